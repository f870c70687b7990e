"""What makes a run the same training, so that a resume continues only that.

Every checkpoint records its run's identity (trainer_state.json, "run"): the settings that change the trajectory -
model, method and its shape, data, learning-rate schedule, optimiser, seed, global batch, length of the run,
precision. A resume compares it with this command's before the model loads: a changed command on an existing folder
(another learning rate, seed, batch, method, more steps) stops with one line listing each difference, instead of
silently continuing the old schedule under the new flags. Not part of the identity: what does not change the
numbers (logging, checkpoint cadence, threads, loader workers, gradient checkpointing, --verify_shards) and the world
size, when the global batch and the data slots stay the same (training/elastic.py says when a resume may change it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from pipeline.core import methods
from pipeline.errors import UsageError

TRAJECTORY_FLAGS = ("model", "model_llm", "model_vision", "mm_projector", "init_adapter", "method", "learning_rate",
                    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "weight_decay",
                    "adam_beta1", "adam_beta2", "max_grad_norm", "seed", "max_steps", "num_train_epochs",
                    "model_max_length", "group_by_length", "length_group_batches", "shuffle_buffer",
                    "per_device_train_batch_size", "bf16", "fp16",
                    # the same function either way, but not the same float rounding: an exact resume keeps the form
                    "text_prompts")
# What --overwrite_output_dir removes: everything a run writes into its folder, nothing else.
RUN_FILES = ("checkpoints", "adapter", "eval", "tb", "metrics.jsonl", "config.json", "train_config.yaml",
             "run_state.json")


def data_fingerprint(shards) -> str:
    """The shards by name, size and sample count (not by folder: a moved data set is the same data)."""
    h = hashlib.sha256()
    for p in sorted(shards.paths, key=lambda p: Path(p).name):
        size = Path(p).stat().st_size if Path(p).is_file() else None
        h.update(json.dumps([Path(p).name, size, shards.counts.get(p)]).encode())
    return h.hexdigest()[:16]


def run_identity(cfg, m2pt_config, world: int, shards, data_slots: int) -> dict:
    """The settings of this run that change its trajectory (cfg: a TrainConfig; data_slots: the streams its data
    is read in, data/stream.py)."""
    ident = {k: getattr(cfg, k) for k in TRAJECTORY_FLAGS}
    ident |= {k: v for k, v in dataclasses.asdict(m2pt_config).items() if k != "seed"}
    ident |= methods.get(cfg.method).identity(cfg)
    ident["global_batch"] = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    ident["data"] = data_fingerprint(shards)
    ident["data_slots"] = data_slots
    return ident


def _label(key: str) -> str:
    return {"global_batch": "global batch (per-device batch x accumulation x ranks)",
            "data": "the training shards (names, sizes, counts)",
            "data_slots": "--data_slots (the streams the data is read in)"}.get(key, f"--{key}")


def differences(old: dict, new: dict) -> list[str]:
    """'--learning_rate 0.0007 -> 0.01' for each setting that differs. Only settings both sides know are compared:
    a checkpoint written before a setting existed ran with its default."""
    return [f"{_label(k)} {old[k]} -> {new[k]}" for k in old if k in new and old[k] != new[k]]


def recorded_identity(ckpt: Path) -> dict | None:
    """The identity a checkpoint recorded (None for a checkpoint written before identities were kept)."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("run")
    except (OSError, ValueError):
        return None


def check_same_run(ckpt: Path | None, identity: dict, output_dir) -> None:
    """Refuse to resume `ckpt` under settings other than its run's."""
    if ckpt is None:
        return
    old = recorded_identity(ckpt)
    if old is None:
        return  # an older checkpoint: nothing to compare against (its run is resumed as before)
    diffs = differences(old, json.loads(json.dumps(identity, default=str)))
    if not diffs:
        return
    if Path(ckpt).resolve().is_relative_to(Path(output_dir).resolve()):
        raise UsageError(f"{output_dir} holds a run with other settings (checkpoint {ckpt.name}): "
                         + "; ".join(diffs) + ". Resuming would continue that run's schedule under the new flags: "
                         "use another --output_dir, or --overwrite_output_dir to start this folder over (removes its "
                         "checkpoints, adapter and logs)")
    # A checkpoint named by path, from another run's folder: that folder is the one to name, not the new one.
    raise UsageError(f"--resume_from_checkpoint {ckpt} was written by a run with other settings: " + "; ".join(diffs)
                     + ". Resuming would continue that run's schedule under the new flags: give that run's flags "
                     "(its train_config.yaml, through --config), or leave out --resume_from_checkpoint to start anew")


def clear_run_files(output_dir) -> list[str]:
    """--overwrite_output_dir: remove what an earlier run wrote here (RUN_FILES); returns what was removed."""
    import shutil

    removed = []
    for name in RUN_FILES:
        p = Path(output_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def same_run_or_start_over(cfg, identity: dict, ckpt: Path | None) -> None:
    """A folder holds one run: resume `ckpt` (what --resume found) only with its own settings;
    --overwrite_output_dir clears the folder first."""
    if cfg.overwrite_output_dir:
        removed = clear_run_files(cfg.output_dir)
        if removed:
            logging.getLogger("m2pt.train").info("--overwrite_output_dir: removed %s from %s", ", ".join(removed),
                                                 cfg.output_dir)
        return
    check_same_run(ckpt, identity, cfg.output_dir)
