"""The comparison's cells: one (method, visual token mode, learning rate, seed) each, trained with pipeline/train.py
and evaluated with pipeline.evaluate in subprocesses, recorded in OUTPUT/cells/<name>/cell.json with the sha256 of
the base and the sample data they were made from, so a later invocation reuses exactly the cells it may.
OUTPUT/invocations.jsonl logs which invocation ran which cells, with its wall time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from pipeline.core.methods import get as get_method
from pipeline.defaults import REPO
from pipeline.demo.sample_data import HELDOUT_NAMES, VAL_TASK
from pipeline.files import atomic_write_json

log = logging.getLogger("m2pt.compare")

LR_GRID = {"m2pt": (1e-3, 3e-3, 7e-3), "visual": (1e-3, 3e-3, 7e-3), "text": (1e-3, 3e-3, 7e-3),
           "projector": (1e-3, 3e-3, 7e-3), "lora": (1e-4, 3e-4, 1e-3), "full": (1e-5, 3e-5, 1e-4)}
# Methods with visual prompts also choose, on validation like the lr, what the LLM is handed: "official" (the reference
# code and the trainer's default: N + pv visual tokens, the feature layer's prompt slots and CLS beside the N patches)
# or "clean" (standard LLaVA: the N patch tokens). Which one a user should run is the comparison's question, not a
# default's (docs/base_experiments.md §7).
DEFAULT_TOKEN_MODE = "official"
HELDOUT = tuple(HELDOUT_NAMES)  # the embedded set's held-out task types
VAL = VAL_TASK
COLUMN_NAMES = {"sample_mnist": "digits", "sample_pope": "existence", "sample_bigger": "bigger's colour",
                "sample_shape": "shape of colour", VAL: "training tasks (val)"}


RERUN_HINT = "delete {cell}/cell.json and run the comparison again to re-run that cell"
RECORD_FIELDS = {"task", "qid", "target", "prediction", "correct"}


class CellError(RuntimeError):
    """A cell that could not run (its log tail included), or a finished cell of other settings."""


def _tasks(data: Path) -> str:
    return ",".join(HELDOUT) + f",{VAL}={data / 'val.json'}"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def build_shards(data: Path, out: Path, lengths) -> Path:
    """One shard set of `data`/train.json for every cell, built here before any cell starts (parallel cells must
    not race to build the same folder). Lengths are measured with the largest visual-prompt length any cell uses:
    the trainer accepts shards measured for more visual tokens than a run needs, never fewer."""
    from pipeline.demo.sample_data import build_sample_shards

    return build_sample_shards(data, out / "shards", visual_prompt_length=max([10, *lengths]))


def base_sha256() -> str:
    """The shipped base every cell starts from (the trainer and evaluator refuse a file that does not match it)."""
    from pipeline.demo.tiny import tiny_record

    return tiny_record()["sha256"]


def data_sha256(data: Path) -> str:
    """sha256 over every file of the sample set (relative path and bytes): a cell is reused only on the data it was
    trained and scored on. Why every file: the records' JSON can stay the same while a renderer change redraws the
    images (15 MB for the embedded set: a fraction of a second)."""
    h = hashlib.sha256()
    for f in sorted(p for p in data.rglob("*") if p.is_file()):
        h.update(f.relative_to(data).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def run_cell(folder: Path, train_flags: list[str], data: Path, made_from: dict) -> dict:
    """Train (`train_flags` None: nothing, the un-tuned base) and evaluate one cell; record it in cell.json with
    `made_from` (the base's and the data's sha256)."""
    t0 = time.time()
    if train_flags is not None:
        cmd = [sys.executable, str(REPO / "pipeline" / "train.py"), *train_flags, "--output_dir", str(folder / "run"),
               "--no_final_eval", "--report_to", "none", "--num_threads", "1", "--save_steps", "0",
               "--resume", "auto"]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise CellError(f"{folder}: training failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        check_finished(folder / "run")
    adapter = ["--adapter", str(folder / "run" / "adapter")] if train_flags is not None else ["--with_base"]
    cmd = [sys.executable, "-m", "pipeline.evaluate", *adapter, "--tasks", _tasks(data), "--data_root", str(data),
           "--output_dir", str(folder / "eval"), "--batch_size", "32"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise CellError(f"{folder}: evaluation failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    res = json.loads((folder / "eval" / "results.json").read_text())
    row = next(v for k, v in res.items() if k != "majority answer")
    rec = {"scores": {t: m["score"] for t, m in row["tasks"].items()},
           "majority": {t: m["score"] for t, m in res["majority answer"]["tasks"].items()},
           "trainable": _trainable(folder), "seconds": round(time.time() - t0, 1), "flags": train_flags, **made_from,
           "predictions": predictions_record(predictions_file(folder))}
    atomic_write_json(folder / "cell.json", rec)
    return rec


def predictions_file(cell: Path) -> Path:
    found = list((cell / "eval").glob("*/predictions.jsonl"))
    if len(found) != 1:
        raise CellError(f"{cell}: finished, but {len(found)} predictions.jsonl under its eval/ (the verdict needs "
                        f"exactly one); {RERUN_HINT.format(cell=cell)}")
    return found[0]


def predictions_record(f: Path) -> dict:
    """What cell.json records of a cell's predictions file, so a later report can tell it is the one scored."""
    data = f.read_bytes()  # read once: hashed and counted
    return {"sha256": hashlib.sha256(data).hexdigest(), "count": len(data.decode().splitlines())}


def check_predictions(cell: Path, recorded: dict | None) -> None:
    """The predictions file must be the one cell.json's scores were computed from (a cut, emptied or edited file
    would change the verdict's per-question differences while the table kept the old scores)."""
    if recorded is None:
        return  # a cell recorded before predictions were fingerprinted: read_records still checks every line
    f = predictions_file(cell)
    got = predictions_record(f)
    if got != recorded:
        raise CellError(f"{f}: {got['count']} line(s) with sha256 {got['sha256'][:12]}…, but the cell recorded "
                        f"{recorded['count']} with {recorded['sha256'][:12]}… (cut, emptied or edited since it was "
                        f"scored); {RERUN_HINT.format(cell=cell)}")


def read_records(cell: Path) -> list[dict]:
    """The cell's prediction records; a line that is not a complete record is an error naming file:line."""
    f = predictions_file(cell)
    out = []
    for k, line in enumerate(f.read_text().splitlines(), start=1):
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict) or not RECORD_FIELDS <= set(r):
            raise CellError(f"{f}:{k}: not a complete prediction record (cut or edited?); "
                            f"{RERUN_HINT.format(cell=cell)}")
        out.append(r)
    if not out:
        raise CellError(f"{f}: empty; {RERUN_HINT.format(cell=cell)}")
    return out


def check_finished(run: Path) -> None:
    """A run stopped by a signal (SIGTERM, SIGUSR1 to the trainer alone) also exits 0, with a checkpoint: its
    half-trained adapter must not be scored as the cell's result."""
    try:
        state = json.loads((run / "run_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CellError(f"{run}: training exited 0 but left no readable run_state.json ({e})") from None
    if state.get("state") != "finished":
        raise CellError(f"{run}: training exited 0 but is {state.get('state')!r} at step {state.get('step')} of "
                        f"{state.get('total_steps')} (stopped by a signal?); run the comparison again to resume it")


def _trainable(folder: Path):
    cfg = folder / "run" / "config.json"
    if not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    return {"parameters": c["trainable"], "share": c["trainable"] / c["total_parameters"]}


def _common(args) -> list[str]:
    # --text_prompts slots: the recorded comparison (docs/results.md) was trained with the slot form. The prefix form
    # is the same function, but its float rounding differs, and over a run that moves the scores (docs/results.md):
    # a re-run or a resumed comparison computes what was recorded only in the form it was recorded in.
    return ["--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
            "--train_shards", str(args.output / "shards"), "--text_prompts", "slots"]


def _lrs(args, method: str) -> tuple:
    return args.lrs.get(method) or args.lrs.get("*") or LR_GRID[method]


def _seeds(args) -> range:
    return range(args.first_seed, args.first_seed + args.seeds)


def parse_lrs(text: str, methods) -> dict[str, tuple[float, ...]]:
    """--lrs: {method or "*" (every method): learning rates}. "1e-3,3e-3" gives every method those; "m2pt=1e-3,
    lora=1e-3" gives each named method its own (repeat a name for a grid: "m2pt=1e-3,m2pt=3e-3"). Raises ValueError
    naming the bad entry."""
    out: dict[str, list[float]] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        method, _, value = item.rpartition("=")
        if method and method not in methods:
            raise ValueError(f"{item!r}: unknown method {method!r} (one of {', '.join(methods)})")
        try:
            lr = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a learning rate") from None
        if not lr > 0:
            raise ValueError(f"{item!r}: a learning rate must be > 0")
        out.setdefault(method or "*", []).append(lr)
    if "*" in out and len(out) > 1:
        raise ValueError("give either learning rates for every method or METHOD=LR entries, not both")
    return {k: tuple(v) for k, v in out.items()}


def _settings(args, method: str) -> list[tuple[str | None, float]]:
    """(visual token mode, lr) pairs the method's lr is chosen among (mode None: the method has no visual prompts)."""
    modes = args.visual_token_modes if get_method(method).visual_prompts else [None]
    return [(mode, lr) for mode in modes for lr in _lrs(args, method)]


# The trainer's default mode adds neither a folder to the cell's name nor a flag: its cells are named as runs of the
# trainer's defaults are.
def _mode_folder(mode: str | None) -> str:
    return "" if mode in (None, DEFAULT_TOKEN_MODE) else f"{mode}/"


def _mode_flags(mode: str | None) -> list[str]:
    return [] if mode in (None, DEFAULT_TOKEN_MODE) else ["--visual_token_mode", mode]


def cell_name(method: str, mode: str | None, lr: float, seed: int) -> str:
    return f"{method}/{_mode_folder(mode)}lr{lr:g}/seed{seed}"


def setting_label(mode: str | None, lr: float) -> str:
    return f"{lr:g}" + (f" ({mode})" if mode else "")


def plan_cells(args) -> dict:
    """{cell name: train flags (None: the un-tuned base)} for the method grid."""
    cells = {"base": None}
    common = _common(args)
    for m in args.methods:
        for mode, lr in _settings(args, m):
            for s in _seeds(args):
                cells[cell_name(m, mode, lr, s)] = ["--method", m, "--learning_rate", f"{lr:g}", "--seed", str(s),
                                                    *common, *_mode_flags(mode)]
    return cells


def _flags_for_reuse(flags: list[str] | None) -> list[str] | None:
    """A cell's train flags less where its output folder lies: --train_shards is always OUTPUT/shards, built from --data
    (whose sha256 the cell records), so a moved or copied output folder keeps its cells."""
    if flags is None or "--train_shards" not in flags:
        return flags
    i = flags.index("--train_shards") + 1
    return [*flags[:i], "OUTPUT/shards", *flags[i + 1:]]


def cell_origin(data: Path) -> dict:
    """What every cell of this invocation starts from: the shipped base's and the sample data's sha256 (computed once
    per invocation: hashing the data reads every file)."""
    return {"base_sha256": base_sha256(), "data_sha256": data_sha256(data)}


def check_reusable(folder: Path, rec: dict, flags, data: Path, made_from: dict) -> dict:
    """A finished cell's record, if it may stand for this comparison's cell: the same flags, started from the same
    base and trained and scored on the same sample data. Anything else is an error naming the difference."""
    hint = "use another --output (or delete that folder)"
    if _flags_for_reuse(rec.get("flags")) != _flags_for_reuse(flags):  # never reuse a result of other settings
        raise CellError(f"{folder}: finished with {rec.get('flags')}, but this comparison asks for {flags}; {hint}")
    if rec.get("base_sha256") != made_from["base_sha256"]:  # nor one trained from another base
        raise CellError(f"{folder}: finished on the base with sha256 {rec.get('base_sha256')}, but the shipped base "
                        f"is {made_from['base_sha256']}; {hint}")
    if "data_sha256" not in rec:
        raise CellError(f"{folder}: recorded without the sample data's sha256 (a cell of an older version), so it "
                        f"cannot be shown to match {data}; {hint}")
    if rec["data_sha256"] != made_from["data_sha256"]:  # nor one of another sample set (a rebuilt one)
        raise CellError(f"{folder}: finished on sample data with sha256 {rec['data_sha256']}, but {data} is "
                        f"{made_from['data_sha256']}; {hint}")
    check_predictions(folder, rec.get("predictions"))
    return rec


def run_cells(cells: dict, out: Path, data: Path, jobs: int, made_from: dict) -> dict:
    from tqdm import tqdm

    results, todo = {}, {}
    for name, flags in cells.items():
        f = out / "cells" / name
        if (f / "cell.json").is_file():
            results[name] = check_reusable(f, json.loads((f / "cell.json").read_text()), flags, data, made_from)
        else:
            todo[name] = flags
    log.info("%d cell(s) already finished, %d to run with %d job(s)", len(results), len(todo), jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(run_cell, out / "cells" / n, fl, data, made_from): n for n, fl in todo.items()}
        for fut in tqdm(as_completed(futs), total=len(futs), desc="cells", unit="cell"):
            results[futs[fut]] = fut.result()
    return results


def finished_cells(out: Path) -> set[str]:
    cells = out / "cells"
    return {f.parent.relative_to(cells).as_posix() for f in cells.rglob("cell.json")}


def read_invocations(out: Path) -> list[dict]:
    """OUTPUT/invocations.jsonl: every invocation that ran cells in this folder, with the cells it ran. Why a log of its
    own: results.json is the latest report's, and a report of a subset (--methods m2pt) rewrites it; the wall times of
    the runs that made the cells must survive that."""
    log_file = out / "invocations.jsonl"
    if not log_file.is_file():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]


def log_invocation(out: Path, entry: dict) -> None:
    with (out / "invocations.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def report_invocations(log: list[dict], cells: set[str]) -> list[dict]:
    """The invocations that ran the cells of this report, each with how many of them it ran (a cell re-run later
    counts for the later one). Cells no logged invocation ran (a run killed before it could log) count as one entry
    of unknown wall time."""
    last = {}
    for i, e in enumerate(log):
        last.update({c: i for c in e["cells"]})
    counts = [sum(1 for c in cells if last.get(c) == i) for i in range(len(log))]
    unlogged = [c for c in cells if c not in last]
    out = [{"cells_run": len(unlogged), "wall_seconds": None, "jobs": None}] if unlogged else []
    return out + [{k: e[k] for k in ("wall_seconds", "jobs", "command") if k in e} | {"cells_run": n}
                  for e, n in zip(log, counts) if n]
