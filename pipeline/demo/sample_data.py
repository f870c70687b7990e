"""Build the embedded sample set: Vision-Flan-style JSON + an image folder, offline and deterministic.

Every record is a question about a scene of the embedded world (`pipeline.demo.scenes`: shapes, counts, real handwritten
digits from scikit-learn, printed words), the world the shipped base (`pipeline.demo.pretrain_base`) was pretrained to
caption and to answer text-only questions about. Training task types and held-out task types (reserved for
zero-shot evaluation) are disjoint:

  train.json   colour, shape, shape yes/no, counting, position, reading a word, which side is bigger, background
               colour, text-only arithmetic (a few records without an image)
  eval.json    held out: digit recognition (MNIST-style, on digit images the base never saw), object existence
               yes/no (POPE-style), colour of the bigger object, shape of the object of a given colour
  val.json     fresh records of the training task types (for training-task accuracy and picking a learning rate;
               never the held-out types)

The held-out types ask about concepts the base knows (digits, colours, shapes, sizes) in question forms its text QA
covered, but no training record asks them about an image: what a tuning method adds is whether the model answers
them about images.

Library code: the CLI is data_prep/make_sample.py (`python -m data_prep.make_sample --output data/sample`); the
trainer and the evaluator call `ensure_sample` for the embedded default.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from pipeline.demo import scenes
from pipeline.evaluation.datasets import LayoutError, Task

log = logging.getLogger("make_sample")

VERSION = 2  # README.json records it; a set of another version is rebuilt (v1: random-base era, 2 held-out types)
TRAIN_TASKS = ("colour_recognition", "shape_recognition", "shape_yes_no", "counting", "position", "read_text",
               "size_comparison", "background_colour", "text_arithmetic")
HELDOUT_TASKS = ("digit_recognition", "object_existence", "bigger_colour", "shape_of_colour")


def _conv(question: str, answer: str, image: bool = True):
    q = ("<image>\n" + question) if image else question
    return [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]


def text_arithmetic(rng):
    a, b = rng.randint(0, 4), rng.randint(0, 5)
    words = scenes.NUMBER_WORDS
    return None, _conv(f"What is {words[a]} plus {words[b]}? Answer with a number.", str(a + b), False)


def make_record(task: str, rng: random.Random, digit_image: int | None = None):
    """(PIL image or None, conversation) for one record of `task`."""
    if task == "text_arithmetic":
        return text_arithmetic(rng)
    # the held-out digit task shows images the base's pretraining never showed (`digit_image`, else drawn)
    scene = scenes.digit_scene(rng, "heldout", digit_image) if task == "digit_recognition" else None
    scene, q, a = scenes.ask(task, rng, scene)
    return scenes.render(scene), _conv(q, a)


def build(output: Path, per_task: int, text_only: int, heldout_per_task: int, seed: int,
          val_per_task: int = 20) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    (output / "images").mkdir(exist_ok=True)
    plan = [(t, per_task) for t in TRAIN_TASKS if t != "text_arithmetic"] + [("text_arithmetic", text_only)]
    heldout = [(t, heldout_per_task) for t in HELDOUT_TASKS]
    val = [(t, val_per_task) for t in TRAIN_TASKS]
    counts = {}
    for split, tasks in (("train", plan), ("eval", heldout), ("val", val)):
        records = []
        for task, n in tasks:
            rng = random.Random(f"{seed}/{split}/{task}")  # one stream per task: adding a task changes no other
            pool = scenes.DIGIT_POOLS["heldout"]
            digits = rng.sample(pool, len(pool)) if task == "digit_recognition" else None  # distinct images first
            for k in range(n):
                img, conv = make_record(task, rng, digits[k % len(digits)] if digits else None)
                rid = f"{split}-{task}-{k:05d}"
                rec = {"id": rid, "task_name": task, "conversations": conv}
                if digits:
                    rec["source"] = f"scikit-learn digits image {digits[k % len(digits)]}"
                if img is not None:
                    # Mix formats as real corpora do: most PNG, every 4th JPEG.
                    ext = "jpg" if k % 4 == 3 else "png"
                    rel = f"images/{task}/{rid}.{ext}"
                    (output / rel).parent.mkdir(parents=True, exist_ok=True)
                    img.save(output / rel, quality=95) if ext == "jpg" else img.save(output / rel, optimize=False)
                    rec["image"] = rel
                records.append(rec)
        (output / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        counts[split] = len(records)
    info = {"version": VERSION, "seed": seed, "train_tasks": list(TRAIN_TASKS), "heldout_tasks": list(HELDOUT_TASKS),
            "records": counts}
    (output / "README.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _version(output: Path):
    try:
        return json.loads((output / "README.json").read_text()).get("version", 1)
    except (OSError, ValueError):
        return None  # missing or half-written: README.json is written last


def ensure_sample(output: Path, seed: int = 0) -> Path:
    """Build the default sample set at `output` unless it is already complete and of this VERSION (README.json
    is written last; an older set is replaced, image folder included)."""
    if _version(output) != VERSION:
        import shutil

        log.info("building the embedded sample set at %s", output)
        shutil.rmtree(output / "images", ignore_errors=True)
        build(output, per_task=300, text_only=40, heldout_per_task=200, seed=seed)
    return output


def build_sample_shards(sample: Path, output: Path, visual_prompt_length: int = 10,
                        visual_token_mode: str = "official", model_max_length: int = 2048) -> Path:
    """Shards of the sample set's train.json, as the trainer's default run and pipeline.demo.compare train on them
    (256 samples per shard, shuffled). A complete build of this very input returns at once; shards of an older
    sample set (other train.json) in `output` are replaced, as the folder belongs to the embedded default. The
    visual-prompt settings only set the token count the lengths are measured with; the records and their order do
    not change."""
    from pipeline.data.shards import ShardBuildConfig, build
    from pipeline.demo.tiny import tiny_text_side

    build(ShardBuildConfig(input=[str(Path(sample) / "train.json")], image_root=str(sample), output=str(output),
                           samples_per_shard=256, shuffle=True, workers=2, model_max_length=model_max_length,
                           quiet=True, visual_prompt_length=visual_prompt_length, visual_token_mode=visual_token_mode,
                           overwrite=True), tiny_text_side())
    return Path(output)


# ----------------------------------------------------------------- the held-out task types, as evaluation tasks
HELDOUT_NAMES = {"sample_mnist": "digit_recognition", "sample_pope": "object_existence",
                 "sample_bigger": "bigger_colour", "sample_shape": "shape_of_colour"}  # task -> task_name in eval.json
VAL_TASK = "sample_train_val"  # fresh records of the training task types (val.json), a held-out set by path
DEFAULT_TASKS = ",".join(HELDOUT_NAMES)
TITLES = {"sample_mnist": "sample digits", "sample_pope": "sample existence (acc)",
          "sample_bigger": "sample bigger's colour", "sample_shape": "sample shape of colour",
          VAL_TASK: "training tasks (val)"}


def load_sample(task: str, data_root: Path) -> list[dict]:
    """One held-out task type of the sample set at `data_root` (eval.json beside its images) as evaluation items."""
    f = data_root / "eval.json"
    if not f.is_file():
        raise LayoutError(f"{f}: not found (the embedded sample set's held-out records; python -m "
                          "data_prep.make_sample)")
    want = HELDOUT_NAMES[task]
    items = []
    for r in json.loads(f.read_text()):
        if r["task_name"] != want:
            continue
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        items.append({"task": task, "category": "random" if task == "sample_pope" else task, "image_id": r["id"],
                      "qid": r["id"], "question": q, "target": r["conversations"][1]["value"],
                      "image": str(data_root / r["image"])})
    if not items:
        raise LayoutError(f"{f}: no {want!r} records for {task} (a sample set of an older version? rebuild it: "
                          "python -m data_prep.make_sample)")
    return items


# Existence is asked as yes/no and scored as POPE is; the others by label match.
SAMPLE_TASKS = {name: Task(name, "yes_no" if name == "sample_pope" else "accuracy",
                           lambda root, coco, name=name: load_sample(name, root), TITLES[name])
                for name in HELDOUT_NAMES}
SCORING = {name: t.scoring for name, t in SAMPLE_TASKS.items()}
