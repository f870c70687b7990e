"""Evaluation metrics as small pure functions (no model, no I/O): MME, POPE, VQA accuracy, classification match,
MMAvg. Each follows the protocol named in its docstring."""

from __future__ import annotations

import re
from collections import defaultdict

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MMAVG_TASKS = ("textvqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope")


# -------------------------------------------------------------------------------------------------- MME
def mme_parse(prediction: str) -> str:
    """The official MME tool (eval_tool/calculation.py, `parse_pred_ans`, after its `.lower()`): exact "yes"/"no",
    else "yes"/"no" within the first four characters, else "other" (which counts as wrong)."""
    p = prediction.lower().strip()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


class MMEPairError(ValueError):
    """An MME image without exactly two questions: the official score (acc+) is undefined for it."""


def check_mme_pairs(records: list[dict]) -> None:
    """The official calculation.py asserts exactly two questions per image (`assert len(img_items) == 2`), and
    lmms-eval refuses too: acc+ of an image with one question would be that question's accuracy. Name the
    offenders instead of scoring them."""
    per_image: dict[tuple, int] = defaultdict(int)
    for r in records:
        per_image[(r["category"], r["image_id"])] += 1
    bad = [(k, n) for k, n in per_image.items() if n != 2]
    if bad:
        (cat, image), n = bad[0]
        raise MMEPairError(f"MME image {image!r} ({cat}) has {n} question(s), the official score needs exactly 2 "
                           f"per image ({len(bad)} image(s) affected); complete or drop the pair")


def mme_scores(records: list[dict]) -> dict:
    """records: {category, image_id, target, prediction}. Per subtask: acc (per question), acc+ (images whose two
    questions are both right), score = 100 acc + 100 acc+; Perception / Cognition = sums over their subtasks.
    Raises MMEPairError for an image without exactly two questions, as the official tool does."""
    check_mme_pairs(records)
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    out = {"subtasks": {}}
    for cat, rs in sorted(by_cat.items()):
        right = [mme_parse(r["prediction"]) == r["target"].lower().strip() for r in rs]
        per_image: dict[str, list[bool]] = defaultdict(list)
        for r, ok in zip(rs, right):
            per_image[r["image_id"]].append(ok)
        acc = sum(right) / len(right)
        acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
        out["subtasks"][cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                                "questions": len(rs), "images": len(per_image)}
    sub = out["subtasks"]
    out["perception"] = sum(sub[c]["score"] for c in MME_PERCEPTION if c in sub)
    out["cognition"] = sum(sub[c]["score"] for c in MME_COGNITION if c in sub)
    out["total"] = out["perception"] + out["cognition"]
    return out


# ------------------------------------------------------------------------------------------------- POPE
def pope_parse(prediction: str) -> str:
    """The official POPE rule, exactly: RUCAIBox/POPE `evaluate.py`, copied verbatim by LLaVA's
    `llava/eval/eval_pope.py` (and the M2PT repository's copy of it):

        if text.find('.') != -1: text = text.split('.')[0]      # only the first sentence
        text = text.replace(',', '')                            # commas removed, not replaced by a space
        words = text.split(' ')                                 # single spaces, not any whitespace
        'no' if ('No' in words or 'not' in words or 'no' in words) else 'yes'

    Case-sensitive: "NO", "Not at all." and "No,there is none." all count as "yes". Deliberately so: published
    POPE numbers were computed this way, and ours must be comparable with them."""
    text = prediction.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(targets: list[str], predictions: list[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio, in percent. As the official script, a
    label is "no" only when it reads "no" (trimmed, any case: the lmms-lab copy's labels), anything else is "yes"."""
    pred = [pope_parse(p) for p in predictions]
    gold = ["no" if t.strip().lower() == "no" else "yes" for t in targets]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * sum(p == g for p, g in zip(pred, gold)) / n, "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": 100 * pred.count("yes") / n, "questions": n}


def pope_scores(records: list[dict]) -> dict:
    """Per split (records' `category`: adversarial / popular / random) and the mean over splits."""
    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_split[r["category"]].append(r)
    splits = {s: pope_metrics([r["target"] for r in rs], [r["prediction"] for r in rs])
              for s, rs in sorted(by_split.items())}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in splits.values()) / len(splits) for k in keys}
    return {"splits": splits, "mean": mean, "score": mean["accuracy"]}


# ------------------------------------------------------------------------------------------ VQA / labels
# The VQA evaluation's answer processing (the rules of the official evaluation, visualqa.org/evaluation.html, as its
# evaluator and EvalAI's answer processor apply them). Contractions: the common single forms; the official table
# also spells out rare double ones ("wouldn'tve"), which answers of a few words practically never contain.
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "im": "i'm", "ive": "i've", "youre": "you're",
                 "thats": "that's", "whats": "what's", "wasnt": "wasn't", "werent": "weren't", "couldnt": "couldn't",
                 "wouldnt": "wouldn't", "shouldnt": "shouldn't", "hasnt": "hasn't", "havent": "haven't",
                 "hadnt": "hadn't", "theyre": "they're", "theres": "there's", "whos": "who's", "wheres": "where's",
                 "hes": "he's", "shes": "she's", "lets": "let's", "youll": "you'll", "youve": "you've",
                 "theyve": "they've", "weve": "we've", "itll": "it'll", "ill": "i'll", "id": "i'd"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Replaced by a space, or deleted when the answer has it next to a space or has a comma between digits. Not in the
# set (kept): ' : * # % ^ & $ | ~ and the period (its own rule).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("1.5" keeps its, "5." and "dog." lose theirs)


def _vqa_punctuation(text: str) -> str:
    out = text
    drop = _COMMA_IN_NUMBER.search(text) is not None  # "3,000": every mark goes, so the number stays "3000"
    for p in _PUNCT:
        out = out.replace(p, "" if drop or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def vqa_normalize(ans: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation, periods not before a digit, lower case, number words
    to digits, articles dropped, missing apostrophes of contractions restored."""
    a = _vqa_punctuation(ans.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in a.lower().split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Standard VQA accuracy over the (usually 10) human answers: the mean over leave-one-out subsets of
    min(1, matches / 3)."""
    p = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


def label_match(prediction: str, target: str) -> bool:
    """Normalised match of a predicted label/option: equal after normalisation, or the target's words appear as a
    whole-word run at the start of the prediction ("cat" in "cat.", "Cat, sitting on a mat")."""
    p, t = vqa_normalize(prediction).split(), vqa_normalize(target).split()
    if not t:
        return False
    return p == t or p[: len(t)] == t


def accuracy_task(records: list[dict]) -> dict:
    """Classification / VQA sets: VQA accuracy when the record has `answers`, else normalised label match."""
    scores = [vqa_accuracy(r["prediction"], r["answers"]) if r.get("answers") else
              float(label_match(r["prediction"], r["target"])) for r in records]
    return {"accuracy": 100 * sum(scores) / len(scores), "score": 100 * sum(scores) / len(scores),
            "questions": len(records)}


def mmavg(task_scores: dict[str, float]) -> float | None:
    """Mean of the seven non-MME scores (Text-VQA, VSR, SNLI-VE, CIFAR-10/100, MNIST, POPE), as the paper;
    None unless all seven are present."""
    if not all(t in task_scores for t in MMAVG_TASKS):
        return None
    return sum(task_scores[t] for t in MMAVG_TASKS) / len(MMAVG_TASKS)
