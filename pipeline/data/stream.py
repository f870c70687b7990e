"""Reading shards for training: one sample's path from tar to a padded batch.

    tar (webdataset) -> [shard list permuted by seed + epoch, identical on every rank]
      -> [split: the run's data slots (default ranks x workers); a rank takes batches from its slots in turn]
      -> raw samples -> [seeded shuffle buffer] -> [decode + template + image
      processor, in the loader worker] -> [right-padded batch]

Why each step is shaped this way:
* Every slot reads an *endless* stream (epoch after epoch), and the trainer takes a fixed number of steps computed
  from the manifest's sample count. So all ranks take the same number of steps even when shards are uneven; a
  rank never runs dry while another waits in an all-reduce (the classic DDP/ZeRO hang).
* Shards are split between slots when there are at least as many shards as slots; otherwise every slot reads all
  shards and keeps every n-th sample (webdataset would raise "No samples found" for an empty worker).
* Decoding happens after the shuffle buffer (raw bytes are cheap to buffer), and each batch carries its slot's
  position (epoch, raw samples consumed), so a resumed run skips exactly what was consumed, without decoding.
* Bad samples are skipped and *counted* per reason; the counts travel with the batches to the trainer, which
  reports them and aborts past a threshold.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.chat import IGNORE, ConversationError, VicunaTemplate
from pipeline.files import open_rgb, sha256_file

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png")
# Why a sample read from a shard did not train (counted per rank, summed in the metrics and the final summary).
SKIP_REASONS = ("bad_json", "bad_conversation", "image_mismatch", "too_long", "no_supervised", "corrupt_image",
                "lost_in_broken_shard")
READ_ERRORS = "tar_read_errors"  # errors, not samples: reported beside the skips, not counted toward their share


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------- shards
@dataclass
class ShardSet:
    """The shards of a run. `counts` holds each shard's sample count from its manifest (absent for shards without
    one), so a tar that breaks mid-read is accounted for in *samples* lost, not in read errors."""

    paths: list[str]
    total: int | None  # samples in all shards; None when some shard has no manifest
    counts: dict[str, int] = field(default_factory=dict)
    num_visual_tokens: dict[str, int | None] = field(default_factory=dict)  # manifest -> tokens per <image> it used


def _check_listed(path: Path, entry: dict, manifest: Path, verify_sha256: bool) -> None:
    """A shard must be the file its manifest describes: present, same size (and same sha256 when asked)."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path}: listed in {manifest} but missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise ValueError(f"shard {path}: {size} bytes but {manifest} records {entry['bytes']} (truncated or replaced "
                         "since the build); rebuild with data_prep.build_shards or restore the file")
    if verify_sha256 and "sha256" in entry and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"shard {path}: sha256 differs from {manifest} (corrupted or replaced since the build)")


@dataclass
class _Manifest:
    path: Path
    entries: dict[str, dict]  # shard name -> {"name", "samples", "bytes", "sha256"}
    num_visual_tokens: int | None


def _read_manifest(folder: Path) -> _Manifest | None:
    """The manifest.json of a shard folder, or None without one."""
    m = folder / "manifest.json"
    if not m.is_file():
        return None
    try:
        man = json.loads(m.read_text())
        entries = {s["name"]: s for s in man["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{m}: unreadable shard manifest ({e})") from None
    return _Manifest(m, entries, man.get("num_visual_tokens"))


def _expand(part: str, manifest) -> list[Path]:
    """One comma-separated part of a shard spec -> shard paths (a folder: what its manifest lists)."""
    import braceexpand

    p = Path(part)
    if p.is_dir():
        found = manifest(p)
        if found is None:
            raise FileNotFoundError(f"{p}: a shard folder needs the manifest.json written by data_prep.build_shards")
        return [p / name for name in found.entries]
    listed = [Path(f) for pat in braceexpand.braceexpand(part) for f in (sorted(glob.glob(pat)) or [pat])]
    missing = [f for f in listed if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--train_shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return listed


def resolve_shards(spec: str, verify_sha256: bool = False) -> ShardSet:
    """Shards from a shard folder (with manifest.json), a brace pattern (`dir/shard-{000000..000009}.tar`), a glob,
    or a comma-separated list of those. Every shard a manifest lists (also one found by a pattern, when its folder
    has a manifest) is checked against it before any work: present, same size, and same sha256 with
    `verify_sha256`. A mismatch is an error naming the shard."""
    import functools

    manifest = functools.lru_cache(maxsize=None)(_read_manifest)  # each folder's manifest is parsed once
    paths: list[str] = []
    counts: dict[str, int] = {}
    for f in [f for part in spec.split(",") if part for f in _expand(part, manifest)]:
        found = manifest(f.parent)
        entry = found.entries.get(f.name) if found else None
        if entry is not None:
            _check_listed(f, entry, found.path, verify_sha256)
            counts[str(f)] = int(entry["samples"])
        paths.append(str(f))
    if not paths:
        raise FileNotFoundError(f"--train_shards {spec!r}: no shards")
    total = sum(counts.values()) if len(counts) == len(paths) else None  # unknown without every manifest
    tokens = {str(m.path): m.num_visual_tokens for m in map(manifest, {Path(p).parent for p in paths}) if m}
    return ShardSet(paths, total, counts, tokens)


def count_samples(paths: list[str]) -> int:
    """Count samples by scanning tar headers (only when no manifest is available)."""
    import tarfile

    n = 0
    for p in paths:
        with tarfile.open(p) as t:
            n += sum(1 for m in t.getmembers() if m.name.endswith(".json"))
    return n


# ------------------------------------------------------------------------------------------- one sample
class Preprocess:
    """Raw webdataset sample -> {input_ids, labels, pixel_values|None}. Runs in the loader workers."""

    def __init__(self, template: VicunaTemplate, image_processor, max_length: int):
        self.template, self.image_processor, self.max_length = template, image_processor, max_length

    def __call__(self, raw: dict) -> dict:
        try:
            meta = json.loads(raw["json"])
            conv = meta["conversations"]
        except (KeyError, ValueError, TypeError) as e:
            raise SkipSample("bad_json", f"{raw.get('__key__')}: {e}") from None
        img_bytes = next((raw[k] for k in IMAGE_EXTS if k in raw), None)
        try:
            enc = self.template.encode(conv)
        except (ConversationError, KeyError, TypeError, IndexError) as e:
            raise SkipSample("bad_conversation", f"{raw.get('__key__')}: {e}") from None
        n_img_tokens = enc.input_ids.count(self.template.image_token_id)
        if (img_bytes is None) != (n_img_tokens == 0):
            raise SkipSample("image_mismatch", f"{raw.get('__key__')}: image present={img_bytes is not None}, "
                                               f"{n_img_tokens} image tokens")
        if len(enc.input_ids) > self.max_length:
            raise SkipSample("too_long", f"{raw.get('__key__')}: {len(enc.input_ids)} > {self.max_length}")
        if enc.num_supervised == 0:
            raise SkipSample("no_supervised", f"{raw.get('__key__')}")
        pixels = None
        if img_bytes is not None:
            try:
                im = open_rgb(img_bytes)
            except Exception as e:
                raise SkipSample("corrupt_image", f"{raw.get('__key__')}: {e}") from None
            pixels = self.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
        return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixels,
                "id": meta.get("id", raw.get("__key__"))}


def collate(items: list[dict], pad_id: int) -> dict:
    """Right padding (prompts first, tokens, then pads): the layout the reference trains with."""
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, it in enumerate(items):
        k = len(it["input_ids"])
        ids[r, :k] = torch.tensor(it["input_ids"])
        labels[r, :k] = torch.tensor(it["labels"])
        mask[r, :k] = 1
    px = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(px) if px else None, "ids": [it["id"] for it in items]}


# ------------------------------------------------------------------------------------------ the stream
class ShardStream(IterableDataset):
    """Endless, deterministic stream of batches for one rank (see the module docstring).

    The run's data is read in `nslots` slots (default: ranks x loader workers), fixed for the whole run. Rank r owns
    the k = nslots / world slots r*k .. r*k+k-1 and takes its batches from them in turn: its i-th batch since the run
    began comes from its slot i mod k. `first_batch` is that i for the first batch this stream yields (optimizer
    steps done x accumulation), so a resumed stream continues the turn where the run stopped. Each loader worker
    reads whole slots (the worker count must divide k): the loader takes batches from its workers in turn, worker w
    first, so worker w reads the slots whose turns fall to it. Because a step takes the same batches from every slot
    whatever the rank count (when the step's micro-batches are a multiple of nslots), a run may resume on another
    number of ranks (pipeline/training/elastic.py).

    `start`: {slot: [epoch, raw_consumed(, batches of a length group emitted, group size)]} from a checkpoint; each
    slot resumes right after that sample (or inside that length group)."""

    def __init__(self, shards: list[str], *, rank: int, world: int, seed: int, batch_size: int, preprocess,
                 pad_id: int, shuffle_buffer: int = 1000, start: dict | None = None, counts: dict | None = None,
                 group_batches: int = 0, nslots: int | None = None, first_batch: int = 0):
        self.shards, self.rank, self.world, self.seed = list(shards), rank, world, seed
        self.counts = dict(counts or {})  # shard -> samples its manifest lists
        self.batch_size, self.preprocess, self.pad_id = batch_size, preprocess, pad_id
        self.shuffle_buffer, self.start = shuffle_buffer, {int(k): v for k, v in (start or {}).items()}
        self.group_batches = group_batches  # 0: batches in stream order; k: length-grouped within k batches
        self.nslots, self.first_batch = nslots, first_batch  # nslots None: ranks x loader workers

    def _read_shard(self, url: str, stats: Counter, count_lost: bool):
        """Raw samples of one tar. A truncated or corrupt tar ends early: the samples its manifest promised but
        that never came are counted as lost (toward --max_bad_sample_fraction), not just the read error."""
        import webdataset as wds

        def on_error(exn):
            stats[READ_ERRORS] += 1
            log.warning("unreadable shard data in %s: %s", url, exn)
            return True

        n = 0
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=on_error):
            n += 1
            yield sample
        expected = self.counts.get(url)
        if count_lost and expected is not None and n < expected:
            stats["lost_in_broken_shard"] += expected - n
            log.warning("%s: read %d of the %d samples its manifest lists; %d lost this epoch", url, n, expected,
                        expected - n)

    def _raw(self, slot: int, nslots: int, epoch: int, stats: Counter):
        from webdataset.filters import _shuffle

        perm = list(self.shards)
        random.Random(self.seed + epoch).shuffle(perm)  # identical on every rank and worker
        by_shard = len(perm) >= nslots
        mine = perm[slot::nslots] if by_shard else perm
        # When every slot reads every shard, only slot 0 counts lost samples (once, not once per slot).
        raw = (s for u in mine for s in self._read_shard(u, stats, count_lost=by_shard or slot == 0))
        if not by_shard:
            raw = (s for i, s in enumerate(raw) if i % nslots == slot)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{slot}")
            raw = _shuffle(raw, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return raw

    def _samples(self, slot: int, nslots: int, epoch: int, skip: int, stats: Counter):
        """Endless preprocessed samples of one slot, starting after raw sample `skip` of `epoch`:
        yields (sample, epoch, raw samples of that epoch consumed so far)."""
        while True:
            n = 0
            for raw in self._raw(slot, nslots, epoch, stats):
                n += 1
                if n <= skip:
                    continue
                try:
                    item = self.preprocess(raw)
                except SkipSample as e:
                    stats[e.reason] += 1
                    log.debug("skipped sample: %s", e)
                    continue
                yield item, epoch, n
            if n == 0:
                raise RuntimeError(f"data slot {slot} (rank {self.rank}) got no samples from {len(self.shards)} "
                                   "shard(s): fewer samples than ranks x workers?")
            epoch, skip = epoch + 1, 0

    def _emit(self, items: list[dict], cursor: tuple, stats: Counter) -> dict:
        batch = collate(items, self.pad_id)
        batch["cursor"] = cursor
        batch["skipped"] = dict(stats)
        stats.clear()
        return batch

    def _group(self, samples, slot: int, pos: tuple, size: int, emitted: int, stats: Counter):
        """One length group: `size` batches' worth of samples, cut into batches of similar length, emitted in a
        seeded order. Cursor of each batch but the last: (slot, epoch, n before the group, batches emitted, size);
        a resumed run rebuilds the group from there (same samples, same order, same size) and skips what was
        emitted. The last batch carries the plain cursor after the group. Returns that position."""
        group = [next(samples) for _ in range(self.batch_size * size)]
        rng = random.Random(f"{self.seed}/{slot}/{pos}")
        batches = group_by_length([x for x, _, _ in group], self.batch_size, rng)
        if emitted:
            stats.clear()  # the skips met while building this group were reported before the interruption
        for j in range(emitted, len(batches)):
            last = j + 1 == len(batches)
            yield self._emit(batches[j], (slot, *group[-1][1:]) if last else (slot, *pos, j + 1, size), stats)
        return group[-1][1:]

    def _slot_batches(self, slot: int, nslots: int):
        """Endless batches of one slot, from its position in `start`."""
        epoch, skip, *inside = self.start.get(slot, (0, 0))
        stats: Counter = Counter()  # per slot: a resumed length group clears only its own slot's counts
        samples = self._samples(slot, nslots, epoch, skip, stats)
        pos = (epoch, skip)
        if inside:  # stopped inside a length group: finish it as it was built, whatever the flags are now
            emitted, size = inside
            pos = yield from self._group(samples, slot, pos, size, emitted, stats)
        while True:
            if self.group_batches:
                pos = yield from self._group(samples, slot, pos, self.group_batches, 0, stats)
            else:
                items = [next(samples) for _ in range(self.batch_size)]
                yield self._emit([x for x, _, _ in items], (slot, *items[-1][1:]), stats)

    def worker_slots(self, worker: int, nworkers: int) -> tuple[list[int], int]:
        """(the slots loader worker `worker` reads, in the order it takes batches from them; nslots)."""
        nslots = self.nslots or self.world * nworkers
        if nslots % self.world:
            raise ValueError(f"{nslots} data slots cannot be shared by {self.world} ranks")
        k = nslots // self.world
        if k % nworkers:
            raise ValueError(f"{nworkers} loader workers cannot share rank {self.rank}'s {k} data slots")
        first = (self.first_batch + worker) % k  # the turn of this worker's first batch
        return [self.rank * k + (first + n * nworkers) % k for n in range(k // nworkers)], nslots

    def __iter__(self):
        info = get_worker_info()
        slots, nslots = self.worker_slots(*((info.id, info.num_workers) if info else (0, 1)))
        streams = [self._slot_batches(s, nslots) for s in slots]
        while True:
            for stream in streams:
                yield next(stream)


def group_by_length(items: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Batches of similar token length (LLaVA's `group_by_modality_length` idea, inside one slot's stream): sort
    by length, cut into batches, shuffle the batch order so that step lengths still vary."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    batches = [[items[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches
