"""M²PT training on a DeepSpeed engine from WebDataset shards.

    deepspeed pipeline/train.py --deepspeed ds_configs/zero2.json --train_shards data/shards \\
        --model /models/llava-1.5-7b-hf --output_dir runs/m2pt --bf16

With no arguments it trains the embedded tiny model on the embedded sample set (building both first), on one
process, and prints where the adapter went. The file reads in the order a run uses it: flags -> start-up checks
(flags, DeepSpeed config, output-folder lock, model files, shards: all before any model loads) -> model and engine
-> progress and checkpoints -> one step (train_step, backprop_scale; the forward is pipeline/core/step.py) -> metrics
-> setup -> train_loop -> finish; `run` at the bottom starts the process group and ties them together.

Exit status: 0 finished, or stopped by a signal with a checkpoint (resume with --resume auto); 2 a usage or input
mistake (one line starting "error:", before any work); 1 anything else (run_state.json then says "failed").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.cli import add_config_flags
from pipeline.errors import CheckpointError, UsageError
from pipeline.core.m2pt import M2PTConfig
from pipeline.core.methods import METHODS, LoraSettings
from pipeline import defaults
from pipeline.defaults import REPO
log = logging.getLogger("m2pt.train")


METHOD_FLAGS = tuple(f.name for f in fields(M2PTConfig) if f.name != "seed")
M2PT_ALIASES = {"visual_prompt_length": ["--PT_len_vision_encoder"], "text_prompt_length": ["--PT_len_llm"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other start-up error, not usage + "train.py: error:"
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = ap.add_argument_group("model (one of: --model, or the three LLaVA-v1 parts; default: the embedded tiny model)")
    g.add_argument("--model", default="tiny", help="Hugging Face llava folder (llava-hf layout), 'tiny' (the embedded pretrained "
                   "base) or 'tiny-random' (the same architecture, random weights)")
    g.add_argument("--model_llm", default=None, help="LLaVA-v1 parts: Vicuna/Llama folder")
    g.add_argument("--model_vision", default=None, help="LLaVA-v1 parts: CLIP vision tower folder")
    g.add_argument("--mm_projector", default=None, help="LLaVA-v1 parts: stage-1 mm_projector.bin (linear projector)")
    g.add_argument("--attn_implementation", default="auto", choices=("auto", "flash_attention_2", "sdpa", "eager"),
                   help="auto: flash_attention_2 when CUDA + flash-attn are present, else sdpa")
    g.add_argument("--init_adapter", default=None, help="start from this adapter's prompts/projector (and its config)")

    g = ap.add_argument_group("method (pipeline/core/methods.py)")
    g.add_argument("--method", default="m2pt", choices=METHODS,
                   help="m2pt: visual + textual prompts + projector; visual: visual prompts + projector; text: "
                        "textual prompts + projector; projector: projector only; lora: peft LoRA on the LLM + "
                        "projector; full: every weight")
    add_config_flags(g, LoraSettings)
    g = ap.add_argument_group("M2PT (pipeline.core.m2pt.M2PTConfig; the prompt init is seeded by --seed)")
    add_config_flags(g, M2PTConfig, exclude=("seed",), aliases=M2PT_ALIASES)

    g = ap.add_argument_group("data")
    g.add_argument("--train_shards", default=None,
                   help="shard folder with manifest.json, brace pattern or glob (comma-separated for several); "
                        "default: the embedded sample set, built under $M2PT_DATA (./data) if missing")
    g.add_argument("--model_max_length", type=int, default=2048,
                   help="max tokens per sample after <image> expansion (text prompts not counted); longer samples "
                        "are skipped and counted, never truncated")
    g.add_argument("--group_by_length", action="store_true",
                   help="batch samples of similar token length: each loader worker sorts --length_group_batches "
                        "batches' worth of samples by length and emits them as batches in a seeded random order "
                        "(less padding; resume stays exact)")
    g.add_argument("--length_group_batches", type=int, default=16,
                   help="with --group_by_length: batches per length group (larger: less padding, less mixing)")
    g.add_argument("--dataloader_num_workers", type=int, default=1, help="loader processes per rank")
    g.add_argument("--shuffle_buffer", type=int, default=1000, help="samples in each worker's shuffle buffer")
    g.add_argument("--max_bad_sample_fraction", type=float, default=0.05,
                   help="abort when more than this share of samples read so far was skipped (corrupt, too long, "
                        "no supervised token, lost in a broken shard, ...); checked once 200 samples (or one "
                        "epoch, if smaller) were read")
    g.add_argument("--verify_shards", action="store_true",
                   help="also compare every shard's sha256 with manifest.json at start-up (sizes are always "
                        "compared); reads all the data once")

    g = ap.add_argument_group("optimisation (Hugging Face TrainingArguments spelling)")
    g.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"),
                   help="DeepSpeed JSON config; 'auto' values are filled from these flags")
    g.add_argument("--output_dir", default=str(REPO / "out" / "default"), help="checkpoints, logs and the adapter")
    g.add_argument("--per_device_train_batch_size", type=int, default=4, help="micro-batch per rank")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=7e-4, help="peak learning rate (reference recipe)")
    g.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs over the shards' sample count")
    g.add_argument("--max_steps", type=int, default=-1, help="if > 0: optimizer steps to run (overrides epochs)")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="share of steps for linear warm-up")
    g.add_argument("--lr_scheduler_type", default="cosine",
                   help="transformers scheduler name: cosine, linear, constant, constant_with_warmup, ...")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not applied to biases)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (DeepSpeed gradient_clipping)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 training (fp32 master weights of the trainables)")
    g.add_argument("--fp16", action="store_true", help="float16 training (GPU only)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    g.add_argument("--seed", type=int, default=42, help="seed of prompts, data order and dropout")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for the 'mfu' metric (default: the GPU's dense bf16 datasheet "
                        "value, or on CPU a short fp32 GEMM probe at start-up; formula in pipeline/core/flops.py)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="intra-op threads per rank (default: OMP_NUM_THREADS if set, else this rank's share of the "
                        "node's cores, lowered when the machine is already busy; logged at start-up)")

    g = ap.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint every N optimizer steps (0: only at end)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep at most this many checkpoints (0: all)")
    g.add_argument("--resume", default="auto",
                   help="'auto': continue from the newest complete checkpoint in --output_dir if there is one; "
                        "a checkpoint path; or 'none'")
    g.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"),
                   help="also log to TensorBoard (OUTPUT/tb); metrics.jsonl is always written")
    g.add_argument("--dist_timeout", type=int, default=int(os.environ.get("M2PT_DIST_TIMEOUT", 1800)),
                   help="seconds before a stuck collective fails instead of hanging")
    g.add_argument("--no_final_eval", action="store_true",
                   help="skip the zero-shot table (base vs the new adapter on the held-out task types) that ends a "
                        "run on the embedded default data")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return ap


def _flag_problems(a) -> list[str]:
    """Values no run can use (a batch of 0 used to surface as a ZeroDivisionError traceback after a step)."""
    rules = [
        (a.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
        (a.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (a.logging_steps >= 1, "--logging_steps must be >= 1"),
        (a.save_steps >= 0, "--save_steps must be >= 0 (0: only at the end)"),
        (a.save_total_limit >= 0, "--save_total_limit must be >= 0 (0: keep all)"),
        (a.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0"),
        (a.shuffle_buffer >= 0, "--shuffle_buffer must be >= 0"),
        (a.model_max_length >= 1, "--model_max_length must be >= 1"),
        (a.visual_prompt_length >= 0 and a.text_prompt_length >= 0, "prompt lengths must be >= 0"),
        (0 <= a.max_bad_sample_fraction <= 1, "--max_bad_sample_fraction must be within [0, 1]"),
        (a.learning_rate > 0, "--learning_rate must be > 0"),
        (a.max_steps > 0 or a.num_train_epochs > 0, "--num_train_epochs must be > 0 (or set --max_steps)"),
        (0 <= a.warmup_ratio < 1, "--warmup_ratio must be within [0, 1)"),
        (a.weight_decay >= 0, "--weight_decay must be >= 0"),
        (0 <= a.adam_beta1 < 1 and 0 <= a.adam_beta2 < 1, "--adam_beta1 / --adam_beta2 must be within [0, 1)"),
        (a.max_grad_norm >= 0, "--max_grad_norm must be >= 0"),
        (a.dist_timeout >= 1, "--dist_timeout must be >= 1"),
        (a.num_threads is None or a.num_threads >= 1, "--num_threads must be >= 1"),
        (a.peak_tflops is None or a.peak_tflops > 0, "--peak_tflops must be > 0"),
        (a.length_group_batches >= 1, "--length_group_batches must be >= 1"),
        (not (a.bf16 and a.fp16), "choose one of --bf16 / --fp16"),
    ]
    return [msg for ok, msg in rules if not ok]


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    # Which flags were given explicitly (a parse with every default suppressed): --init_adapter must not silently
    # override an explicit method flag.
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(probe.parse_args(argv)))
    if args.resume == "none":
        args.resume = None
    problems = _flag_problems(args)
    if problems:
        ap.error("; ".join(problems))
    return args


def ds_config(path: str, args, world: int) -> dict:
    """Read the DeepSpeed config and fill its "auto" values from the flags (the command line is the one source of
    truth: a concrete value that disagrees with a flag is an error, not a silent override)."""
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
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"{path}: remove the '{section}' section; set it with --learning_rate / "
                             "--lr_scheduler_type / --warmup_ratio / --weight_decay instead")
    want = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "gradient_clipping": args.max_grad_norm,
    }
    for k, v in want.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise ValueError(f"{path}: {k} = {cfg[k]} but the flags say {v}; set it to \"auto\"")
    for k, flag in (("bf16", args.bf16), ("fp16", args.fp16)):
        sec = cfg.setdefault(k, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = flag
        elif bool(sec["enabled"]) != flag:
            raise ValueError(f"{path}: {k}.enabled = {sec['enabled']} but --{k} is {'on' if flag else 'off'}")
    return cfg


# ----------------------------------------------------------------------------------------------- start-up checks
def demo_shards(args, m2pt) -> Path:
    """The embedded sample set's shards for this run (built on first use, rank 0 only), measured with this
    model's visual-token count."""
    from pipeline.core.m2pt import count_visual_tokens

    return defaults.demo_shards_dir(count_visual_tokens(defaults.load_text_side(args.model)[1], m2pt))


def _fix_method_lengths(args) -> dict:
    """--method visual / text / projector / lora / full fix prompt lengths (and lora / full the LM head): an explicit
    flag that disagrees is an error; otherwise args are rewritten so config.json records what really trains.
    Returns what the method fixes."""
    from pipeline.core.methods import FIXED_LENGTHS, PROMPT_METHODS

    fixed = dict(zip(("visual_prompt_length", "text_prompt_length"), FIXED_LENGTHS.get(args.method, (0, 0))))
    if args.method not in PROMPT_METHODS:
        fixed.update(tune_lm_head=False, tune_projector=True)
        if args.init_adapter:
            raise UsageError(f"--init_adapter starts from an M2PT adapter; --method {args.method} cannot use one")
    clash = [f"--{k}" for k, v in fixed.items() if v is not None and k in args.explicit and getattr(args, k) != v]
    if args.method != "lora":
        clash += [f"--{f.name}" for f in fields(LoraSettings) if f.name in args.explicit]
    if clash:
        raise UsageError(f"--method {args.method} fixes or ignores {', '.join(clash)}: drop the flag(s) or choose "
                         "another method")
    fixed = {k: v for k, v in fixed.items() if v is not None}
    for k, v in fixed.items():
        setattr(args, k, v)
    return fixed


def method_config(args):
    """The M2PT config of this run: from the flags, or from --init_adapter (then an explicit method flag that
    disagrees with the adapter is an error, and args are rewritten so config.json records what really trains).
    For lora / full: prompt lengths 0 (no prompts are attached; the visual-token count is the stock one)."""
    from pipeline.core.m2pt import read_adapter_config

    fixed = _fix_method_lengths(args)
    if not args.init_adapter:
        cfg = M2PTConfig(**{k: getattr(args, k) for k in METHOD_FLAGS}, seed=args.seed)
        if args.method in ("lora", "full"):
            return cfg
        if not (cfg.visual_prompt_length or cfg.text_prompt_length or cfg.tune_projector or cfg.tune_lm_head):
            raise UsageError("nothing would train: both prompt lengths are 0, the projector is frozen and the LM head "
                             "is not tuned")
        return cfg
    cfg = M2PTConfig.from_dict(read_adapter_config(args.init_adapter)["m2pt_config"])
    wrong = [f"{k} {getattr(cfg, k)}" for k, v in fixed.items() if getattr(cfg, k) != v]
    if wrong:
        raise UsageError(f"--init_adapter {args.init_adapter} has {', '.join(wrong)}, which --method {args.method} "
                         "does not train")
    clash = [f"--{k} {getattr(args, k)} (adapter: {getattr(cfg, k)})" for k in METHOD_FLAGS
             if k in args.explicit and getattr(args, k) != getattr(cfg, k)]
    if clash:
        raise UsageError(f"--init_adapter {args.init_adapter} fixes the method's shape; conflicting flag(s): "
                         + ", ".join(clash) + ". Drop them, or start without --init_adapter")
    for k in METHOD_FLAGS:
        setattr(args, k, getattr(cfg, k))
    return cfg


def _agree(fn, dist):
    """Run one start-up check on every rank; if any rank failed, every rank stops (the failing one with its own
    error) instead of the others hanging in the next collective."""
    import torch

    from pipeline.training.dist import device

    error, result = None, None
    try:
        result = fn()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        error = e
    failed = torch.tensor([0.0 if error is None else 1.0], device=device())  # NCCL reduces on the GPU only
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise UsageError("another rank failed its start-up checks (its error is above)")
    return result


def start_up_checks(args, rank: int, world: int, lock) -> dict:
    """Everything that can be checked without loading the model, before it loads (a 7B takes minutes): flags,
    the DeepSpeed config, one run per output folder, the model's files, the method config, the shards."""
    import deepspeed.comm as dist

    from pipeline.data.stream import resolve_shards
    from pipeline.defaults import check_model_source

    def local():
        if rank == 0:
            lock.acquire()
        check_model_source(args.model, args.model_llm, args.model_vision, args.mm_projector)
        from transformers import SchedulerType

        if args.lr_scheduler_type not in {t.value for t in SchedulerType}:
            raise UsageError(f"--lr_scheduler_type {args.lr_scheduler_type!r}: not one of "
                             f"{', '.join(t.value for t in SchedulerType)}")
        if args.resume not in (None, "auto"):
            from pipeline.training.checkpoint import find_resume

            find_resume(args.output_dir, args.resume)  # a damaged checkpoint: one line naming what is missing
        return ds_config(args.deepspeed, args, world), method_config(args)

    cfg, m2pt = _agree(local, dist)
    spec = args.train_shards
    if not spec:
        folder = demo_shards(args, m2pt)
        _agree(lambda: defaults.build_demo_shards(folder, m2pt.visual_prompt_length, m2pt.visual_token_mode,
                                                  args.model_max_length) if rank == 0 else None, dist)
        spec = str(folder)
    shards = _agree(lambda: resolve_shards(spec, verify_sha256=args.verify_shards and rank == 0), dist)
    return {"deepspeed_config": cfg, "m2pt": m2pt, "shards": shards}


# ------------------------------------------------------------------------------------------- model and engine
def build_model(args, m2pt, rank: int):
    from pipeline.core import methods
    from pipeline.core.m2pt import load_adapter, parameter_table
    from pipeline.defaults import load_base

    base = load_base(args.model, llm=args.model_llm, vision=args.model_vision, mm_projector=args.mm_projector,
                     attn=args.attn_implementation)
    lora = LoraSettings(**{f.name: getattr(args, f.name) for f in fields(LoraSettings)})
    model = (load_adapter(base.model, args.init_adapter) if args.init_adapter
             else methods.apply(base.model, args.method, m2pt, lora))
    model.train()  # from_pretrained returns eval mode; dropout / checkpointing act only in train mode
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise UsageError("nothing is trainable (prompt lengths 0, projector frozen, no LM head)")
    if rank == 0:
        lines = [f"{'module':<16}{'trainable':>14}{'total':>16}{'share':>9}"]
        for name, t, tot in parameter_table(model):
            lines.append(f"{name:<16}{t:>14,}{tot:>16,}{100 * t / tot:>8.3f}%")
        lines.append(f"{'all':<16}{n_train:>14,}{n_total:>16,}{100 * n_train / n_total:>8.3f}%")
        log.info("method %s, trainable parameters:\n%s", args.method, "\n".join(lines))
    return base, model, n_train, n_total


def build_engine(args, cfg: dict, model, total_steps: int):
    import deepspeed
    import torch
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (args.adam_beta1, args.adam_beta2)
    if cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload requires DeepSpeed's CPU Adam

        optimizer = DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=betas, adamw_mode=True)
    else:
        # torch AdamW: no JIT compile (DeepSpeed's FusedAdam would build C++ for minutes); its fused kernel exists
        # for CUDA and CPU parameters alike.
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, fused=True)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    return engine, scheduler


# ---------------------------------------------------------------------------------- progress and checkpoints
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
    """Save / restore everything a resume needs for this run's engine (the layout and its guarantees are in
    pipeline/training/checkpoint.py)."""

    def __init__(self, engine, out: Path, rank: int, world: int, keep: int, method: str, base_name: str):
        self.engine, self.out, self.rank, self.world, self.keep = engine, out, rank, world, keep
        self.method, self.base_name = method, base_name
        self._trainable = [p for p in engine.module.parameters() if p.requires_grad]

    def adapter_tensors(self) -> dict:
        """fp32 master copies of the trainables (ZeRO 1-3 safe; a gather under ZeRO-3) under the artifact's names."""
        from deepspeed.utils import safe_get_full_fp32_param

        from pipeline.core.methods import artifact_tensors

        by_id = {id(p): safe_get_full_fp32_param(p) for p in self._trainable}
        return {k: by_id.get(id(v), v) for k, v in artifact_tensors(self.engine.module, self.method).items()}

    def write_adapter(self, path: Path, tensors: dict, base=None) -> Path:
        from pipeline.core.methods import save_artifact

        return save_artifact(self.engine.module, path, self.method, tensors, self.base_name, base)

    def resume(self, resume: str | None, progress: TrainingProgress) -> Path | None:
        from pipeline.training import checkpoint

        ckpt = checkpoint.find_resume(self.out, resume)
        if ckpt is not None:
            state, rank_state = checkpoint.load(self.engine, ckpt, self.rank, self.world)
            progress.load_state_dict(rank_state, step=state["step"])
            log.info("resumed from %s at step %d", ckpt, progress.step)
        return ckpt

    def save(self, progress: TrainingProgress, reason: str) -> None:
        from pipeline.training import checkpoint

        d = checkpoint.save(self.engine, self.write_adapter, self.out, progress.step, self.rank, self.world,
                            {"reason": reason, **dict(progress.totals)}, progress.state_dict(), self.adapter_tensors,
                            self.keep)
        log.info("checkpoint (%s) -> %s", reason, d)


# ------------------------------------------------------------------------------------------------ one step
def backprop_scale(n_tok_step: float, world: int, accumulation: int) -> float:
    """Factor from a micro-batch's summed token loss to the loss handed to `engine.backward`.

    The step's loss is sum over its supervised tokens / their count across all micro-batches and ranks
    (`n_tok_step`), not a mean of per-batch means. DeepSpeed divides gradients by the accumulation steps and
    averages them over ranks, so each micro-batch's sum is multiplied by world x accumulation / n_tok_step."""
    return world * accumulation / n_tok_step


def vision_keepalive(model, dtype, device):
    """0 x (vision tower + projector on one blank image): a graph edge to every visual trainable."""
    import torch

    vc = model.config.vision_config
    px = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
    feats = model.model.get_image_features(
        pixel_values=px, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    return sum(f.float().sum() for f in feats) * 0.0


def train_step(r: "Run", micro: list[dict]) -> float:
    """Forward + backward over the step's micro-batches; returns the summed token loss (this rank)."""
    import deepspeed.comm as dist
    import torch

    from pipeline.core.flops import batch_flops
    from pipeline.core.methods import unwrap
    from pipeline.core.step import token_loss

    n_tok = torch.tensor([float(sum((b["labels"][:, 1:] != -100).sum() for b in micro))], device=r.device)
    dist.all_reduce(n_tok)
    n_tok_step = max(n_tok.item(), 1.0)
    r.window["sup_tok_global"] += n_tok_step
    loss_sum = 0.0
    scale = backprop_scale(n_tok_step, r.world, len(micro))
    for b in micro:
        tok_loss = token_loss(r.engine, unwrap(r.engine.module), b, r.device, r.dtype)
        loss = tok_loss * scale
        if b["pixel_values"] is None:
            # A text-only batch never runs the vision path: run it on a blank image x0 so the visual prompts and the
            # projector stay in the graph (ZeRO cannot handle a trainable set that changes between steps). Through
            # the modules' own forward, so ZeRO-3 gathers their partitioned weights.
            loss = loss + vision_keepalive(unwrap(r.engine.module), r.dtype, r.device)
        r.engine.backward(loss)
        r.engine.step()
        loss_sum += tok_loss.item()
        counts = {"samples": b["input_ids"].shape[0], "tokens": int(b["attention_mask"].sum())}
        r.progress.totals.update(counts)
        r.window.update(counts, flops=batch_flops(r.flop_model, b))
    return loss_sum


# ------------------------------------------------------------------------------------------- bookkeeping
def write_run_state(out: Path, **state) -> None:
    """OUTPUT/run_state.json: "running" | "stopped" (by a signal, resumable) | "finished" | "failed" (with the
    error's first line). The Slurm template reads it to decide whether to requeue the job."""
    from pipeline.files import atomic_write_json

    atomic_write_json(out / "run_state.json", state, indent=None)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard) on rank 0; every line carries the run id, and each run (a resumed one too)
    starts with a "start" line, so appended runs stay distinguishable."""

    def __init__(self, out: Path, rank: int, report_to: str, run_id: str):
        self.run_id, self.f, self.tb = run_id, None, None
        if rank != 0:
            return
        self.f = open(out / "metrics.jsonl", "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, rec: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps({"run_id": self.run_id, **rec}, default=str) + "\n")
        self.f.flush()
        if self.tb and "step" in rec and "event" not in rec:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def global_counts(totals: Counter, device) -> dict:
    """Samples, tokens and skips summed over all ranks (every rank must call it)."""
    import deepspeed.comm as dist
    import torch

    from pipeline.data.stream import READ_ERRORS, SKIP_REASONS

    keys = ["samples", "tokens", READ_ERRORS] + [f"skipped_{r}" for r in SKIP_REASONS]
    t = torch.tensor([float(totals.get(k, 0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out = {k: int(v) for k, v in zip(keys, t.tolist())}
    out["skipped"] = sum(out[f"skipped_{r}"] for r in SKIP_REASONS)
    return out


def check_bad_samples(counts: dict, args, n_samples: int) -> None:
    seen = counts["samples"] + counts["skipped"]
    if seen >= min(200, n_samples) and counts["skipped"] > args.max_bad_sample_fraction * seen:
        reasons = {k[8:]: v for k, v in counts.items() if k.startswith("skipped_") and v}
        raise UsageError(f"{counts['skipped']} of {seen} samples read so far were skipped ({reasons}), above "
                         f"--max_bad_sample_fraction {args.max_bad_sample_fraction}: check the data")


def log_window(r: "Run") -> None:
    """Every --logging_steps: one metrics line (reduced over ranks), the progress bar, the bad-sample limit."""
    import deepspeed.comm as dist
    import torch

    w = r.window
    red = torch.tensor([w["loss_sum"], w["samples"], w["tokens"], w["flops"]], device=r.device, dtype=torch.float64)
    dist.all_reduce(red)
    counts = global_counts(r.progress.totals, r.device)
    elapsed = time.time() - r.t_window
    tflops = red[3].item() / r.world / elapsed / 1e12  # model TFLOP/s per device (pipeline/core/flops.py)
    rec = {"step": r.progress.step, "epoch": round(r.progress.step / r.steps_per_epoch, 4),
           "loss": red[0].item() / w["sup_tok_global"], "lr": r.scheduler.get_last_lr()[0],
           "grad_norm": float(r.engine.get_global_grad_norm() or 0.0),
           "samples_per_s": red[1].item() / elapsed, "tokens_per_s": red[2].item() / elapsed,
           "data_wait_share": w["t_data"] / max(w["t_step"], 1e-9), "sec_per_step": w["t_step"] / w["steps"],
           "tflops": tflops, "mfu": tflops / r.peak_tflops if r.peak_tflops else None,
           "peak_mem_mb": round(peak_memory_mb(), 1),
           **{k: v for k, v in counts.items() if k not in ("samples", "tokens")}}
    r.metrics.write(rec)
    r.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
    check_bad_samples(counts, r.args, r.n_samples)
    w.clear()
    r.t_window = time.time()


# -------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What the loop works with, built once by `setup`."""

    args: argparse.Namespace
    rank: int
    world: int
    device: object
    dtype: object
    out: Path
    base: object
    engine: object
    scheduler: object
    checkpointer: Checkpointer
    progress: TrainingProgress
    metrics: MetricsWriter
    loader: object
    bar: object
    n_samples: int
    steps_per_epoch: int
    total_steps: int
    run_id: str
    flop_model: object
    peak_tflops: float
    window: Counter = field(default_factory=Counter)
    t_window: float = field(default_factory=time.time)


def plan_steps(args, n_samples: int, world: int) -> tuple[int, int]:
    per_step = world * args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = n_samples // per_step
    if steps_per_epoch == 0:
        raise UsageError(f"{n_samples} samples are fewer than one optimizer step needs ({per_step})")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total


def check_visual_tokens(shards, model) -> None:
    """Shards record the visual tokens per <image> their lengths were measured with; a model that expands an
    image into more would train on sequences the --model_max_length check never saw. Fewer is fine (the check was
    stricter than needed): e.g. --method text on shards built for M2PT's visual prompts."""
    from pipeline.core.m2pt import num_visual_tokens

    n = num_visual_tokens(model)
    bad = {m: v for m, v in shards.num_visual_tokens.items() if v is not None and v < n}
    if bad:
        manifest, v = next(iter(bad.items()))
        raise UsageError(f"{manifest} was built for {v} visual tokens per image, but this model and M2PT config give "
                         f"{n}: rebuild the shards with the same --visual_prompt_length / --visual_token_mode / "
                         "--model, or train with the settings they were built for")


def write_config(r: Run, cfg: dict, ckpt, shards, model, n_train: int, n_total: int) -> None:
    from pipeline.core.m2pt import num_visual_tokens

    resolved = {"args": vars(r.args), "deepspeed_config": cfg, "world_size": r.world, "samples": r.n_samples,
                "shards": len(shards.paths), "steps_per_epoch": r.steps_per_epoch, "total_steps": r.total_steps,
                "method": r.args.method, "num_visual_tokens": num_visual_tokens(model),
                "m2pt": vars(model.m2pt_config) if hasattr(model, "m2pt_config") else None,
                "base_model": r.base.name, "trainable": n_train, "total_parameters": n_total,
                "attn_implementation": model.config._attn_implementation,
                "resumed_from": str(ckpt) if ckpt else None, "run_id": r.run_id}
    (r.out / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def setup(args, plan: dict, rank: int, world: int) -> Run:
    """Model -> engine -> resume -> config.json / metrics start line -> data loader (last)."""
    import torch
    from tqdm import tqdm

    from pipeline.training import dist as pdist
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream, count_samples
    from pipeline.core.flops import FlopModel, peak_tflops
    from pipeline.core.m2pt import num_visual_tokens
    from pipeline.core.methods import unwrap
    from pipeline.training.run_control import quiet_worker

    torch.manual_seed(args.seed)
    out, shards = Path(args.output_dir), plan["shards"]
    base, trained, n_train, n_total = build_model(args, plan["m2pt"], rank)
    model = unwrap(trained)  # the LlavaForConditionalGeneration (under a PeftModel for --method lora)
    check_visual_tokens(shards, model)
    n_samples = shards.total if shards.total is not None else count_samples(shards.paths)
    steps_per_epoch, total_steps = plan_steps(args, n_samples, world)
    engine, scheduler = build_engine(args, plan["deepspeed_config"], trained, total_steps)
    checkpointer = Checkpointer(engine, out, rank, world, args.save_total_limit, args.method, base.name)
    progress = TrainingProgress()
    ckpt = checkpointer.resume(args.resume, progress)

    run_id = uuid.uuid4().hex[:12]
    metrics = MetricsWriter(out, rank, args.report_to, run_id)
    template = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
    stream = ShardStream(shards.paths, rank=rank, world=world, seed=args.seed,
                         batch_size=args.per_device_train_batch_size,
                         preprocess=Preprocess(template, base.image_processor, args.model_max_length),
                         pad_id=base.tokenizer.pad_token_id, shuffle_buffer=args.shuffle_buffer,
                         start=progress.cursors, counts=shards.counts,
                         group_batches=args.length_group_batches if args.group_by_length else 0)
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", disable=rank != 0, dynamic_ncols=True)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    device = pdist.device()
    peak, peak_from = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else peak_tflops(device, dtype)
    r = Run(args, rank, world, device, dtype, out, base, engine, scheduler, checkpointer, progress, metrics,
            None, bar, n_samples, steps_per_epoch, total_steps, run_id, FlopModel.from_model(model), peak)
    if rank == 0:
        write_config(r, plan["deepspeed_config"], ckpt, shards, model, n_train, n_total)
        write_run_state(out, state="running", step=progress.step, total_steps=total_steps, run_id=run_id)
        metrics.write({"event": "start", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": progress.step,
                       "resumed_from": str(ckpt) if ckpt else None, "world_size": world, "args": vars(args)})
        log.info("%d samples in %d shard(s); %d ranks x %d x %d per step -> %d steps/epoch, %d steps", n_samples,
                 len(shards.paths), world, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                 steps_per_epoch, total_steps)
        log.info("peak for MFU: %.3g TFLOP/s per device (%s)", peak, peak_from)
    # Last: once its worker processes exist, every exit path must stop them (train()'s finally; see close_loader).
    r.loader = iter(torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.dataloader_num_workers,
        worker_init_fn=quiet_worker if args.dataloader_num_workers > 0 else None))
    return r


def stop_requested(r: Run, stop) -> bool:
    """Every rank agrees to stop at the same step (a signal may reach only some of them)."""
    import deepspeed.comm as dist
    import torch

    flag = torch.tensor([1.0 if stop.poll() else 0.0], device=r.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def train_loop(r: Run, stop) -> bool:
    """Steps until the planned total or a stop request (then a checkpoint); True when it was stopped."""
    args, p = r.args, r.progress
    while p.step < r.total_steps:
        t0 = time.time()
        micro = [next(r.loader) for _ in range(args.gradient_accumulation_steps)]
        for b in micro:
            p.consumed(b)
        t_data = time.time() - t0
        loss_sum = train_step(r, micro)
        p.step += 1
        r.bar.update()
        r.window.update(loss_sum=loss_sum, steps=1, t_data=t_data, t_step=time.time() - t0)
        if p.step % args.logging_steps == 0 or p.step == r.total_steps:
            log_window(r)
        if stop_requested(r, stop):
            r.checkpointer.save(p, f"stop: {stop.reason or 'requested on another rank'}")
            log.info("stopped (%s) at step %d/%d; resume with --resume auto", stop.reason or "another rank", p.step,
                     r.total_steps)
            if r.rank == 0:
                write_run_state(r.out, state="stopped", step=p.step, total_steps=r.total_steps, run_id=r.run_id,
                                signal=stop.reason)
            return True
        if args.save_steps > 0 and p.step % args.save_steps == 0 and p.step < r.total_steps:
            r.checkpointer.save(p, "periodic")
    return False


def finish(r: Run) -> None:
    """Final checkpoint, adapter, end line and summary; on the embedded default, the zero-shot table."""
    import deepspeed.comm as dist
    import torch

    r.checkpointer.save(r.progress, "final")
    steps = torch.tensor([float(r.progress.step)], device=r.device)
    all_steps = [torch.zeros_like(steps) for _ in range(r.world)]
    dist.all_gather(all_steps, steps)
    counts = global_counts(r.progress.totals, r.device)
    tensors = r.checkpointer.adapter_tensors()
    if r.rank != 0:
        return
    adapter_dir = r.checkpointer.write_adapter(r.out / "adapter", tensors, base=r.base)
    r.metrics.write({"event": "end", "step": r.progress.step, "steps_per_rank": [int(s.item()) for s in all_steps],
                     **counts})
    r.metrics.close()
    write_run_state(r.out, state="finished", step=r.progress.step, total_steps=r.total_steps, run_id=r.run_id,
                    adapter=str(adapter_dir))
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    skipped = {k[8:]: v for k, v in counts.items() if k.startswith("skipped_") and v}
    print(f"trained {counts['samples']:,} samples ({counts['tokens']:,} tokens) in {r.progress.step} steps; skipped "
          f"{counts['skipped']:,}" + (f" {skipped}" if skipped else ""), flush=True)
    print(f"adapter ({size / 2**20:.2f} MiB) written to {adapter_dir}", flush=True)
    if not r.args.train_shards and r.args.model in defaults.DEMO_MODELS and not r.args.no_final_eval:
        from pipeline.demo.sample_data import closing_table

        print(closing_table(adapter_dir, r.out / "eval"), end="")


def train(args, plan: dict, rank: int, world: int, stop) -> dict:
    import deepspeed.comm as dist

    from pipeline.training.run_control import close_loader

    r = setup(args, plan, rank, world)
    try:
        stopped = train_loop(r, stop)
        if not stopped:
            finish(r)
    finally:
        r.bar.close()
        r.metrics.close()  # also when a signal, an error or the bad-sample limit ends the run
        close_loader(r.loader)
    if not stopped:
        dist.barrier()
    return {"engine": r.engine, "step": r.progress.step, "stopped": stopped, "output_dir": r.out}


# ------------------------------------------------------------------------------------------------ the app
def set_threads(args) -> None:
    import torch

    from pipeline.training.dist import intra_op_threads, local_world_size

    n, why = intra_op_threads(args.num_threads, local_world_size())
    torch.set_num_threads(n)
    log.info("intra-op threads per rank: %d (%s)", n, why)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        # User mistakes (a wrong path, a config that disagrees with the flags, an adapter for another model, a busy
        # output folder) and failed checkpoints (a full disk): one clear line, no traceback (M2PT_DEBUG=1 shows it).
        if os.environ.get("M2PT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, CheckpointError) else 2
    return 0


def run(args) -> dict:
    """Train; returns {"engine", "step", "stopped", "output_dir"} (the engine is for in-process tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.training import dist as pdist
    from pipeline.training.run_control import OutputLock, StopFlag

    under_launcher = "RANK" in os.environ or "SLURM_PROCID" in os.environ  # before init fills them in
    rank, world, _ = pdist.init(args.dist_timeout)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = StopFlag().install(under_launcher)
    set_threads(args)
    out = Path(args.output_dir)
    lock = OutputLock(out)
    try:
        plan = start_up_checks(args, rank, world, lock)
        return train(args, plan, rank, world, stop)
    except BaseException as e:
        if lock.held:  # rank 0 of *this* run only: a refused second run must not mark the first one failed
            first = (str(e).strip().splitlines() or [""])[0]
            write_run_state(out, state="failed", error=f"{type(e).__name__}: {first}")
        raise
    finally:
        lock.release()
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
