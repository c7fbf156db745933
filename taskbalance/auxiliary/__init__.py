"""Auxiliary-task learning: task roles and schedule-level strategies (ForkMerge).

* :mod:`.roles` — ``targets=[...]`` / ``main=...`` for methods that treat target and auxiliary tasks
  differently (GCS, OL-AUX and HydaLearn are per-step balancers in ``taskbalance.balancers.gradients``).
"""

from .roles import Roles, resolve_roles, targets_from_specs

__all__ = ["Roles", "resolve_roles", "targets_from_specs"]
