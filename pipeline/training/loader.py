"""The data loader of one rank of a training run: the shard stream (pipeline/data/stream.py) with the model's chat
template and image processor, read by DataLoader workers that each own whole data slots (pipeline/training/elastic.py),
so a resume on the same or another rank count continues the same sample order."""

from __future__ import annotations

import logging

import torch

from pipeline.core.m2pt import num_visual_tokens
from pipeline.training import elastic
from pipeline.training.checkpoint import TrainingProgress
from pipeline.training.config import TrainConfig
from pipeline.training.plan import RunPlan

log = logging.getLogger("m2pt.train")


def _stream(cfg: TrainConfig, plan: RunPlan, base, model, progress: TrainingProgress, rank: int, world: int):
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream

    template = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
    return ShardStream(plan.shards.paths, rank=rank, world=world, seed=cfg.seed,
                       batch_size=cfg.per_device_train_batch_size,
                       preprocess=Preprocess(template, base.image_processor, cfg.model_max_length),
                       pad_id=base.tokenizer.pad_token_id, shuffle_buffer=cfg.shuffle_buffer,
                       start=progress.cursors, counts=plan.shards.counts,
                       group_batches=cfg.length_group_batches if cfg.group_by_length else 0,
                       nslots=plan.data_slots, first_batch=progress.step * cfg.gradient_accumulation_steps)


def rank_loader(cfg: TrainConfig, plan: RunPlan, base, model, progress: TrainingProgress, rank: int, world: int):
    """The rank's batches: its share of the shards through the chat template, in worker processes that each read
    whole data slots, from where `progress` left off."""
    from pipeline.training.run_control import quiet_worker

    stream = _stream(cfg, plan, base, model, progress, rank, world)
    workers = elastic.loader_workers(plan.data_slots // world, cfg.dataloader_num_workers)
    if workers != cfg.dataloader_num_workers and rank == 0:
        log.info("%d loader worker(s) per rank instead of %d: each reads whole data slots, and a rank has %d",
                 workers, cfg.dataloader_num_workers, plan.data_slots // world)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                            worker_init_fn=quiet_worker if workers else None))
