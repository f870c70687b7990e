"""Vision-Flan / LLaVA records + images -> validated WebDataset shards (+ manifest.json, rejected.jsonl).

Library code: the CLI is data_prep/build_shards.py (flags generated from ShardBuildConfig below); the embedded
default's shards are built by pipeline/demo/sample_data.py. Both call `build(ShardBuildConfig(...), text_side)` with
the model's (tokenizer, config): this module resolves no model names.

Every input record ends up either in a shard or as one line of rejected.jsonl with its file, index, id and a
reason code, so `read = written + rejected` always holds (it is asserted before the manifest is written).
Output depends only on the input and the arguments, not on --workers. An interrupted build re-run with the same
arguments keeps the completed shards and redoes the rest; a shard becomes visible under its final name only once
it is fully written, and counts as complete only once its stats are recorded.

Exit status: 0 when at least one sample was written (rejections are normal and summarised), 1 when nothing could
be written, 2 when the input itself is unreadable or the arguments are wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.files import atomic_write_json, hf_image_bytes, sha256_file

log = logging.getLogger("build_shards")


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class ShardBuildConfig:
    """What a shard build reads and how it writes (every field is a flag of data_prep/build_shards.py)."""

    input: list = field(metadata={"nargs": "+", "help": (
        "one or more record sources: a Vision-Flan/LLaVA .json list, a .jsonl file (one record per line), a Hugging "
        "Face `datasets` folder (save_to_disk) or a .parquet file. Records: {\"id\", \"image\" (path relative to "
        "--image_root; omit for text-only), \"conversations\": [{\"from\": \"human\"|\"gpt\", \"value\"}], "
        "\"task_name\"?}")})
    output: str = field(metadata={"help": "folder for the shards, manifest.json and rejected.jsonl"})
    image_root: str | None = field(default=None, metadata={"help": (
        "folder the records' image paths are relative to; paths resolving outside it (.., absolute, symlinks) are "
        "rejected")})
    prefix: str = field(default="shard", metadata={"help": "shard file prefix: PREFIX-000000.tar ..."})
    samples_per_shard: int = field(default=1000, metadata={"help": "start a new shard after this many samples"})
    max_shard_bytes: int = field(default=1 << 30, metadata={"help": "...or before a shard would exceed this size"})
    workers: int = field(default_factory=_default_workers, metadata={"help": (
        "parallel validation/encoding processes; the output does not depend on it")})
    max_image_pixels: int = field(default=89_478_485, metadata={"help": (
        "reject images with more pixels than this, checked from the header before decoding (decompression-bomb "
        "guard; PIL's own limit)")})
    model_max_length: int = field(default=2048, metadata={"help": (
        "reject records longer than this many tokens after <image> expansion (text prompts not counted); the "
        "trainer's flag of the same name")})
    model: str | None = field(default=None, metadata={"help": (
        "model whose tokenizer and image-token count measure --model_max_length: a Hugging Face llava folder, or "
        "'tiny' (the embedded default, used when omitted)")})
    image_tokens: int | None = field(default=None, metadata={"type": int, "help": (
        "override the visual tokens one <image> expands to (default: from --model and the two M2PT flags)")})
    seed: int = field(default=0, metadata={"help": "seed of --shuffle"})
    shuffle: bool = field(default=False, metadata={"help": (
        "shuffle the record order before sharding (recommended when inputs are grouped by task)")})
    overwrite: bool = field(default=False, metadata={"help": (
        "replace an existing build in --output made with other inputs or arguments")})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    # The M2PT settings the trainer will use: official mode adds visual_prompt_length visual tokens per image.
    visual_prompt_length: int = field(default_factory=lambda: _m2pt_default("visual_prompt_length"),
                                      metadata={"help": "(from M2PTConfig)"})
    visual_token_mode: str = field(default_factory=lambda: _m2pt_default("visual_token_mode"),
                                   metadata={"help": "(from M2PTConfig)"})

    def check(self) -> None:
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1 or self.workers < 1:
            raise InputError("--samples_per_shard, --max_shard_bytes and --workers must be >= 1")


def _m2pt_default(name: str):
    from pipeline.core.m2pt import M2PTConfig

    return getattr(M2PTConfig(), name)

FORMAT = "m2pt-shards/1"
PROGRESS = ".progress.json"
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
TAR_MTIME = 946684800  # fixed member mtime (2000-01-01): identical input -> byte-identical shards
REASONS = (
    "bad_json", "bad_encoding", "bad_record", "duplicate_id", "bad_conversation", "missing_image_token", "extra_image_token",
    "empty_answer", "too_long", "path_outside_root", "missing_image", "undecodable_image", "image_too_large",
)


class InputError(Exception):
    """The input itself is unreadable (exit status 2)."""


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Job:
    file: str
    index: int  # record index inside its file
    record: object
    duplicate: bool = False


def read_inputs(paths: list[str]) -> list[Job]:
    jobs: list[Job] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"--input {p}: no such file or directory")
        try:
            if p.is_dir() or p.suffix == ".parquet":
                jobs += _read_hf(p)
            elif p.suffix == ".jsonl":
                jobs += _read_jsonl(p)
            else:
                data = json.loads(p.read_text(encoding="utf-8"))
                if not isinstance(data, list):
                    raise InputError(f"--input {p}: expected a JSON list of records, got {type(data).__name__}")
                jobs += [Job(str(p), i, r) for i, r in enumerate(data)]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--input {p}: unreadable ({e})") from e
    return jobs


def _read_jsonl(p: Path) -> list[Job]:
    """One job per non-empty line; a line that is not UTF-8 or not JSON is rejected on its own (with its number),
    not the whole file."""
    jobs = []
    with p.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                jobs.append(Job(str(p), i, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as e:
                jobs.append(Job(str(p), i, Rejected("bad_encoding", f"line {i + 1}: not UTF-8 ({e.reason} at byte "
                                                                    f"{e.start})")))
            except json.JSONDecodeError as e:
                jobs.append(Job(str(p), i, Rejected("bad_json", f"line {i + 1}: {e}")))
    return jobs


@dataclass
class HFRow:
    """A row of a Hugging Face dataset, read only in the worker that processes it: the build holds the id column,
    not the records and their image bytes, so its memory does not grow with the data set."""

    source: str
    index: int
    id: object


_SOURCES: dict = {}  # source -> its Dataset (memory-mapped Arrow), opened once; forked workers inherit it


def _open_hf(p: Path):
    """A saved `datasets` folder, a .parquet file, or a folder of .parquet files (how Hub data sets ship)."""
    import datasets

    parquet = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    saved = p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())
    try:
        if p.is_dir() and (saved or not parquet):
            return datasets.load_from_disk(str(p))
        return datasets.Dataset.from_parquet([str(f) for f in parquet])
    except Exception as e:  # datasets raises many types for a wrong folder
        raise InputError(f"--input {p}: not a Hugging Face datasets folder or parquet file(s) ({e})") from e


def _read_hf(p: Path) -> list[Job]:
    import datasets

    ds = _open_hf(p)
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"--input {p}: holds splits {list(ds)}; pass one split's folder")
    missing = {"id", "conversations"} - set(ds.column_names)
    if missing:
        raise InputError(f"--input {p}: missing column(s) {sorted(missing)} (has {ds.column_names})")
    if isinstance(ds.features.get("image"), datasets.Image):
        # Encoded bytes as they are stored: decoding would hold every image in memory as pixels, and writing
        # them back would re-encode JPEGs as PNG.
        ds = ds.cast_column("image", datasets.Image(decode=False))
    _SOURCES[str(p)] = ds
    return [Job(str(p), i, HFRow(str(p), i, rid)) for i, rid in enumerate(ds["id"])]


# --------------------------------------------------------------------------------------- per-record work
_worker: dict = {}  # worker state, set by _init_worker


def _init_worker(image_root: str, max_pixels: int, text_side: tuple, image_tokens: int, max_length: int,
                 in_pool: bool = False):
    import signal

    from PIL import Image

    if in_pool:
        # A forked worker inherits its parent's Python signal handlers. The trainer's turn SIGTERM into a "stop at
        # the next step" flag, so Pool.terminate() (SIGTERM) would wait forever for workers that never die.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    from pipeline.core.chat import VicunaTemplate

    Image.MAX_IMAGE_PIXELS = None  # our own header check below is the guard; PIL's would raise a bare error
    tok, cfg = text_side
    _worker.update(
        root=os.path.realpath(image_root) if image_root else None, max_pixels=max_pixels, max_length=max_length,
        template=VicunaTemplate(tok, cfg.image_token_id, image_tokens),
    )


def record_id(rec) -> str | None:
    """The record's id as a string, or None when it has no usable one (missing, empty, not str/int, a bool).
    The one definition used for validation, duplicate detection and its rebuild on resume."""
    rid = rec.id if isinstance(rec, HFRow) else rec.get("id") if isinstance(rec, dict) else None
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        return None
    return str(rid)


def sample_key(rid: str) -> str:
    """Stable tar key: the id with anything but [A-Za-z0-9_-] replaced (dots would split the webdataset key),
    plus a short hash of the original whenever sanitising changed it, so distinct ids never collide."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", rid)[:96] or "_"
    if key != rid:
        key += "_" + hashlib.sha1(rid.encode()).hexdigest()[:8]
    return key


def _read_record_image(image) -> bytes:
    """The encoded bytes a record's `image` names: an HF Image value's own bytes, or a file inside --image_root."""
    data = hf_image_bytes(image) if not isinstance(image, str) else None
    if data is not None:
        return data
    if isinstance(image, dict) and isinstance(image.get("path"), str):
        image = image["path"]  # an HF Image value (parquet, a datasets folder) that kept only its path
    if not isinstance(image, str):
        raise Rejected("bad_record", f"'image' must be a relative path, got {type(image).__name__}")
    real = _inside_image_root(image)
    try:
        with open(real, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing_image", f"{image!r}: no such file") from None
    except OSError as e:
        raise Rejected("missing_image", f"{image!r}: {e.strerror}") from None


def _inside_image_root(image: str) -> str:
    """The one rule for an image file a record names, whatever the input format (a JSON path, a parquet or
    `datasets` Image value's path): its real path (after '..' and symlinks) lies inside --image_root, or the record
    is rejected as path_outside_root. Why: a data file may come from someone else, and a shard is shared further:
    a path must not pull /etc/shadow or another user's files into it."""
    root = _worker["root"]
    if root is None:
        raise Rejected("missing_image", f"record names the image file {image!r} but no --image_root was given")
    real = os.path.realpath(os.path.join(root, image))  # an absolute path stays itself
    if not real.startswith(root + os.sep):
        what = "absolute image path" if os.path.isabs(image) else "image path"
        raise Rejected("path_outside_root", f"{what} {image!r} resolves to {real}, outside --image_root")
    return real


def _check_image(data: bytes):
    """Decode-check; return (bytes to store, extension, width, height)."""
    from PIL import Image

    if not data:
        raise Rejected("undecodable_image", "zero-byte image file")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
    except Exception as e:
        raise Rejected("undecodable_image", f"not an image ({type(e).__name__}: {e})") from None
    if w * h > _worker["max_pixels"]:
        raise Rejected("image_too_large", f"{w}x{h} = {w * h} pixels > --max_image_pixels {_worker['max_pixels']}")
    try:
        im.load()
        rgb = im.convert("RGB")
    except Exception as e:
        raise Rejected("undecodable_image", f"decoding failed ({type(e).__name__}: {e})") from None
    if im.format in ("JPEG", "PNG"):
        return data, ("jpg" if im.format == "JPEG" else "png"), w, h
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png", w, h


@dataclass
class Processed:
    """One record's outcome: a sample to write, or the reason (and detail) it was rejected."""

    sample: dict | None = None
    reason: str | None = None
    detail: str | None = None


def process(job: Job) -> Processed:
    """Validate and encode one record. Runs in a worker process."""
    from pipeline.core.chat import ConversationError, check_conversation

    try:
        rec = job.record
        if isinstance(rec, HFRow):
            rec = _SOURCES[rec.source][rec.index]
        if isinstance(rec, Rejected):
            raise rec
        if not isinstance(rec, dict):
            raise Rejected("bad_record", f"record is a {type(rec).__name__}, not an object")
        rid = record_id(rec)
        if rid is None:
            raise Rejected("bad_record", "missing or empty 'id'")
        if job.duplicate:
            raise Rejected("duplicate_id", f"id {rid!r} already used by an earlier record")
        image = rec.get("image")
        has_image = image not in (None, "")
        convs = rec.get("conversations")
        try:
            check_conversation(convs, has_image)
        except ConversationError as e:
            raise Rejected(e.reason, str(e)) from None
        n_tokens = _worker["template"].length(convs)
        if n_tokens > _worker["max_length"]:
            raise Rejected("too_long", f"{n_tokens} tokens after image expansion > --model_max_length {_worker['max_length']}")
        meta = {"id": rid, "task_name": rec.get("task_name"), "conversations": convs,
                "source": f"{job.file}:{job.index}", "width": None, "height": None}
        sample = {"__key__": sample_key(rid)}
        if has_image:
            data, ext, meta["width"], meta["height"] = _check_image(_read_record_image(image))
            sample[ext] = data
        sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
        return Processed(sample=sample)
    except Rejected as e:
        return Processed(reason=e.reason, detail=e.detail)


# ----------------------------------------------------------------------------------------------- writing
def _tar_bytes(sample: dict) -> int:
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


class ShardSink:
    """Writes numbered shards; each appears under its final name (atomic rename) only once complete."""

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: int, first_index: int):
        self.out, self.prefix, self.max_count, self.max_bytes = out, prefix, max_count, max_bytes
        self.index, self.writer, self.count, self.bytes = first_index, None, 0, 0

    def name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def needs_roll(self, sample) -> bool:
        return self.count > 0 and (self.count >= self.max_count or self.bytes + _tar_bytes(sample) > self.max_bytes)

    def write(self, sample):
        import webdataset as wds

        if self.writer is None:
            self.tmp = self.out / (self.name() + ".tmp")
            self.writer = wds.TarWriter(str(self.tmp), mtime=TAR_MTIME, encoder=False)
        self.writer.write(sample)
        self.count += 1
        self.bytes += _tar_bytes(sample)

    def close(self) -> dict | None:
        """Finish the open shard; returns its stats (None if nothing was open)."""
        if self.writer is None:
            return None
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self.out / self.name()
        os.replace(self.tmp, final)
        stats = {"name": final.name, "samples": self.count, "bytes": final.stat().st_size, "sha256": sha256_file(final)}
        self.index, self.writer, self.count, self.bytes = self.index + 1, None, 0, 0
        return stats


# -------------------------------------------------------------------------------------------------- main
def _fingerprint(args, jobs_files: list[str]) -> str:
    keys = ("input", "image_root", "prefix", "samples_per_shard", "max_shard_bytes", "max_image_pixels",
            "max_length", "model", "image_tokens", "seed", "shuffle")
    # (max_length: the flag's old name, kept as the key so builds made before the rename are still recognised)
    d = {k: getattr(args, "model_max_length" if k == "max_length" else k) for k in keys}
    d["input_stats"] = [(f, os.path.getsize(f) if os.path.isfile(f) else None) for f in sorted(set(jobs_files))]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_tokens(args, config) -> int:
    if args.image_tokens:
        return args.image_tokens
    from pipeline.core.m2pt import M2PTConfig, visual_tokens_for_config

    return visual_tokens_for_config(config, M2PTConfig(visual_prompt_length=args.visual_prompt_length,
                                               visual_token_mode=args.visual_token_mode))


def _listed_shards(path: Path, fingerprint: str) -> set[str]:
    """Shard names a manifest / progress file of *another* build lists (empty for this build's own or none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if doc.get("fingerprint") == fingerprint:
        return set()
    return {s["name"] for s in doc.get("shards", []) if isinstance(s, dict) and "name" in s}


def _remove_old_build(out: Path, fingerprint: str, keep: set[str]) -> None:
    """--overwrite: delete the tars of the previous build (whatever their prefix, so a `*.tar` glob never mixes two
    builds), but only the files its manifest / progress file lists: never a file this tool did not write."""
    old = (_listed_shards(out / MANIFEST, fingerprint) | _listed_shards(out / PROGRESS, fingerprint)) - keep
    for name in sorted(old):
        if "/" not in name and name.endswith(".tar"):
            (out / name).unlink(missing_ok=True)
    if old:
        log.info("--overwrite: removed %d shard(s) of the previous build in %s", len(old), out)
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest of this very build returned early in build()


def _start_state(out: Path, fp: str, cfg: ShardBuildConfig, n_jobs: int) -> dict:
    """The build's progress: fresh, resumed from .progress.json (same fingerprint), or - when the manifest of this
    very build exists - that manifest (nothing to do). Another build's files need --overwrite."""
    state = {"fingerprint": fp, "shards": [], "records_done": 0, "rejected_lines": 0, "rejected_by_reason": {}}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if old.get("fingerprint") == fp:
            return dict(old, complete=True)
        if not cfg.overwrite:
            raise InputError(f"{out} holds shards of a different build (other input or arguments); "
                             "use --overwrite or another --output")
    if (out / PROGRESS).is_file():
        prev = json.loads((out / PROGRESS).read_text())
        if prev.get("fingerprint") == fp:
            state = prev
            log.info("resuming: %d complete shard(s), %d/%d records done", len(state["shards"]),
                     state["records_done"], n_jobs)
        elif not cfg.overwrite:
            raise InputError(f"{out} holds a partial build with other arguments; use --overwrite or another --output")
    if cfg.overwrite:
        _remove_old_build(out, fp, keep={s["name"] for s in state["shards"]})
    for stray in out.glob("*.tar.tmp"):  # a shard that was being written when the last run died
        stray.unlink()
    return state


def _pending_jobs(jobs: list[Job], order: list[int], done: int):
    """The jobs still to do, in order, each marked when its id was already used (also by a done record)."""
    seen = {rid for rid in (record_id(jobs[pos].record) for pos in order[:done]) if rid is not None}
    for pos in order[done:]:
        job = jobs[pos]
        rid = record_id(job.record)
        if rid is not None:
            job.duplicate = rid in seen
            seen.add(rid)
        yield job


def _results(cfg: ShardBuildConfig, todo, text_side: tuple):
    """Processed records in input order (so the output does not depend on --workers), and the pool to end."""
    init = (cfg.image_root, cfg.max_image_pixels, text_side, cfg.image_tokens, cfg.model_max_length)
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(cfg.workers, initializer=_init_worker, initargs=(*init, True))
        return pool.imap(process, todo, chunksize=8), pool
    _init_worker(*init)
    return map(process, todo), None


class _BuildWriter:
    """Shards + rejected.jsonl + .progress.json. Rejections are flushed and counted with each completed shard, so
    a killed build resumes exactly at the last complete shard's boundary."""

    def __init__(self, out: Path, cfg: ShardBuildConfig, state: dict):
        self.out, self.state = out, state
        self.sink = ShardSink(out, cfg.prefix, cfg.samples_per_shard, cfg.max_shard_bytes, len(state["shards"]))
        rej = out / REJECTED
        lines = rej.read_text().splitlines(keepends=True)[: state["rejected_lines"]] if rej.exists() else []
        rej.write_text("".join(lines))  # drop rejections written after the last complete shard
        self.rej_f = rej.open("a", encoding="utf-8")
        self.rejected_by = Counter(state["rejected_by_reason"])
        self.done, self.pending = state["records_done"], 0

    def add(self, job: Job, result: Processed) -> None:
        if result.sample is not None:
            if self.sink.needs_roll(result.sample):
                self.finish_shard()
            self.sink.write(result.sample)
        else:
            rid = record_id(job.record)
            self.rej_f.write(json.dumps({"file": job.file, "index": job.index, "id": rid, "reason": result.reason,
                                         "detail": result.detail}, ensure_ascii=False, default=str) + "\n")
            self.rejected_by[result.reason] += 1
            self.pending += 1
        self.done += 1

    def _record_progress(self) -> None:
        self.state.update(records_done=self.done, rejected_lines=self.state["rejected_lines"] + self.pending,
                          rejected_by_reason=dict(self.rejected_by))
        self.pending = 0

    def finish_shard(self) -> None:
        stats = self.sink.close()
        if stats:
            self.rej_f.flush()
            self.state["shards"].append(stats)
            self._record_progress()
            atomic_write_json(self.out / PROGRESS, self.state)  # the shard is complete from here on

    def close(self) -> None:
        self.finish_shard()
        self._record_progress()  # no shard after the last one: the tail rejections still count
        self.rej_f.close()


def build(args: ShardBuildConfig, text_side: tuple) -> dict:
    """Run a build; returns the manifest. `text_side`: (tokenizer, LlavaConfig) of `args.model`, which the lengths
    are measured with (the caller resolves the model name: this library knows no model names). Raises InputError
    for unreadable input or bad settings."""
    from tqdm import tqdm

    t0 = time.time()
    args.check()
    args.image_tokens = _image_tokens(args, text_side[1])
    jobs = read_inputs(args.input)
    order = list(range(len(jobs)))
    if args.shuffle:
        random.Random(args.seed).shuffle(order)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(args, [j.file for j in jobs])
    state = _start_state(out, fp, args, len(jobs))
    if state.pop("complete", False):
        log.info("%s is already complete for these arguments; nothing to do", out)
        return state
    writer = _BuildWriter(out, args, state)
    results, pool = _results(args, _pending_jobs(jobs, order, state["records_done"]), text_side)
    bar = tqdm(total=len(jobs), initial=writer.done, unit="rec", desc="shards", dynamic_ncols=True,
               disable=args.quiet or None)
    try:
        for pos, result in zip(order[writer.done:], results):
            writer.add(jobs[pos], result)
            bar.update()
            if writer.done % 64 == 0:
                bar.set_postfix(rejected=sum(writer.rejected_by.values()), refresh=False)
        writer.close()
    finally:
        bar.close()
        writer.rej_f.close()
        if pool is not None:
            pool.terminate()
    written = sum(s["samples"] for s in state["shards"])
    rejected = sum(writer.rejected_by.values())
    assert len(jobs) == written + rejected, (len(jobs), written, rejected)  # the invariant, never silently broken
    manifest = _manifest(args, fp, state, len(jobs), written, writer.rejected_by, time.time() - t0)
    atomic_write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _manifest(args, fp, state, read, written, rejected_by, seconds) -> dict:
    import PIL
    import webdataset

    import pipeline

    return {
        "format": FORMAT,
        "fingerprint": fp,
        "args": {k: v for k, v in asdict(args).items() if k not in ("quiet", "overwrite")},
        "versions": {"m2pt_pipeline": pipeline.__version__, "webdataset": webdataset.__version__,
                     "pillow": PIL.__version__, "python": sys.version.split()[0]},
        "num_visual_tokens": args.image_tokens,
        "shards": state["shards"],
        "totals": {"read": read, "written": written, "rejected": sum(rejected_by.values()),
                   "rejected_by_reason": dict(sorted(rejected_by.items()))},
        "seconds": round(seconds, 2),
    }
