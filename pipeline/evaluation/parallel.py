"""Evaluation on every rank a launcher starts (torchrun, deepspeed, srun, or one plain process), resumable after a
kill, with the same predictions whatever the batch size or rank count.

    every rank  its share of each task's unanswered questions -> generate -> append each batch's answers to
                <row>/answers/rank-NNNNN.jsonl (flushed and fsynced: a kill loses at most the batches in flight)
    rank 0      once every rank is done: every answers file -> the answers in dataset order -> predictions.jsonl
                (written atomically) -> scores

Why it is shaped this way:
* An answer is stored under its question's key (task, position, a hash of the question, its image id and its image
  file's size and time) and the row's fingerprint: the base model's files (name, size, modification time), the
  adapter's files (sha256), and every setting that changes an answer (max_new_tokens, temperature, the seed when
  sampling, dtype, the chat template's system prompt). Batch size and rank count are not part of it, because they do
  not change an answer (greedy rows are left-padded and masked; samples are seeded per question,
  evaluation/generate.py). So the same command run again - on any number of ranks - generates only what no answers
  file holds yet, and a changed adapter or setting reuses nothing (one log line says how many stored answers were set
  aside).
* Shares: a task's unanswered questions sorted by prompt length and dealt in turn, so every rank gets the same mix
  of long and short prompts, and its batches (of similar lengths) little padding.
* Ranks meet only at barriers, two per row: after reading the stored answers (so everyone deals the same pending
  questions) and after generating. No collective runs inside generation, so a rank with fewer questions never waits
  in an operation the others never reach.
* Progress: rank 0's bar counts every rank's answers, from what was appended to their files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("m2pt.evaluate")
ANSWERS = "answers"  # <row>/answers/rank-NNNNN.jsonl


# --------------------------------------------------------------------------------------------------- ranks
@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = True  # this evaluation started the process group, so it ends it

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_ranks(timeout_s: int) -> Ranks:
    """The process group of whatever launched us (gloo on CPU, nccl on CUDA); one plain process needs none.

    Inside a process that already has one (the closing table of a training run on several ranks), evaluation runs
    on that group and leaves it to its owner: a second init_process_group fails ("trying to initialize the default
    process group twice"), and destroying the trainer's group would break the trainer's last barrier."""
    import torch
    import torch.distributed as dist

    from pipeline.launcher import map_launcher_env

    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return Ranks(dist.get_rank(), dist.get_world_size(), local, owned=False)
    map_launcher_env()
    env = os.environ
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if world == 1:
        return Ranks()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(rank, world, local)


# -------------------------------------------------------------------------------------------- fingerprints
def _file_stamps(path: Path, content: bool) -> list:
    """(name, sha256) of an artifact's files, or (name, size, mtime) of a model folder's (gigabytes: not read). Not
    its model card (README.md): the card gains the results table after the answers it summarises were given."""
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.is_file() and p.name != "README.md")
    if content:
        from pipeline.files import sha256_file

        return [(p.name, sha256_file(p)) for p in files]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _source_stamps(source: str | None) -> list | str | None:
    if source is None:
        return None
    p = Path(source)
    return _file_stamps(p, content=False) if p.exists() else source  # a name: "tiny", a hub id


def fingerprint(cfg, adapter: str | None, artifact, dtype: str, system_prompt: str) -> str:
    """What an answer depends on besides its question (see the module docstring); `artifact`: the adapter's
    methods.Artifact (None for the base)."""
    parts = {
        "model": [_source_stamps(s) for s in (cfg.model, cfg.model_llm, cfg.model_vision, cfg.mm_projector)],
        "adapter": _file_stamps(artifact.path, content=not artifact.method.is_model) if adapter else None,
        "kind": artifact.kind if artifact else None, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed if cfg.temperature > 0 else None, "dtype": dtype, "system": system_prompt}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_stamp(image) -> list | str | None:
    """What tells an image file apart from its replacement under the same name: size and modification time of a
    path, a checksum of in-memory bytes."""
    if isinstance(image, (bytes, bytearray)):
        return f"crc32:{zlib.crc32(image)}"
    if isinstance(image, (str, Path)) and Path(image).is_file():
        st = Path(image).stat()
        return [st.st_size, st.st_mtime_ns]
    return None


def question_key(task: str, index: int, item: dict) -> str:
    """task / position / a hash of the question, its image id and its image file's stamp."""
    text = json.dumps([item.get("question"), item.get("image_id"), _image_stamp(item.get("image"))],
                      ensure_ascii=False)
    return f"{task}/{index}/{hashlib.sha1(text.encode()).hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------------ answers
def answer_sum(fp: str, key: str, prediction: str) -> str:
    """The checksum a stored answer's line carries: an answer edited in place no longer matches it."""
    text = json.dumps([fp, key, prediction], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Stored:
    """What the answers files of a row hold for one fingerprint."""

    answers: dict  # question key -> prediction, under this fingerprint, checksum intact
    other: int  # answers of other settings (adapter, model or generation)
    stale: int  # questions whose only answers do not match their checksum (edited, or stored before lines had one)


def read_answers(row_dir: Path, fp: str) -> Stored:
    """The answers stored under `fp` in every rank's answers file. A line cut short by a kill is skipped; a line
    whose checksum does not match is counted as stale and its question is asked again."""
    found, other, stale = {}, 0, set()
    for f in sorted((row_dir / ANSWERS).glob("rank-*.jsonl")):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                key, pred, rec_fp = rec["key"], rec["prediction"], rec["fp"]
            except (ValueError, KeyError, TypeError):
                continue
            if rec_fp != fp:
                other += 1
            elif isinstance(pred, str) and rec.get("sum") == answer_sum(fp, key, pred):
                found[key] = pred
            else:
                stale.add(key)
    return Stored(found, other, len(stale - found.keys()))  # an answer asked again since counts no more


class AnswerLog:
    """This rank's answers file, appended to batch by batch."""

    def __init__(self, row_dir: Path, rank: int, fp: str):
        self.path = row_dir / ANSWERS / f"rank-{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fp = fp
        self.f = self.path.open("a", encoding="utf-8")
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self.f.write("\n")  # a line cut short by a kill stays on its own line, unread

    def write(self, keys: list[str], predictions: list[str]) -> None:
        for k, p in zip(keys, predictions):
            line = {"fp": self.fp, "key": k, "prediction": p, "sum": answer_sum(self.fp, k, p)}
            self.f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class AnswerCounter:
    """Answers appended to any rank's file since it was created (rank 0's progress bar)."""

    def __init__(self, row_dir: Path):
        self.folder = row_dir / ANSWERS
        self.offsets = {f: f.stat().st_size for f in self.folder.glob("rank-*.jsonl")}
        self.count = 0

    def update(self) -> int:
        for f in self.folder.glob("rank-*.jsonl"):
            start = self.offsets.get(f, 0)
            with f.open("rb") as fh:
                fh.seek(start)
                new = fh.read()
            self.count += new.count(b"\n")
            self.offsets[f] = start + len(new)
        return self.count


# ----------------------------------------------------------------------------------------------- the shares
@dataclass
class Pending:
    """The questions of one row still to answer, with their keys, and how many were already answered."""

    items: dict  # task -> [(key, item)] not yet answered
    answered: int
    total: int


def pending(items: dict, stored: dict) -> Pending:
    todo, done, total = {}, 0, 0
    for task, its in items.items():
        keyed = [(question_key(task, i, it), it) for i, it in enumerate(its)]
        todo[task] = [(k, it) for k, it in keyed if k not in stored]
        done += len(keyed) - len(todo[task])
        total += len(keyed)
    return Pending(todo, done, total)


def share(keyed: list, rank: int, world: int, prompt_length) -> list:
    """This rank's part of a task's pending questions: sorted by prompt length (then key), dealt in turn."""
    order = sorted(keyed, key=lambda kv: (prompt_length(kv[1]), kv[0]))
    return order[rank::world]


def collect(items: dict, row_dir: Path, fp: str) -> dict:
    """task -> predictions in dataset order, from every rank's answers file (rank 0, after the last barrier)."""
    stored = read_answers(row_dir, fp).answers
    out, missing = {}, []
    for task, its in items.items():
        keys = [question_key(task, i, it) for i, it in enumerate(its)]
        missing += [k for k in keys if k not in stored]
        out[task] = [stored.get(k) for k in keys]
    if missing:
        raise RuntimeError(f"{len(missing)} question(s) have no stored answer after every rank finished, e.g. "
                           f"{missing[0]} (a rank failed?); run the same command again to answer them")
    return out


class Progress:
    """Rank 0's one bar for a row: every rank's answers (read from what they append), questions/s and ETA."""

    def __init__(self, row_dir: Path, todo: Pending, name: str, enabled: bool):
        from tqdm import tqdm

        self.counter = AnswerCounter(row_dir) if enabled else None
        self.answered, self.total = todo.answered, todo.total
        self.bar = tqdm(total=todo.total, initial=todo.answered, desc=name, unit="q", disable=not enabled,
                        dynamic_ncols=True)

    def update(self) -> None:
        if self.counter is not None:
            self.bar.update(self.answered + self.counter.update() - self.bar.n)

    def wait_for_others(self, timeout_s: int) -> None:
        """Rank 0, its own share done: keep the bar moving until every rank's answers are in (or nothing moved
        for `timeout_s`: the barrier after this then fails on the rank that is stuck)."""
        if self.counter is None:
            return
        last, since = self.counter.count, time.time()
        while self.answered + self.counter.update() < self.total and time.time() - since < timeout_s:
            if self.counter.count != last:
                last, since = self.counter.count, time.time()
                self.update()
            time.sleep(0.2)
        self.update()
        self.bar.close()
