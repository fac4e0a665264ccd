"""Figures, tables and report.md from the results store: capacity (paper Fig. 2), learning curves (Fig. 3),
normalisation, stability, contrast and speed.

Figure functions are pure (DataFrames in, a ``matplotlib.figure.Figure`` out, never pyplot, so nothing is
shown or kept alive); ``write_report`` does the I/O. A diverged or failed run is an x at the top of its axis.
The package imports no torch (nor does ``retrieval-bench report``; a test checks ``sys.modules``): a report
loads fast on any machine that holds a store. Memory names are read with ``retrieval_bench.spec``.

Modules: ``frames`` (the store as DataFrames, and what the others share), ``figures``, ``tables``, ``write``
(report.md and the files), ``colors`` (a stable colour per memory).
"""

from ..spec import RULE_DEFAULTS
from .colors import memory_color
from .figures import (
    DOUBLE,
    SINGLE,
    bench_figure,
    capacity_figure,
    contrast_figure,
    learning_curves_figure,
    normalisation_figure,
    stability_figure,
)
from .frames import LOG_FLOOR, SCHEMA, NoDataError, load_frames
from .tables import accuracy_table, capacity_table, final_loss_table, margin_table, solved_table
from .write import write_report

__all__ = ["NoDataError", "load_frames", "capacity_figure", "learning_curves_figure", "normalisation_figure",
           "stability_figure", "contrast_figure", "bench_figure", "capacity_table", "final_loss_table",
           "accuracy_table", "margin_table", "solved_table", "write_report", "memory_color", "SINGLE", "DOUBLE",
           "LOG_FLOOR", "SCHEMA", "RULE_DEFAULTS"]
