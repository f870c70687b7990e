"""The embedded world and the sample set built from it: captions name every attribute, answers follow from the
scene, training and held-out task types stay disjoint, held-out digits are images the base's pretraining never saw."""

import json
import random

import pytest

from pipeline.demo import scenes
from pipeline.demo.sample_data import HELDOUT_TASKS, TRAIN_TASKS, build


def test_captions_name_every_attribute_in_a_fixed_order():
    s = scenes.Scene("objects", background="gray", objects=(scenes.Obj("red", "circle", "big", "left"),
                                                            scenes.Obj("blue", "square", "small", "right")))
    assert scenes.caption(s) == ("a big red circle on the left and a small blue square on the right, on a gray "
                                 "background")
    assert scenes.caption(scenes.Scene("count", background="pink", count=1, shape="triangle", colour="cyan")) == \
        "one cyan triangle, on a pink background"
    assert scenes.caption(scenes.Scene("count", count=3, shape="square", colour="white")) == \
        "three white squares, on a black background"
    assert scenes.caption(scenes.Scene("digit", digit=7, digit_image=0)) == "the handwritten digit 7"
    assert scenes.caption(scenes.Scene("word", word="cup")) == "the word cup, printed in black on white"


def test_answers_follow_from_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        s, q, a = scenes.ask("bigger_colour", rng)
        big = [o for o in s.objects if o.size == "big"]
        assert len(big) == 1 and a == big[0].colour and q == "What colour is the bigger object?"
        s, q, a = scenes.ask("object_existence", rng)
        asked = q.split("Is there a ")[1].split(" object")[0]
        assert a == ("yes" if asked in {o.colour for o in s.objects} else "no")
        s, q, a = scenes.ask("shape_of_colour", rng)
        colour = q.split("the ")[1].split(" object")[0]
        assert a == next(o.shape for o in s.objects if o.colour == colour)
        s, q, a = scenes.ask("size_comparison", rng)
        side = {o.position: o.size for o in s.objects}
        assert side[a] == "big" and len(set(side.values())) == 2
        s, q, a = scenes.ask("counting", rng)
        assert a == str(s.count) and s.shape in q


def test_two_objects_never_overlap_and_never_share_a_colour():
    rng = random.Random(1)
    for _ in range(300):
        s = scenes.objects_scene(rng, 2)
        assert tuple(o.position for o in s.objects) in scenes.PAIRS
        assert s.objects[0].colour != s.objects[1].colour


def test_rendering_is_deterministic_and_draws_what_the_caption_says():
    rng = random.Random(2)
    s = scenes.objects_scene(rng, 1)
    a, b = scenes.render(s), scenes.render(s)
    assert a.tobytes() == b.tobytes() and a.size == (scenes.SIZE, scenes.SIZE)
    x, y = scenes.POSITIONS[s.objects[0].position]
    assert a.getpixel((x + s.jitter[0], y + s.jitter[1])) == scenes.COLOURS[s.objects[0].colour]
    assert a.getpixel((1, 1)) == scenes.BACKGROUNDS[s.background]


def test_heldout_digits_come_from_images_the_pretraining_never_draws():
    pre, held = set(scenes.DIGIT_POOLS["pretrain"]), set(scenes.DIGIT_POOLS["heldout"])
    assert not pre & held and len(pre) + len(held) == 1797 and len(held) >= 200
    rng = random.Random(3)
    assert {scenes.digit_scene(rng, "heldout").digit_image for _ in range(500)} <= held


def test_sample_set_keeps_training_and_heldout_types_apart(tmp_path):
    info = build(tmp_path, per_task=3, text_only=2, heldout_per_task=200, seed=0, val_per_task=2)
    train = json.loads((tmp_path / "train.json").read_text())
    held = json.loads((tmp_path / "eval.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert {r["task_name"] for r in train} == set(TRAIN_TASKS) == {r["task_name"] for r in val}
    assert {r["task_name"] for r in held} == set(HELDOUT_TASKS) and not set(TRAIN_TASKS) & set(HELDOUT_TASKS)
    assert info["records"] == {"train": 8 * 3 + 2, "eval": 4 * 200, "val": 9 * 2}
    per = {t: [r for r in held if r["task_name"] == t] for t in HELDOUT_TASKS}
    assert all(len(v) == 200 for v in per.values())
    # no training record asks a held-out question about an image
    assert not {r["conversations"][0]["value"] for r in train} & {r["conversations"][0]["value"] for r in held}
    sources = [int(r["source"].rsplit(" ", 1)[1]) for r in per["digit_recognition"]]
    assert len(set(sources)) == 200 and set(sources) <= set(scenes.DIGIT_POOLS["heldout"])
    yes = sum(r["conversations"][1]["value"] == "yes" for r in per["object_existence"])
    assert 70 <= yes <= 130  # balanced yes/no, so the majority answer is near 50 %


@pytest.mark.parametrize("task", sorted(scenes.QUESTIONS))
def test_every_question_form_has_a_one_word_answer(task):
    rng = random.Random(task)
    for _ in range(20):
        _, q, a = scenes.ask(task, rng)
        assert q.strip() and a and " " not in a
