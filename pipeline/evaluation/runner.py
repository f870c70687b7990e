"""Zero-shot evaluation as a library: plan the rows (the base, each artifact) and the questions, load a row's
model, generate every rank's share of the unanswered questions, score, and add the rows to the folder's tables.
`pipeline.evaluate` is its command line; `pipeline.chat` and the demo's closing table use the same planning and
loading, so every app reads an artifact the same way (as LLaVA's one `load_pretrained_model` serves its evaluation
scripts, CLI and server).

    plan = plan_runs(cfg)                 # everything checked before a model loads
    base, model, template = load_row(cfg, info)
    results = evaluate(cfg)               # {row: {"tasks": ..., "provenance": ...}}; cfg is not changed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import defaults
from pipeline.core.methods import Artifact
from pipeline.errors import UsageError
from pipeline.evaluation import metrics
from pipeline.evaluation.datasets import BENCHMARKS, TASKS, load_task, parse_tasks, read_jsonl
from pipeline.evaluation.rows import folder_name
from pipeline.evaluation.scoring import MAJORITY, majority_baseline, mark_correct, markdown_table, score
from pipeline.source import ModelSource, Runtime, resolve_device, resolve_dtype

log = logging.getLogger("m2pt.evaluate")


@dataclass
class EvalConfig(Runtime, ModelSource):
    """One evaluation: which models, which tasks, how to decode (every field is a flag of `pipeline.evaluate`)."""

    adapter: list | None = field(default=None, metadata={"nargs": "*", "help": (
        "one or more training artifacts, one row each: M2PT adapters (--method m2pt / visual / text / projector), "
        "PEFT LoRA adapters (--method lora) or model folders (--method full); each a folder or a Hub repo id "
        "(user/name[@revision], read through the Hugging Face cache; HF_HUB_OFFLINE=1: the cache only)")})
    names: list | None = field(default=None, metadata={"nargs": "*", "help": (
        "table row names for the --adapter artifacts, in order (default: from their paths, with as many parent "
        "folders as it takes to tell them apart)")})
    allow_other_base: bool = field(default=False, metadata={"help": (
        "evaluate an adapter on a base other than the one it records (by default an error); each such row's "
        "provenance says so")})
    with_base: bool = field(default=False, metadata={"help": (
        "also evaluate the un-tuned base (the 'base' row); implied when no --adapter is given")})
    tasks: str | None = field(default=None, metadata={"help": (
        f"comma-separated; built-in: {', '.join(TASKS)}; or your own held-out set as a path (LLaVA .json / .jsonl, "
        "or a shard folder) or name=path, scored by label match (default: the embedded sample set's held-out "
        "task types)")})
    data_root: Path | None = field(default=None, metadata={"type": Path, "help": (
        "folder holding the task data (layouts in pipeline/evaluation/datasets.py; default: the embedded sample set, "
        "data/sample)")})
    coco_root: Path | None = field(default=None, metadata={"type": Path, "help": (
        "COCO val2014 images for the official POPE json")})
    output_dir: Path | None = field(default=None, metadata={"type": Path, "help": (
        "where results go (default: out/eval in the repository; with --score_only: the folder of the predictions "
        "file)")})
    batch_size: int = field(default=8, metadata={"help": "questions per generation batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "the reference used 128 for MME and 50 for the others"})
    temperature: float = field(default=0.0, metadata={"help": (
        "0: deterministic greedy; the reference sampled at 0.2 (then --seed applies)")})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    limit: int | None = field(default=None, metadata={"type": int, "help": (
        "evaluate only the first N questions per task (MME: rounded up to whole image pairs)")})
    majority_baseline: bool = field(default=True, metadata={
        "help": ("score the majority answer too: every question of a task answered with that task's most frequent "
                 "target, scored by the same rules (no model; the floor a tuned model must beat)"),
        "no_help": "do not score the majority-answer row"})
    judge_model: str | None = field(default=None, metadata={"help": (
        "local HF causal LM used as the reference's yes/no judge for the non-MME tasks (e.g. vicuna-13b-v1.5); "
        "reported as judge_accuracy beside the rule-based score")})
    score_only: Path | None = field(default=None, metadata={"type": Path, "help": (
        "re-score an existing predictions.jsonl (fields task, category, image_id, question, target, prediction; "
        "scoring when present) without loading any model")})
    dist_timeout: int = field(default=10800, metadata={"help": (
        "seconds a rank waits for the others at the end of a row (under torchrun / deepspeed / srun); the largest "
        "share's generation time must fit in it")})
    local_rank: int = field(default=-1, metadata={"help": argparse.SUPPRESS})  # passed by the deepspeed launcher

    def results_dir(self) -> Path:
        """Where results go: --output_dir, else beside the predictions re-scored, else out/eval."""
        if self.output_dir is not None:
            return self.output_dir
        return self.score_only.parent if self.score_only is not None else defaults.EVAL_OUTPUT


def limit_items(items: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` questions; for MME whole images (both questions of a pair), so acc+ stays defined."""
    if limit is None or len(items) <= limit:
        return items
    if items[0].get("scoring") != "mme":
        return items[:limit]
    images: dict = {}
    for it in items:
        if len(images) * 2 >= limit and (it["category"], it["image_id"]) not in images:
            break
        images.setdefault((it["category"], it["image_id"]), []).append(it)
    return [it for group in images.values() for it in group]


def rescore(cfg: EvalConfig) -> dict:
    """Score an existing predictions file again; records without a "scoring" field take their task's rule."""
    recs = [r for _, r in read_jsonl(cfg.score_only, {"task", "category", "image_id", "question", "target",
                                                        "prediction"})]
    known = defaults.known_tasks(",".join(sorted({r["task"] for r in recs})) or None)
    rules = {name: t.scoring for name, t in known.items()}
    results = {cfg.score_only.parent.name or "predictions": {"tasks": score(recs, rules),
                                                             "provenance": {"predictions": str(cfg.score_only)}}}
    write_outputs(cfg.results_dir(), results, _titles(known))  # beside its input, never a shared default
    return results


def _titles(known: dict) -> dict:
    return {name: t.title for name, t in known.items() if t.title}


def write_outputs(out: Path, results: dict, titles: dict | None = None) -> dict:
    """Write results.json / results.md with this run's rows added to the rows already there: a row of the same name
    is replaced in place, the others are kept (evaluating a second adapter into a folder adds its row). Returns
    every row written."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_rows(out / "results.json")
    merged = {name: results.get(name, row) for name, row in earlier.items()}
    merged |= {name: row for name, row in results.items() if name not in merged}
    kept = [name for name in earlier if name not in results]
    if kept:
        log.info("%s: kept %d earlier row(s) of this folder: %s", out / "results.json", len(kept), ", ".join(kept))
    (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(merged, titles))
    return merged


def _earlier_rows(path: Path) -> dict:
    """The rows an earlier evaluation wrote to `path`; one that cannot be read is moved aside (and logged), never
    silently overwritten."""
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())
        if isinstance(rows, dict) and all(isinstance(r, dict) and isinstance(r.get("tasks"), dict)
                                          for r in rows.values()):
            return rows
        why = "not a results file of pipeline.evaluate"
    except (OSError, ValueError) as e:
        why = str(e)
    aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
    path.rename(aside)
    log.warning("%s could not be read (%s): moved to %s, its rows are not in the new table", path, why, aside)
    return {}


@dataclass
class EvalPlan:
    """What an evaluation will do, checked before any model loads."""

    runs: list  # [(row name, adapter path | None, its methods.Artifact | None)]
    items: dict  # task -> items
    data_root: Path | None
    titles: dict  # task -> column title
    other_base: dict  # row -> "trained on X, evaluated on Y" (with --allow_other_base only)


def plan_rows(cfg: EvalConfig) -> tuple[list, dict]:
    """(rows, other_base): the base row unless only adapters are asked for, then one distinct row per artifact,
    each artifact's config and weight files read and its recorded base compared with --model, before any model
    loads (a broken or mismatched artifact must not fail after the others were evaluated)."""
    from pipeline.core.methods import read_artifact
    from pipeline.evaluation.rows import check_safetensors, row_names, same_base

    adapters = list(cfg.adapter or [])
    infos = [read_artifact(a) for a in adapters]
    for info in infos:
        for f in info.weight_files():
            check_safetensors(f)
    names = row_names(adapters, cfg.names)
    given = cfg.base_name()
    other_base = {}
    for name, a, info in zip(names, adapters, infos):
        recorded = info.recorded_base()
        if recorded and not same_base(recorded, given):
            if not cfg.allow_other_base:
                raise UsageError(f"--adapter {a} was trained on {recorded!r}, but the model is {given!r}: give the "
                                 "base it was trained on, or --allow_other_base to evaluate it anyway (the results "
                                 "then say so)")
            other_base[name] = f"trained on {recorded}, evaluated on {given}"
    base = [("base", None, None)] if (cfg.with_base or not adapters) else []
    return base + list(zip(names, adapters, infos)), other_base


def plan_runs(cfg: EvalConfig) -> EvalPlan:
    """Rows and items, everything checked before any model loads (artifacts, task files, MME pairs). With
    neither --tasks nor --data_root: the embedded sample set's held-out task types."""
    runs, other_base = plan_rows(cfg)
    known = defaults.known_tasks(cfg.tasks)
    task_paths = parse_tasks(cfg.tasks or defaults.demo_task_spec(), known)
    builtin = [t for t, p in task_paths.items() if p is None]
    data_root = cfg.data_root
    if data_root is None and builtin:
        needs_root = [t for t in builtin if t in BENCHMARKS]
        if needs_root:
            raise ValueError(f"--data_root: needed for {', '.join(needs_root)} (layouts: pipeline/evaluation/"
                             "datasets.py)")
        data_root = defaults.demo_sample()  # the demo's held-out tasks read the embedded sample set
    items = {t: limit_items(load_task(t, data_root, cfg.coco_root, p, known), cfg.limit)
             for t, p in task_paths.items()}
    if "mme" in items:
        metrics.check_mme_pairs(items["mme"])  # before any generation, not after hours of it
    return EvalPlan(runs, items, data_root, _titles(known), other_base)


def load_row_model(cfg: EvalConfig, artifact: Artifact | None):
    """(base, model) of one row: the base alone, the base + an adapter, or a fully fine-tuned model folder."""
    import torch

    dtype = getattr(torch, resolve_dtype(cfg.dtype, cfg.device))
    if artifact is not None and artifact.method.is_model:  # a fully fine-tuned model folder is the model
        base = defaults.load_base(str(artifact.path), dtype=dtype)
        return base, base.model
    base = cfg.load_base(dtype=dtype)
    return base, (artifact.load(base.model) if artifact is not None else base.model)


def load_row(cfg: EvalConfig, artifact: Artifact | None):
    """(base, model on its device in eval mode, the chat template) of one row."""
    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import num_visual_tokens

    base, model = load_row_model(cfg, artifact)
    model.to(cfg.device).eval()
    return base, model, VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))


def _generate_share(cfg: EvalConfig, ranks, load, todo, answers, progress) -> None:
    """This rank's share of every task's pending questions, each batch's answers appended as it finishes. The row's
    model loads only when the rank has a question to answer (a resumed row may have none)."""
    from pipeline.evaluation.generate import generate_batches
    from pipeline.evaluation.parallel import share

    loaded = None
    for keyed in todo.items.values():
        mine = share(keyed, ranks.rank, ranks.world, lambda it: len(it["question"]))
        if not mine:
            continue
        base, model, template = loaded = loaded or load()
        keys, done = [k for k, _ in mine], 0
        for chunk, preds in generate_batches(model, base.tokenizer, base.image_processor, template,
                                             [it for _, it in mine], cfg.batch_size, cfg.max_new_tokens,
                                             cfg.temperature, cfg.seed, keys):
            answers.write(keys[done:done + len(chunk)], preds)
            done += len(chunk)
            progress.update()


def answer_share(cfg: EvalConfig, ranks, load, items: dict, row: str, fp: str) -> int:
    """Every rank: generate its share of the row's unanswered questions, appending each batch's answers to its
    answers file (evaluation/parallel.py); returns how many all ranks generated together. Ends at a barrier: all
    answers are in. `load()` gives (base, model, template)."""
    from pipeline.evaluation.parallel import AnswerLog, Progress, pending, read_answers

    row_dir = cfg.output_dir / folder_name(row)
    stored = read_answers(row_dir, fp)
    ranks.barrier()  # everyone read the same stored answers before anyone appends: they deal the same questions
    todo = pending(items, stored.answers)
    if ranks.rank == 0 and (todo.answered or stored.other or stored.stale):
        log.info("%s: %d of %d questions already answered under these settings%s%s", row, todo.answered, todo.total,
                 f"; {stored.other} stored answers of other settings (adapter, model or generation) not reused"
                 if stored.other else "",
                 f"; {stored.stale} stored answers set aside as stale (their line does not match its checksum: "
                 "edited, or stored before answers carried one), asked again" if stored.stale else "")
    progress = Progress(row_dir, todo, row, enabled=ranks.rank == 0)
    answers = AnswerLog(row_dir, ranks.rank, fp)
    try:
        _generate_share(cfg, ranks, load, todo, answers, progress)
    finally:
        answers.close()
    progress.wait_for_others(cfg.dist_timeout)
    ranks.barrier()
    return todo.total - todo.answered


def predict(cfg: EvalConfig, items: dict, row: str, fp: str, judge) -> list[dict]:
    """Rank 0, every answer in: prediction records in dataset order, marked correct (and judged)."""
    from pipeline.evaluation.parallel import collect
    from pipeline.evaluation.scoring import prediction_record

    preds = collect(items, cfg.output_dir / folder_name(row), fp)
    recs = [prediction_record(it, p) for task, its in items.items() for it, p in zip(its, preds[task])]
    mark_correct(recs)
    if judge:
        judged = [r for r in recs if r["scoring"] != "mme"]
        for r, ok in zip(judged, judge(judged)):
            r["judge_correct"] = ok
    return recs


def evaluate_one(cfg: EvalConfig, name: str, adapter: str | None, artifact: Artifact | None, plan: EvalPlan,
                 judge, ranks) -> dict | None:
    """One row (the base, or the base + one adapter) on every rank; rank 0 merges, writes its predictions and
    returns its metrics (None on the other ranks)."""
    from pipeline.core.chat import SYSTEM
    from pipeline.evaluation.parallel import fingerprint
    from pipeline.files import atomic_write_text

    t0 = time.time()
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    fp = fingerprint(cfg, adapter, artifact, dtype, SYSTEM)
    generated = answer_share(cfg, ranks, lambda: load_row(cfg, artifact), plan.items, name, fp)
    if ranks.rank != 0:
        return None
    recs = predict(cfg, plan.items, name, fp, judge)
    atomic_write_text(cfg.output_dir / folder_name(name) / "predictions.jsonl", "".join(
        json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n" for r in recs))
    return {"tasks": score(recs), "provenance": {
        "base_model": defaults.base_name(adapter) if artifact and artifact.method.is_model else cfg.base_name(),
        "adapter": adapter, "method": artifact.method.name if artifact else "base",
        "adapter_config": artifact.settings() if artifact else None,
        "data_root": str(plan.data_root) if plan.data_root else None, "tasks": list(plan.items),
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "padding_side": "left", "dtype": dtype, "world_size": ranks.world,
        "fingerprint": fp, "generated": generated, "reused": len(recs) - generated,
        "seconds": round(time.time() - t0, 1), "other_base": plan.other_base.get(name)}}


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate (or with score_only, re-score) on every rank of the launcher; returns {row: {"tasks": {task:
    metrics}, "provenance": ...}} for this run's rows and adds them to results.json / results.md in
    `cfg.results_dir()` (rank 0; the other ranks return {}). `cfg` is left as it was given."""
    if cfg.score_only:
        return rescore(cfg)
    from pipeline.evaluation.parallel import init_ranks

    cfg = dataclasses.replace(cfg, output_dir=cfg.results_dir(), device=resolve_device(cfg.device))
    plan = plan_runs(cfg)  # every rank checks the same inputs: a mistake stops them all before a model loads
    ranks = init_ranks(cfg.dist_timeout)
    try:
        if cfg.device == "cuda" and ranks.world > 1:
            cfg = dataclasses.replace(cfg, device=f"cuda:{ranks.local_rank}")
        from pipeline.evaluation.generate import Judge

        judge = Judge(cfg.judge_model, cfg.device) if cfg.judge_model and ranks.rank == 0 else None
        results = {MAJORITY: majority_baseline(plan.items)} if cfg.majority_baseline else {}
        for name, adapter, artifact in plan.runs:
            row = evaluate_one(cfg, name, adapter, artifact, plan, judge, ranks)
            if row is not None:
                results[name] = row
                log.info("%s: %s", name, {t: round(m["score"], 2) for t, m in row["tasks"].items()})
        if ranks.rank != 0:
            return {}
        write_outputs(cfg.output_dir, results, plan.titles)
        update_cards(cfg, plan, results)
        return results
    finally:
        ranks.close()


def update_cards(cfg: EvalConfig, plan: EvalPlan, results: dict) -> None:
    """Each scored artifact folder that has a model card (core/card.py) gets its row, beside this evaluation's
    majority-answer and base rows, as the card's Results section. A repo id's snapshot in the Hugging Face cache is
    left as downloaded; a card that cannot be written is logged, not an error (the results are in --output_dir)."""
    from pipeline.core import card
    from pipeline.core.hub import is_repo_id

    refs = {k: results[k] for k in (MAJORITY, "base") if k in results}
    how = (f"Zero-shot, scored by `python -m pipeline.evaluate` on `{cfg.base_name()}`: "
           f"{', '.join(plan.items)} ({sum(len(v) for v in plan.items.values()):,} questions).")
    for name, adapter, artifact in plan.runs:
        if artifact is None or name not in results or is_repo_id(adapter):
            continue
        try:
            written = card.add_results(artifact.path, markdown_table(refs | {name: results[name]}, plan.titles), how)
        except (OSError, ValueError) as e:
            log.warning("%s: the model card's results could not be written (%s)", artifact.path, e)
            continue
        if written:
            log.info("%s: results added to the model card", written)
