"""Evaluation: metric functions on hand-worked cases, every loader layout, batched/shuffled == sequential,
re-scoring, errors that name the problem."""

import json
import random

import numpy as np
import pytest
from helpers import prompts_that_matter
from PIL import Image

from pipeline.evaluation import metrics
from pipeline.evaluation.datasets import LayoutError, load_task


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("pred,label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is", "yes"), ("no.", "no"), ("The answer is yes", "other"),
    ("  NO ", "no"), ("Nope", "no"), ("maybe", "other"), ("", "other"),
])
def test_mme_parse(pred, label):
    assert metrics.mme_parse(pred) == label


def test_mme_acc_plus_pairs_questions_of_an_image():
    recs = [  # existence: image a both right, image b one right; code_reasoning: one image, both wrong
        {"category": "existence", "image_id": "a", "target": "Yes", "prediction": "Yes"},
        {"category": "existence", "image_id": "a", "target": "No", "prediction": "no."},
        {"category": "existence", "image_id": "b", "target": "Yes", "prediction": "Yes"},
        {"category": "existence", "image_id": "b", "target": "No", "prediction": "The answer is no"},
        {"category": "code_reasoning", "image_id": "c", "target": "Yes", "prediction": "No"},
        {"category": "code_reasoning", "image_id": "c", "target": "No", "prediction": "Yes"},
    ]
    m = metrics.mme_scores(recs)
    ex = m["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert m["subtasks"]["code_reasoning"]["score"] == 0.0
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 0.0, 125.0)


def test_pope_all_yes_predictions():
    m = metrics.pope_metrics(["yes", "no", "yes", "no"], ["Yes", "Yes.", "yes, there is", "Yes"])
    assert m["accuracy"] == 50.0 and m["precision"] == 50.0 and m["recall"] == 100.0 and m["yes_ratio"] == 100.0
    assert m["f1"] == pytest.approx(200 / 3)
    s = metrics.pope_scores([{"category": c, "target": t, "prediction": p} for c, t, p in
                             [("random", "yes", "yes"), ("random", "no", "No, there is not."),
                              ("popular", "yes", "no"), ("popular", "no", "there is no dog")]])
    assert s["splits"]["random"]["accuracy"] == 100.0 and s["splits"]["popular"]["accuracy"] == 50.0
    assert s["score"] == s["mean"]["accuracy"] == 75.0


# The official rule (RUCAIBox/POPE evaluate.py = LLaVA eval_pope.py): first sentence, commas deleted, split on ' ',
# "no" only for the exact words No / not / no. Before this project followed it, the first three counted as "no".
@pytest.mark.parametrize("pred,label", [
    ("NO", "yes"), ("Not at all.", "yes"), ("No,there is none.", "yes"), ("There is not a cat", "no"),
    ("No, there is no cat.", "no"), ("no", "no"), ("No.", "no"), ("Yes. There is no dog.", "yes"),
    ("There is no\tcat", "yes"), ("yes", "yes"), ("", "yes"),
])
def test_pope_parse_follows_the_official_rule(pred, label):
    assert metrics.pope_parse(pred) == label


def test_pope_scores_on_mixed_phrasing_match_the_official_script():
    preds = ["NO", "Not at all.", "No,there is none.", "There is not a cat", "No, there is no cat.", "Yes", "yes.",
             "No."]
    gold = ["no", "no", "no", "no", "no", "yes", "yes", "no"]
    m = metrics.pope_metrics(gold, preds)
    # official: predictions -> yes yes yes no no yes yes no  =>  TP 2, FP 3, TN 3, FN 0
    assert m["accuracy"] == 100 * 5 / 8 and m["precision"] == 100 * 2 / 5 and m["recall"] == 100.0
    assert m["yes_ratio"] == 100 * 5 / 8


def test_mme_image_without_two_questions_is_an_error():
    recs = [{"category": "existence", "image_id": "a", "target": "Yes", "prediction": "Yes"},
            {"category": "existence", "image_id": "a", "target": "No", "prediction": "No"},
            {"category": "existence", "image_id": "b", "target": "Yes", "prediction": "Yes"}]
    with pytest.raises(metrics.MMEPairError, match=r"MME image 'b' \(existence\) has 1 question\(s\)"):
        metrics.mme_scores(recs)
    with pytest.raises(metrics.MMEPairError, match="has 3 question"):
        metrics.mme_scores(recs[:2] + [dict(recs[0])])


def test_limit_keeps_mme_pairs_whole():
    from pipeline.evaluation.runner import limit_items

    items = [{"scoring": "mme", "category": "c", "image_id": str(i // 2), "qid": str(i)} for i in range(10)]
    assert [it["qid"] for it in limit_items(items, 3)] == ["0", "1", "2", "3"]
    assert [it["qid"] for it in limit_items(items, 4)] == ["0", "1", "2", "3"]
    pope = [it | {"scoring": "yes_no"} for it in items]
    assert len(limit_items(items, 99)) == 10 and len(limit_items(pope, 3)) == 3


def test_vqa_accuracy_and_label_match():
    answers = ["two"] * 3 + ["2 dogs"] * 7
    assert metrics.vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # "two" -> "2"
    assert metrics.vqa_accuracy("Two.", ["two"] * 10) == 1.0
    assert metrics.vqa_accuracy("three", ["two"] * 10) == 0.0
    assert metrics.label_match("Cat.", "cat") and metrics.label_match("A cat, sitting", "cat")
    assert not metrics.label_match("not a cat", "cat") and not metrics.label_match("dog", "cat")
    assert metrics.label_match("seven", "7")


def test_mmavg_needs_all_seven():
    s = dict(zip(metrics.MMAVG_TASKS, [10, 20, 30, 40, 50, 60, 70]))
    assert metrics.mmavg(s) == 40.0
    s.pop("vsr")
    assert metrics.mmavg(s) is None


# ------------------------------------------------------------------------------------------------ layouts
def _png(path, colour=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def eval_root(tmp_path):
    r = tmp_path / "eval"
    # MME official release, both folder styles
    for i in range(2):
        _png(r / "mme" / "artwork" / "images" / f"{i}.png")
        (r / "mme" / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (r / "mme" / "artwork" / "questions_answers_YN" / f"{i}.txt").write_text(
            "Is this a painting? Please answer yes or no.\tYes\nIs this a photo? Please answer yes or no.\tNo\n")
        _png(r / "mme" / "code_reasoning" / f"{i}.png")
        (r / "mme" / "code_reasoning" / f"{i}.txt").write_text("Does it print 1? Please answer yes or no.\tYes\n"
                                                               "Does it print 2? Please answer yes or no.\tNo\n")
    # POPE official json + COCO images
    for split in ("adversarial", "popular", "random"):
        lines = [{"question_id": k, "image": f"COCO_{k}.jpg", "text": f"Is there a cat {k}?",
                  "label": "yes" if k % 2 else "no"} for k in range(3)]
        (r / "pope").mkdir(parents=True, exist_ok=True)
        (r / "pope" / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for k in range(3):
        _png(r / "pope" / "val2014" / f"COCO_{k}.jpg", (0, 0, 200))
    # the reference JSONL form
    for name in ("text_vqa", "cifar_10"):
        rows = [{"unique_id": f"{name}-{k}", "image_path": f"img/{k}.png", "prompt": "What is it? [Options] cat dog",
                 "target": "cat"} for k in range(3)]
        if name == "text_vqa":
            for row in rows:
                row["answers"] = ["cat"] * 10
        (r / name).mkdir(parents=True, exist_ok=True)
        (r / name / "data.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
        for k in range(3):
            _png(r / name / "img" / f"{k}.png")
    return r


def test_loaders_official_and_jsonl_layouts(eval_root):
    mme = load_task("mme", eval_root)
    assert len(mme) == 8 and {i["category"] for i in mme} == {"artwork", "code_reasoning"}
    assert len({i["image_id"] for i in mme}) == 4 and all(i["image"].endswith(".png") for i in mme)
    pope = load_task("pope", eval_root)
    assert len(pope) == 9 and {i["category"] for i in pope} == {"adversarial", "popular", "random"}
    assert pope[0]["question"].endswith("Please answer yes or no.")
    tv = load_task("textvqa", eval_root)
    assert tv[0]["answers"] == ["cat"] * 10 and "Options cat dog" in tv[0]["question"]
    assert load_task("cifar10", eval_root)[2]["image"].endswith("cifar_10/img/2.png")


def test_loaders_parquet_layouts(tmp_path):
    import io

    import datasets

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    img = {"bytes": buf.getvalue(), "path": None}
    (tmp_path / "mme").mkdir()
    datasets.Dataset.from_list([{"question_id": "count/1.png", "image": img,
                                 "question": "Two? Please answer yes or no.", "answer": "Yes",
                                 "category": "count"}]).to_parquet(str(tmp_path / "mme" / "t.parquet"))
    (tmp_path / "pope").mkdir()
    datasets.Dataset.from_list([{"question_id": "1", "question": "Is there a dog?", "answer": "no",
                                 "image_source": "COCO_1", "image": img, "category": "random"}]).to_parquet(
        str(tmp_path / "pope" / "t.parquet"))
    assert load_task("mme", tmp_path)[0]["image"] == buf.getvalue()
    assert load_task("pope", tmp_path)[0]["target"] == "no"
    datasets.Dataset.from_list([{"question_id": "1", "question": "q"}]).to_parquet(str(tmp_path / "pope" / "t.parquet"))
    with pytest.raises(LayoutError, match=r"parquet lacks column\(s\) \['answer', 'category', 'image'\]"):
        load_task("pope", tmp_path)


def test_layout_errors_name_the_file(tmp_path):
    with pytest.raises(LayoutError, match="mnist.jsonl"):
        load_task("mnist", tmp_path)
    (tmp_path / "pope").mkdir()
    with pytest.raises(LayoutError, match="coco_pope_adversarial.json: not found"):
        load_task("pope", tmp_path)
    (tmp_path / "mnist.jsonl").write_text(json.dumps({"unique_id": 1, "prompt": "p", "target": "1"}) + "\n")
    with pytest.raises(LayoutError, match=r"mnist.jsonl:1: missing field\(s\) \['image_path'\]"):
        load_task("mnist", tmp_path)
    (tmp_path / "mnist.jsonl").write_text("{not json\n")
    with pytest.raises(LayoutError, match=r"mnist.jsonl:1: not valid JSON"):
        load_task("mnist", tmp_path)


# ----------------------------------------------------------------------------------- end to end (tiny)
def test_evaluate_every_layout_and_rescore(eval_root, tmp_path):
    from pipeline.evaluate import main, parse_args
    from pipeline.evaluation.runner import EvalConfig, evaluate

    out = tmp_path / "out"
    args = parse_args(["--tasks", "mme,pope,textvqa,cifar10", "--data_root", str(eval_root), "--output_dir", str(out),
                       "--max_new_tokens", "4", "--batch_size", "3"])
    cfg = EvalConfig(**vars(args))
    given = vars(cfg).copy()
    res = evaluate(cfg)
    assert vars(cfg) == given  # evaluate() leaves its config as it was given
    tasks = res["base"]["tasks"]
    assert set(tasks) == {"mme", "pope", "textvqa", "cifar10"}
    assert tasks["mme"]["subtasks"]["artwork"]["questions"] == 4 and tasks["pope"]["splits"]["random"]["questions"] == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["base"]["provenance"]["base_model"] == "tiny"
    assert (out / "results.md").read_text().startswith("| run | MME (P / C) | textvqa | cifar10 | POPE acc |")
    preds = (out / "base" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 8 + 9 + 3 + 3
    # --score_only on the written predictions gives the same results, without a model
    assert main(["--score_only", str(out / "base" / "predictions.jsonl"), "--output_dir", str(tmp_path / "re")]) == 0
    again = json.loads((tmp_path / "re" / "results.json").read_text())["base"]["tasks"]
    assert again == json.loads(json.dumps(tasks))
    # ... and without --output_dir it writes beside its input, never into a shared default folder
    (out / "results.json").unlink()
    assert main(["--score_only", str(out / "base" / "predictions.jsonl")]) == 0
    assert json.loads((out / "base" / "results.json").read_text())["base"]["tasks"] == again
    assert not (out / "results.json").exists()


def test_incomplete_mme_pair_fails_before_generation_and_on_rescoring(eval_root, tmp_path, capsys):
    from pipeline.evaluate import main

    txt = eval_root / "mme" / "artwork" / "questions_answers_YN" / "1.txt"
    txt.write_text(txt.read_text().splitlines()[0] + "\n")
    assert main(["--tasks", "mme", "--data_root", str(eval_root), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: MME image 'artwork/1' (artwork) has 1 question(s)" in err
    assert not (tmp_path / "o").exists()  # nothing was generated
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"task": "mme", "category": "count", "image_id": "x", "question": "q", "target": "Yes",
                                 "prediction": "Yes"}) + "\n")
    assert main(["--score_only", str(preds)]) == 2
    assert "MME image 'x' (count) has 1 question(s)" in capsys.readouterr().err


def test_own_heldout_sets_by_path_json_and_shards(tmp_path):
    """--tasks with a LLaVA JSON and a shard folder of held-out data: scored by label match under their own names."""
    from data_prep.build_shards import main as build_main
    from pipeline.evaluate import main

    recs = [{"id": f"h{i}", "image": f"img/{i}.png", "task_name": "shape",
             "conversations": [{"from": "human", "value": "<image>\nWhat shape is it?"},
                               {"from": "gpt", "value": "circle"}]} for i in range(3)]
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png")
    (tmp_path / "held.json").write_text(json.dumps(recs))
    assert build_main(["--input", str(tmp_path / "held.json"), "--image_root", str(tmp_path), "--output",
                       str(tmp_path / "held_shards"), "--workers", "1", "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["--tasks", f"{tmp_path / 'held.json'},mine={tmp_path / 'held_shards'}", "--output_dir", str(out),
                 "--max_new_tokens", "3"]) == 0
    res = json.loads((out / "results.json").read_text())["base"]["tasks"]
    assert res["held"]["questions"] == 3 and res["mine"]["questions"] == 3
    assert "| run | held | mine |" in (out / "results.md").read_text()
    preds = [json.loads(x) for x in (out / "base" / "predictions.jsonl").read_text().splitlines()]
    assert {p["target"] for p in preds} == {"circle"} and {p["question"] for p in preds} == {"What shape is it?"}
    with pytest.raises(ValueError, match="'pope' is a built-in task"):
        from pipeline.evaluation.datasets import parse_tasks

        parse_tasks(f"pope={tmp_path / 'held.json'}")


def test_batched_and_shuffled_generation_equal_sequential(eval_root):

    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, num_visual_tokens
    from pipeline.demo.tiny import build_tiny
    from pipeline.evaluation.generate import generate

    base = build_tiny()
    m = prompts_that_matter(attach_m2pt(base.model, M2PTConfig(seed=1)).eval())
    t = VicunaTemplate(base.tokenizer, m.config.image_token_id, num_visual_tokens(m))
    items = load_task("mme", eval_root) + load_task("textvqa", eval_root)
    for k, it in enumerate(items):  # different prompt lengths -> real left padding
        it["question"] += " please" * (k % 4)
    seq = dict(zip([i["qid"] for i in items], generate(m, base.tokenizer, base.image_processor, t, items, 1, 6,
                                                      show_progress=False)))
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    bat = dict(zip([i["qid"] for i in shuffled], generate(m, base.tokenizer, base.image_processor, t, shuffled, 5, 6,
                                                         show_progress=False)))
    assert bat == seq
    assert len(set(seq.values())) > 1  # outputs actually depend on the input


def test_judge_prompt_and_verdict_parsing_with_a_stub_model():
    """A stub judge that answers "Yes, it is." / "No." / "yes": the prompt it sees is the reference's, filled in
    with each record; its replies are parsed to verdicts and scored."""
    import torch

    from pipeline.demo.tiny import tiny_tokenizer
    from pipeline.evaluation.generate import JUDGE_PROMPT, Judge
    from pipeline.evaluation.scoring import score

    replies = iter(["Yes, it is.", "No.", "yes"])
    seen = []

    class StubLM:
        def generate(self, input_ids, attention_mask=None, **kw):
            seen.append(tok.decode(input_ids[0]))
            reply = tok(next(replies), add_special_tokens=False, return_tensors="pt")["input_ids"]
            return torch.cat([input_ids, reply], dim=1)

    tok = tiny_tokenizer()
    judge = Judge.__new__(Judge)
    judge.tok, judge.model, judge.system, judge.device = tok, StubLM(), "SYS", "cpu"
    recs = [{"task": "mnist", "category": "mnist", "image_id": str(i), "question": f"digit {i}?", "target": "3",
             "prediction": p} for i, p in enumerate(["3", "7", "three"])]
    verdicts = judge(recs)
    assert verdicts == [True, False, True]
    assert seen[1].endswith("SYS USER: " + JUDGE_PROMPT.format(**recs[1]) + " ASSISTANT:")
    for r, v in zip(recs, verdicts):
        r["judge_correct"] = v
    assert score(recs)["mnist"]["judge_accuracy"] == pytest.approx(200 / 3)


def test_judge_loads_a_local_causal_lm(tmp_path):
    from transformers import LlamaForCausalLM

    from pipeline.demo.tiny import build_tiny
    from pipeline.evaluation.generate import Judge
    from pipeline.evaluation.scoring import score

    base = build_tiny()
    LlamaForCausalLM(base.model.config.text_config).save_pretrained(tmp_path / "judge")
    base.tokenizer.save_pretrained(tmp_path / "judge")
    recs = [{"task": "mnist", "category": "mnist", "image_id": str(i), "question": "digit?", "target": "3",
             "prediction": p} for i, p in enumerate(["3", "7"])]
    verdicts = Judge(str(tmp_path / "judge"))(recs)
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)
    for r, v in zip(recs, verdicts):
        r["judge_correct"] = v
    assert score(recs)["mnist"]["judge_accuracy"] == 50.0 * sum(verdicts)


def test_majority_baseline_answers_each_task_with_its_most_frequent_target():
    from pipeline.evaluation.scoring import majority_baseline

    items = {
        "sample_pope": [{"task": "sample_pope", "scoring": "yes_no", "category": "random", "question": "q",
                         "target": t, "qid": i}
                        for i, t in enumerate(["yes", "no", "no", "no"])],
        "sample_mnist": [{"task": "sample_mnist", "category": "sample_mnist", "question": "q", "target": t, "qid": i}
                         for i, t in enumerate(["1", "7", "7"])],
    }
    row = majority_baseline(items)
    assert row["provenance"]["answers"] == {"sample_pope": "no", "sample_mnist": "7"}
    assert row["tasks"]["sample_pope"]["score"] == pytest.approx(75.0)
    assert row["tasks"]["sample_mnist"]["score"] == pytest.approx(200 / 3)


def test_a_held_out_set_of_text_only_records_evaluates(tmp_path):
    """Before: a batch without any image passed pixel_values=None, and transformers' generate ran the vision
    tower on it (AttributeError)."""
    from pipeline.evaluation.runner import EvalConfig, evaluate

    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                              {"from": "gpt", "value": str(i + 1)}]} for i in range(3)]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    res = evaluate(EvalConfig(tasks=f"arith={tmp_path / 't.json'}", output_dir=tmp_path / "o", max_new_tokens=3))
    assert res["base"]["tasks"]["arith"]["questions"] == 3


@pytest.mark.parametrize("answer, official", [
    ("3,000", "3000"),  # a comma between digits: every mark is deleted, not spaced
    ("don't", "don't"), ("dont", "don't"), ("Isnt", "isn't"),
    ("1.5", "1.5"), ("5.", "5"), ("a dog.", "dog"), ("An apple?", "apple"),
    ("Two dogs", "2 dogs"), ("ten", "10"), ("none", "0"),
    ("t-shirt", "t shirt"), ("well - done", "well done"), ("The Cat, the hat", "cat hat"),
    ("12:30", "12:30"), ("$3.50", "$3.50"),  # colon and dollar are not in the official set
    ("yes!\n", "yes"),
])
def test_vqa_normalisation_follows_the_official_rule(answer, official):
    """Values worked out by hand with the official VQA evaluation's rules (punctuation deleted next to a space or
    around a comma in a number, else spaced; periods kept only before a digit; number words; articles;
    contractions)."""
    from pipeline.evaluation.metrics import vqa_accuracy, vqa_normalize

    assert vqa_normalize(answer) == official
    assert vqa_accuracy(answer, [official] * 10) == 1.0


def test_evaluating_an_adapter_puts_its_row_into_its_model_card(tmp_path):
    """The card training writes (core/card.py) gains this evaluation's table as its Results section: the adapter's
    row beside the majority answer and the base; a second evaluation replaces it, the metadata stays."""
    from huggingface_hub import ModelCard

    from pipeline.core import card, methods
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny
    from pipeline.evaluation.runner import EvalConfig, evaluate

    m = prompts_that_matter(attach_m2pt(build_tiny().model, M2PTConfig(seed=2)))
    folder = save_adapter(m, tmp_path / "mine", base_name="tiny")
    card.write_card(folder, method=methods.get("m2pt"), base_name="tiny", training=["data: a test"],
                    settings_yaml="method: m2pt")
    res = evaluate(EvalConfig(adapter=[str(folder)], with_base=True, limit=2, output_dir=tmp_path / "e1"))
    text = (folder / card.CARD).read_text()
    assert text.count("## Results") == 1
    results = text.split("## Results")[1]
    assert "Zero-shot, scored by `python -m pipeline.evaluate` on `tiny`" in results
    for row in ("majority answer", "base", "mine"):
        cells = [c.strip() for c in next(x for x in results.splitlines() if x.startswith(f"| {row} |")).split("|")]
        assert cells[2:-1] == [f"{res[row]['tasks'][t]['score']:.1f}" for t in res[row]["tasks"]], row
    evaluate(EvalConfig(adapter=[str(folder)], limit=2, output_dir=tmp_path / "e2"))  # no base row this time
    again = ModelCard.load(str(folder / card.CARD))
    assert again.text.count("## Results") == 1 and "| base |" not in again.text and "| mine |" in again.text
    assert again.data.library_name == "m2pt-pipeline" and "m2pt" in again.data.tags
    assert "data: a test" in again.text  # the training section is kept
