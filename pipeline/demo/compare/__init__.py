"""Compare training methods on the embedded sample set: one command, every method x learning rate x seed.

    python -m pipeline.compare [--methods m2pt,visual,text,projector,lora,full] [--seeds 3] [--max_steps 1200]
                               [--output out/compare] [--report docs/results.md]

For every cell (method, learning rate, seed) it trains with `pipeline/train.py` (one process, one thread), then
evaluates the artifact on the validation records of the *training* task types (val.json) and zero-shot on the
held-out task types. Per method the learning rate with the best mean validation accuracy over seeds is chosen -
never on held-out tasks; for the methods with visual prompts the visual token mode too (--visual_token_modes) - and
the held-out scores of that setting are reported as mean ± std over seeds, beside the majority answer and the
un-tuned base. The report's verdict counts a difference (a method against the majority answer, against the un-tuned
base, M²PT against each method) only beyond two standard errors that hold both the spread over seeds and the draw of
the questions (paired, question by question). The prompt-length ablation (pv x pt over --ablation_lengths) trains
M²PT at its chosen setting, first seed. Outputs: the markdown report (--report) with a bar chart of the methods and
a heat map of the ablation (PNG, in a folder named like the report beside it: docs/results/ for docs/results.md),
the same numbers as JSON beside it, OUTPUT/results.json (the latest report's) and OUTPUT/invocations.jsonl (which
invocation ran which cells, and its wall time: the report's wall times come from it).

Cells run in parallel (as many as there are cores, one thread each) and each finished cell is recorded in its
folder (cell.json), so an interrupted comparison resumes where it stopped and a re-run recomputes nothing.
"""

from pipeline.demo.compare.cells import (  # noqa: E402  (the docstring above is the app's --help)
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
from pipeline.demo.compare.report import markdown, verdict  # noqa: E402
from pipeline.demo.compare.stats import (  # noqa: E402
    _difference,
    _records,
    ablation,
    answer_sets,
    answer_sources,
    summarise,
)

__all__ = ["_difference", "_records", "ablation", "answer_sets", "answer_sources", "CellError", "check_finished",
           "COLUMN_NAMES", "finished_cells", "HELDOUT", "log_invocation", "main", "markdown", "parse_lrs",
           "plan_cells", "predictions_file", "read_invocations", "report_invocations", "run_cells", "summarise",
           "VAL", "verdict"]


def main(argv=None) -> int:
    from pipeline.demo.compare.app import main as app_main

    return app_main(argv)
