"""The embedded world: scenes, how they are drawn, their one true caption, and the questions asked about them.

Everything the embedded set and the embedded base know comes from here, so a concept a task asks about is always a
concept the base was pretrained to name. A scene is one of

  objects   one or two shapes (colour, shape, big/small, position) on a coloured background
            "a big red circle on the left and a small blue square on the right, on a gray background"
  count     1-5 equal small shapes on a 3 x 3 grid      "three green triangles, on a black background"
  digit     a real handwritten digit (scikit-learn's 8 x 8 UCI digits, no download)   "the handwritten digit 7"
  word      a printed word                              "the word cat, printed in black on white"

`caption(scene)` is deterministic (objects in a fixed order, one phrase per attribute), so caption exact match is a
well-defined score. `QUESTIONS` maps every question form - the training task types, the held-out task types and
the text-only QA of the base's pretraining - to the scenes it applies to and the answer it has.

The digits are split by image: `DIGIT_POOLS["pretrain"]` feeds the base's pretraining and the training tasks,
`DIGIT_POOLS["heldout"]` only the held-out digit task, so that task is scored on handwriting the base never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "cyan": (40, 200, 210),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "brown": (110, 70, 40), "pink": (240, 170, 190)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"big": 13, "small": 7}  # radius in px on the 64 px canvas (the tiny model sees it at 32 px)
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
PAIRS = (("left", "right"), ("top", "bottom"))  # two objects never overlap: big shapes elsewhere would
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = ["cat", "dog", "sun", "car", "box", "red", "map", "hat", "bus", "pen", "cup"]  # three letters: legible at 32 px
SIZE = 64  # canvas px; the tiny model's processor resizes to 32
DIGIT_SPLIT = 1400  # of scikit-learn's 1,797 digit images: [0, 1400) pretrain + training tasks, the rest held out


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    kind: str  # objects | count | digit | word
    background: str = "black"
    objects: tuple = ()
    count: int = 0
    shape: str = ""
    colour: str = ""
    digit: int = -1
    digit_image: int = -1
    word: str = ""
    jitter: tuple = field(default=(0, 0), compare=False)


# ---- drawing a scene at random -----------------------------------------------------------------------------------

def objects_scene(rng: random.Random, n: int | None = None, distinct_sizes: bool = False) -> Scene:
    n = n or rng.choice((1, 2))
    positions = [rng.choice(list(POSITIONS))] if n == 1 else list(rng.choice(PAIRS))
    colours = rng.sample(list(COLOURS), n)  # two objects never share a colour: "the red object" is one object
    sizes = rng.sample(list(SIZES), 2)[:n] if distinct_sizes else [rng.choice(list(SIZES)) for _ in range(n)]
    objs = tuple(Obj(c, rng.choice(SHAPES), s, p) for c, s, p in zip(colours, sizes, positions))
    return Scene("objects", background=rng.choice(list(BACKGROUNDS)), objects=objs,
                 jitter=(rng.randint(-2, 2), rng.randint(-2, 2)))


def count_scene(rng: random.Random) -> Scene:
    return Scene("count", background=rng.choice(list(BACKGROUNDS)), count=rng.randint(1, 5),
                 shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)),
                 jitter=(rng.randrange(1 << 30), 0))


def digit_scene(rng: random.Random, pool: str, image: int | None = None) -> Scene:
    i = rng.choice(DIGIT_POOLS[pool]) if image is None else image
    return Scene("digit", digit=int(_digits().target[i]), digit_image=i,
                 jitter=(rng.randint(-3, 3), rng.randint(-3, 3)))


def word_scene(rng: random.Random) -> Scene:
    return Scene("word", background="white", word=rng.choice(WORDS), jitter=(rng.random(), rng.random()))


SCENE_KINDS = ("objects1", "objects2", "count", "digit", "word")


def random_scene(rng: random.Random, kind: str) -> Scene:
    """A scene of one of SCENE_KINDS (digits from the pretraining pool)."""
    if kind.startswith("objects"):
        return objects_scene(rng, int(kind[-1]))
    if kind == "count":
        return count_scene(rng)
    if kind == "digit":
        return digit_scene(rng, "pretrain")
    return word_scene(rng)


# ---- rendering ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    return load_digits()


@lru_cache(maxsize=1)
def _font():
    return ImageFont.load_default(size=26)  # Pillow's embedded scalable font (needs FreeType, part of the wheel)


DIGIT_POOLS = {"pretrain": list(range(DIGIT_SPLIT)), "heldout": list(range(DIGIT_SPLIT, 1797))}


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render(scene: Scene) -> Image.Image:
    if scene.kind == "digit":
        arr = (_digits().images[scene.digit_image] * (255.0 / 16.0)).astype("uint8")
        img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
        glyph = Image.fromarray(arr, mode="L").resize((48, 48), Image.NEAREST).convert("RGB")
        img.paste(glyph, (8 + scene.jitter[0], 8 + scene.jitter[1]))
        return img
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 245) if scene.kind == "word" else BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    if scene.kind == "word":
        text = scene.word.upper()
        left, top, right, bottom = d.textbbox((0, 0), text, font=_font())
        x = scene.jitter[0] * (SIZE - (right - left)) - left
        y = 6 + scene.jitter[1] * (SIZE - 12 - (bottom - top)) - top
        d.text((x, y), text, fill=(0, 0, 0), font=_font())
    elif scene.kind == "count":
        slots = random.Random(scene.jitter[0]).sample([(x, y) for x in (12, 32, 52) for y in (12, 32, 52)],
                                                      scene.count)
        for x, y in slots:
            _shape(d, scene.shape, x, y, 7, COLOURS[scene.colour])
    else:
        dx, dy = scene.jitter
        for o in scene.objects:
            x, y = POSITIONS[o.position]
            _shape(d, o.shape, x + dx, y + dy, SIZES[o.size], COLOURS[o.colour])
    return img


# ---- the caption -------------------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    if scene.kind == "digit":
        return f"the handwritten digit {scene.digit}"
    if scene.kind == "word":
        return f"the word {scene.word}, printed in black on white"
    if scene.kind == "count":
        noun = scene.shape + ("s" if scene.count > 1 else "")
        return f"{NUMBER_WORDS[scene.count]} {scene.colour} {noun}, on a {scene.background} background"
    objs = " and ".join(f"a {o.size} {o.colour} {o.shape} {PHRASE[o.position]}" for o in scene.objects)
    return f"{objs}, on a {scene.background} background"


DESCRIBE = "Describe the image."


def scene_text(scene: Scene) -> str:
    """How a text-only QA sample shows the scene in place of the image."""
    return f"Scene: {caption(scene)}."


# ---- question forms ----------------------------------------------------------------------------------------------
# Each: (scene maker, question maker) -> (question, answer). Training task types, held-out task types and the base's
# text-only QA all draw from this one table, so their wording can never drift apart.

def _single(rng):
    return objects_scene(rng, 1)


def _pair(rng):
    return objects_scene(rng, 2)


def _pair_sized(rng):
    return objects_scene(rng, 2, distinct_sizes=True)


def _yes_no(rng, truth: str, choices) -> tuple[str, str]:
    asked = truth if rng.random() < 0.5 else rng.choice([c for c in choices if c != truth])
    return asked, "yes" if asked == truth else "no"


def q_colour(s, rng):
    return "What colour is the shape?", s.objects[0].colour


def q_shape(s, rng):
    return "Which shape is shown?", s.objects[0].shape


def q_shape_yes_no(s, rng):
    asked, ans = _yes_no(rng, s.objects[0].shape, SHAPES)
    return f"Is the shape a {asked}? Answer yes or no.", ans


def q_count(s, rng):
    return f"How many {s.shape}s are there? Answer with a number.", str(s.count)


def q_position(s, rng):
    return "Where is the shape: left, right, top, bottom or center?", s.objects[0].position


def q_word(s, rng):
    return "What word is written in the image?", s.word


def q_bigger_side(s, rng):
    a, b = s.objects
    first, second = ("left", "right") if a.position == "left" else ("top", "bottom")
    return (f"Which object is bigger, the {first} one or the {second} one?",
            first if SIZES[a.size] > SIZES[b.size] else second)


def q_background(s, rng):
    return "What colour is the background?", s.background


def q_digit(s, rng):
    return "What digit is written in the image? Answer with a single number.", str(s.digit)


def q_exists(s, rng):
    present = [o.colour for o in s.objects]
    asked = rng.choice(present) if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c not in present])
    return f"Is there a {asked} object in the image? Answer yes or no.", "yes" if asked in present else "no"


def q_bigger_colour(s, rng):
    big = max(s.objects, key=lambda o: SIZES[o.size])
    return "What colour is the bigger object?", big.colour


def q_shape_of_colour(s, rng):
    o = rng.choice(s.objects)
    return f"What shape is the {o.colour} object?", o.shape


def _bg_scene(rng):
    return objects_scene(rng) if rng.random() < 0.7 else count_scene(rng)


QUESTIONS = {
    # training task types
    "colour_recognition": (_single, q_colour),
    "shape_recognition": (_single, q_shape),
    "shape_yes_no": (_single, q_shape_yes_no),
    "counting": (count_scene, q_count),
    "position": (_single, q_position),
    "read_text": (word_scene, q_word),
    "size_comparison": (_pair_sized, q_bigger_side),
    "background_colour": (_bg_scene, q_background),
    # held-out task types
    "digit_recognition": (lambda rng: digit_scene(rng, "pretrain"), q_digit),
    "object_existence": (_pair, q_exists),
    "bigger_colour": (_pair_sized, q_bigger_colour),
    "shape_of_colour": (_pair, q_shape_of_colour),
}


def ask(task: str, rng: random.Random, scene: Scene | None = None) -> tuple[Scene, str, str]:
    make, q = QUESTIONS[task]
    scene = scene or make(rng)
    question, answer = q(scene, rng)
    return scene, question, answer
