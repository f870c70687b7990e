"""The DeepSpeed side of the recipe: the JSON config with its "auto" values filled from the flags, and the engine
over the trainable parameters (AdamW groups, the transformers scheduler)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import UsageError


def _read_json(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--deepspeed {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--deepspeed {path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--deepspeed {path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--deepspeed {path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def ds_config(path: str, train, world: int) -> dict:
    """Read the DeepSpeed config and fill its "auto" values from the flags of `train` (a TrainConfig). The command
    line is the one source of truth: a concrete value that disagrees with a flag is an error, not a silent
    override."""
    cfg = _read_json(path)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"{path}: remove the '{section}' section; set it with --learning_rate / "
                             "--lr_scheduler_type / --warmup_ratio / --weight_decay instead")
    want = {
        "train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.per_device_train_batch_size * train.gradient_accumulation_steps * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for k, v in want.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise ValueError(f"{path}: {k} = {cfg[k]} but the flags say {v}; set it to \"auto\"")
    for k, flag in (("bf16", train.bf16), ("fp16", train.fp16)):
        sec = cfg.setdefault(k, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = flag
        elif bool(sec["enabled"]) != flag:
            raise ValueError(f"{path}: {k}.enabled = {sec['enabled']} but --{k} is {'on' if flag else 'off'}")
    return cfg


def make_scheduler(train, optimizer, total_steps: int):
    """The --lr_scheduler_type schedule (with --lr_scheduler_kwargs) over `total_steps`; warm-up: --warmup_steps,
    else --warmup_ratio of the steps."""
    from transformers import get_scheduler

    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)
    return get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, scheduler_specific_kwargs=train.scheduler_kwargs())


def check_scheduler(train) -> None:
    """Build the schedule once on a stand-in optimizer, so a scheduler that needs arguments it was not given (or
    got wrong ones) fails here, before the model loads, not after."""
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.learning_rate)
    try:
        make_scheduler(train, optimizer, total_steps=100)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"--lr_scheduler_type {train.lr_scheduler_type} with --lr_scheduler_kwargs "
                         f"{train.lr_scheduler_kwargs}: {e}") from None


def build_engine(train, ds_cfg: dict, model, total_steps: int, load_universal: bool = False):
    """(engine, scheduler) over the parameters that require gradients: AdamW with weight decay on matrices only,
    the --lr_scheduler_type schedule with --warmup_ratio of `total_steps` to warm up. `load_universal`: the
    checkpoint to resume is a DeepSpeed universal one (another rank count wrote it; training/elastic.py)."""
    import deepspeed
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (train.adam_beta1, train.adam_beta2)
    if ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload requires DeepSpeed's CPU Adam

        optimizer = DeepSpeedCPUAdam(groups, lr=train.learning_rate, betas=betas, adamw_mode=True)
    else:
        # torch AdamW: no JIT compile (DeepSpeed's FusedAdam would build C++ for minutes); its fused kernel exists
        # for CUDA and CPU parameters alike.
        optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas, fused=True)
    scheduler = make_scheduler(train, optimizer, total_steps)
    if load_universal:
        ds_cfg = dict(ds_cfg, checkpoint=dict(ds_cfg.get("checkpoint", {}), load_universal=True))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine, scheduler


def check_engine_flags(cfg) -> None:
    """Before the model loads: the scheduler can be built with its kwargs and is not metric-driven, and the
    accelerator supports the precision asked for."""
    from deepspeed.accelerator import get_accelerator
    from transformers import SchedulerType

    if cfg.lr_scheduler_type not in {t.value for t in SchedulerType}:
        raise UsageError(f"--lr_scheduler_type {cfg.lr_scheduler_type!r}: not one of "
                         f"{', '.join(t.value for t in SchedulerType)}")
    if cfg.lr_scheduler_type in (SchedulerType.REDUCE_ON_PLATEAU.value, "greedy"):
        raise UsageError(f"--lr_scheduler_type {cfg.lr_scheduler_type}: it changes the lr from a metric handed to "
                         "each step, and the engine hands it none, so the lr would never change; use cosine, "
                         "linear, constant, ...")
    check_scheduler(cfg)
    acc = get_accelerator()
    for flag, on, supported in (("--fp16", cfg.fp16, acc.is_fp16_supported), ("--bf16", cfg.bf16,
                                                                               acc.is_bf16_supported)):
        if on and not supported():
            raise UsageError(f"{flag}: the {acc.device_name()} accelerator here does not support it; drop the flag "
                             "(fp32)" + (", or use --bf16" if flag == "--fp16" and acc.is_bf16_supported() else ""))
