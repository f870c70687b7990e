"""Per-task scoring of prediction records, the majority-answer baseline and the results table.

A task declares its scoring rule (`pipeline.evaluation.datasets.Task.scoring`), and every item and prediction
record carries it in its "scoring" field, so re-scoring a predictions file needs no task list:

  "mme"       MME's acc + acc+ per image pair (perception / cognition sums)
  "yes_no"    POPE's accuracy, F1, precision, recall and yes-ratio
  "accuracy"  VQA accuracy against the record's `answers` when it has them, else normalised label match

A record without the field (a predictions file from before it existed) takes the rule its task has in `rules`,
else the built-in benchmark's, else "accuracy".
"""

from __future__ import annotations

from collections import Counter, defaultdict

from pipeline.evaluation import metrics

MAJORITY = "majority answer"  # the table row of the majority-answer baseline
SCORING_RULES = ("mme", "yes_no", "accuracy")
BENCHMARK_SCORING = {"mme": "mme", "pope": "yes_no"}  # every other built-in task: "accuracy"
RECORD_KEYS = ("task", "scoring", "category", "image_id", "qid", "question", "target", "answers")


def rule_of(record: dict, rules: dict | None = None) -> str:
    task = record["task"]
    return record.get("scoring") or (rules or {}).get(task) or BENCHMARK_SCORING.get(task, "accuracy")


def prediction_record(item: dict, prediction: str) -> dict:
    """One line of predictions.jsonl: what scoring needs of the item, and the answer."""
    return {k: item.get(k) for k in RECORD_KEYS} | {"prediction": prediction}


def _task_metrics(rule: str, rs: list[dict]) -> dict:
    if rule == "mme":
        m = metrics.mme_scores(rs)
        m["score"] = m["total"]
        return m
    m = metrics.pope_scores(rs) if rule == "yes_no" else metrics.accuracy_task(rs)
    if any("judge_correct" in r for r in rs):
        m["judge_accuracy"] = 100 * sum(bool(r.get("judge_correct")) for r in rs) / len(rs)
    return m


def score(records: list[dict], rules: dict | None = None) -> dict:
    """task -> metrics for a list of prediction records (also what --score_only runs), plus "mmavg" when every
    task of the paper's average is present."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    res = {task: _task_metrics(rule_of(rs[0], rules), rs) for task, rs in by_task.items()}
    avg = metrics.mmavg({t: m["score"] for t, m in res.items()})
    if avg is not None:
        res["mmavg"] = {"score": avg}
    return res


def mark_correct(records: list[dict], rules: dict | None = None) -> None:
    """Per-question rule-based correctness, written into the predictions file for inspection."""
    for r in records:
        rule = rule_of(r, rules)
        if rule == "mme":
            r["correct"] = metrics.mme_parse(r["prediction"]) == r["target"].lower().strip()
        elif rule == "yes_no":
            r["correct"] = metrics.pope_parse(r["prediction"]) == r["target"].lower().strip()
        elif r.get("answers"):
            r["correct"] = metrics.vqa_accuracy(r["prediction"], r["answers"])
        else:
            r["correct"] = metrics.label_match(r["prediction"], r["target"])


def majority_baseline(items: dict, rules: dict | None = None) -> dict:
    """The row of a model that answers every question of a task with the task's most frequent target (its first
    reference answer for open VQA), scored exactly as generated answers are."""
    recs, answers = [], {}
    for task, its in items.items():
        targets = Counter(it.get("target") or (it.get("answers") or [""])[0] for it in its)
        answers[task] = max(sorted(targets), key=targets.get)  # ties: alphabetical, so the row is reproducible
        recs += [prediction_record(it, answers[task]) for it in its]
    mark_correct(recs, rules)
    return {"tasks": score(recs, rules), "provenance": {"method": MAJORITY, "answers": answers}}


# ------------------------------------------------------------------------------------------------ the table
TABLE_COLUMNS = ("mme", "textvqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope", "mmavg")
COLUMN_NAMES = {"mme": "MME (P / C)", "pope": "POPE acc", "mmavg": "MMAvg"}


def _cell(res: dict, col: str) -> str:
    if col not in res:
        return "–"
    m = res[col]
    return f"{m['score']:.1f}" if col != "mme" else f"{m['perception']:.1f} / {m['cognition']:.1f}"


def markdown_table(results: dict, names: dict | None = None) -> str:
    """One row per run, one column per task: the paper's benchmarks in its order, then the others as given.
    `names`: column titles for tasks (beside the benchmarks' own)."""
    names = COLUMN_NAMES | (names or {})
    present = [t for r in results.values() for t in r["tasks"]]
    cols = [c for c in TABLE_COLUMNS if c in present]
    cols += [c for c in dict.fromkeys(present) if c not in cols]  # held-out sets given by path, in order
    lines = ["| run | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for run, r in results.items():
        lines.append(f"| {run} | " + " | ".join(_cell(r["tasks"], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"
