"""What a training run checks before its model loads (a 7B takes minutes to load, and a mistake must not wait for
it): the DeepSpeed config, one run per output folder, the model's files, the method, the shards (built first on the
embedded default) and what their manifests say, a checkpoint to resume and its rank count. The result is a RunPlan
that pipeline/train.py builds the run from; every rank reaches the same one (pdist.agree_on)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import defaults
from pipeline.core.m2pt import M2PTConfig, visual_tokens_for_config
from pipeline.errors import UsageError
from pipeline.training import dist as pdist
from pipeline.training import elastic
from pipeline.training.config import TrainConfig, resolve_m2pt_config, trackers
from pipeline.training.elastic import SavedLayout
from pipeline.training.identity import run_identity, same_run_or_start_over

if TYPE_CHECKING:
    from pipeline.data.stream import ShardSet


def expected_visual_tokens(cfg: TrainConfig, m2pt_config: M2PTConfig) -> int | None:
    """Visual tokens per <image> this model and method will give, from the model's config alone (None for LLaVA-v1
    parts, whose config exists only once they are assembled)."""
    if any(cfg.parts()):
        return None
    return visual_tokens_for_config(defaults.load_text_side(cfg.model)[1], m2pt_config)


@dataclass
class RunPlan:
    """What the start-up checks resolved: the filled DeepSpeed config, the method's config, the shards."""

    ds_config: dict
    m2pt_config: M2PTConfig
    shards: ShardSet
    identity: dict  # the settings that make this run this run (pipeline/training/identity.py)
    ckpt: Path | None  # the checkpoint to resume (None: a fresh start, also after --overwrite_output_dir)
    saved: SavedLayout | None  # the rank count, data slots and batch of the run that wrote it
    data_slots: int  # the streams the data is read in (data/stream.py), fixed for the whole run

    def changes_world(self, world: int) -> bool:
        return self.saved is not None and self.saved.world != world


def _check_flags_against_files(cfg: TrainConfig, rank: int, world: int) -> tuple[dict, M2PTConfig]:
    from pipeline.training.checkpoint import find_resume
    from pipeline.training.engine import check_engine_flags, ds_config
    from pipeline.training.records import check_trackers

    cfg.check_source()
    check_engine_flags(cfg)
    check_trackers(trackers(cfg.report_to))
    if cfg.resume not in (None, "auto"):
        find_resume(cfg.output_dir, cfg.resume)  # a damaged checkpoint: one line naming what is missing
    if cfg.push_to_hub:  # hours later is too late to find there is no token
        from pipeline.core.hub import check_can_push

        check_can_push(cfg.push_to_hub, ask_hub=rank == 0)  # rank 0 uploads; every rank checks the token
    return ds_config(cfg.deepspeed, cfg, world), resolve_m2pt_config(cfg)


def start_up_checks(cfg: TrainConfig, rank: int, world: int, lock) -> RunPlan:
    """Everything that can be checked without loading the model, before it loads: the output-folder lock, the
    model's files, the scheduler and precision, the DeepSpeed config, the method, the shards (built first on the
    default) and what their manifests say, and that the folder holds no run of other settings."""
    from pipeline.data.stream import resolve_shards
    from pipeline.training.checkpoint import find_resume

    def local():
        if rank == 0:
            lock.acquire()
        return _check_flags_against_files(cfg, rank, world)

    ds_cfg, m2pt_config = pdist.agree_on(local)
    visual_tokens = pdist.agree_on(lambda: expected_visual_tokens(cfg, m2pt_config))
    spec = cfg.train_shards
    if not spec:  # the demo's shards, measured with this run's visual-token count (one folder per count)
        folder = defaults.demo_shards_dir(visual_tokens)
        pdist.agree_on(lambda: defaults.build_demo_shards(
            folder, m2pt_config.visual_prompt_length, m2pt_config.visual_token_mode, cfg.model_max_length)
            if rank == 0 else None)
        spec = str(folder)
    shards = pdist.agree_on(lambda: resolve_shards(spec, verify_sha256=cfg.verify_shards and rank == 0))
    pdist.agree_on(lambda: _check_shards_fit(cfg, visual_tokens, shards, world))
    ckpt = None if cfg.overwrite_output_dir else pdist.agree_on(lambda: find_resume(cfg.output_dir, cfg.resume))
    saved = pdist.agree_on(lambda: elastic.saved_layout(ckpt)) if ckpt else None
    if saved is not None:
        pdist.agree_on(lambda: elastic.check_world_change(cfg, world, saved, ckpt))
    slots = pdist.agree_on(lambda: elastic.plan_data_slots(cfg, world, saved))
    identity = run_identity(cfg, m2pt_config, world, shards, slots)
    pdist.agree_on(lambda: same_run_or_start_over(cfg, identity, ckpt) if rank == 0 else None)
    return RunPlan(ds_cfg, m2pt_config, shards, identity, ckpt, saved, slots)


def _check_shards_fit(cfg: TrainConfig, visual_tokens: int | None, shards, world: int) -> None:
    """What the manifests say, checked before the model loads: enough samples for one optimizer step, and lengths
    measured for at least this model's visual tokens (LLaVA-v1 parts: checked once the model is built)."""
    if shards.total is not None:
        count_steps(cfg, shards.total, world)
    if visual_tokens is not None:
        check_visual_tokens(shards, visual_tokens)


def check_visual_tokens(shards, n: int) -> None:
    """Shards record the visual tokens per <image> their lengths were measured with; a model that expands an
    image into `n`, more, would train on sequences the --model_max_length check never saw. Fewer is fine (the check
    was stricter than needed): e.g. --method text on shards built for M2PT's visual prompts."""
    bad = {m: v for m, v in shards.num_visual_tokens.items() if v is not None and v < n}
    if bad:
        manifest, v = next(iter(bad.items()))
        raise UsageError(f"{manifest} was built for {v} visual tokens per image, but this model and M2PT config give "
                         f"{n}: rebuild the shards with the same --visual_prompt_length / --visual_token_mode / "
                         "--model, or train with the settings they were built for")


def count_steps(cfg: TrainConfig, n_samples: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    per_step = world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = n_samples // per_step
    if steps_per_epoch == 0:
        raise UsageError(f"{n_samples} samples are fewer than one optimizer step needs ({per_step})")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total
