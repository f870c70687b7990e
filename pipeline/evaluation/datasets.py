"""Evaluation sets from local disk (no downloads). Every loader returns items:

    {"task", "category", "image_id", "qid", "question", "target", "answers"?, "image": path | bytes | None}

Layouts under --data_root (each task looks in its own sub-folder or file):

  mme/        the official release (one folder per subtask: `<cat>/images/*.jpg` + `<cat>/questions_answers_YN/
              *.txt`, or images and .txt side by side; each .txt holds "question<TAB>Yes|No" lines), or the
              lmms-lab parquet files (columns question_id, image, question, answer, category)
  pope/       lmms-lab parquet files (question_id, question, answer, image_source, image, category), or the
              official `coco_pope_{adversarial,popular,random}.json` (JSON lines: question_id, image, text, label)
              with COCO images in pope/val2014/ (or --coco_root)
  <name>.jsonl or <name>/*.jsonl
              the reference / MixLoRA form: unique_id, image_path (relative to the file's folder), prompt, target
              (+ optional `answers`, a list, for TextVQA); names: text_vqa, visual_spatial_reasoning,
              snli_ve_classification, cifar_10, cifar_100, mnist

Your own held-out set, by path (`--tasks path/to/heldout.json` or `--tasks name=path`): a LLaVA / Vision-Flan JSON
list or JSONL (`id`, `image` relative to the file's folder, `conversations`: the first human turn is the question,
the first gpt turn the target), or a shard folder written by data_prep.build_shards. Scored by normalised label
match; its name (the file's stem, the folder's name, or `name=`) is its column in the results table.

Each built-in task is a `Task`: its name, how it is scored (pipeline/evaluation/scoring.py) and its loader. An app
may pass more (the embedded demo's held-out tasks are pipeline/demo/sample_data.py's `SAMPLE_TASKS`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

JSONL_NAMES = {"textvqa": "text_vqa", "vsr": "visual_spatial_reasoning", "snli_ve": "snli_ve_classification",
               "cifar10": "cifar_10", "cifar100": "cifar_100", "mnist": "mnist"}
YES_NO = " Please answer yes or no."


class LayoutError(FileNotFoundError):
    """The evaluation data is not where or not in the form a loader expects (names the file or column)."""


@dataclass(frozen=True)
class Task:
    """A built-in evaluation task: its scoring rule ("mme", "yes_no" or "accuracy"; pipeline/evaluation/scoring.py),
    its loader, (data_root, coco_root) -> items, and its column title in the results table (default: the name)."""

    name: str
    scoring: str
    load: Callable
    title: str | None = None


def _builtin_tasks() -> dict[str, Task]:
    tasks = {"mme": Task("mme", "mme", lambda root, coco: load_mme(root / "mme")),
             "pope": Task("pope", "yes_no", lambda root, coco: load_pope(root / "pope", coco))}
    for name in JSONL_NAMES:
        tasks[name] = Task(name, "accuracy", lambda root, coco, name=name: load_jsonl_task(name, root))
    return tasks


BENCHMARKS = _builtin_tasks()
TASKS = tuple(BENCHMARKS)


def parse_tasks(spec: str, known: dict[str, Task] = BENCHMARKS) -> dict[str, Path | None]:
    """`--tasks` -> {name: None for a built-in task | path of a held-out set}. Entries: a built-in name (of
    `known`), `name=path`, or a path (named after its stem / folder)."""
    out: dict[str, Path | None] = {}
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        if "=" in entry:
            name, path = entry.split("=", 1)
            name, path = name.strip(), Path(path.strip())
        elif entry in known:
            name, path = entry, None
        elif Path(entry).suffix in (".json", ".jsonl") or Path(entry).exists():
            path = Path(entry)
            name = path.stem if path.suffix else path.name
        else:
            raise ValueError(f"--tasks: unknown task {entry!r}; built-in: {', '.join(known)}; or give a held-out "
                             "set as a path (.json / .jsonl / shard folder) or name=path")
        if path is not None:
            if name in known:
                raise ValueError(f"--tasks {entry}: {name!r} is a built-in task with its own scoring; name your "
                                 "set differently (name=path)")
            if not path.exists():
                raise LayoutError(f"--tasks {entry}: {path} not found")
        if name in out:
            raise ValueError(f"--tasks: {name!r} given twice")
        out[name] = path
    if not out:
        raise ValueError("--tasks: no task given")
    return out


def load_task(task: str, data_root: Path, coco_root: Path | None = None, path: Path | None = None,
              known: dict[str, Task] = BENCHMARKS) -> list[dict]:
    """The items of one task, each carrying its scoring rule: a held-out set by path (label match), or a
    built-in task of `known` read from under `data_root`."""
    if path is not None:
        items, rule = load_heldout(task, path), "accuracy"
    elif task in known:
        items, rule = known[task].load(data_root, coco_root), known[task].scoring
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(known)}")
    for it in items:
        it["scoring"] = rule
    return items


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise LayoutError(f"{path}: not found ({what})")
    return path


def read_jsonl(path: Path, required: set[str]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-empty line; a malformed line or a missing field names file:line."""
    out = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise LayoutError(f"{path}:{k}: not valid JSON ({e})") from None
        missing = required - set(r) if isinstance(r, dict) else required
        if missing:
            raise LayoutError(f"{path}:{k}: missing field(s) {sorted(missing)}")
        out.append((k, r))
    return out


def _parquet_rows(files: list[Path], columns: set[str]):
    import datasets

    ds = datasets.Dataset.from_parquet([str(f) for f in files])
    missing = columns - set(ds.column_names)
    if missing:
        raise LayoutError(f"{files[0].parent}: parquet lacks column(s) {sorted(missing)} (has {ds.column_names})")
    return ds


def _image_bytes(v):
    from pipeline.files import hf_image_bytes

    data = hf_image_bytes(v)
    if data is None:
        raise LayoutError(f"unsupported image value of type {type(v).__name__}")
    return data


# -------------------------------------------------------------------------------------------------- MME
def load_mme(root: Path) -> list[dict]:
    _need(root, "MME: official release folder or lmms-lab parquet files")
    parquet = sorted(root.rglob("*.parquet"))
    items = _mme_from_parquet(parquet) if parquet else _mme_from_release(root)
    if not items:
        raise LayoutError(f"{root}: no MME subtask folders with question .txt files and no parquet files")
    return items


def _mme_from_parquet(files: list[Path]) -> list[dict]:
    ds = _parquet_rows(files, {"question_id", "image", "question", "answer", "category"})
    return [{"task": "mme", "category": r["category"], "image_id": r["question_id"], "qid": f"{r['question_id']}#{i}",
             "question": r["question"], "target": r["answer"], "image": _image_bytes(r["image"])}
            for i, r in enumerate(ds)]


def _mme_from_release(root: Path) -> list[dict]:
    """The official release: `<cat>/images/*.jpg` + `<cat>/questions_answers_YN/*.txt`, or both side by side."""
    items = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = cat_dir / "questions_answers_YN"
        img_dir = cat_dir / "images" if qa_dir.is_dir() else cat_dir
        for txt in sorted((qa_dir if qa_dir.is_dir() else cat_dir).glob("*.txt")):
            image = next((img_dir / (txt.stem + e) for e in (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
                          if (img_dir / (txt.stem + e)).is_file()), None)
            if image is None:
                raise LayoutError(f"{txt}: no image {txt.stem}.jpg/.png in {img_dir}")
            items += _mme_questions(txt, cat_dir.name, image)
    return items


def _mme_questions(txt: Path, category: str, image: Path) -> list[dict]:
    items = []
    for k, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise LayoutError(f"{txt}:{k + 1}: expected 'question<TAB>answer', got {line!r}")
        items.append({"task": "mme", "category": category, "image_id": f"{category}/{txt.stem}",
                      "qid": f"{category}/{txt.stem}#{k}", "question": parts[0].strip(), "target": parts[1].strip(),
                      "image": str(image)})
    return items


# ------------------------------------------------------------------------------------------------- POPE
def load_pope(root: Path, coco_root: Path | None = None) -> list[dict]:
    _need(root, "POPE: lmms-lab parquet files or coco_pope_*.json + COCO images")
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        ds = _parquet_rows(parquet, {"question_id", "question", "answer", "image", "category"})
        return [{"task": "pope", "category": r["category"], "image_id": r.get("image_source") or r["question_id"],
                 "qid": f"{r['category']}#{r['question_id']}", "question": r["question"] + YES_NO,
                 "target": r["answer"], "image": _image_bytes(r["image"])} for r in ds]
    images = coco_root or root / "val2014"
    items = []
    for split in ("adversarial", "popular", "random"):
        f = _need(root / f"coco_pope_{split}.json", "official POPE question file")
        for _, r in read_jsonl(f, {"question_id", "image", "text", "label"}):
            items.append({"task": "pope", "category": split, "image_id": r["image"],
                          "qid": f"{split}#{r['question_id']}", "question": r["text"] + YES_NO,
                          "target": r["label"], "image": str(images / r["image"])})
    return items


# -------------------------------------------------------------------------------- reference JSONL sets
def load_jsonl_task(task: str, data_root: Path) -> list[dict]:
    name = JSONL_NAMES[task]
    cands = [data_root / f"{name}.jsonl", data_root / f"{task}.jsonl"]
    cands += sorted((data_root / name).glob("*.jsonl")) if (data_root / name).is_dir() else []
    f = next((c for c in cands if c.is_file()), None)
    if f is None:
        raise LayoutError(f"{task}: none of {[str(c) for c in cands[:2]]} or {data_root / name}/*.jsonl exists")
    items = []
    for _, r in read_jsonl(f, {"unique_id", "image_path", "prompt", "target"}):
        img = Path(r["image_path"])
        items.append({"task": task, "category": task, "image_id": str(r["unique_id"]), "qid": str(r["unique_id"]),
                      "question": r["prompt"].replace("[Options]", "Options"), "target": str(r["target"]),
                      "answers": r.get("answers"), "image": str(img if img.is_absolute() else f.parent / img)})
    return items


# ------------------------------------------------------------------------------------ your own held-out set
def _heldout_item(task: str, where: str, rec, image) -> dict:
    """One LLaVA-format record -> an item: first human turn = question (without <image>), first gpt turn = target."""
    try:
        convs = rec["conversations"]
        q = next(c["value"] for c in convs if c["from"] == "human")
        a = next(c["value"] for c in convs if c["from"] == "gpt")
        rid = str(rec["id"])
    except (KeyError, TypeError, StopIteration) as e:
        raise LayoutError(f"{where}: not a LLaVA record with id and a human + a gpt turn ({type(e).__name__}: {e})") \
            from None
    return {"task": task, "category": task, "image_id": rid, "qid": rid, "question": q.replace("<image>", "").strip(),
            "target": a.strip(), "image": image}


def load_heldout(task: str, path: Path) -> list[dict]:
    if path.is_dir():
        return _load_heldout_shards(task, path)
    if path.suffix == ".jsonl":
        recs = [(f"{path}:{k}", r) for k, r in read_jsonl(path, {"id", "conversations"})]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LayoutError(f"{path}: not a readable JSON list ({e})") from None
        if not isinstance(data, list):
            raise LayoutError(f"{path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
        recs = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    items = []
    for where, r in recs:
        img = r.get("image") if isinstance(r, dict) else None
        if img:
            img = Path(img) if Path(img).is_absolute() else path.parent / img
            if not img.is_file():
                raise LayoutError(f"{where}: image {img} not found")
            img = str(img)
        items.append(_heldout_item(task, where, r, img or None))
    if not items:
        raise LayoutError(f"{path}: no records")
    return items


def _load_heldout_shards(task: str, folder: Path) -> list[dict]:
    """Samples read the way training reads them (webdataset's tar reader, the trainer's image extensions)."""
    import webdataset as wds

    from pipeline.data.stream import IMAGE_EXTS

    man = _need(folder / "manifest.json", "a held-out shard folder needs the manifest.json of data_prep.build_shards")
    items = []
    for s in json.loads(man.read_text())["shards"]:
        tar = _need(folder / s["name"], f"listed in {man}")
        for sample in wds.tariterators.tarfile_samples([{"url": str(tar)}]):
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            items.append(_heldout_item(task, f"{tar}:{sample['__key__']}", json.loads(sample["json"]), image))
    return items
