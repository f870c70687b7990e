"""Reading shards for training: one sample's path from tar to a padded batch.

    tar (webdataset) -> [shard list permuted by seed + epoch, identical on every rank]
      -> [split: rank x worker "slots"] -> raw samples -> [seeded shuffle buffer] -> [decode + template + image
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
import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.chat import IGNORE, ConversationError, VicunaTemplate

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png")


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------- shards
def resolve_shards(spec: str) -> tuple[list[str], int | None]:
    """Shard paths and total sample count from a shard folder (with manifest.json), a brace pattern
    (`dir/shard-{000000..000009}.tar`), a glob, or a comma-separated list of those."""
    import braceexpand

    paths, total = [], 0
    for part in [s for s in spec.split(",") if s]:
        p = Path(part)
        if p.is_dir():
            m = p / "manifest.json"
            if not m.is_file():
                raise FileNotFoundError(f"{p}: a shard folder needs the manifest.json written by data_prep.build_shards")
            man = json.loads(m.read_text())
            for s in man["shards"]:
                paths.append(str(p / s["name"]))
            total = None if total is None else total + man["totals"]["written"]
            continue
        found = [f for pat in braceexpand.braceexpand(part) for f in (sorted(glob.glob(pat)) or [pat])]
        missing = [f for f in found if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"--train_shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        paths += found
        total = None  # counts unknown without a manifest; the caller counts them
    if not paths:
        raise FileNotFoundError(f"--train_shards {spec!r}: no shards")
    return paths, total


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
        from PIL import Image

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
                im = Image.open(io.BytesIO(img_bytes)).convert("RGB")
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

    `start`: {slot: [epoch, raw_consumed]} from a checkpoint; each slot resumes right after that sample."""

    def __init__(self, shards: list[str], *, rank: int, world: int, seed: int, batch_size: int, preprocess,
                 pad_id: int, shuffle_buffer: int = 1000, start: dict | None = None):
        self.shards, self.rank, self.world, self.seed = list(shards), rank, world, seed
        self.batch_size, self.preprocess, self.pad_id = batch_size, preprocess, pad_id
        self.shuffle_buffer, self.start = shuffle_buffer, {int(k): v for k, v in (start or {}).items()}

    def _raw(self, slot: int, nslots: int, epoch: int, tar_errors: Counter):
        import webdataset as wds
        from webdataset.filters import _shuffle

        perm = list(self.shards)
        random.Random(self.seed + epoch).shuffle(perm)  # identical on every rank and worker
        by_shard = len(perm) >= nslots
        mine = perm[slot::nslots] if by_shard else perm

        def on_error(exn):  # a truncated or corrupt tar member: count it and go on
            tar_errors["corrupt_tar"] += 1
            log.warning("skipping unreadable shard data: %s", exn)
            return True

        raw = wds.tariterators.tarfile_samples(({"url": u} for u in mine), handler=on_error)
        if not by_shard:
            raw = (s for i, s in enumerate(raw) if i % nslots == slot)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{slot}")
            raw = _shuffle(raw, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return raw

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        slot, nslots = self.rank * nworkers + wid, self.world * nworkers
        epoch, skip = self.start.get(slot, (0, 0))
        stats: Counter = Counter()
        buf: list[dict] = []
        while True:
            n = 0
            for raw in self._raw(slot, nslots, epoch, stats):
                n += 1
                if n <= skip:
                    continue
                try:
                    buf.append(self.preprocess(raw))
                except SkipSample as e:
                    stats[e.reason] += 1
                    log.debug("skipped sample: %s", e)
                    continue
                if len(buf) == self.batch_size:
                    batch = collate(buf, self.pad_id)
                    batch["cursor"] = (slot, epoch, n)
                    batch["skipped"] = dict(stats)
                    stats.clear()
                    buf = []
                    yield batch
            if n == 0:
                raise RuntimeError(f"data slot {slot} (rank {self.rank}, worker {wid}) got no samples from "
                                   f"{len(self.shards)} shard(s): fewer samples than ranks x workers?")
            epoch, skip = epoch + 1, 0
