"""Build the embedded sample set: Vision-Flan-style JSON + an image folder, offline and deterministic.

Real images where the machine has them (scikit-learn's handwritten digits, UCI ML hand-written digits) plus
procedurally drawn scenes. Training task types and held-out task types (reserved for zero-shot evaluation) are
disjoint:

  train.json   colour, shape, shape yes/no, counting, position, reading text, size comparison, background
               colour, text-only arithmetic (a few records without an image)
  eval.json    held-out: digit recognition (MNIST-style), object existence yes/no (POPE-style)
  val.json     fresh records of the training task types (for training-task accuracy and picking a learning rate;
               never the held-out types)

Library code: the CLI is data_prep/make_sample.py (`python -m data_prep.make_sample --output data/sample`); the
trainer and the evaluator call `ensure_sample` for the embedded default.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger("make_sample")

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "cyan": (40, 200, 210),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "brown": (110, 70, 40), "pink": (240, 170, 190)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
WORDS = ["CAT", "DOG", "SUN", "CAR", "TREE", "BOX", "RED", "MAP", "HAT", "BUS", "PEN", "CUP"]
SIZE = 64  # the tiny model resizes to 32 px; real pipelines use whatever their processor says

TRAIN_TASKS = ("colour_recognition", "shape_recognition", "shape_yes_no", "counting", "position", "read_text",
               "size_comparison", "background_colour", "text_arithmetic")
HELDOUT_TASKS = ("digit_recognition", "object_existence")


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _canvas(bg=(15, 15, 15)):
    img = Image.new("RGB", (SIZE, SIZE), bg)
    return img, ImageDraw.Draw(img)


def _conv(question: str, answer: str, image: bool = True):
    q = ("<image>\n" + question) if image else question
    return [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]


def colour_recognition(rng):
    c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img, d = _canvas()
    _shape(d, s, SIZE / 2 + rng.uniform(-8, 8), SIZE / 2 + rng.uniform(-8, 8), rng.uniform(10, 18), COLOURS[c])
    q = rng.choice(["What colour is the shape?", "What is the colour of the object? Answer with one word."])
    return img, _conv(q, c)


def shape_recognition(rng):
    c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img, d = _canvas()
    _shape(d, s, SIZE / 2, SIZE / 2, rng.uniform(12, 20), COLOURS[c])
    return img, _conv(rng.choice(["Which shape is shown?", "What shape is in the image?"]), s)


def shape_yes_no(rng):
    # Teaches the yes/no answer format on shapes, so the held-out existence questions (colours) test transfer.
    c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img, d = _canvas()
    _shape(d, s, SIZE / 2, SIZE / 2, rng.uniform(12, 20), COLOURS[c])
    asked = s if rng.random() < 0.5 else rng.choice([x for x in SHAPES if x != s])
    return img, _conv(f"Is the shape a {asked}? Answer yes or no.", "yes" if asked == s else "no")


def counting(rng):
    n, c = rng.randint(1, 5), rng.choice(list(COLOURS))
    img, d = _canvas()
    slots = rng.sample([(x, y) for x in (12, 32, 52) for y in (12, 32, 52)], n)
    for x, y in slots:
        _shape(d, "circle", x, y, 6, COLOURS[c])
    return img, _conv("How many circles are there? Answer with a number.", str(n))


def position(rng):
    p, c, s = rng.choice(list(POSITIONS)), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img, d = _canvas()
    fx, fy = POSITIONS[p]
    _shape(d, s, fx * SIZE, fy * SIZE, 8, COLOURS[c])
    return img, _conv("Where is the shape: left, right, top, bottom or center?", p)


def read_text(rng):
    w = rng.choice(WORDS)
    img, d = _canvas((245, 245, 245))
    d.text((rng.randint(4, 20), rng.randint(10, 40)), w, fill=(0, 0, 0))
    return img, _conv("What word is written in the image?", w.lower())


def size_comparison(rng):
    c1, c2 = rng.sample(list(COLOURS), 2)
    big_left = rng.random() < 0.5
    img, d = _canvas()
    _shape(d, "square", 16, 32, 12 if big_left else 5, COLOURS[c1])
    _shape(d, "square", 48, 32, 5 if big_left else 12, COLOURS[c2])
    return img, _conv("Which square is bigger, the left one or the right one?", "left" if big_left else "right")


def background_colour(rng):
    b = rng.choice(list(BACKGROUNDS))
    img, d = _canvas(BACKGROUNDS[b])
    _shape(d, rng.choice(SHAPES), SIZE / 2, SIZE / 2, 6, COLOURS[rng.choice(list(COLOURS))])
    return img, _conv("What colour is the background?", b)


def text_arithmetic(rng):
    a, b = rng.randint(0, 4), rng.randint(0, 5)
    return None, _conv(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}? Answer with a number.", str(a + b), False)


def object_existence(rng):
    present = rng.sample(list(COLOURS), 2)
    img, d = _canvas()
    for k, c in enumerate(present):
        _shape(d, rng.choice(SHAPES), 18 + 28 * k, 32, 8, COLOURS[c])
    asked = rng.choice(present) if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c not in present])
    return img, _conv(f"Is there a {asked} object in the image? Answer yes or no.", "yes" if asked in present else "no")


def digit_factory():
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()

    def digit_recognition(rng):
        i = rng.randrange(len(digits.images))
        arr = (digits.images[i] * (255.0 / 16.0)).astype("uint8")
        img = Image.fromarray(arr, mode="L").resize((SIZE, SIZE), Image.NEAREST).convert("RGB")
        return img, _conv("What digit is written in the image? Answer with a single number.", str(digits.target[i]))

    return digit_recognition


def build(output: Path, per_task: int, text_only: int, heldout_per_task: int, seed: int,
          val_per_task: int = 20) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    (output / "images").mkdir(exist_ok=True)
    makers = {name: globals()[name] for name in TRAIN_TASKS if name != "text_arithmetic"}
    makers["digit_recognition"] = digit_factory()
    makers["object_existence"] = object_existence
    plan = [(t, per_task) for t in TRAIN_TASKS if t != "text_arithmetic"] + [("text_arithmetic", text_only)]
    heldout = [(t, heldout_per_task) for t in HELDOUT_TASKS]
    val = [(t, val_per_task) for t in TRAIN_TASKS]
    counts = {}
    for split, tasks in (("train", plan), ("eval", heldout), ("val", val)):
        records = []
        for task, n in tasks:
            rng = random.Random(f"{seed}/{split}/{task}")  # one stream per task: adding a task changes no other
            for k in range(n):
                img, conv = text_arithmetic(rng) if task == "text_arithmetic" else makers[task](rng)
                rid = f"{split}-{task}-{k:05d}"
                rec = {"id": rid, "task_name": task, "conversations": conv}
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
    info = {"seed": seed, "train_tasks": list(TRAIN_TASKS), "heldout_tasks": list(HELDOUT_TASKS), "records": counts}
    (output / "README.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_sample(output: Path, seed: int = 0) -> Path:
    """Build the default sample set at `output` unless it is already complete (README.json written last; a set
    from before val.json existed is rebuilt: train.json and eval.json come out the same)."""
    if not (output / "README.json").is_file() or not (output / "val.json").is_file():
        log.info("building the embedded sample set at %s", output)
        build(output, per_task=300, text_only=40, heldout_per_task=100, seed=seed)
    return output
