"""Atomic, resumable training checkpoints.

    OUTPUT/checkpoints/step-00000120/
        adapter/                 the M2PT adapter at this step (fp32 trainables: adapter_config.json + safetensors)
        ds/                      DeepSpeed engine state: trainables, ZeRO optimizer partitions, LR scheduler
                                 (saved with exclude_frozen_parameters: megabytes, not the frozen base model)
        rank-00000.json          per-rank data position (cursor per loader slot), skip counters, RNG state
        trainer_state.json       step, samples, tokens, world size
        COMPLETE                 written last; a directory without it is never resumed from
    OUTPUT/checkpoints/latest    name of the newest complete checkpoint (replaced atomically)

Everything is written into `.tmp-step-…` first and renamed once every rank has finished, so a crash or kill
at any moment leaves either the previous complete checkpoint or the new one, never a half-written one that
`--resume auto` could pick.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def ckpt_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete(d: Path) -> bool:
    return (d / "COMPLETE").is_file()


def find_resume(output_dir, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint under output_dir (None if there is none); a path: that checkpoint."""
    if not resume:
        return None
    if resume != "auto":
        d = Path(resume)
        if not _complete(d):
            raise FileNotFoundError(f"--resume {d}: not a complete checkpoint (no COMPLETE marker)")
        return d
    root = ckpt_root(output_dir)
    latest = root / "latest"
    if latest.is_file():
        d = root / latest.read_text().strip()
        if _complete(d):
            return d
    done = sorted(d for d in root.glob("step-*") if _complete(d))
    return done[-1] if done else None


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


def save(engine, model, output_dir, step: int, rank: int, world: int, state: dict, rank_state: dict,
         adapter_tensors_fn, save_total_limit: int | None) -> Path | None:
    """Collective: every rank must call it. Returns the checkpoint path."""
    import deepspeed.comm as dist

    from pipeline.m2pt import save_adapter

    root = ckpt_root(output_dir)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag="ds", exclude_frozen_parameters=True)
    rank_state = dict(rank_state, rng=base64.b64encode(pickle.dumps(_rng_state())).decode())
    (tmp / f"rank-{rank:05d}.json").write_text(json.dumps(rank_state) + "\n")
    tensors = adapter_tensors_fn()  # collective under ZeRO-3 (gathers); cheap local copies otherwise
    dist.barrier()
    if rank == 0:
        save_adapter(model, tmp / "adapter", state_dict=tensors)
        (tmp / "trainer_state.json").write_text(json.dumps(dict(state, step=step, world_size=world), indent=2) + "\n")
        (tmp / "COMPLETE").write_text("")
        if final.exists():  # a re-save of the same step (e.g. the signal arrived right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")
        _prune(root, save_total_limit, keep=final)
    dist.barrier()
    return final


def _prune(root: Path, limit: int | None, keep: Path) -> None:
    if not limit or limit <= 0:
        return
    done = sorted(d for d in root.glob("step-*") if _complete(d))
    for d in done[:-limit]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def load(engine, ckpt: Path, rank: int, world: int) -> tuple[dict, dict]:
    """Restore engine + this rank's data position and RNG. Returns (trainer_state, rank_state)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["world_size"] != world:
        raise RuntimeError(
            f"{ckpt} was written by {state['world_size']} rank(s) but this run has {world}: ZeRO optimizer "
            "partitions and per-rank data positions cannot be re-split. Resume with the same world size, or start "
            f"a new run from its adapter ({ckpt / 'adapter'}) with --init_adapter.")
    path, _ = engine.load_checkpoint(str(ckpt / "ds"), tag="ds", load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / 'ds'}")
    rank_state = json.loads((ckpt / f"rank-{rank:05d}.json").read_text())
    # Our own file, written by this pipeline (never user input): safe to unpickle.
    _set_rng_state(pickle.loads(base64.b64decode(rank_state.pop("rng"))))
    return state, rank_state
