"""Diagnostics: negative transfer against single-task baselines (Δm, per-task verdicts), gradient conflict
(:class:`ConflictMonitor`), lookahead task affinity and groupings (:class:`TaskAffinity`), and the histories a
run persists (:class:`ConflictHistory`, :class:`WeightTrajectory`).

The ``diagnose`` command lives in :mod:`taskbalance.diagnostics.cli_diagnose` (it needs typer) and is not
imported here.
"""

from .affinity import (
    AffinityResult,
    Grouping,
    TaskAffinity,
    best_partition,
    compute_task_affinity,
    grouping_score,
    plot_affinity,
    suggest_groupings,
)
from .conflict import (
    ConflictHistory,
    ConflictMonitor,
    ConflictStats,
    ConflictSummary,
    WeightTrajectory,
    conflict_rate,
    conflict_statistics,
    cosine_similarity_matrix,
    gradient_magnitude_similarity,
)
from .stats import adjust_p_values, paired_t_test, seeds_needed, t_quantile
from .transfer import (
    DELTA_M_CONVENTION,
    StudyComparison,
    TaskTransfer,
    TransferSummary,
    Verdict,
    at_trivial_level,
    compare_study,
    compare_to_baselines,
    delta_m,
    relative_change,
    student_t_sf,
    verdict,
    welch_t_test,
)

__all__ = [
    "AffinityResult",
    "ConflictHistory",
    "ConflictMonitor",
    "ConflictStats",
    "ConflictSummary",
    "Grouping",
    "TaskAffinity",
    "WeightTrajectory",
    "best_partition",
    "compute_task_affinity",
    "conflict_rate",
    "conflict_statistics",
    "cosine_similarity_matrix",
    "gradient_magnitude_similarity",
    "grouping_score",
    "plot_affinity",
    "suggest_groupings",
    "DELTA_M_CONVENTION",
    "TaskTransfer",
    "TransferSummary",
    "Verdict",
    "compare_to_baselines",
    "compare_study",
    "StudyComparison",
    "at_trivial_level",
    "adjust_p_values",
    "paired_t_test",
    "seeds_needed",
    "t_quantile",
    "delta_m",
    "relative_change",
    "student_t_sf",
    "verdict",
    "welch_t_test",
]
