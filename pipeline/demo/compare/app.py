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

The command line (`python -m pipeline.compare`, or pipeline.demo.compare): this docstring is its --help.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.defaults import REPO
from pipeline.demo.compare import cells
from pipeline.demo.compare.report import markdown, plots
from pipeline.demo.compare.stats import ablation, summarise
from pipeline.files import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="m2pt,visual,text,projector,lora,full",
                    help="comma-separated --method values to compare")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per (method, learning rate)")
    ap.add_argument("--first_seed", type=int, default=0,
                    help="the seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1 (e.g. --first_seed 6 --seeds 6 repeats "
                         "chosen settings on seeds no earlier choice has seen)")
    ap.add_argument("--lrs", default="",
                    help="comma-separated learning rates for every method, or METHOD=LR entries, each method its own "
                         "(e.g. m2pt=1e-3,lora=1e-3: to re-run chosen settings; a method not named keeps its grid). "
                         "Default: each method's grid: "
                         "prompts and projector 1e-3,3e-3,7e-3; lora 1e-4,3e-4,1e-3; full 1e-5,3e-5,1e-4")
    ap.add_argument("--max_steps", type=int, default=1200,
                    help="optimizer steps per run (1200 x batch 4 is two epochs of the sample set's 2,440 training "
                         "records; why not fewer: docs/base_experiments.md)")
    ap.add_argument("--batch_size", type=int, default=4, help="per-device batch size of every run")
    ap.add_argument("--ablation_lengths", default="0,5,10,20",
                    help="prompt lengths of the pv x pt ablation (comma-separated; empty: no ablation)")
    ap.add_argument("--visual_token_modes", default="official,clean",
                    help="visual token modes the methods with visual prompts (m2pt, visual) choose among on "
                         "validation, like the lr (official: N + pv visual tokens, the feature layer's prompt slots "
                         "and CLS beside the N patches: the reference code and the trainer's default; clean: the N "
                         "patch tokens)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (one thread each)")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "sample", help="the embedded sample set")
    ap.add_argument("--output", type=Path, default=REPO / "out" / "compare",
                    help="cells (reused by any later run with the same settings), invocations.jsonl (which run made "
                         "which cells, with its wall time) and results.json (the latest report's numbers)")
    ap.add_argument("--report", type=Path, default=REPO / "docs" / "results.md", help="the markdown report")
    return ap


def _check_lists(args) -> str | None:
    from pipeline.core.m2pt import VISUAL_TOKEN_MODES
    from pipeline.core.methods import METHODS

    args.methods = [m for m in args.methods.split(",") if m]
    try:
        args.lrs = cells.parse_lrs(args.lrs, METHODS)
    except ValueError as e:
        return f"--lrs {e}"
    args.visual_token_modes = [x for x in args.visual_token_modes.split(",") if x]
    if not args.visual_token_modes or set(args.visual_token_modes) - set(VISUAL_TOKEN_MODES):
        return (f"--visual_token_modes {','.join(args.visual_token_modes) or '(empty)'}: give one or more of "
                f"{', '.join(VISUAL_TOKEN_MODES)}")
    bad = [m for m in args.methods if m not in METHODS]
    return f"unknown method(s) {bad} (one of {METHODS})" if bad else None


def check_args(args) -> str | None:
    """Parse the list flags in place; a message for the first unusable value, else None."""
    problem = _check_lists(args)
    if problem:
        return problem
    if args.seeds < 1 or args.max_steps < 1 or args.jobs < 1 or args.first_seed < 0:
        return "--seeds, --max_steps and --jobs must be >= 1, --first_seed >= 0"
    args.ablation_lengths = [int(x) for x in args.ablation_lengths.split(",") if x]
    return None


def run_all(args, command: str) -> tuple[dict, dict | None, dict]:
    """Build the shards, run (or reuse) every cell, summarise; log the cells this invocation ran, also when it
    fails or is interrupted (a re-run reuses them). Returns (summary, ablation, the grid's cells)."""
    t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    finished_before = cells.finished_cells(args.output)
    cells.build_shards(args.data, args.output, args.ablation_lengths)
    try:
        origin = cells.cell_origin(args.data)
        res = cells.run_cells(cells.plan_cells(args), args.output, args.data, args.jobs, origin)
        summary = summarise(args, res)
        summary["cell_seconds"] = round(sum(c["seconds"] for c in res.values()))
        abl = ablation(args, summary, res, origin) if args.ablation_lengths else None
    finally:
        ran = cells.finished_cells(args.output) - finished_before
        if ran:
            cells.log_invocation(args.output, {"started": started, "command": command, "jobs": args.jobs,
                                         "wall_seconds": round(time.time() - t0), "cells": sorted(ran)})
    summary["invocations"] = cells.report_invocations(cells.read_invocations(args.output),
                                                set(res) | set((abl or {}).get("cells", {}).values()))
    return summary, abl, res


def write_report(args, summary: dict, abl: dict | None, command: str) -> None:
    """The markdown report, its JSON beside it and OUTPUT/results.json; the PNGs in a folder named like the report
    (docs/results.md -> docs/results/), so a second --report never overwrites the first one's images."""
    images = plots(summary, abl, args.ablation_lengths, args.report.with_suffix(""))
    record = {"summary": summary, "ablation": abl, "images": [os.path.relpath(i, args.report.parent) for i in images],
              "command": command}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    for f in (args.output / "results.json", args.report.with_suffix(".json")):  # the report's is committed beside it
        atomic_write_json(f, record)
    args.report.write_text(markdown(summary, abl, images, args.report, command))


def main(argv=None) -> int:
    from pipeline.demo.sample_data import ensure_sample

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ensure_sample(args.data)
    command = ("python -m pipeline.compare " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0 = time.time()
    args.output = args.output.resolve()
    try:
        summary, abl, _ = run_all(args, command)
    except cells.CellError as e:
        print(f"error: {e}\n(finished cells are kept: run the same command again to resume)", file=sys.stderr)
        return 1
    write_report(args, summary, abl, command)
    print(f"wrote {args.report}, {args.report.with_suffix('.json')} and {args.output / 'results.json'} "
          f"({round(time.time() - t0)} s)")
    return 0
