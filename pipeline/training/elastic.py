"""Resuming a run on another number of ranks: a requeued Slurm job that comes back on fewer or more nodes.

Two things tie a checkpoint to the rank count that wrote it, and each has an answer here:

* **The sample stream.** The shards are read in a fixed number of data slots for the whole run (`--data_slots`,
  default ranks x loader workers at the start; data/stream.py). A step takes the same batches from every slot on any
  rank count when the global batch and the micro-batch stay the same and each step's micro-batches (ranks x
  accumulation) are a multiple of the slot count: every slot then gives the same number of batches to every step.
  The slots' positions are saved per rank and merged on resume, so the new ranks share them out again. What cannot
  be continued exactly is refused before the model loads, with the reason and the flag to change
  (`check_world_change`). The only numerical difference left is the order in which the ranks' gradients are summed.
* **The ZeRO optimizer state** is partitioned per rank, and DeepSpeed refuses to load it on another world size.
  Its *universal checkpoint* is the library's own answer: `deepspeed.checkpoint.ds_to_universal` turns the partitions
  into one folder per parameter (fp32 weights, Adam moments, step), which an engine of any size loads with
  `"checkpoint": {"load_universal": true}`. Rank 0 converts once, into the checkpoint's `universal/` folder
  (written under a temporary name, then renamed into place), before the engine is built.

Random draws (dropout, LoRA dropout) after such a resume come from the new ranks' generators: a rank that did not
exist before starts from the run's seed. M2PT itself draws nothing at training time.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)
UNIVERSAL = "universal"  # <checkpoint>/universal/ds: the DeepSpeed universal checkpoint (tag "ds")


@dataclass(frozen=True)
class SavedLayout:
    """How the run a checkpoint belongs to read its data and split its batch."""

    world: int
    data_slots: int
    global_batch: int | None  # samples per optimizer step (None: a checkpoint older than run identities)
    micro_batch: int | None


def saved_layout(ckpt: Path) -> SavedLayout:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    run = state.get("run") or {}
    world = int(state["world_size"])
    # Checkpoints written before --data_slots read ranks x workers slots.
    slots = state.get("data_slots") or world * max(int(run.get("dataloader_num_workers", 1)), 1)
    return SavedLayout(world, int(slots), run.get("global_batch"), run.get("per_device_train_batch_size"))


def plan_data_slots(cfg, world: int, saved: SavedLayout | None) -> int:
    """The run's slot count: the checkpoint's when resuming (a different --data_slots is caught by the run's
    identity), else --data_slots, else ranks x loader workers."""
    if saved is not None:
        return cfg.data_slots or saved.data_slots
    slots = cfg.data_slots or world * max(cfg.dataloader_num_workers, 1)
    if slots % world:
        raise UsageError(f"--data_slots {slots}: {world} ranks cannot share {slots} data slots evenly; give a "
                         f"multiple of {world}")
    return slots


def _batch_hint(cfg, saved: SavedLayout, world: int) -> str:
    """What keeps the saved global batch on `world` ranks, in flags."""
    per_rank, rest = divmod(saved.global_batch, world * cfg.per_device_train_batch_size)
    if rest == 0 and per_rank >= 1:
        return f"--gradient_accumulation_steps {per_rank}"
    return (f"no accumulation keeps {saved.global_batch} samples per step with micro-batches of "
            f"{cfg.per_device_train_batch_size} on {world} ranks; resume on {saved.world} ranks")


def check_world_change(cfg, world: int, saved: SavedLayout, ckpt: Path) -> None:
    """Refuse, before the model loads, a resume on another rank count that would not continue the same steps."""
    if saved.world == world:
        return
    head = f"{ckpt} was written by {saved.world} rank(s), this run has {world}"
    if saved.global_batch is None:
        raise UsageError(f"{head}, and it predates run identities (it records no global batch): resume it on "
                         f"{saved.world} ranks")
    if saved.micro_batch not in (None, cfg.per_device_train_batch_size):
        raise UsageError(f"{head}: keep --per_device_train_batch_size {saved.micro_batch} (the data slots' batches "
                         "are cut at that size)")
    new_batch = world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if new_batch != saved.global_batch:
        raise UsageError(f"{head}: the run's global batch is {saved.global_batch} samples per step, this command's "
                         f"{new_batch}; {_batch_hint(cfg, saved, world)}")
    slots = saved.data_slots
    if slots % world:
        raise UsageError(f"{head}: its data is read in {slots} slots, which {world} ranks cannot share evenly; resume "
                         f"on a rank count that divides {slots} (runs meant to move to more ranks start with "
                         "--data_slots set to a multiple of every rank count they may get)")
    micro = world * cfg.gradient_accumulation_steps
    if micro % slots:
        raise UsageError(f"{head}: each step takes {micro} micro-batches from {slots} data slots, not the same "
                         f"number from each, so the steps would hold other samples than on {saved.world} ranks; "
                         f"resume on {saved.world} ranks")


def loader_workers(slots_per_rank: int, requested: int) -> int:
    """Loader processes for a rank's slots: each reads whole slots, so the count divides them (0 stays 0: the
    main process reads them all)."""
    if requested == 0:
        return 0
    return max(d for d in range(1, min(requested, slots_per_rank) + 1) if slots_per_rank % d == 0)


def to_universal(ckpt: Path) -> Path:
    """Rank 0: convert the checkpoint's ZeRO partitions into DeepSpeed's universal format (once); returns the
    folder `engine.load_checkpoint` takes (tag "ds")."""
    final, tmp = ckpt / UNIVERSAL, ckpt / f".tmp-{UNIVERSAL}"
    if (final / "ds" / "zero" / "optimizer_state.pt").is_file():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: the universal-checkpoint version tag the engine does not write by itself.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "ds" / "ds"),
           "--output_folder", str(tmp / "ds"), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    log.info("converting %s to DeepSpeed's universal checkpoint (the ZeRO state of another rank count)", ckpt)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"converting {ckpt / 'ds'} to a universal checkpoint failed: {last}")
    (tmp / "ds" / "latest").write_text("ds\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def merged_rank_state(ckpt: Path, rank: int, saved_world: int) -> dict:
    """This rank's part of a checkpoint written by `saved_world` ranks: every slot's position (each slot was
    saved by the rank that read it), the consumed/skipped totals (all of them on rank 0, so their sums over ranks
    stay right), and the random-generator state of the same rank number when there was one."""
    parts = [json.loads((ckpt / f"rank-{r:05d}.json").read_text()) for r in range(saved_world)]
    cursors: dict = {}
    for part in parts:
        cursors.update(part["cursors"])
    totals = sum((Counter(p["totals"]) for p in parts), Counter()) if rank == 0 else Counter()
    state = {"cursors": cursors, "totals": dict(totals)}
    if rank < saved_world:
        state["rng"] = parts[rank]["rng"]
    return state
