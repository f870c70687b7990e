"""Compare training methods on the embedded sample set: the cells (cells.py), their statistics (stats.py) and the
report (report.py). The command line and what it does: app.py (`python -m pipeline.compare`)."""

from pipeline.demo.compare.cells import (
    COLUMN_NAMES,
    HELDOUT,
    VAL,
    CellError,
    check_finished,
    finished_cells,
    log_invocation,
    parse_lrs,
    plan_cells,
    predictions_file,
    read_invocations,
    report_invocations,
    run_cells,
)
from pipeline.demo.compare.report import markdown, verdict
from pipeline.demo.compare.stats import (
    _difference,
    _records,
    ablation,
    answer_sets,
    answer_sources,
    summarise,
)

__all__ = ["_difference", "_records", "ablation", "answer_sets", "answer_sources", "CellError", "check_finished",
           "COLUMN_NAMES", "finished_cells", "HELDOUT", "log_invocation", "markdown", "parse_lrs",
           "plan_cells", "predictions_file", "read_invocations", "report_invocations", "run_cells", "summarise",
           "VAL", "verdict"]

