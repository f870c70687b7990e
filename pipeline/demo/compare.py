"""Compare training methods on the embedded sample set: one command, every method x learning rate x seed.

    python -m pipeline.demo.compare [--methods m2pt,visual,text,projector,lora,full] [--seeds 3] [--max_steps 1200]
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

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from pipeline.demo.sample_data import HELDOUT_NAMES, SCORING, VAL_TASK
from pipeline.files import atomic_write_json

from pipeline.defaults import REPO
log = logging.getLogger("m2pt.compare")

LR_GRID = {"m2pt": (1e-3, 3e-3, 7e-3), "visual": (1e-3, 3e-3, 7e-3), "text": (1e-3, 3e-3, 7e-3),
           "projector": (1e-3, 3e-3, 7e-3), "lora": (1e-4, 3e-4, 1e-3), "full": (1e-5, 3e-5, 1e-4)}
# Methods with visual prompts also choose, on validation like the lr, what the LLM is handed: "official" (the reference
# code and the trainer's default: N + pv visual tokens, the feature layer's prompt slots and CLS beside the N patches)
# or "clean" (standard LLaVA: the N patch tokens). Why a grid dimension: on the embedded base the two fit the training
# tasks differently (docs/base_experiments.md §7), and which one a user should run is the comparison's question, not a
# default's.
VISUAL_PROMPT_METHODS = ("m2pt", "visual")
DEFAULT_TOKEN_MODE = "official"
HELDOUT = tuple(HELDOUT_NAMES)  # the embedded set's held-out task types
VAL = VAL_TASK
COLUMN_NAMES = {"sample_mnist": "digits", "sample_pope": "existence", "sample_bigger": "bigger's colour",
                "sample_shape": "shape of colour", VAL: "training tasks (val)"}


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
           "trainable": _trainable(folder), "seconds": round(time.time() - t0, 1), "flags": train_flags, **made_from}
    atomic_write_json(folder / "cell.json", rec)
    return rec


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
    return ["--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
            "--train_shards", str(args.output / "shards")]


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
    modes = args.visual_token_modes if method in VISUAL_PROMPT_METHODS else [None]
    return [(mode, lr) for mode in modes for lr in _lrs(args, method)]


# The trainer's default mode adds neither a folder to the cell's name nor a flag, so cells finished before the mode was
# a grid dimension are the same cells.
def _mode_folder(mode: str | None) -> str:
    return "" if mode in (None, DEFAULT_TOKEN_MODE) else f"{mode}/"


def _mode_flags(mode: str | None) -> list[str]:
    return [] if mode in (None, DEFAULT_TOKEN_MODE) else ["--visual_token_mode", mode]


def cell_name(method: str, mode: str | None, lr: float, seed: int) -> str:
    return f"{method}/{_mode_folder(mode)}lr{lr:g}/seed{seed}"


def setting_label(mode: str | None, lr: float) -> str:
    return f"{lr:g}" + (f" ({mode})" if mode else "")


def plan(args) -> dict:
    """{cell name: train flags (None: the un-tuned base)} for the method grid."""
    cells = {"base": None}
    common = _common(args)
    for m in args.methods:
        for mode, lr in _settings(args, m):
            for s in _seeds(args):
                cells[cell_name(m, mode, lr, s)] = ["--method", m, "--learning_rate", f"{lr:g}", "--seed", str(s),
                                                    *common, *_mode_flags(mode)]
    return cells


def _settings_of(flags: list[str] | None) -> list[str] | None:
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


def run_cells(cells: dict, out: Path, data: Path, jobs: int, made_from: dict) -> dict:
    from tqdm import tqdm

    results, todo, undated = {}, {}, []
    for name, flags in cells.items():
        f = out / "cells" / name
        if (f / "cell.json").is_file():
            results[name] = rec = json.loads((f / "cell.json").read_text())
            if _settings_of(rec.get("flags")) != _settings_of(flags):  # never reuse a result of other settings
                raise CellError(f"{f}: finished with {rec.get('flags')}, but this comparison asks for "
                                f"{flags}; use another --output (or delete that folder)")
            if rec.get("base_sha256") != made_from["base_sha256"]:  # nor one trained from another base
                raise CellError(f"{f}: finished on the base with sha256 {rec.get('base_sha256')}, but the "
                                f"shipped base is {made_from['base_sha256']}; use another --output (or delete that "
                                f"folder)")
            if "data_sha256" not in rec:
                undated.append(name)
            elif rec["data_sha256"] != made_from["data_sha256"]:  # nor one of another sample set (a rebuilt one)
                raise CellError(f"{f}: finished on sample data with sha256 {rec['data_sha256']}, but {data} is "
                                f"{made_from['data_sha256']}; use another --output (or delete that folder)")
        else:
            todo[name] = flags
    if undated:  # cells recorded before the data fingerprint: reused, and said so
        log.warning("%d finished cell(s) have no data_sha256 (recorded before it was kept), e.g. %s: reusing them "
                    "as made from %s", len(undated), undated[0], data)
    log.info("%d cell(s) already finished, %d to run with %d job(s)", len(results), len(todo), jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(run_cell, out / "cells" / n, fl, data, made_from): n for n, fl in todo.items()}
        for fut in tqdm(as_completed(futs), total=len(futs), desc="cells", unit="cell"):
            results[futs[fut]] = fut.result()
    return results


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _predictions(cell: Path) -> Path:
    found = list((cell / "eval").glob("*/predictions.jsonl"))
    if len(found) != 1:
        raise CellError(f"{cell}: finished, but {len(found)} predictions.jsonl under its eval/ (the verdict needs "
                        f"exactly one); delete {cell / 'cell.json'} and run the comparison again to re-run that cell")
    return found[0]


def _records(cell: Path) -> list[dict]:
    return [json.loads(line) for line in _predictions(cell).read_text().splitlines()]


def _per_question(seeds: list[list[dict]]) -> dict[str, dict[str, float]]:
    """task -> question id -> share of the seeds' prediction records that are correct."""
    hits: dict[str, dict[str, list]] = {}
    for recs in seeds:
        for r in recs:
            hits.setdefault(r["task"], {}).setdefault(r["qid"], []).append(float(r["correct"]))
    return {t: {q: statistics.fmean(v) for q, v in qs.items()} for t, qs in hits.items()}


def _base_and_majority(base_cell: Path, base: list[dict]) -> tuple[dict, dict]:
    """Per question: did the un-tuned base (its prediction records `base`), and the majority answer (as evaluate chose
    and scored it), get it right. The majority is re-scored on the base's records, so both cover exactly the questions
    every cell answers."""
    from pipeline.evaluation.scoring import MAJORITY, mark_correct

    answers = json.loads((base_cell / "eval" / "results.json").read_text())[MAJORITY]["provenance"]["answers"]
    majority = [r | {"prediction": answers[r["task"]]} for r in base]
    mark_correct(majority, SCORING)
    return _per_question([base]), _per_question([majority])


def answer_sets(records: list[dict]) -> dict[str, set]:
    """task -> its answers: the normalised targets of its records (every cell answers the same questions)."""
    from pipeline.evaluation.metrics import vqa_normalize

    targets: dict[str, set] = {}
    for r in records:
        targets.setdefault(r["task"], set()).add(vqa_normalize(r["target"]))
    return targets


def answer_sources(seeds: list[list[dict]], targets: dict[str, set]) -> dict[str, dict]:
    """Per held-out task, what the answers of `seeds` (prediction records, pooled) are: the share (%) that is no answer
    of the task at all (a word where a digit is asked; `targets` from `answer_sets`), and the most frequent wrong
    answer with its share. Why: a score below the un-tuned base is either wrong answers to the question asked or
    answers to another question; the two call for different fixes."""
    from pipeline.evaluation.metrics import vqa_normalize

    out = {}
    for t in HELDOUT:
        recs = [r for rs in seeds for r in rs if r["task"] == t]
        said = [vqa_normalize(r["prediction"]) for r in recs]
        wrong = [a for a, r in zip(said, recs) if not r["correct"]]
        top = statistics.mode(wrong or [""])
        out[t] = {"off_task": 100 * sum(a not in targets[t] for a in said) / len(said),
                  "top_wrong": top, "top_wrong_share": 100 * wrong.count(top) / len(said)}
    return out


def _difference(a: dict, b: dict, seed_se2: float) -> dict:
    """Mean accuracy difference a - b (points) over the same questions, with its standard error.

    Why two terms: the std over seeds says nothing about the 200 questions being a sample too (every seed answers the
    same ones), so a 3-point lead with tight seeds can still be luck of the question draw. The question term is the
    paired one (per-question differences, seed-averaged: it already holds some seed noise, so the sum errs on the
    cautious side); `seed_se2` adds the seed variance of the mean(s)."""
    d = [100 * (a[q] - b[q]) for q in a]
    return {"diff": statistics.fmean(d), "se": (statistics.pvariance(d) / len(d) + seed_se2) ** 0.5}


def summarise(args, res: dict) -> dict:
    """Per method: the chosen learning rate (and visual token mode: best mean validation accuracy), its scores over
    seeds, and the differences the verdict tests (against the majority answer, the un-tuned base and, for m2pt, each
    method)."""
    cells = args.output / "cells"
    base_records = _records(cells / "base")
    base_q, majority_q = _base_and_majority(cells / "base", base_records)
    targets = answer_sets(base_records)
    methods, per_q = {}, {}
    for m in args.methods:
        names = {st: [cell_name(m, *st, s) for s in _seeds(args)] for st in _settings(args, m)}
        val = {st: statistics.fmean(res[n]["scores"][VAL] for n in ns) for st, ns in names.items()}
        best = max(val, key=val.get)  # the first of equals: official before clean, the lower lr first
        cs = [res[n] for n in names[best]]
        scores = {t: dict(zip(("mean", "std"), _mean_std([c["scores"][t] for c in cs]))) for t in (*HELDOUT, VAL)}
        chosen = [_records(cells / n) for n in names[best]]  # read once: per-question scores and answers
        per_q[m] = _per_question(chosen)
        se2 = {t: scores[t]["std"] ** 2 / args.seeds for t in HELDOUT}
        methods[m] = {"lr": best[1], "visual_token_mode": best[0],
                      "val_by_setting": [{"visual_token_mode": mode, "lr": lr, "val": v}
                                         for (mode, lr), v in val.items()],
                      "trainable": cs[0]["trainable"],
                      "seconds": sum(c["seconds"] for c in cs), "scores": scores,
                      "answers": answer_sources(chosen, targets),
                      "vs_majority": {t: _difference(per_q[m][t], majority_q[t], se2[t]) for t in HELDOUT},
                      "vs_base": {t: _difference(per_q[m][t], base_q[t], se2[t]) for t in HELDOUT}}
    if "m2pt" in methods:
        m2 = methods["m2pt"]
        m2["vs_method"] = {o: {t: _difference(per_q["m2pt"][t], per_q[o][t], (m2["scores"][t]["std"] ** 2 + r[
            "scores"][t]["std"] ** 2) / args.seeds) for t in HELDOUT} for o, r in methods.items() if o != "m2pt"}
    base = res["base"]
    return {"methods": methods, "base": base["scores"], "majority": base["majority"], "seeds": args.seeds,
            "base_answers": answer_sources([base_records], targets),
            "first_seed": args.first_seed, "max_steps": args.max_steps}


def ablation(args, summary: dict, grid: dict, made_from: dict) -> dict:
    """pv x pt at M²PT's chosen lr and visual token mode, first seed. A cell that is a run of the method grid -
    pv = pt = the default length is m2pt, (default, 0) visual, (0, default) text, (0, 0) projector: the same trainable
    set, init and data order, bit-identical (tests/test_methods.py) - is taken from `grid` instead of being trained
    twice."""
    from pipeline.core.m2pt import M2PTConfig

    chosen = summary["methods"].get("m2pt", {})
    lr, mode = chosen.get("lr", LR_GRID["m2pt"][1]), chosen.get("visual_token_mode") or DEFAULT_TOKEN_MODE
    d = M2PTConfig().visual_prompt_length
    same = {(d, d): "m2pt", (d, 0): "visual", (0, d): "text", (0, 0): "projector"}
    if d != M2PTConfig().text_prompt_length:  # only (0, 0) is then a grid run
        same = {(0, 0): "projector"}
    cells, reused, seed = {}, {}, args.first_seed
    for pv in args.ablation_lengths:
        for pt in args.ablation_lengths:
            # with pv = 0 there are no prompt outputs to hand on: both modes give the N patch tokens (and the twins
            # with pv = 0, text and projector, are the methods without a mode)
            key, m_pv, twin = f"pv{pv}-pt{pt}", (mode if pv else None), same.get((pv, pt))
            twin = twin and cell_name(twin, m_pv, lr, seed)
            if twin in grid:
                reused[key] = twin
                continue
            flags = ["--method", "projector"] if pv == pt == 0 else [
                "--method", "m2pt", "--visual_prompt_length", str(pv), "--text_prompt_length", str(pt)]
            # the lr in the name: a re-run may choose another
            cells[key] = (f"ablation/{_mode_folder(m_pv)}lr{lr:g}/{key}" + (f"-seed{seed}" if seed else ""),
                          [*flags, "--learning_rate", f"{lr:g}", "--seed", str(seed), *_common(args),
                           *_mode_flags(m_pv)])
    res = run_cells(dict(cells.values()), args.output, args.data, args.jobs, made_from)
    scores = {**{k: grid[t]["scores"] for k, t in reused.items()},
              **{k: res[n]["scores"] for k, (n, _) in cells.items()}}
    return {"lr": lr, "visual_token_mode": mode, "reused": reused, "cells": {k: n for k, (n, _) in cells.items()},
            "heldout_mean": {k: statistics.fmean(s[t] for t in HELDOUT) for k, s in scores.items()},
            "val": {k: s[VAL] for k, s in scores.items()},
            "heldout": {k: {t: s[t] for t in HELDOUT} for k, s in scores.items()}}


def plots(summary: dict, abl: dict | None, lengths, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(summary["methods"])
    fig, axes = plt.subplots(1, len(HELDOUT), figsize=(4.5 * len(HELDOUT), 3.6))
    for ax, t in zip(axes, HELDOUT):
        ms = [summary["methods"][m]["scores"][t] for m in names]
        ax.bar(names, [x["mean"] for x in ms], yerr=[x["std"] for x in ms], capsize=3, color="#4c72b0")
        ax.axhline(summary["majority"][t], color="#c44e52", ls="--", label="majority answer")
        ax.axhline(summary["base"][t], color="#55a868", ls=":", label="un-tuned base")
        ax.set_title(f"{COLUMN_NAMES[t]} (held out)")
        ax.set_ylabel("accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    files = [folder / "methods.png"]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    if abl:
        grid = [[abl["heldout_mean"][f"pv{pv}-pt{pt}"] for pt in lengths] for pv in lengths]
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_xlabel("textual prompt length pt")
        ax.set_ylabel("visual prompt length pv")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean held-out accuracy (%)")
        fig.tight_layout()
        files.append(folder / "ablation.png")
        fig.savefig(files[1], dpi=110)
        plt.close(fig)
    return [str(f) for f in files]


def verdict(summary: dict) -> list[str]:
    """What the table supports, computed: a difference counts when it is more than two standard errors, the error
    holding both the spread over seeds and the sampling of the questions (`_difference`)."""
    n, ms = summary["seeds"], summary["methods"]
    if n < 2:  # why: with one seed the spread over seeds is unknown, and a claim would rest on the question draw alone
        return ["- One seed: no spread over seeds, so no claim of a difference beyond 2 SE is made (run --seeds 2 or "
                "more for one)."]

    def beyond(x: dict) -> bool:
        return abs(x["diff"]) > 2 * x["se"]

    def diff(x: dict) -> str:
        return f"{x['diff']:+.1f} ± {x['se']:.1f}" + (" (beyond 2 SE)" if beyond(x) else "")

    lines = []
    for t in HELDOUT:
        above = [f"{m} ({r['vs_majority'][t]['diff']:+.1f} ± {r['vs_majority'][t]['se']:.1f})" for m, r in ms.items()
                 if r["vs_majority"][t]["diff"] > 0 and beyond(r["vs_majority"][t])]
        lines.append(f"- {t}: " + (f"above the majority answer by more than 2 SE: {', '.join(above)}." if above else
                                   "no method is above the majority answer by more than 2 SE."))
    for m, r in ms.items():
        lines.append(f"- {m} − un-tuned base on held-out tasks: "
                     + "; ".join(f"{t} {diff(r['vs_base'][t])}" for t in HELDOUT) + ".")
    for other in [m for m in ("visual", "text", "lora") if m in ms.get("m2pt", {}).get("vs_method", {})]:
        vs = ms["m2pt"]["vs_method"][other]
        lines.append(f"- m2pt − {other} on held-out tasks: " + "; ".join(f"{t} {diff(vs[t])}" for t in HELDOUT) + ".")
    return lines


def base_description() -> str:
    """Which base every cell started from, with the record that produced it."""
    from pipeline.demo.tiny import tiny_record

    rec = tiny_record()
    sc, cfg = rec.get("scores", {}), rec.get("config", {})
    untrained = sc.get("image_qa_untrained")
    lr = cfg.get("lr")
    joint_lr = cfg.get("joint_lr") or lr
    stages = [f"{n:,} steps of {what}" for n, what in (
        (cfg.get("language_steps", 0), f"text QA for the language model alone (peak lr {lr:g})"),
        (cfg.get("align_steps", 0), f"captioning for the vision tower and projector, the language model frozen "
                                    f"(peak lr {lr:g})"),
        (cfg.get("steps", 0), f"captioning and text QA with every weight (peak lr {joint_lr:g})")) if n]
    return (f"Base: the embedded pretrained tiny model (`pipeline/demo/assets/{rec['file']}`, sha256 `{rec['sha256'][:16]}…`, "
            f"made by `{rec['command']}`; on fresh samples: caption exact match {sc.get('caption_exact_match')} %, "
            f"text-only QA {sc.get('text_qa')} %"
            + (f"; the same questions asked about the image, never trained: {untrained} %" if untrained is not None
               else "")
            + "). Every method starts from it; all but `full` keep it frozen. Its pretraining: " + "; then ".join(stages)
            + ". The text QA covered every question form, the held-out ones included, but it never saw a question "
            "about an image.")


def answers_table(summary: dict) -> list[str]:
    """The report's section on what the held-out answers are (`answer_sources`)."""
    rows = [("un-tuned base", summary["base_answers"])] + [(m, r["answers"]) for m, r in summary["methods"].items()]

    def cell(a: dict) -> str:
        return f"{a['off_task']:.1f} (\"{a['top_wrong']}\" {a['top_wrong_share']:.1f})"

    return ["## What the held-out answers are", "",
            "Share of the answers (%, pooled over seeds) that are no answer of the task at all (not one of its "
            "targets: a word where a digit is asked); in brackets the most frequent wrong answer and how many of all "
            "answers (%) are it, wrong. A score below the un-tuned base with a high share here comes from answering "
            "another question; with a low share, from answering the question asked, wrongly.", "",
            "| method | " + " | ".join(COLUMN_NAMES[t] for t in HELDOUT) + " |", "|---" * (len(HELDOUT) + 1) + "|",
            *[f"| {name} | " + " | ".join(cell(a[t]) for t in HELDOUT) + " |" for name, a in rows], ""]


def _seed_words(summary: dict) -> str:
    n, first = summary["seeds"], summary.get("first_seed", 0)
    return f"{n} seed(s)" + (f" ({first}-{first + n - 1})" if first else "")


def markdown(summary: dict, abl: dict | None, images: list[str], report: Path, command: str) -> str:
    cols = (*HELDOUT, VAL)
    names = {t: COLUMN_NAMES[t] + (" (held out)" if t in HELDOUT else "") for t in cols}
    chosen = any(len(r["val_by_setting"]) > 1 for r in summary["methods"].values())
    lines = ["# Method comparison on the embedded sample set", "",
             f"Produced by `{command}`: {_seed_words(summary)}, {summary['max_steps']} steps per run "
             f"({summary['cell_seconds']:,} s of runs in the method grid, summed over cells; "
             + "; ".join(f"{i['cells_run']} cell(s) " + (f"ran {i['jobs']} at a time in {i['wall_seconds']:,} s wall"
                                                          if i["wall_seconds"] is not None else
                                                          "from runs that were not logged")
                         for i in summary["invocations"]) + "); "
             + ("the learning rate of each method was chosen on the validation records of the training task types"
                if chosen else "each method ran at the one setting given (--lrs, --visual_token_modes): nothing was "
                               "chosen") + ". Scores are accuracy (%), mean ± std over seeds.", ""]
    if chosen and any(r.get("visual_token_mode") for r in summary["methods"].values()):
        lines += ["The methods with visual prompts also chose, on the same validation records, what the language "
                  "model is handed: *official* (the reference code and the trainer's default: N + pv visual tokens, "
                  "the feature layer's prompt slots and CLS beside the N patches) or *clean* (the N patch tokens, as "
                  "in standard LLaVA). The lr column names the choice.", ""]
    lines += [base_description(), "",
              "| method | lr | trainable | " + " | ".join(names[c] for c in cols) + " | wall s (all seeds) |",
              "|---" * (len(cols) + 4) + "|",
              "| majority answer | – | – | " + " | ".join(f"{summary['majority'][c]:.1f}" for c in cols)
              + " | – |",
              "| un-tuned base | – | 0 | " + " | ".join(f"{summary['base'][c]:.1f}" for c in cols) + " | – |"]
    for m, r in summary["methods"].items():
        tr = r["trainable"] or {"parameters": 0, "share": 0}
        cells = " | ".join(f"{r['scores'][c]['mean']:.1f} ± {r['scores'][c]['std']:.1f}" for c in cols)
        lines.append(f"| {m} | {setting_label(r.get('visual_token_mode'), r['lr'])} | {tr['parameters']:,} "
                     f"({100 * tr['share']:.2f} %) | {cells} | {r['seconds']:.0f} |")
    lines += ["", "Validation accuracy (training task types) of each setting, mean over seeds"
              + ("; the best was chosen:" if chosen else ":"), ""]
    for m, r in summary["methods"].items():
        grid = sorted(r["val_by_setting"], key=lambda x: (x["visual_token_mode"] or "", x["lr"]))
        lrs = {x["lr"] for x in grid}
        edge = " (the top of the grid)" if r["lr"] == max(lrs) and len(lrs) > 1 else ""
        lines.append(f"- {m}: " + ", ".join(f"{setting_label(x['visual_token_mode'], x['lr'])}: {x['val']:.1f}"
                                            for x in grid) + edge)
    lines += ["", *verdict(summary), "", f"![methods]({os.path.relpath(images[0], report.parent)})", "",
              *answers_table(summary)]
    if abl:
        lengths = sorted({int(k.split("-")[0][2:]) for k in abl["heldout_mean"]})
        lines += ["## Prompt-length ablation", "",
                  f"M²PT at its chosen lr {abl['lr']:g} ({abl.get('visual_token_mode', DEFAULT_TOKEN_MODE)} visual "
                  f"tokens where pv > 0), seed {summary.get('first_seed', 0)}, {summary['max_steps']} steps; "
                  "pv = pt = 0 is the "
                  "projector alone. Each cell: mean accuracy over the four held-out tasks / training-task validation "
                  "accuracy." + (" Cells that are a run of the method grid are that run, not trained twice: "
                                 + ", ".join(f"{k} = {t}" for k, t in abl["reused"].items()) + "."
                                 if abl["reused"] else ""), "",
                  f"![ablation]({os.path.relpath(images[1], report.parent)})", "",
                  "| pv \\ pt | " + " | ".join(str(pt) for pt in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for pv in lengths:
            lines.append(f"| {pv} | " + " | ".join(f"{abl['heldout_mean'][f'pv{pv}-pt{pt}']:.1f} / "
                                                   f"{abl['val'][f'pv{pv}-pt{pt}']:.1f}" for pt in lengths) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def finished_cells(out: Path) -> set[str]:
    cells = out / "cells"
    return {f.parent.relative_to(cells).as_posix() for f in cells.rglob("cell.json")}


def read_invocations(out: Path) -> list[dict]:
    """OUTPUT/invocations.jsonl: every invocation that ran cells in this folder, with the cells it ran. Why a log of its
    own: results.json is the latest report's, and a report of a subset (--methods m2pt) rewrites it; the wall times of
    the runs that made the cells must survive that. A folder from before the log has only the history its results.json
    kept, without the cells: those entries come back with cells None."""
    log_file = out / "invocations.jsonl"
    if log_file.is_file():
        return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    try:
        summary = json.loads((out / "results.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return []
    legacy = summary.get("invocations") or ([summary["invocation"]] if summary.get("invocation") else [])
    return [dict(i, cells=None) for i in legacy if i.get("cells_run")]


def log_invocation(out: Path, entry: dict) -> None:
    """Append `entry` to the log (writing the legacy history first, the first time)."""
    log_file = out / "invocations.jsonl"
    lines = [] if log_file.is_file() else read_invocations(out)
    with log_file.open("a") as f:
        for e in [*lines, entry]:
            f.write(json.dumps(e) + "\n")


def report_invocations(log: list[dict], cells: set[str]) -> list[dict]:
    """The invocations that ran the cells of this report, each with how many of them it ran (a cell re-run later
    counts for the later one). Cells no logged invocation ran are from before the log: the legacy entries stand for
    them, or, with none, one entry of unknown wall time."""
    last = {}
    for i, e in enumerate(log):
        last.update({c: i for c in e["cells"] or ()})
    counts = [sum(1 for c in cells if last.get(c) == i) for i in range(len(log))]
    unlogged = [c for c in cells if c not in last]
    legacy = [e for e in log if e["cells"] is None] if unlogged else []
    out = [{k: v for k, v in e.items() if k != "cells"} for e in legacy]  # they ran first
    if unlogged and not legacy:
        out.append({"cells_run": len(unlogged), "wall_seconds": None, "jobs": None})
    return out + [{k: e[k] for k in ("wall_seconds", "jobs", "command") if k in e} | {"cells_run": n}
                  for e, n in zip(log, counts) if n]


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
                         "records; at 400 steps the training types reached only 34-52 %% on validation)")
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


def main(argv=None) -> int:
    from pipeline.core.m2pt import VISUAL_TOKEN_MODES
    from pipeline.core.methods import METHODS
    from pipeline.demo.sample_data import ensure_sample

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.methods = [m for m in args.methods.split(",") if m]
    try:
        args.lrs = parse_lrs(args.lrs, METHODS)
    except ValueError as e:
        print(f"error: --lrs {e}", file=sys.stderr)
        return 2
    args.visual_token_modes = [x for x in args.visual_token_modes.split(",") if x]
    if not args.visual_token_modes or set(args.visual_token_modes) - set(VISUAL_TOKEN_MODES):
        print(f"error: --visual_token_modes {','.join(args.visual_token_modes) or '(empty)'}: give one or more of "
              f"{', '.join(VISUAL_TOKEN_MODES)}", file=sys.stderr)
        return 2
    bad = [m for m in args.methods if m not in METHODS]
    if bad or args.seeds < 1 or args.max_steps < 1 or args.jobs < 1 or args.first_seed < 0:
        print(f"error: unknown method(s) {bad} (one of {METHODS})" if bad else
              "error: --seeds, --max_steps and --jobs must be >= 1, --first_seed >= 0", file=sys.stderr)
        return 2
    args.ablation_lengths = lengths = [int(x) for x in args.ablation_lengths.split(",") if x]
    ensure_sample(args.data)
    command = ("python -m pipeline.demo.compare " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.output = args.output.resolve()
    finished_before = finished_cells(args.output)
    build_shards(args.data, args.output, lengths)
    try:
        origin = cell_origin(args.data)
        res = run_cells(plan(args), args.output, args.data, args.jobs, origin)
        summary = summarise(args, res)
        summary["cell_seconds"] = round(sum(c["seconds"] for c in res.values()))
        abl = ablation(args, summary, res, origin) if lengths else None
    except CellError as e:
        print(f"error: {e}\n(finished cells are kept: run the same command again to resume)", file=sys.stderr)
        return 1
    finally:  # a failed or interrupted run logs the cells it finished too: a re-run reuses them
        ran = finished_cells(args.output) - finished_before
        if ran:
            log_invocation(args.output, {"started": started, "command": command, "jobs": args.jobs,
                                         "wall_seconds": round(time.time() - t0), "cells": sorted(ran)})
    summary["invocations"] = report_invocations(read_invocations(args.output),
                                                set(res) | set((abl or {}).get("cells", {}).values()))
    images = plots(summary, abl, lengths, args.report.with_suffix(""))  # docs/results.md -> docs/results/*.png: a
    # second report (another --report) never overwrites the first one's images
    record = {"summary": summary, "ablation": abl, "images": [os.path.relpath(i, args.report.parent) for i in images],
              "command": command}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    for f in (args.output / "results.json", args.report.with_suffix(".json")):  # the report's is committed beside it
        atomic_write_json(f, record)
    args.report.write_text(markdown(summary, abl, images, args.report, command))
    print(f"wrote {args.report}, {args.report.with_suffix('.json')} and {args.output / 'results.json'} "
          f"({round(time.time() - t0)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
