"""Study reports: ``DIR/report.md``, a self-contained ``DIR/report.html`` and ``DIR/plots/*.png``.

::

    from taskbalance.report import write_report
    files = write_report("runs/quick")        # after `taskbalance bench --suite quick --out runs/quick`

Also ``taskbalance report DIR`` on the command line, and written automatically at the end of ``bench``.
Needs the ``report`` extra (matplotlib). See ``docs/report.md``.
"""

from .data import Section, confidence_interval, load_sections, relative_change_matrix, t_quantile
from .own_loop import StudyLog
from .render import PLOTS_DIR, REPORT_HTML, REPORT_MD, ReportFiles, write_report

__all__ = [
    "PLOTS_DIR",
    "REPORT_HTML",
    "REPORT_MD",
    "ReportFiles",
    "Section",
    "StudyLog",
    "confidence_interval",
    "load_sections",
    "relative_change_matrix",
    "t_quantile",
    "write_report",
]
