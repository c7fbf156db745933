"""Auxiliary-task learning: task roles and schedule-level strategies (ForkMerge).

* :mod:`.roles` — ``targets=[...]`` / ``main=...`` for methods that treat target and auxiliary tasks
  differently (GCS, OL-AUX and HydaLearn are per-step balancers in ``taskbalance.balancers.gradients``).
* :class:`ForkMerge` — fork into branches with different task weights, merge them on the target's validation
  score (:mod:`.forkmerge`); its parts: :func:`merge_state_dicts` and :func:`greedy_merge_search`
  (:mod:`.merge`), :func:`rank_auxiliaries` (:mod:`.pruning`), executors (:mod:`.executor`).

See ``docs/auxiliary.md``.
"""

from .executor import Executor, ProcessExecutor, SerialExecutor
from .forkmerge import ForkMerge, ForkMergeResult, task_of_key_by_name
from .merge import DEFAULT_ALPHAS, MergeSearch, greedy_merge_search, merge_state_dicts
from .pruning import rank_auxiliaries
from .roles import Roles, resolve_roles, targets_from_specs

__all__ = [
    "DEFAULT_ALPHAS",
    "Executor",
    "ForkMerge",
    "ForkMergeResult",
    "MergeSearch",
    "ProcessExecutor",
    "Roles",
    "SerialExecutor",
    "greedy_merge_search",
    "merge_state_dicts",
    "rank_auxiliaries",
    "resolve_roles",
    "targets_from_specs",
    "task_of_key_by_name",
]
