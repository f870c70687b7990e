"""Pretrain the embedded tiny base, so that prompts and adapters have something to expose.

    python -m pipeline.pretrain_base            # the defaults reproduce pipeline/assets/tiny_base.safetensors

A random base cannot show what M²PT buys: prompts, LoRA and the projector steer what a frozen model knows, they do
not teach it concepts. This builds, from the seeded random init (`--model tiny-random`), a base that knows the
embedded world (`pipeline.scenes`), LLaVA-style with every weight trainable, on a stream generated on the fly:

  captioning  "<image>\\nDescribe the image." -> the scene's full caption (every attribute any task asks about)
  text QA     "Scene: <caption>.\\n<question>" -> the answer, over every question form of the training and the
              held-out task types, with no image (the language model learns to answer from a description)

Half the samples are each (`--text_share`; among the QA forms the two look-ups, existence and shape of a given
colour, are drawn `--lookup_weight` times as often as each other form), and every sample weighs the same in the
loss (the mean of its own tokens' cross-entropy): with a token average a one-word answer would be 2 of ~25
supervised tokens beside a caption and QA would barely train. One stage, all weights trained jointly: the LLM has
no language to keep (it starts random), so LLaVA's frozen-LLM alignment stage has nothing to protect here.

At the end it scores, greedily, on fresh samples (their own random stream): caption exact match and text-QA
accuracy (targets: >= 90 % and >= 95 %), and caption accuracy on the held-out digit images the stream never
showed. Writes OUTPUT.safetensors (every weight, fp32) and OUTPUT.json: the command, seed, sha256, the loss of
every `--log_every`-th step (and all of the first 20, which a test reproduces) and the scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline import scenes
from pipeline.files import sha256_file
from pipeline.models import ASSETS

log = logging.getLogger("m2pt.pretrain_base")
FIRST_LOSSES = 20  # every step's loss is recorded up to here (the reproduction test runs a few of them)
# Forms answered by finding the asked colour among the described objects. At weight 1 (each ~4 % of samples)
# existence stayed at chance for 8,000 steps while every other form reached 100 %; a separate 400-step run on
# existence alone only moved it from 57 % to 72 %: the look-up is learned slowly and needs more examples.
LOOKUP_FORMS = ("object_existence", "shape_of_colour")


@dataclass
class PretrainConfig:
    steps: int = field(default=8000, metadata={"help": "optimizer steps (the schedule's length)"})
    stop_after: int = field(default=0, metadata={"help": "stop after this many steps, same schedule, no weights "
                                                         "written (0: run all; for checking reproduction)"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine to 10 %)"})
    warmup: int = field(default=200, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    text_share: float = field(default=0.5, metadata={"help": "share of text-only QA samples (the rest caption)"})
    lookup_weight: float = field(default=4.0, metadata={"help": "sampling weight, among the text-QA forms, of the "
                                                                "look-up forms (existence, shape of colour; every "
                                                                "other form weighs 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the init and of the sample stream"})
    eval_samples: int = field(default=500, metadata={"help": "fresh samples per score at the end (0: no scores)"})
    eval_every: int = field(default=0, metadata={"help": "also score on 100 fresh samples every N steps (0: never)"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    log_every: int = field(default=50, metadata={"help": "record and show the loss every N steps"})
    output: Path = field(default=ASSETS / "tiny_base", metadata={"help": "writes OUTPUT.safetensors and OUTPUT.json"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in PretrainConfig.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default,  # argparse %-formats help
                        help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))
    return ap


# ---- the sample stream -------------------------------------------------------------------------------------------

def draw_sample(rng: random.Random, text_share: float, lookup_weight: float) -> tuple[list[dict], object]:
    """(conversation, PIL image or None): a caption of a random scene, or a text-only question about one."""
    if rng.random() < text_share:
        forms = list(scenes.QUESTIONS)
        task = rng.choices(forms, [lookup_weight if f in LOOKUP_FORMS else 1.0 for f in forms])[0]
        scene, q, a = scenes.ask(task, rng)
        return [{"from": "human", "value": scenes.scene_text(scene) + "\n" + q}, {"from": "gpt", "value": a}], None
    scene = scenes.random_scene(rng, rng.choice(scenes.SCENE_KINDS))
    return ([{"from": "human", "value": "<image>\n" + scenes.DESCRIBE}, {"from": "gpt", "value": scenes.caption(scene)}],
            scenes.render(scene))


def make_batch(step: int, cfg: PretrainConfig, template, image_processor, pad_id: int) -> dict:
    rng = random.Random(f"{cfg.seed}/train/{step}")  # each step's batch from its own stream: resumable, reproducible
    convs, images = zip(*(draw_sample(rng, cfg.text_share, cfg.lookup_weight) for _ in range(cfg.batch_size)))
    enc = [template.encode(c) for c in convs]
    n = max(len(e.input_ids) for e in enc)
    ids = torch.tensor([e.input_ids + [pad_id] * (n - len(e.input_ids)) for e in enc])
    labels = torch.tensor([e.labels + [-100] * (n - len(e.labels)) for e in enc])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in enc])
    ims = [im for im in images if im is not None]
    px = image_processor(images=ims, return_tensors="pt")["pixel_values"] if ims else None
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}


class _Batches(torch.utils.data.IterableDataset):
    """Steps [0, last) as batches, drawn in a loader worker while the main process trains on the previous one."""

    def __init__(self, last: int, cfg: PretrainConfig, template, image_processor, pad_id: int):
        self.args = last, cfg, template, image_processor, pad_id

    def __iter__(self):
        last, cfg, template, image_processor, pad_id = self.args
        return (make_batch(step, cfg, template, image_processor, pad_id) for step in range(last))


def sample_mean_loss(model, batch: dict) -> torch.Tensor:
    """Mean over samples of each sample's mean token cross-entropy (every sample weighs the same)."""
    kw = {"pixel_values": batch["pixel_values"]} if batch["pixel_values"] is not None else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), tgt, ignore_index=-100, reduction="none")
    n = (tgt != -100).sum(1).clamp(min=1)
    return (tok.sum(1) / n).mean()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---- the scores --------------------------------------------------------------------------------------------------

def score_base(base, n: int, seed: int, batch_size: int = 64) -> dict:
    """Greedy caption exact match and text-QA accuracy on `n` fresh samples each (per kind / per task too), and
    caption accuracy on held-out digit images."""
    from pipeline.chat import VicunaTemplate
    from pipeline.evaluate import generate
    from pipeline.m2pt import num_visual_tokens

    tok, model = base.tokenizer, base.model.eval()
    template = VicunaTemplate(tok, model.config.image_token_id, num_visual_tokens(model))
    rng = random.Random(f"{seed}/eval")
    caps = [scenes.random_scene(rng, scenes.SCENE_KINDS[k % len(scenes.SCENE_KINDS)]) for k in range(n)]
    tasks = [list(scenes.QUESTIONS)[k % len(scenes.QUESTIONS)] for k in range(n)]
    qas = [scenes.ask(t, rng) for t in tasks]
    held = [scenes.digit_scene(rng, "heldout") for _ in range(n // 5)]
    items = ([{"image": scenes.render(s), "question": scenes.DESCRIBE, "target": scenes.caption(s), "kind": s.kind
               + (str(len(s.objects)) if s.kind == "objects" else "")} for s in caps]
             + [{"image": None, "question": scenes.scene_text(s) + "\n" + q, "target": a, "kind": t}
                for t, (s, q, a) in zip(tasks, qas)]
             + [{"image": scenes.render(s), "question": scenes.DESCRIBE, "target": scenes.caption(s),
                 "kind": "heldout_digit"} for s in held])
    preds = generate(model, tok, base.image_processor, template, items, batch_size, max_new_tokens=32,
                     show_progress=False)
    by: dict[str, list[bool]] = {}
    wrong = []
    for it, p in zip(items, preds):
        by.setdefault(it["kind"], []).append(p.strip() == it["target"])
        if not by[it["kind"]][-1] and len(wrong) < 6 and it["image"] is not None:
            wrong.append(f"{p.strip()!r} for {it['target']!r}")
    log.info("e.g. wrong: %s", "; ".join(wrong))
    pct = {k: round(100 * sum(v) / len(v), 2) for k, v in by.items()}
    cap = [x for k, v in by.items() if k in scenes.SCENE_KINDS for x in v]
    qa = [x for k, v in by.items() if k in scenes.QUESTIONS for x in v]
    return {"caption_exact_match": round(100 * sum(cap) / len(cap), 2), "text_qa": round(100 * sum(qa) / len(qa), 2),
            "heldout_digit_caption": pct.get("heldout_digit"), "by_kind": pct, "samples": {"caption": len(cap),
                                                                                           "text_qa": len(qa)}}


# ---- the run -----------------------------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig, command: str) -> dict:
    from tqdm import tqdm

    from pipeline.chat import VicunaTemplate
    from pipeline.m2pt import num_visual_tokens
    from pipeline.models import build_tiny

    torch.set_num_threads(cfg.threads)
    base = build_tiny(seed=cfg.seed, pretrained=False)
    model, tok = base.model.train(), base.tokenizer
    for p in model.parameters():
        p.requires_grad_(True)
    template = VicunaTemplate(tok, model.config.image_token_id, num_visual_tokens(model))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    losses, t0 = {}, time.time()
    last = cfg.stop_after or cfg.steps
    loader = torch.utils.data.DataLoader(_Batches(last, cfg, template, base.image_processor, tok.pad_token_id),
                                         batch_size=None, num_workers=1, prefetch_factor=4)
    bar = tqdm(loader, total=last, desc="pretrain", unit="step", mininterval=5)
    for step, batch in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = sample_mean_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step < FIRST_LOSSES or (step + 1) % cfg.log_every == 0 or step + 1 == last:
            losses[step] = loss.item()
            bar.set_postfix(loss=f"{losses[step]:.4f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < last:
            log.info("step %d: %s", step + 1, json.dumps(score_base(base, 100, cfg.seed)))
            model.train()
    record = {"command": command, "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "torch": torch.__version__, "losses": losses, "seconds": round(time.time() - t0)}
    if cfg.stop_after:
        return record
    if cfg.eval_samples:
        record["scores"] = score_base(base, cfg.eval_samples, cfg.seed)
        log.info("scores: %s", json.dumps(record["scores"]))
    from safetensors.torch import save_file

    out = cfg.output.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes a metadata map in no fixed order, so with two keys the same weights
    # got one of two sha256s from run to run. The command is in OUTPUT.json.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"format": "pt"})
    record["file"], record["sha256"] = out.name, sha256_file(out)
    cfg.output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cfg = PretrainConfig(**vars(args))
    if (cfg.steps < 1 or cfg.batch_size < 1 or not 0 <= cfg.text_share <= 1 or cfg.stop_after < 0
            or cfg.lookup_weight <= 0):
        print("error: --steps and --batch_size must be >= 1, --stop_after >= 0, --text_share in [0, 1], "
              "--lookup_weight > 0",
              file=sys.stderr)
        return 2
    command = "python -m pipeline.pretrain_base " + " ".join(argv if argv is not None else sys.argv[1:])
    rec = pretrain(cfg, command.strip())
    if cfg.stop_after:
        print(json.dumps(rec["losses"]))
    else:
        print(f"wrote {cfg.output.with_suffix('.safetensors')} (sha256 {rec['sha256']}) and "
              f"{cfg.output.with_suffix('.json')}; scores {json.dumps(rec.get('scores', {}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
