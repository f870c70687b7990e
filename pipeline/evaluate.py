"""Zero-shot evaluation: batched, left-padded, KV-cached generation with the training template, then the standard
metrics. One invocation evaluates the base model and/or several adapters and writes one comparison table.

    python -m pipeline.evaluate --model /models/llava-1.5-7b-hf --adapter runs/a/adapter runs/b/adapter --with_base \\
        --tasks mme,pope,textvqa,vsr,snli_ve,cifar10,cifar100,mnist --data_root /data/eval --output_dir eval_out
    python -m pipeline.evaluate --score_only eval_out/base/predictions.jsonl      # re-score, no model
    python -m pipeline.evaluate                                                   # the embedded default

With no arguments it evaluates the embedded tiny model on the held-out task types of the embedded sample set
(digits as an MNIST-style set, existence questions as a POPE-style set): the un-tuned base, plus the adapter of
the default training run when there is one.

Outputs under --output_dir: `<run>/predictions.jsonl` (one line per question: task, category, image_id, qid,
question, target, prediction, correct), `results.json` (run -> task -> metrics, with provenance) and
`results.md` (one row per run).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from pipeline import metrics
from pipeline.eval_data import TASKS, LayoutError, load_task, parse_tasks, read_jsonl

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("m2pt.evaluate")
JUDGE_PROMPT = ("Please decide if the prediction is correct given the question and the answer.\n"
                "Questions: {question}\nAnswer: {target}\nPrediction: {prediction}\n"
                "Your response should only be Yes or No.")
TABLE_COLUMNS = ("mme", "textvqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope", "mmavg",
                 "sample_mnist", "sample_pope")


# ------------------------------------------------------------------------------------------- generation
def _load_image(image, image_processor):
    from PIL import Image

    if image is None:
        return None
    im = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image).convert("RGB")
    return image_processor(images=im, return_tensors="pt")["pixel_values"][0]


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
        pixel_values = torch.stack(px).to(dev, dtype) if px else None
        if temperature > 0:
            torch.manual_seed(seed + s)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **gen)
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

        from pipeline.chat import SYSTEM

        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.unk_token or self.tok.eos_token
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
             "sample_pope": "sample existence (acc)"}
    lines = ["| run | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for run, r in results.items():
        lines.append(f"| {run} | " + " | ".join(_cell(r["tasks"], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))


# ----------------------------------------------------------------------------------------------- the app
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="HF llava folder or 'tiny' (default: %(default)s)")
    ap.add_argument("--model_llm", default=None, help="LLaVA-v1 parts: Vicuna/Llama folder")
    ap.add_argument("--model_vision", default=None, help="LLaVA-v1 parts: CLIP vision folder")
    ap.add_argument("--mm_projector", default=None, help="LLaVA-v1 parts: stage-1 mm_projector.bin")
    ap.add_argument("--adapter", nargs="*", default=None,
                    help="one or more adapter folders (adapter_config.json + adapter_model.safetensors); one row each")
    ap.add_argument("--with_base", action="store_true",
                    help="also evaluate the un-tuned base (the 'LLaVA_Align' row); implied when no --adapter is given")
    ap.add_argument("--tasks", default=None,
                    help=f"comma-separated; built-in: {', '.join(TASKS)}; or your own held-out set as a path (LLaVA "
                         ".json / .jsonl, or a shard folder) or name=path, scored by label match (default: "
                         "sample_mnist,sample_pope)")
    ap.add_argument("--data_root", type=Path, default=None,
                    help="folder holding the task data (layouts in pipeline/eval_data.py; default: the embedded "
                         "sample set, data/sample)")
    ap.add_argument("--coco_root", type=Path, default=None, help="COCO val2014 images for the official POPE json")
    ap.add_argument("--output_dir", type=Path, default=None,
                    help="where results go (default: out/eval in the repository; with --score_only: the folder of "
                         "the predictions file)")
    ap.add_argument("--batch_size", type=int, default=8, help="questions per generation batch (default: %(default)s)")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="(default: %(default)s; the reference used 128 "
                                                                   "for MME and 50 for the others)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: deterministic greedy (default); the reference sampled at 0.2 (then --seed applies)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate only the first N questions per task (MME: rounded up to whole image pairs)")
    ap.add_argument("--judge_model", default=None,
                    help="local HF causal LM used as the reference's yes/no judge for the non-MME tasks "
                         "(e.g. vicuna-13b-v1.5); reported as judge_accuracy beside the rule-based score")
    ap.add_argument("--score_only", type=Path, default=None,
                    help="re-score an existing predictions.jsonl (fields task, category, image_id, question, "
                         "target, prediction) without loading any model")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
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


def run(args) -> dict:
    import torch

    from pipeline.chat import VicunaTemplate
    from pipeline.m2pt import load_adapter, num_visual_tokens, read_adapter_config
    from pipeline.models import load_base

    if args.score_only:
        recs = _read_predictions(args.score_only)
        results = {args.score_only.parent.name or "predictions": {"tasks": score(recs),
                                                                  "provenance": {"predictions": str(args.score_only)}}}
        args.output_dir = args.output_dir or args.score_only.parent  # beside its input, never a shared default
        write_outputs(args.output_dir, results)
        return results

    args.output_dir = args.output_dir or REPO / "out" / "eval"
    default = args.tasks is None and args.data_root is None
    task_paths = parse_tasks(args.tasks or "sample_mnist,sample_pope")
    tasks = list(task_paths)
    data_root = args.data_root or REPO / "data" / "sample"
    if default:
        from data_prep.make_sample import ensure_sample

        ensure_sample(data_root)
    adapters = list(args.adapter or [])
    if default and not adapters and (REPO / "out" / "default" / "adapter").is_dir():
        adapters = [str(REPO / "out" / "default" / "adapter")]
        args.with_base = True
    adapter_configs = {a: read_adapter_config(a) for a in adapters}  # fail before any model loads
    runs = ([("base", None)] if (args.with_base or not adapters) else []) + [(_run_name(a), a) for a in adapters]
    items = {t: limit_items(t, load_task(t, data_root, args.coco_root, task_paths[t]), args.limit) for t in tasks}
    if "mme" in items:
        metrics.check_mme_pairs(items["mme"])  # before any generation, not after hours of it
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    judge = Judge(args.judge_model, device) if args.judge_model else None

    results = {}
    for name, adapter in runs:
        t0 = time.time()
        base = load_base(args.model, llm=args.model_llm, vision=args.model_vision, mm_projector=args.mm_projector,
                         dtype=dtype)
        model = load_adapter(base.model, adapter) if adapter else base.model
        model.to(device).eval()
        template = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
        recs = []
        for task, its in items.items():
            preds = generate(model, base.tokenizer, base.image_processor, template, its, args.batch_size,
                             args.max_new_tokens, args.temperature, args.seed)
            for it, p in zip(its, preds):
                recs.append({k: it.get(k) for k in ("task", "category", "image_id", "qid", "question", "target",
                                                    "answers")} | {"prediction": p})
        mark_correct(recs)
        if judge:
            for r, ok in zip([r for r in recs if r["task"] != "mme"], judge([r for r in recs if r["task"] != "mme"])):
                r["judge_correct"] = ok
        run_dir = args.output_dir / name.replace("/", "__")
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "predictions.jsonl").open("w") as f:
            for r in recs:
                f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")
        results[name] = {"tasks": score(recs), "provenance": {
            "base_model": base.name, "adapter": adapter,
            "adapter_config": adapter_configs[adapter]["m2pt_config"] if adapter else None,
            "data_root": str(data_root), "tasks": tasks, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size,
            "seconds": round(time.time() - t0, 1)}}
        log.info("%s: %s", name, {t: round(m["score"], 2) for t, m in results[name]["tasks"].items()})
        del model, base
    write_outputs(args.output_dir, results)
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
