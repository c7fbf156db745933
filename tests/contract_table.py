"""Print the bad-input × method table of the gradient contract (``python tests/contract_table.py``).

Codes: ``R`` raised the expected error with state and every ``.grad`` unchanged; ``S`` skipped the task with
finite ``.grad`` and state; ``P`` propagated (NaN reaches ``.grad``, as ``on_nonfinite="propagate"``
documents); ``-`` does not apply at that level; ``!`` anything else (a silent no-op, a wrong error, a change
before a raise, a silent NaN).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gradient_contract_cases import (  # noqa: E402
    BAD_INPUTS,
    CONFIGS,
    all_finite,
    attempt,
    backward,
    forward,
    poison_gradient,
    warmed_up,
)


def bad_input_code(bad, name, level) -> str:
    if level not in bad.levels:
        return "-"
    outcome, unchanged = attempt(bad, name, level)
    return "R" if outcome == f"raise {bad.error.__name__}" and unchanged else "!"


def policy_code(policy: str, poison: str, name: str, level: str) -> str:
    model, balancer = warmed_up(name, level, on_nonfinite=policy)
    z, losses = forward(model, 99)
    if poison == "gradient":
        poison_gradient(losses, z)
    else:
        losses["b"] = losses["b"] * float("nan")
    try:
        record = backward(balancer, model, losses, z)
    except Exception:  # noqa: BLE001
        return "!"
    if policy == "skip":
        return "S" if "b" in record.skipped and all_finite(balancer, model) else "!"
    return "P" if not all_finite(balancer, model) else "!"


def main() -> None:
    warnings.simplefilter("ignore")
    kinds = [b.kind for b in BAD_INPUTS] + ["NaN loss/skip", "NaN grad/skip", "NaN loss/propagate",
                                            "NaN grad/propagate"]
    short = [re.sub(r"[^A-Za-z/]+", " ", k) for k in kinds]
    print("| method | " + " | ".join(short) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    silent = 0
    for name, level in CONFIGS:
        codes = [bad_input_code(b, name, level) for b in BAD_INPUTS]
        codes += [policy_code("skip", "loss", name, level), policy_code("skip", "gradient", name, level),
                  policy_code("propagate", "loss", name, level),
                  policy_code("propagate", "gradient", name, level)]
        silent += codes.count("!")
        print(f"| {name} ({level[:4]}) | " + " | ".join(codes) + " |")
    print(f"\n{len(CONFIGS)} method configurations x {len(kinds)} cases; '!' (silent or wrong): {silent}")


if __name__ == "__main__":
    main()
