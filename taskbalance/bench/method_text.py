"""The ``--methods`` mini-language: method variants, labels and grids, parsed by hand (never ``eval``).

Grammar (whitespace ignored around tokens)::

    methods  := entry ("," entry)*
    entry    := [label "="] name ["(" [option ("," option)*] ")"]
    option   := key "=" value
    value    := number | true | false | "quoted string" | 'quoted string' | bare-word | "[" value, ... "]"

* ``ew,bmtl(temperature=5),imtl-g(gradients=features),forkmerge`` — four variants.
* ``hot=bmtl(temperature=5)`` — the label ``hot`` (default label: the text of the variant, e.g.
  ``bmtl(temperature=5)``; a method without options is labelled by its name).
* ``bmtl(temperature=[1,5,25])`` — a **grid**: a list value expands to one variant per element (several
  lists: their Cartesian product), labelled ``bmtl(temperature=1)``, …; a labelled grid gets
  ``label(temperature=1)``, …. A hyperparameter whose value is itself a list is written as a one-element grid:
  ``forkmerge(topk=[[0,1]])`` (our choice: on the command line lists mean grids).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

__all__ = ["parse_method_text", "MethodTextError", "expand_grid", "variant_label", "format_value"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class MethodTextError(ValueError):
    """A malformed ``--methods`` text; the message points at the position."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, expected: str) -> MethodTextError:
        near = self.text[self.pos : self.pos + 12] or "end of text"
        return MethodTextError(
            f"--methods {self.text!r}: expected {expected} at position {self.pos} ({near!r})"
        )

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def name(self, what: str) -> str:
        self.skip()
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.error(what)
        self.pos = match.end()
        return match.group()

    def value(self) -> Any:
        char = self.peek()
        if char == "[":
            self.pos += 1
            items: list[Any] = []
            if self.take("]"):
                raise self.error("a non-empty list")
            while True:
                items.append(self.value())
                if self.take("]"):
                    return items
                if not self.take(","):
                    raise self.error("',' or ']'")
        if char in ("'", '"'):
            end = self.text.find(char, self.pos + 1)
            if end < 0:
                raise self.error("a closing quote")
            text = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return text
        match = _NUMBER.match(self.text, self.pos)
        if match and not _NAME.match(self.text, match.end()):
            self.pos = match.end()
            number = match.group()
            return float(number) if any(c in number for c in ".eE") else int(number)
        word = self.name("a value (number, true/false, a word, a quoted string or a [list])")
        return {"true": True, "false": False}.get(word.lower(), word)

    def entry(self) -> tuple[str | None, str, dict[str, Any]]:
        first = self.name("a method name")
        label, name = None, first
        if self.take("="):
            label, name = first, self.name("a method name after the label")
        options: dict[str, Any] = {}
        if self.take("("):
            if not self.take(")"):
                while True:
                    key = self.name("a hyperparameter name")
                    if key in options:
                        raise self.error(f"{key!r} given once")
                    if not self.take("="):
                        raise self.error("'='")
                    options[key] = self.value()
                    if self.take(")"):
                        break
                    if not self.take(","):
                        raise self.error("',' or ')'")
        return label, name.lower(), options


def parse_method_text(text: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    """``(label or None, method name, options)`` per entry; grids not expanded yet (:func:`expand_grid`)."""
    parser = _Parser(text)
    entries = []
    while True:
        while parser.take(","):  # empty items are ignored
            pass
        if not parser.peek():
            break
        entries.append(parser.entry())
        if parser.peek() and not parser.take(","):
            raise parser.error("',' between methods")
    if not entries:
        raise MethodTextError(
            "no method given; pass e.g. --methods ew,ema,pcgrad (see `taskbalance methods`)"
        )
    return entries


def expand_grid(options: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(hyperparameters, the grid point)`` per variant: list values are grid axes (see module docstring)."""
    axes = {k: v for k, v in options.items() if isinstance(v, list)}
    if not axes:
        return [(dict(options), {})]
    out = []
    for point in itertools.product(*axes.values()):
        chosen = dict(zip(axes, point, strict=True))
        out.append(({**options, **chosen}, chosen))
    return out


def format_value(value: Any) -> str:
    """A value as the mini-language writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and not _NAME.fullmatch(value):
        return repr(value)
    return str(value)


def variant_label(base: str, options: dict[str, Any]) -> str:
    """``base(k=v,...)``, or ``base`` without options."""
    if not options:
        return base
    return base + "(" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + ")"
