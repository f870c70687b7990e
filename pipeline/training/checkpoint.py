"""Atomic, verified, resumable training checkpoints.

    OUTPUT/checkpoints/step-00000120/
        adapter/                 the M2PT adapter at this step (fp32 trainables: adapter_config.json + safetensors)
        ds/                      DeepSpeed engine state: trainables, ZeRO optimizer partitions, LR scheduler
                                 (saved with exclude_frozen_parameters: megabytes, not the frozen base model)
        rank-00000.json          per-rank data position (cursor per loader slot), skip counters, RNG state
        trainer_state.json       step, samples, tokens, world size, the run's identity (training/identity.py)
        COMPLETE                 written last: {"files": {relative path: size}} - what it vouches for
    OUTPUT/checkpoints/latest    name of the newest complete checkpoint (replaced atomically)

Why it is shaped this way (each rule closes a window in which a kill -9 or a full disk used to lose the run):
* Everything is written into `.tmp-step-…` first; `COMPLETE` goes in last, so a directory without it was never
  finished. `COMPLETE` lists every file with its size, and resume *verifies* them: a marker beside a half-deleted
  directory (a kill while pruning or re-saving) is not mistaken for a checkpoint.
* The checkpoint `latest` names is never deleted before its replacement is complete: a re-save of an existing step
  (a finished run launched again, a signal right after a periodic save) points `latest` at the complete new copy
  first, then removes the old one, then renames the new one into place.
* Pruning removes a checkpoint's marker before its files.
* `--resume auto` takes `latest` if it verifies, else the newest checkpoint that does (an intact `.tmp-…` copy
  included), and says so. A checkpoint named with `--resume PATH` that does not verify is an error naming what is
  missing.
* A failed save (no space left on device, ...) removes its partial `.tmp-…` and raises CheckpointError with one
  line; the previous checkpoint stays intact.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import CheckpointError, UsageError, first_line
from pipeline.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
# Files every checkpoint has whatever its marker says (also how markers written before sizes were recorded are
# checked).
REQUIRED = ("trainer_state.json", "rank-00000.json", "adapter/adapter_model.safetensors", "ds/latest")


def ckpt_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(d: Path) -> int | None:
    m = re.fullmatch(r"(?:\.tmp-)?step-(\d+)", d.name)
    return int(m.group(1)) if m else None


def inventory(d: Path) -> dict[str, int]:
    """{relative path: size} of every file under d except the marker."""
    return {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != MARKER}


def verify(d: Path) -> str | None:
    """None when `d` is a complete checkpoint (marker present, every file it lists there with its size); else why
    not, in a few words."""
    marker = d / MARKER
    if not marker.is_file():
        return "no COMPLETE marker" if d.is_dir() else "no such directory"
    text = marker.read_text().strip()
    try:
        files = json.loads(text)["files"] if text else {}  # empty: a marker written before sizes were recorded
    except (ValueError, KeyError, TypeError):
        return "unreadable COMPLETE marker"
    missing = [f for f in list(files) + [f for f in REQUIRED if f not in files] if not (d / f).is_file()]
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    for f, size in files.items():
        if (d / f).stat().st_size != size:
            return f"{f} has {(d / f).stat().st_size} bytes, COMPLETE recorded {size}"
    return None


def find_resume(output_dir, resume: str | None) -> Path | None:
    """`auto`: the checkpoint `latest` names if it verifies, else the newest one that does (None if none does);
    a path: that checkpoint, which must verify."""
    if not resume:
        return None
    if resume != "auto":
        d = Path(resume)
        why = verify(d)
        if why:
            raise FileNotFoundError(f"--resume {d}: not a resumable checkpoint ({why})")
        return d
    root = ckpt_root(output_dir)
    named = None
    if (root / "latest").is_file():
        named = root / (root / "latest").read_text().strip()
        why = verify(named)
        if why is None:
            return named
        log.warning("checkpoint %s named by %s is not usable (%s); looking for the newest intact one",
                    named, root / "latest", why)
    # Newest first; at equal steps the final name before an interrupted re-save's .tmp copy.
    cands = sorted((d for d in root.glob("*step-*") if d.is_dir() and _step_of(d) is not None),
                   key=lambda d: (_step_of(d), not d.name.startswith(".tmp-")), reverse=True)
    for d in cands:
        why = verify(d)
        if why is None:
            if named is not None:
                log.warning("resuming from %s instead", d)
            return d
        log.info("skipping %s: %s", d, why)
    return None


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove(d: Path) -> None:
    """Delete a checkpoint directory, its marker first: a kill halfway leaves an unmarked (ignored) directory."""
    (d / MARKER).unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    atomic_write_text(root / "latest", name + "\n")


def _write_marker(d: Path) -> None:
    atomic_write_json(d / MARKER, {"files": inventory(d)}, indent=1)


def _save_error(e: BaseException, where: Path) -> str:
    """One line for a failed save. torch's writer reports a full disk as 'basic_ios::clear: iostream error' or
    'unexpected pos …', never ENOSPC: check the free space ourselves."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < (1 << 20)):
        left = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return f"No space left on device writing a checkpoint to {where}{left}"
    return f"writing a checkpoint to {where} failed: {type(e).__name__}: {first_line(e)}"


def _promote(tmp: Path, final: Path) -> bool:
    """An intact `.tmp-` copy left by a re-save killed after it removed the old copy takes its step's name."""
    if verify(tmp) is None and verify(final) is not None:
        _remove(final)
        os.replace(tmp, final)
        return True
    return False


def _any_failed(error: str | None) -> bool:
    """Collective: did any rank fail? (NCCL reduces on the GPU only, hence the device.)"""
    import deepspeed.comm as dist

    from pipeline.training.dist import device

    failed = torch.tensor([0.0 if error is None else 1.0], device=device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return bool(failed.item())


def _write_rank_part(engine, tmp: Path, rank: int, rank_state: dict, adapter_tensors_fn):
    """Every rank: its DeepSpeed shards, its data position + RNG; returns (adapter tensors, error or None)."""
    try:
        engine.save_checkpoint(str(tmp / "ds"), tag="ds", exclude_frozen_parameters=True)
        rank_state = dict(rank_state, rng=base64.b64encode(pickle.dumps(_rng_state())).decode())
        (tmp / f"rank-{rank:05d}.json").write_text(json.dumps(rank_state) + "\n")
        return adapter_tensors_fn(), None  # collective under ZeRO-3 (gathers); cheap local copies otherwise
    except Exception as e:  # noqa: BLE001 - reported on every rank by the caller
        return None, _save_error(e, tmp.parent)


def _write_rank0_part(write_adapter, tmp: Path, tensors, state: dict) -> str | None:
    """Rank 0: the adapter, the trainer state, then the marker that vouches for every file."""
    try:
        write_adapter(tmp / "adapter", tensors)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        _write_marker(tmp)
        return None
    except Exception as e:  # noqa: BLE001
        return _save_error(e, tmp.parent)


def _publish(root: Path, tmp: Path, final: Path, limit: int | None) -> None:
    """Rank 0: move the complete copy into place without ever deleting what `latest` names first."""
    if final.exists():  # a re-save of the same step: point at the new copy before the old one goes
        _point_latest(root, tmp.name)
        _remove(final)
    os.replace(tmp, final)
    _point_latest(root, final.name)
    _prune(root, limit, keep=final)


def save(engine, write_adapter, output_dir, step: int, rank: int, world: int, state: dict, rank_state: dict,
         adapter_tensors_fn, save_total_limit: int | None) -> Path:
    """Collective: every rank must call it. Returns the checkpoint path; raises CheckpointError on every rank when
    any rank failed to write (the partial copy is removed, the previous checkpoint is untouched).
    `adapter_tensors_fn()` (every rank) gathers the artifact's tensors; `write_adapter(folder, tensors)` (rank 0)
    writes them."""
    import deepspeed.comm as dist

    root = ckpt_root(output_dir)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists() and _promote(tmp, final):
            _point_latest(root, final.name)
        _remove(tmp)
        tmp.mkdir()
    dist.barrier()
    tensors, error = _write_rank_part(engine, tmp, rank, rank_state, adapter_tensors_fn)
    if not _any_failed(error) and rank == 0:
        error = _write_rank0_part(write_adapter, tmp, tensors, dict(state, step=step, world_size=world))
    if _any_failed(error):
        if rank == 0:
            _remove(tmp)
        prev = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        dist.barrier()
        raise CheckpointError(f"{error or 'another rank failed to write its part of the checkpoint'}; removed the "
                              f"partial {tmp.name}" + (f"; {prev} is intact" if prev else ""))
    if rank == 0:
        _publish(root, tmp, final, save_total_limit)
    dist.barrier()
    return final


def _prune(root: Path, limit: int | None, keep: Path) -> None:
    """Tidy up once `keep` is complete and named by `latest` (only this run writes here: it holds the folder's
    lock): an intact `.tmp-` copy left by an interrupted re-save takes its step's name, debris without a marker
    goes, and of the complete checkpoints the newest `limit` stay (0: all)."""
    for tmp in root.glob(".tmp-step-*"):
        if not _promote(tmp, root / tmp.name[len(".tmp-"):]):
            _remove(tmp)
    for d in root.glob("step-*"):
        if d.is_dir() and not (d / MARKER).is_file():
            _remove(d)
    if not limit or limit <= 0:
        return
    done = sorted(d for d in root.glob("step-*") if (d / MARKER).is_file())
    for d in done[:-limit]:
        if d != keep:
            _remove(d)


def load(engine, ckpt: Path, rank: int, world: int, universal: Path | None = None) -> tuple[dict, dict]:
    """Restore engine + this rank's data position and RNG. Returns (trainer_state, rank_state). A checkpoint of
    another rank count loads through its universal conversion `universal` (training/elastic.py)."""
    from pipeline.training.elastic import merged_rank_state

    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["world_size"] != world and universal is None:
        raise UsageError(f"{ckpt} was written by {state['world_size']} rank(s) but this run has {world}, and its "
                         "ZeRO state was not converted for them")
    ds_dir = universal if universal is not None else ckpt / "ds"
    path, _ = engine.load_checkpoint(str(ds_dir), tag="ds", load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ds_dir}")
    if state["world_size"] == world:
        rank_state = json.loads((ckpt / f"rank-{rank:05d}.json").read_text())
    else:
        rank_state = merged_rank_state(ckpt, rank, state["world_size"])
    rng = rank_state.pop("rng", None)
    if rng is not None:  # our own file, written by this pipeline (never user input): safe to unpickle
        _set_rng_state(pickle.loads(base64.b64decode(rng)))
    return state, rank_state


# ----------------------------------------------------------------------------- the recipe's view of a checkpoint
@dataclass
class TrainingProgress:
    """Where a rank is: optimizer steps taken, what it consumed (samples, tokens, skips per reason) and each loader
    slot's position in its shard stream. Saved per rank in every checkpoint; JSON keys are strings, in memory the
    slot ids are ints (torchtune's TrainingProgress pattern)."""

    step: int = 0
    totals: Counter = field(default_factory=Counter)
    cursors: dict = field(default_factory=dict)  # slot -> [epoch, raw consumed in it(, group batches done, size)]

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals), "cursors": {str(k): list(v) for k, v in self.cursors.items()}}

    def load_state_dict(self, d: dict, step: int) -> None:
        self.step = step
        self.totals = Counter(d["totals"])
        self.cursors = {int(k): list(v) for k, v in d["cursors"].items()}

    def consumed(self, batch: dict) -> None:
        """Record a batch taken from the loader: its slot's new position and the samples skipped before it."""
        from pipeline.data.stream import READ_ERRORS

        slot, *position = batch["cursor"]
        self.cursors[slot] = position
        for k, v in batch["skipped"].items():
            self.totals[k if k == READ_ERRORS else "skipped_" + k] += v


class Checkpointer:
    """Save / restore everything a resume needs for this run's engine (the layout and its guarantees are at the
    top of this module)."""

    def __init__(self, engine, out: Path, rank: int, world: int, keep: int, method: str, base_name: str,
                 identity: dict | None = None, data_slots: int | None = None):
        self.engine, self.out, self.rank, self.world, self.keep = engine, out, rank, world, keep
        self.method, self.base_name, self.identity, self.data_slots = method, base_name, identity, data_slots
        self._trainable = [p for p in engine.module.parameters() if p.requires_grad]

    def adapter_tensors(self) -> dict:
        """fp32 master copies of the trainables (ZeRO 1-3 safe; a gather under ZeRO-3) under the artifact's names."""
        from deepspeed.utils import safe_get_full_fp32_param

        from pipeline.core import methods

        by_id = {id(p): safe_get_full_fp32_param(p) for p in self._trainable}
        tensors = methods.get(self.method).artifact_tensors(self.engine.module)
        return {k: by_id.get(id(v), v) for k, v in tensors.items()}

    def write_adapter(self, path: Path, tensors: dict, base=None) -> Path:
        from pipeline.core import methods

        return methods.get(self.method).save(self.engine.module, path, tensors, self.base_name, base)

    def resume(self, ckpt: Path | None, progress: TrainingProgress, universal: Path | None = None) -> Path | None:
        """Restore `ckpt` (found at start-up by find_resume), if any."""
        if ckpt is not None:
            state, rank_state = load(self.engine, ckpt, self.rank, self.world, universal)
            progress.load_state_dict(rank_state, step=state["step"])
            moved = f" (written by {state['world_size']} ranks)" if state["world_size"] != self.world else ""
            log.info("resumed from %s at step %d%s", ckpt, progress.step, moved)
        return ckpt

    def save(self, progress: TrainingProgress, reason: str) -> None:
        d = save(self.engine, self.write_adapter, self.out, progress.step, self.rank, self.world,
                 {"reason": reason, "run": self.identity, "data_slots": self.data_slots, **dict(progress.totals)},
                 progress.state_dict(),
                 self.adapter_tensors, self.keep)
        log.info("checkpoint (%s) -> %s", reason, d)
