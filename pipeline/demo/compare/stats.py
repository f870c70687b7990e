"""The comparison's numbers: per method the setting chosen on validation and its held-out scores over seeds, the
paired differences the verdict tests (against the majority answer, the un-tuned base and, for M²PT, each method),
what the held-out answers are, and the prompt-length ablation."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.demo.compare.cells import (
    DEFAULT_TOKEN_MODE,
    HELDOUT,
    LR_GRID,
    RERUN_HINT,
    VAL,
    CellError,
    _common,
    _mode_flags,
    _mode_folder,
    _seeds,
    _settings,
    cell_name,
    read_records,
    run_cells,
)
from pipeline.demo.sample_data import SCORING


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _records(cell: Path) -> list[dict]:
    return read_records(cell)


def _check_questions(cell: Path, records: list[dict], questions: set) -> None:
    """Every cell answers the base's questions, each once (the verdict pairs them question by question)."""
    got = [(r["task"], r["qid"]) for r in records]
    if len(got) != len(set(got)) or set(got) != questions:
        raise CellError(f"{cell}: its predictions answer {len(set(got))} of the base's {len(questions)} questions "
                        f"({len(got)} lines); {RERUN_HINT.format(cell=cell)}")


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


def _method_summary(args, method: str, res: dict, ref: dict) -> tuple[dict, dict]:
    """One method's entry (the setting with the best mean validation accuracy, its scores over seeds, its answers
    and differences) and its per-question scores."""
    names = {st: [cell_name(method, *st, s) for s in _seeds(args)] for st in _settings(args, method)}
    val = {st: statistics.fmean(res[n]["scores"][VAL] for n in ns) for st, ns in names.items()}
    best = max(val, key=val.get)  # the first of equals: official before clean, the lower lr first
    runs = [res[n] for n in names[best]]
    scores = {t: dict(zip(("mean", "std"), _mean_std([c["scores"][t] for c in runs]))) for t in (*HELDOUT, VAL)}
    chosen = [_records(ref["cells"] / n) for n in names[best]]  # read once: per-question scores and answers
    for n, recs in zip(names[best], chosen):
        _check_questions(ref["cells"] / n, recs, ref["questions"])
    per_q = _per_question(chosen)
    se2 = {t: scores[t]["std"] ** 2 / args.seeds for t in HELDOUT}
    entry = {"lr": best[1], "visual_token_mode": best[0],
             "val_by_setting": [{"visual_token_mode": mode, "lr": lr, "val": v} for (mode, lr), v in val.items()],
             "trainable": runs[0]["trainable"], "seconds": sum(c["seconds"] for c in runs), "scores": scores,
             "answers": answer_sources(chosen, ref["targets"]),
             "vs_majority": {t: _difference(per_q[t], ref["majority_q"][t], se2[t]) for t in HELDOUT},
             "vs_base": {t: _difference(per_q[t], ref["base_q"][t], se2[t]) for t in HELDOUT}}
    return entry, per_q


def _m2pt_vs_methods(methods: dict, per_q: dict, seeds: int) -> dict:
    m2 = methods["m2pt"]
    return {other: {t: _difference(per_q["m2pt"][t], per_q[other][t],
                                   (m2["scores"][t]["std"] ** 2 + r["scores"][t]["std"] ** 2) / seeds)
                    for t in HELDOUT}
            for other, r in methods.items() if r is not m2}


def summarise(args, res: dict) -> dict:
    """Per method: the chosen learning rate (and visual token mode: best mean validation accuracy), its scores over
    seeds, and the differences the verdict tests (against the majority answer, the un-tuned base and, for m2pt, each
    method)."""
    cells = args.output / "cells"
    base_records = _records(cells / "base")
    base_q, majority_q = _base_and_majority(cells / "base", base_records)
    ref = {"cells": cells, "targets": answer_sets(base_records), "base_q": base_q, "majority_q": majority_q,
           "questions": {(r["task"], r["qid"]) for r in base_records}}
    methods, per_q = {}, {}
    for m in args.methods:
        methods[m], per_q[m] = _method_summary(args, m, res, ref)
    if "m2pt" in methods:
        methods["m2pt"]["vs_method"] = _m2pt_vs_methods(methods, per_q, args.seeds)
    base = res["base"]
    return {"methods": methods, "base": base["scores"], "majority": base["majority"], "seeds": args.seeds,
            "base_answers": answer_sources([base_records], ref["targets"]),
            "first_seed": args.first_seed, "max_steps": args.max_steps}


def _grid_twins() -> dict:
    """Ablation cells that are runs of the method grid: pv = pt = the default length is m2pt, (default, 0) visual,
    (0, default) text, (0, 0) projector - the same trainable set, init and data order, bit-identical
    (tests/core/test_methods.py)."""
    from pipeline.core.m2pt import M2PTConfig

    d = M2PTConfig().visual_prompt_length
    if d != M2PTConfig().text_prompt_length:  # only (0, 0) is then a grid run
        return {(0, 0): "projector"}
    return {(d, d): "m2pt", (d, 0): "visual", (0, d): "text", (0, 0): "projector"}


def _ablation_cells(args, lr: float, mode: str, grid: dict) -> tuple[dict, dict]:
    """({key: (cell name, train flags)} to run, {key: grid cell} reused) for pv x pt."""
    twins, cells, reused, seed = _grid_twins(), {}, {}, args.first_seed
    for pv in args.ablation_lengths:
        for pt in args.ablation_lengths:
            # with pv = 0 there are no prompt outputs to hand on: both modes give the N patch tokens (and the twins
            # with pv = 0, text and projector, are the methods without a mode)
            key, m_pv, twin = f"pv{pv}-pt{pt}", (mode if pv else None), twins.get((pv, pt))
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
    return cells, reused


def ablation(args, summary: dict, grid: dict, made_from: dict) -> dict:
    """pv x pt at M²PT's chosen lr and visual token mode, first seed; cells that are grid runs are taken from `grid`
    instead of being trained twice."""
    chosen = summary["methods"].get("m2pt", {})
    lr, mode = chosen.get("lr", LR_GRID["m2pt"][1]), chosen.get("visual_token_mode") or DEFAULT_TOKEN_MODE
    cells, reused = _ablation_cells(args, lr, mode, grid)
    res = run_cells(dict(cells.values()), args.output, args.data, args.jobs, made_from)
    scores = {**{k: grid[t]["scores"] for k, t in reused.items()},
              **{k: res[n]["scores"] for k, (n, _) in cells.items()}}
    return {"lr": lr, "visual_token_mode": mode, "reused": reused, "cells": {k: n for k, (n, _) in cells.items()},
            "heldout_mean": {k: statistics.fmean(s[t] for t in HELDOUT) for k, s in scores.items()},
            "val": {k: s[VAL] for k, s in scores.items()},
            "heldout": {k: {t: s[t] for t in HELDOUT} for k, s in scores.items()}}
