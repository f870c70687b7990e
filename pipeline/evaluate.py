"""Zero-shot evaluation: batched, left-padded, KV-cached generation with the training template, then the standard
metrics. One invocation evaluates the base model and/or several adapters and writes one comparison table.

    python -m pipeline.evaluate --model /models/llava-1.5-7b-hf --adapter runs/a/adapter runs/b/adapter --with_base \\
        --tasks mme,pope,textvqa,vsr,snli_ve,cifar10,cifar100,mnist --data_root /data/eval --output_dir eval_out
    python -m pipeline.evaluate --score_only eval_out/base/predictions.jsonl      # re-score, no model
    python -m pipeline.evaluate                                                   # the embedded default

With no arguments it evaluates the embedded tiny model on the held-out task types of the embedded sample set
(digits as an MNIST-style set, existence questions as a POPE-style set, the bigger object's colour, the shape of
the object of a given colour): the un-tuned base, plus the adapter of
the default training run when there is one.

Outputs under --output_dir: `<run>/predictions.jsonl` (one line per question: task, category, image_id, qid,
question, target, prediction, correct), `results.json` (run -> task -> metrics, with provenance) and
`results.md` (one row per run).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.evaluation import metrics
from pipeline.evaluation.datasets import TASKS, LayoutError, load_task, parse_tasks, read_jsonl

from pipeline.defaults import REPO
log = logging.getLogger("m2pt.evaluate")
JUDGE_PROMPT = ("Please decide if the prediction is correct given the question and the answer.\n"
                "Questions: {question}\nAnswer: {target}\nPrediction: {prediction}\n"
                "Your response should only be Yes or No.")
TABLE_COLUMNS = ("mme", "textvqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope", "mmavg",
                 "sample_mnist", "sample_pope", "sample_bigger", "sample_shape")
SAMPLE_DEFAULT = "sample_mnist,sample_pope,sample_bigger,sample_shape"  # the embedded set's held-out task types


# ------------------------------------------------------------------------------------------- generation
def _load_image(image, image_processor):
    from pipeline.files import open_rgb

    if image is None:
        return None
    if not hasattr(image, "convert"):  # bytes or a path, not an in-memory PIL image
        image = open_rgb(image)
    return image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def generate(model, tokenizer, image_processor, template, items: list[dict], batch_size: int, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, show_progress: bool = True) -> list[str]:
    """Predictions for `items`, in order. Left-padded batches; greedy unless temperature > 0 (then seeded
    sampling, as the reference's T = 0.2). Batched greedy output equals one-by-one output (tests)."""
    import torch
    from tqdm import tqdm

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = tokenizer.pad_token_id
    out: list[str] = []
    gen = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_p=None, top_k=None)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    for s in tqdm(range(0, len(items), batch_size), desc="generate", unit="batch", disable=not show_progress):
        chunk = items[s:s + batch_size]
        prompts = [template.prompt(("<image>\n" if it["image"] is not None else "") + it["question"]) for it in chunk]
        n = max(map(len, prompts))
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=dev)
        px = [_load_image(it["image"], image_processor) for it in chunk]
        px = [p for p in px if p is not None]
        # A batch without any image must not pass pixel_values=None: transformers 5.23's generate runs the vision
        # tower for any pixel_values key it is given.
        images = {"pixel_values": torch.stack(px).to(dev, dtype)} if px else {}
        if temperature > 0:
            torch.manual_seed(seed + s)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, **images, **gen)
        out += [tokenizer.decode(q[n:], skip_special_tokens=True).strip() for q in seqs]
    return out


# ---------------------------------------------------------------------------------------------- scoring
def score(records: list[dict]) -> dict:
    """task -> metrics for a list of prediction records (also what --score_only runs)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    res = {}
    for task, rs in by_task.items():
        if task == "mme":
            m = metrics.mme_scores(rs)
            m["score"] = m["total"]
        elif task in ("pope", "sample_pope"):
            m = metrics.pope_scores(rs)
        else:
            m = metrics.accuracy_task(rs)
        if any("judge_correct" in r for r in rs) and task != "mme":
            m["judge_accuracy"] = 100 * sum(bool(r.get("judge_correct")) for r in rs) / len(rs)
        res[task] = m
    avg = metrics.mmavg({t: m["score"] for t, m in res.items()})
    if avg is not None:
        res["mmavg"] = {"score": avg}
    return res


MAJORITY = "majority answer"


def prediction_record(item: dict, prediction: str) -> dict:
    """One line of predictions.jsonl: what scoring needs of the item, and the answer."""
    keys = ("task", "category", "image_id", "qid", "question", "target", "answers")
    return {k: item.get(k) for k in keys} | {"prediction": prediction}


def majority_baseline(items: dict) -> dict:
    """The row of a model that answers every question of a task with the task's most frequent target (its first
    reference answer for open VQA), scored exactly as generated answers are."""
    recs, answers = [], {}
    for task, its in items.items():
        targets = Counter(it.get("target") or (it.get("answers") or [""])[0] for it in its)
        answers[task] = max(sorted(targets), key=targets.get)  # ties: alphabetical, so the row is reproducible
        recs += [prediction_record(it, answers[task]) for it in its]
    mark_correct(recs)
    return {"tasks": score(recs), "provenance": {"method": "majority answer", "answers": answers}}


def mark_correct(records: list[dict]) -> None:
    """Per-question rule-based correctness, written into the predictions file for inspection."""
    for r in records:
        if r["task"] == "mme":
            r["correct"] = metrics.mme_parse(r["prediction"]) == r["target"].lower().strip()
        elif r["task"] in ("pope", "sample_pope"):
            r["correct"] = metrics.pope_parse(r["prediction"]) == r["target"].lower().strip()
        elif r.get("answers"):
            r["correct"] = metrics.vqa_accuracy(r["prediction"], r["answers"])
        else:
            r["correct"] = metrics.label_match(r["prediction"], r["target"])


class Judge:
    """The reference's LLM judge (it used vicuna-13b-v1.5): any local HF causal LM is asked, in the Vicuna chat
    format, whether the prediction is correct; "yes" in its (<= 5 token) reply counts as correct."""

    def __init__(self, path: str, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.core.chat import SYSTEM

        from pipeline.core.models import ensure_pad_token

        self.tok = ensure_pad_token(AutoTokenizer.from_pretrained(path))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device == "cpu" else torch.float16)
        self.model.to(device).eval()
        self.system, self.device = SYSTEM, device

    def __call__(self, records: list[dict]) -> list[bool]:
        import torch

        out = []
        for r in records:
            text = f"{self.system} USER: {JUDGE_PROMPT.format(**r)} ASSISTANT:"
            enc = self.tok(text, return_tensors="pt").to(self.device)
            with torch.no_grad():
                seq = self.model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=self.tok.pad_token_id)
            out.append("yes" in self.tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).lower())
        return out


# ------------------------------------------------------------------------------------------------ tables
def _cell(res: dict, col: str) -> str:
    if col not in res:
        return "–"
    m = res[col]
    return f"{m['score']:.1f}" if col != "mme" else f"{m['perception']:.1f} / {m['cognition']:.1f}"


def markdown_table(results: dict) -> str:
    present = [t for r in results.values() for t in r["tasks"]]
    cols = [c for c in TABLE_COLUMNS if c in present]
    cols += [c for c in dict.fromkeys(present) if c not in cols]  # held-out sets given by path, in order
    names = {"mme": "MME (P / C)", "pope": "POPE acc", "mmavg": "MMAvg", "sample_mnist": "sample digits",
             "sample_pope": "sample existence (acc)", "sample_bigger": "sample bigger's colour",
             "sample_shape": "sample shape of colour", "sample_train_val": "training tasks (val)"}
    lines = ["| run | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for run, r in results.items():
        lines.append(f"| {run} | " + " | ".join(_cell(r["tasks"], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))


# ----------------------------------------------------------------------------------------------- the app
@dataclass
class EvalConfig:
    """One evaluation: which models, which tasks, how to decode (every field is a flag of this module's CLI)."""

    model: str = field(default="tiny", metadata={"help": "HF llava folder, 'tiny' (the embedded pretrained base) or 'tiny-random'"})
    model_llm: str | None = field(default=None, metadata={"help": "LLaVA-v1 parts: Vicuna/Llama folder"})
    model_vision: str | None = field(default=None, metadata={"help": "LLaVA-v1 parts: CLIP vision folder"})
    mm_projector: str | None = field(default=None, metadata={"help": "LLaVA-v1 parts: stage-1 mm_projector.bin"})
    adapter: list | None = field(default=None, metadata={"nargs": "*", "help": (
        "one or more training artifacts, one row each: M2PT adapters (--method m2pt / visual / text / projector), "
        "PEFT LoRA adapters (--method lora) or model folders (--method full)")})
    with_base: bool = field(default=False, metadata={"help": (
        "also evaluate the un-tuned base (the 'LLaVA_Align' row); implied when no --adapter is given")})
    tasks: str | None = field(default=None, metadata={"help": (
        f"comma-separated; built-in: {', '.join(TASKS)}; or your own held-out set as a path (LLaVA .json / .jsonl, "
        "or a shard folder) or name=path, scored by label match (default: " + SAMPLE_DEFAULT + ")")})
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
    majority_baseline: bool = field(default=True, metadata={"help": (
        "also score the majority answer: every question of a task answered with that task's most frequent target, "
        "scored by the same rules (no model; the floor a tuned model must beat)")})
    judge_model: str | None = field(default=None, metadata={"help": (
        "local HF causal LM used as the reference's yes/no judge for the non-MME tasks (e.g. vicuna-13b-v1.5); "
        "reported as judge_accuracy beside the rule-based score")})
    score_only: Path | None = field(default=None, metadata={"type": Path, "help": (
        "re-score an existing predictions.jsonl (fields task, category, image_id, question, target, prediction) "
        "without loading any model")})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)"})


def parse_args(argv=None):
    from pipeline.cli import HelpFormatter, add_config_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_config_flags(ap, EvalConfig)
    return ap.parse_args(argv)


def _read_predictions(path: Path) -> list[dict]:
    return [r for _, r in read_jsonl(path, {"task", "category", "image_id", "question", "target", "prediction"})]


def limit_items(task: str, items: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` questions; for MME whole images (both questions of a pair), so acc+ stays defined."""
    if limit is None or len(items) <= limit:
        return items
    if task != "mme":
        return items[:limit]
    images: dict = {}
    for it in items:
        if len(images) * 2 >= limit and (it["category"], it["image_id"]) not in images:
            break
        images.setdefault((it["category"], it["image_id"]), []).append(it)
    return [it for group in images.values() for it in group]


def _run_name(adapter: str) -> str:
    """Table row name: `runs/x/adapter` -> `x`; `runs/x/checkpoints/step-00000100/adapter` -> `x/step-00000100`."""
    p = Path(adapter)
    if p.name != "adapter":
        return p.name
    if p.parent.parent.name == "checkpoints":
        return f"{p.parent.parent.parent.name}/{p.parent.name}"
    return p.parent.name


def rescore(cfg: EvalConfig) -> dict:
    recs = _read_predictions(cfg.score_only)
    results = {cfg.score_only.parent.name or "predictions": {"tasks": score(recs),
                                                             "provenance": {"predictions": str(cfg.score_only)}}}
    cfg.output_dir = cfg.output_dir or cfg.score_only.parent  # beside its input, never a shared default
    write_outputs(cfg.output_dir, results)
    return results


def plan_runs(cfg: EvalConfig) -> tuple[list, dict, Path]:
    """Rows to evaluate [(name, adapter | None, what methods.read_artifact says of it | None)], the items per task,
    and the data root - everything checked before any model loads (adapter configs, task files, MME pairs)."""
    from pipeline.core.methods import read_artifact

    default = cfg.tasks is None and cfg.data_root is None
    task_paths = parse_tasks(cfg.tasks or SAMPLE_DEFAULT)
    data_root = cfg.data_root or REPO / "data" / "sample"
    if default:
        from pipeline.demo.sample_data import ensure_sample

        ensure_sample(data_root)
    adapters = list(cfg.adapter or [])
    if default and not adapters and (REPO / "out" / "default" / "adapter").is_dir():
        adapters = [str(REPO / "out" / "default" / "adapter")]
        cfg.with_base = True
    # Each adapter's config is read once, here: a broken one fails before any model loads.
    runs = ([("base", None, None)] if (cfg.with_base or not adapters) else []) + [
        (_run_name(a), a, read_artifact(a)) for a in adapters]
    items = {t: limit_items(t, load_task(t, data_root, cfg.coco_root, p), cfg.limit) for t, p in task_paths.items()}
    if "mme" in items:
        metrics.check_mme_pairs(items["mme"])  # before any generation, not after hours of it
    return runs, items, data_root


def evaluate_one(cfg: EvalConfig, name: str, adapter: str | None, adapter_config: dict | None, items: dict,
                 data_root: Path, judge) -> dict:
    """Generate for every task with one model (the base, or the base + one adapter); write its predictions."""
    import torch

    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import num_visual_tokens
    from pipeline.core.methods import load_artifact
    from pipeline.defaults import load_base

    t0 = time.time()
    dtype = torch.float16 if cfg.device.startswith("cuda") else torch.float32
    kind = adapter_config["kind"] if adapter_config else None
    if kind == "full":  # a fully fine-tuned model folder is the model
        base = load_base(adapter, dtype=dtype)
        model = base.model
    else:
        base = load_base(cfg.model, llm=cfg.model_llm, vision=cfg.model_vision, mm_projector=cfg.mm_projector,
                         dtype=dtype)
        model = load_artifact(base.model, adapter, kind) if adapter else base.model
    model.to(cfg.device).eval()
    template = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
    recs = []
    for its in items.values():
        preds = generate(model, base.tokenizer, base.image_processor, template, its, cfg.batch_size,
                         cfg.max_new_tokens, cfg.temperature, cfg.seed)
        recs += [prediction_record(it, p) for it, p in zip(its, preds)]
    mark_correct(recs)
    if judge:
        judged = [r for r in recs if r["task"] != "mme"]
        for r, ok in zip(judged, judge(judged)):
            r["judge_correct"] = ok
    run_dir = cfg.output_dir / name.replace("/", "__")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "predictions.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")
    return {"tasks": score(recs), "provenance": {
        "base_model": base.name, "adapter": adapter,
        "method": adapter_config["training_method"] if adapter_config else "base",
        "adapter_config": (adapter_config["config"].get("m2pt_config") if kind == "m2pt"
                           else adapter_config["config"] if kind == "lora" else None),
        "data_root": str(data_root), "tasks": list(items), "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "seconds": round(time.time() - t0, 1)}}


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate (or with score_only, re-score); returns {row: {"tasks": {task: metrics}, "provenance": ...}} and
    writes results.json / results.md under cfg.output_dir."""
    import torch

    if cfg.score_only:
        return rescore(cfg)
    cfg.output_dir = cfg.output_dir or REPO / "out" / "eval"
    runs, items, data_root = plan_runs(cfg)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    judge = Judge(cfg.judge_model, cfg.device) if cfg.judge_model else None
    results = {MAJORITY: majority_baseline(items)} if cfg.majority_baseline else {}
    for name, adapter, adapter_config in runs:
        results[name] = evaluate_one(cfg, name, adapter, adapter_config, items, data_root, judge)
        log.info("%s: %s", name, {t: round(m["score"], 2) for t, m in results[name]["tasks"].items()})
    write_outputs(cfg.output_dir, results)
    return results


def run(args) -> dict:
    """The CLI's namespace -> evaluate(); args.output_dir is updated to where the results went."""
    cfg = EvalConfig(**vars(args))
    results = evaluate(cfg)
    args.output_dir = cfg.output_dir
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    try:
        results = run(args)
    except (LayoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(results), end="")
    print(f"results: {args.output_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
