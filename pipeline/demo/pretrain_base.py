"""Pretrain the embedded tiny base, so that prompts and adapters have something to expose.

    python -m pipeline.pretrain_base --eval_every 2000   # the shipped demo/assets/tiny_base.safetensors (~2.3 h)

A random base cannot show what M²PT buys: prompts, LoRA and the projector steer what a frozen model knows, they do
not teach it concepts. This builds, from the seeded random init (`--model tiny-random`), a base that knows the
embedded world (`pipeline.demo.scenes`), on streams generated on the fly, in up to three stages (each optional):

  1. language (--language_steps): the LLM alone (the vision side unused), on text:
       text QA     "Scene: <caption>.\\n<question>" -> the answer, over every question form of the training and the
                   held-out task types (the LLM learns to answer from a description)
       restating   "Scene: <caption>.\\nDescribe the image." -> the caption (--copy_share of the samples)
  2. alignment (--align_steps): LLaVA's stage 1 - the LLM frozen, the vision tower and projector trained on
       captioning  "<image>\\nDescribe the image." -> the scene's full caption (every attribute any task asks about)
  3. joint (--steps): every weight, on captioning and text QA (--text_share of the samples)

In text QA the two look-up forms, existence and shape of a given colour, are drawn --lookup_weight times as often as
each other form. Every sample weighs the same in the loss (the mean of its own tokens' cross-entropy): with a token
average a one-word answer would be 2 of ~25 supervised tokens beside a caption and QA would barely train.

The shipped base runs all three (the defaults: 6,000 + 8,000 + 8,000 steps, the joint one at the low --joint_lr).
Why staged: with the LLM frozen while the vision side learns to caption, the vision side must hand it tokens it reads
like the descriptions it learned to answer questions about (docs/base_experiments.md §2-6 has the measurements).

A finished stage's weights are kept in --work_dir: a re-run whose settings for that stage and every earlier one are
the same, with the same code (comments and docstrings aside) and torch version, starts after it (the result of a
stage is a pure function of those, so nothing changes but time).

At the end it scores, greedily, on fresh samples (their own random stream): caption exact match and text-QA
accuracy (targets: >= 90 % and >= 95 %), caption accuracy on the held-out digit images the stream never showed,
and - for information, never trained - the text-QA questions asked about the image instead. Writes
OUTPUT.safetensors (every weight, fp32) and OUTPUT.json: the command, seed, sha256, the loss of every
`--log_every`-th step (and all of the first 20, which a test reproduces) and the scores.
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

from pipeline.demo import scenes
from pipeline.demo.tiny import ASSETS
from pipeline.files import sha256_file

log = logging.getLogger("m2pt.pretrain_base")
FIRST_LOSSES = 20  # every step's loss is recorded up to here (the reproduction test runs a few of them)
# Forms answered by finding the asked colour among the described objects: drawn more often (--lookup_weight), as
# look-ups are learned slowly (docs/base_experiments.md).
LOOKUP_FORMS = ("object_existence", "shape_of_colour")


@dataclass
class PretrainConfig:
    steps: int = field(default=8000, metadata={"help": "steps of the joint stage: every weight, on captions and "
                                                       "text QA (0: none)"})
    language_steps: int = field(default=6000, metadata={"help": "steps of a first stage, language: the LLM alone on "
                                                             "text QA and restated descriptions (0: none)"})
    align_steps: int = field(default=8000, metadata={"help": "steps of a second stage, alignment: the vision tower and "
                                                          "projector on captions, the LLM frozen (0: none)"})
    stop_after: int = field(default=0, metadata={"help": "stop after this many steps (every stage counted), same "
                                                         "schedules, no weights written (0: run all; for checking "
                                                         "reproduction)"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate of each stage (linear warm-up, "
                                                      "cosine to 10 %)"})
    joint_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of the joint stage alone (0: --lr); "
                                                           "not part of the earlier stages' settings, so a low-rate "
                                                           "joint stage reuses kept language and alignment stages"})
    warmup: int = field(default=200, metadata={"help": "warm-up steps of each stage"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    text_share: float = field(default=0.5, metadata={"help": "share of the joint stage's samples that are text QA "
                                                             "(the rest caption)"})
    copy_share: float = field(default=0.3, metadata={"help": "share of the language stage's samples that restate "
                                                             "the description (the rest: text QA)"})
    lookup_weight: float = field(default=4.0, metadata={"help": "sampling weight, among the text-QA forms, of the "
                                                                "look-up forms (existence, shape of colour; every "
                                                                "other form weighs 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the init and of the sample streams"})
    eval_samples: int = field(default=500, metadata={"help": "fresh samples per score at the end (0: no scores)"})
    eval_every: int = field(default=0, metadata={"help": "also score on 100 fresh samples every N steps of the "
                                                         "alignment and joint stages (0: never)"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    log_every: int = field(default=50, metadata={"help": "record and show the loss every N steps"})
    output: Path = field(default=ASSETS / "tiny_base", metadata={"help": "writes OUTPUT.safetensors and OUTPUT.json"})
    work_dir: Path = field(default=Path("out/pretrain_base"), metadata={
        "help": "the weights after each finished stage; a re-run whose settings of that stage and every earlier one "
                "are the same starts after it"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in PretrainConfig.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default,  # argparse %-formats help
                        help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))
    return ap


# ---- the sample streams ------------------------------------------------------------------------------------------

def qa_sample(rng: random.Random, lookup_weight: float) -> tuple[list[dict], None]:
    """A question about a written scene (no image)."""
    forms = list(scenes.QUESTIONS)
    task = rng.choices(forms, [lookup_weight if f in LOOKUP_FORMS else 1.0 for f in forms])[0]
    scene, q, a = scenes.ask(task, rng)
    return [{"from": "human", "value": scenes.scene_text(scene) + "\n" + q}, {"from": "gpt", "value": a}], None


def restate_sample(rng: random.Random) -> tuple[list[dict], None]:
    """A written scene restated as its caption (what stage 2 asks of an image)."""
    scene = scenes.random_scene(rng, rng.choice(scenes.SCENE_KINDS))
    return ([{"from": "human", "value": scenes.scene_text(scene) + "\n" + scenes.DESCRIBE},
             {"from": "gpt", "value": scenes.caption(scene)}], None)


def caption_sample(rng: random.Random) -> tuple[list[dict], object]:
    """The caption of a rendered scene."""
    scene = scenes.random_scene(rng, rng.choice(scenes.SCENE_KINDS))
    conv = [{"from": "human", "value": "<image>\n" + scenes.DESCRIBE}, {"from": "gpt", "value": scenes.caption(scene)}]
    return conv, scenes.render(scene)


def draw_sample(stage: str, rng: random.Random, cfg: PretrainConfig) -> tuple[list[dict], object]:
    if stage == "language":
        return restate_sample(rng) if rng.random() < cfg.copy_share else qa_sample(rng, cfg.lookup_weight)
    if stage == "alignment":
        return caption_sample(rng)
    return qa_sample(rng, cfg.lookup_weight) if rng.random() < cfg.text_share else caption_sample(rng)


# Each step's batch comes from its own stream (reproducible, and a stage can start anywhere). The joint stage keeps
# the stream name of the one-stage recipe, so the shipped base's command reproduces.
STREAM = {"language": "language", "alignment": "alignment", "joint": "train"}


def make_batch(stage: str, step: int, cfg: PretrainConfig, template, image_processor, pad_id: int) -> dict:
    rng = random.Random(f"{cfg.seed}/{STREAM[stage]}/{step}")
    convs, images = zip(*(draw_sample(stage, rng, cfg) for _ in range(cfg.batch_size)))
    enc = [template.encode(c) for c in convs]
    n = max(len(e.input_ids) for e in enc)
    ids = torch.tensor([e.input_ids + [pad_id] * (n - len(e.input_ids)) for e in enc])
    labels = torch.tensor([e.labels + [-100] * (n - len(e.labels)) for e in enc])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in enc])
    ims = [im for im in images if im is not None]
    px = image_processor(images=ims, return_tensors="pt")["pixel_values"] if ims else None
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}


class _Batches(torch.utils.data.IterableDataset):
    """A stage's steps [0, last) as batches, drawn in a loader worker while the main process trains."""

    def __init__(self, stage: str, last: int, cfg: PretrainConfig, template, image_processor, pad_id: int):
        self.args = stage, last, cfg, template, image_processor, pad_id

    def __iter__(self):
        stage, last, cfg, template, image_processor, pad_id = self.args
        return (make_batch(stage, step, cfg, template, image_processor, pad_id) for step in range(last))


def sample_mean_loss(model, batch: dict) -> torch.Tensor:
    """Mean over samples of each sample's mean token cross-entropy (every sample weighs the same)."""
    kw = {"pixel_values": batch["pixel_values"]} if batch["pixel_values"] is not None else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), tgt, ignore_index=-100, reduction="none")
    n = (tgt != -100).sum(1).clamp(min=1)
    return (tok.sum(1) / n).mean()


def lr_at(step: int, steps: int, peak: float, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---- the scores --------------------------------------------------------------------------------------------------

def _score_items(n: int, seed: int) -> list[dict]:
    """Fresh samples from their own random stream: captions, text QA, captions of held-out digit images, and the
    text-QA questions asked about the image instead."""
    rng = random.Random(f"{seed}/eval")
    caps = [scenes.random_scene(rng, scenes.SCENE_KINDS[k % len(scenes.SCENE_KINDS)]) for k in range(n)]
    tasks = [list(scenes.QUESTIONS)[k % len(scenes.QUESTIONS)] for k in range(n)]
    qas = [scenes.ask(t, rng) for t in tasks]
    held = [scenes.digit_scene(rng, "heldout") for _ in range(n // 5)]
    return ([{"image": scenes.render(s), "question": scenes.DESCRIBE, "target": scenes.caption(s), "kind": s.kind
              + (str(len(s.objects)) if s.kind == "objects" else "")} for s in caps]
            + [{"image": None, "question": scenes.scene_text(s) + "\n" + q, "target": a, "kind": t}
               for t, (s, q, a) in zip(tasks, qas)]
            + [{"image": scenes.render(s), "question": scenes.DESCRIBE, "target": scenes.caption(s),
                "kind": "heldout_digit"} for s in held]
            + [{"image": scenes.render(s), "question": "<image>\n" + q, "target": a, "kind": "image:" + t}
               for t, (s, q, a) in zip(tasks, qas)])


def _share(hits: list[bool]) -> float:
    return round(100 * sum(hits) / len(hits), 2)


def score_base(base, n: int, seed: int, batch_size: int = 64) -> dict:
    """Greedy caption exact match and text-QA accuracy on `n` fresh samples each (per kind / per task too),
    caption accuracy on held-out digit images, and the text-QA questions asked about the image instead (never
    trained: what the base answers about an image before any tuning)."""
    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import num_visual_tokens
    from pipeline.evaluation.generate import generate

    tok, model = base.tokenizer, base.model.eval()
    template = VicunaTemplate(tok, model.config.image_token_id, num_visual_tokens(model))
    items = _score_items(n, seed)
    preds = generate(model, tok, base.image_processor, template, items, batch_size, max_new_tokens=32,
                     show_progress=False)
    by: dict[str, list[bool]] = {}
    for it, p in zip(items, preds):
        by.setdefault(it["kind"], []).append(p.strip() == it["target"])
    wrong = [f"{p.strip()!r} for {it['target']!r}" for it, p in zip(items, preds)
             if p.strip() != it["target"] and it["image"] is not None][:6]
    log.info("e.g. wrong: %s", "; ".join(wrong))
    cap = [x for k, v in by.items() if k in scenes.SCENE_KINDS for x in v]
    qa = [x for k, v in by.items() if k in scenes.QUESTIONS for x in v]
    img = [x for k, v in by.items() if k.startswith("image:") for x in v]
    pct = {k: _share(v) for k, v in by.items()}
    return {"caption_exact_match": _share(cap), "text_qa": _share(qa),
            "heldout_digit_caption": pct.get("heldout_digit"), "image_qa_untrained": _share(img),
            "by_kind": pct, "samples": {"caption": len(cap), "text_qa": len(qa)}}


# ---- the run -----------------------------------------------------------------------------------------------------

def _stage_optimizer(model, params: list, cfg: PretrainConfig):
    """Freeze every weight but `params`; AdamW with weight decay on their matrices only."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _keeps_loss(k: int, step: int, last: int, cfg: PretrainConfig) -> bool:
    """Which losses the record keeps: every one of the first FIRST_LOSSES, then every --log_every-th, and the last."""
    return k < FIRST_LOSSES or (step + 1) % cfg.log_every == 0 or step + 1 == last


def run_stage(base, stage: str, params: list, steps: int, first: int, cfg: PretrainConfig, template,
              losses: dict) -> None:
    """Train `params` (every other weight frozen) for `steps` steps of `stage`'s stream; `first`: the index of its
    first step in the whole run, so that `losses` and `--stop_after` count the stages as one run."""
    from tqdm import tqdm

    model = base.model.train()
    opt = _stage_optimizer(model, params, cfg)
    last = min(steps, cfg.stop_after - first) if cfg.stop_after else steps
    peak = (cfg.joint_lr or cfg.lr) if stage == "joint" else cfg.lr
    evals = cfg.eval_every if stage != "language" else 0
    loader = torch.utils.data.DataLoader(
        _Batches(stage, last, cfg, template, base.image_processor, base.tokenizer.pad_token_id),
        batch_size=None, num_workers=1, prefetch_factor=4)
    bar = tqdm(loader, total=last, desc=stage, unit="step", mininterval=5)
    for step, batch in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak, cfg)
        loss = sample_mean_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if _keeps_loss(first + step, step, last, cfg):
            losses[first + step] = loss.item()
            bar.set_postfix(loss=f"{losses[first + step]:.4f}")
        if evals and (step + 1) % evals == 0 and step + 1 < last:
            log.info("%s step %d: %s", stage, step + 1, json.dumps(score_base(base, 100, cfg.seed)))
            model.train()


# The settings a stage's result depends on: its own and every earlier stage's (threads too: they change float sums).
STAGE_SETTINGS = {"language": ("seed", "batch_size", "lr", "warmup", "weight_decay", "threads", "language_steps",
                               "copy_share", "lookup_weight")}
STAGE_SETTINGS["alignment"] = STAGE_SETTINGS["language"] + ("align_steps",)
STAGE_SETTINGS["joint"] = STAGE_SETTINGS["alignment"] + ("steps", "text_share", "joint_lr")


# The modules whose code a stage runs: the model, the chat template, the scene generator and the stages themselves.
STAGE_CODE = ("pipeline.demo.pretrain_base", "pipeline.demo.scenes", "pipeline.core.chat", "pipeline.core.models",
              "pipeline.demo.tiny")


def code_fingerprint(modules=STAGE_CODE) -> str:
    """sha256 over the modules' code with comments and docstrings left out, plus the torch version.

    Why: a kept stage is reused on its settings alone, so without this a change to a sampler, a schedule or the loss
    would silently reuse stages made by the old code. The AST is hashed rather than the file so that editing a
    docstring or a comment does not throw away an hour of kept stages."""
    import ast
    import hashlib
    import importlib.util

    h = hashlib.sha256(torch.__version__.encode())
    for name in modules:
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()


def _stage_key(cfg: PretrainConfig, stage: str, code: str) -> dict:
    return {**{k: getattr(cfg, k) for k in STAGE_SETTINGS[stage]}, "code": code}


def resume_stage(base, cfg: PretrainConfig, stage: str, losses: dict, code: str) -> bool:
    """Load `stage`'s kept result if it was made with this run's settings and code (`code_fingerprint()`); True if
    it was."""
    from safetensors.torch import load_file

    rec, weights = cfg.work_dir / f"{stage}.json", cfg.work_dir / f"{stage}.safetensors"
    try:
        kept = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    want, had = _stage_key(cfg, stage, code), kept.get("settings", {})
    if had != want or not weights.is_file():
        differ = sorted(k for k in want.keys() | had.keys() if had.get(k) != want.get(k))
        log.info("stage %s: running it, the one kept in %s has other %s", stage, cfg.work_dir,
                 ", ".join(differ) or "(missing) weights")
        return False
    base.model.load_state_dict(load_file(str(weights)))
    losses.update({int(k): v for k, v in kept["losses"].items()})
    log.info("stage %s: reusing %s (made with the same settings)", stage, weights)
    return True


def keep_stage(base, cfg: PretrainConfig, stage: str, losses: dict, code: str) -> None:
    from safetensors.torch import save_file

    from pipeline.files import atomic_write_json

    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.work_dir / f"{stage}.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in base.model.state_dict().items()}, str(tmp))
    tmp.replace(cfg.work_dir / f"{stage}.safetensors")
    atomic_write_json(cfg.work_dir / f"{stage}.json", {"settings": _stage_key(cfg, stage, code), "losses": losses})


def _sides(model) -> tuple[list, list, list]:
    """(LLM parameters, vision-side parameters, all) of the tiny model."""
    named = list(model.named_parameters())
    llm = [p for n, p in named if n.startswith(("model.language_model.", "lm_head."))]
    vision = [p for n, p in named if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    if len(llm) + len(vision) != len(named) or not llm or not vision:
        raise RuntimeError("the tiny model's parameters do not split into LLM and vision side as expected")
    return llm, vision, [p for _, p in named]


def run_stages(base, cfg: PretrainConfig, template, losses: dict) -> None:
    """language -> alignment -> joint, each skipped at 0 steps; a finished stage made with these settings and this
    code is loaded instead of trained (except in a --stop_after reproduction check, which keeps nothing)."""
    llm, vision, every = _sides(base.model)
    code = code_fingerprint()  # once per run: it parses every module in STAGE_CODE
    first = 0
    for stage, params, steps in (("language", llm, cfg.language_steps), ("alignment", vision, cfg.align_steps),
                                 ("joint", every, cfg.steps)):
        if steps and not (cfg.stop_after and first >= cfg.stop_after):
            if cfg.stop_after:
                run_stage(base, stage, params, steps, first, cfg, template, losses)
            elif not resume_stage(base, cfg, stage, losses, code):
                run_stage(base, stage, params, steps, first, cfg, template, losses)
                keep_stage(base, cfg, stage, losses, code)
        first += steps


def save_base(base, cfg: PretrainConfig, record: dict) -> None:
    """OUTPUT.safetensors (every weight, fp32) and OUTPUT.json (the record, with the file's sha256)."""
    from safetensors.torch import save_file

    out = cfg.output.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes a metadata map in no fixed order, so with two keys the same weights
    # got one of two sha256s from run to run. The command is in OUTPUT.json.
    save_file({k: v.detach().contiguous() for k, v in base.model.state_dict().items()}, str(out),
              metadata={"format": "pt"})
    record["file"], record["sha256"] = out.name, sha256_file(out)
    cfg.output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def pretrain(cfg: PretrainConfig, command: str) -> dict:
    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import num_visual_tokens
    from pipeline.demo.tiny import build_tiny

    torch.set_num_threads(cfg.threads)
    base = build_tiny(seed=cfg.seed, pretrained=False)
    template = VicunaTemplate(base.tokenizer, base.model.config.image_token_id, num_visual_tokens(base.model))
    losses, t0 = {}, time.time()
    run_stages(base, cfg, template, losses)
    record = {"command": command, "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "torch": torch.__version__, "losses": losses, "seconds": round(time.time() - t0)}
    if cfg.stop_after:
        return record
    if cfg.eval_samples:
        record["scores"] = score_base(base, cfg.eval_samples, cfg.seed)
        log.info("scores: %s", json.dumps(record["scores"]))
    save_base(base, cfg, record)
    return record


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cfg = PretrainConfig(**vars(args))
    steps = (cfg.language_steps, cfg.align_steps, cfg.steps)
    if (min(steps) < 0 or not sum(steps) or cfg.batch_size < 1 or not 0 <= cfg.text_share <= 1
            or not 0 <= cfg.copy_share <= 1 or cfg.stop_after < 0 or cfg.lookup_weight <= 0 or cfg.joint_lr < 0):
        print("error: --steps, --language_steps and --align_steps must be >= 0 and not all 0, --batch_size >= 1, "
              "--stop_after >= 0, --text_share and --copy_share in [0, 1], --lookup_weight > 0, --joint_lr >= 0",
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
