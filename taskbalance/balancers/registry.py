"""The method registry: :func:`register`, :func:`available` and :func:`make`.

Each method file registers its class with :func:`register`; the registry imports every module under
``taskbalance.balancers.losses`` and ``taskbalance.balancers.gradients`` the first time it is asked, so a new
method is one new file and nothing else.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from .base import Balancer

__all__ = ["MethodInfo", "register", "available", "make"]

Family = Literal["loss", "gradient", "schedule"]
FeatureLevel = Literal["no", "yes", "only"]
_FAMILY_PACKAGES = ("taskbalance.balancers.losses", "taskbalance.balancers.gradients")


@dataclass(frozen=True)
class MethodInfo:
    """What a registered method is and what it needs.

    Attributes:
        name: registry name, as given to :func:`make`.
        family: ``"loss"`` (needs loss values only), ``"gradient"`` (needs per-task gradients) or
            ``"schedule"`` (shapes the whole training schedule).
        needs: what the engine computes for it: ``{"losses"}`` or ``{"losses", "jacobian"}``.
        feature_level: whether the method is defined on gradients w.r.t. shared *features*
            (``"yes"``: either level; ``"only"``: features only; ``"no"``: parameters only).
        paper: reference (authors, venue, year, arXiv id).
        description: one line.
        cls: the implementing class.
        extension: what of the method is **our extension** rather than the source's (``""``: none), shown
            in ``taskbalance methods`` and marked in the README's methods table.
    """

    name: str
    family: Family
    needs: frozenset[str]
    feature_level: FeatureLevel
    paper: str
    description: str
    cls: type
    extension: str = ""

    @property
    def cost(self) -> str:
        """Cost class: how many backward passes a step needs compared with a summed loss, and how many
        batches beyond the step's own it reads (the extra-batch protocol, e.g. ``"K batched VJPs + 2 extra
        training batches"``)."""
        if self.family == "loss":
            base = "1 backward"
        elif self.feature_level == "only":
            base = "K feature VJPs + 1 backward"
        else:
            base = "K batched VJPs"
        extra = int(getattr(self.cls, "extra_batches", 0))
        if extra:
            source = getattr(self.cls, "extra_batch_source", None) or "extra"
            base += f" + {extra} extra {source} batch{'es' if extra != 1 else ''}"
        return base


_REGISTRY: dict[str, MethodInfo] = {}
_loaded = False
B = TypeVar("B", bound=type)


def register(
    name: str,
    *,
    family: Family,
    paper: str,
    description: str,
    feature_level: FeatureLevel = "no",
    extension: str = "",
) -> Callable[[B], B]:
    """Class decorator adding a balancer to the registry under ``name``."""

    def decorate(cls: B) -> B:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise RuntimeError(f"method name {name!r} registered twice")
        needs = frozenset({"losses"} if family == "loss" else {"losses", "jacobian"})
        info = MethodInfo(name, family, needs, feature_level, paper, description, cls, extension)
        _REGISTRY[name] = info
        cls.info = info  # type: ignore[attr-defined]
        return cls

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for package_name in _FAMILY_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package_name}.{module.name}")
    _loaded = True


def available() -> list[MethodInfo]:
    """Every registered method, sorted by family then name."""
    _load_all()
    order = {"loss": 0, "gradient": 1, "schedule": 2}
    return sorted(_REGISTRY.values(), key=lambda m: (order[m.family], m.name))


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``; ``ValueError`` listing close matches if unknown."""
    _load_all()
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown balancing method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[key]


def make(name: str, tasks: Sequence[str], **hyperparameters: Any) -> Balancer:
    """Build the balancer registered as ``name`` for the named ``tasks``.

    Args:
        name: a registry name (see :func:`available`), case-insensitive.
        tasks: task names, in a fixed order; every later ``losses`` mapping is keyed by them.
        **hyperparameters: the method's keyword arguments (see its class docstring). Gradient methods also
            take ``engine="auto" | "gramian" | "jacobian"`` (see :class:`~taskbalance.GradientBalancer`).

    Raises:
        ValueError: unknown method name (close matches are listed) or invalid task list.
        TypeError: a hyperparameter the method does not take (the valid ones are listed).
    """
    info = method_info(name)
    engine = hyperparameters.pop("engine", None) if info.family == "gradient" else None
    parameters = inspect.signature(info.cls).parameters
    valid = [p for p in parameters if p not in ("self", "tasks")]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in hyperparameters if k not in valid]
    if unknown and not accepts_any:
        raise TypeError(
            f"{info.name} got unknown hyperparameter(s) {', '.join(repr(u) for u in unknown)}; "
            f"valid: {', '.join(valid) or '(none)'}"
        )
    balancer: Balancer = info.cls(tasks, **hyperparameters)
    if engine is not None:  # gradient methods: "auto" | "gramian" | "jacobian" (GradientBalancer.set_engine)
        from .base import GradientBalancer

        if isinstance(balancer, GradientBalancer):
            balancer.set_engine(engine)
    return balancer
