"""M²PT training on a DeepSpeed engine from WebDataset shards: the recipe, in the order a run uses it.

    deepspeed pipeline/train.py --deepspeed ds_configs/zero2.json --train_shards data/shards \\
        --model /models/llava-1.5-7b-hf --output_dir runs/m2pt --bf16

With no arguments it trains the embedded demo model on the embedded sample set (building its shards first), on one
process, and ends with a zero-shot table.

    parse_args -> start_up_checks -> setup -> train_loop -> finish          (run, at the bottom, ties them together)

  parse_args       the flags (pipeline/training/config.py: TrainConfig)
  start_up_checks  everything that can be checked before the model loads (a 7B takes minutes): the DeepSpeed
                   config, one run per output folder, the model's files, the method, the shards -> a RunPlan
                   (training/plan.py)
  setup            model + method, engine (training/engine.py), resume (training/checkpoint.py), data loader
                   (data/stream.py)
  train_loop       train_step (the loss normalisation; the forward is core/step.py), a metrics line every
                   --logging_steps (training/records.py), checkpoints, stop signals (training/run_control.py)
  finish           the final checkpoint, the adapter and its model card (core/card.py), the closing table on the
                   embedded default; then --push_to_hub (core/hub.py)

Exit status: 0 finished, or stopped by a signal with a checkpoint (resume with --resume auto); 2 a usage or input
mistake (one line starting "error:", before any work); 1 anything else (run_state.json then says "failed"; a
failed --push_to_hub leaves a finished run "finished")
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from pipeline import defaults, launcher
from pipeline.core import hub
from pipeline.core.m2pt import M2PTConfig, num_visual_tokens
from pipeline.core.methods import unwrap
from pipeline.errors import CheckpointError, UsageError
from pipeline.training import dist as pdist
from pipeline.training import elastic
from pipeline.training.checkpoint import Checkpointer, TrainingProgress
from pipeline.training.config import CONFIG_FILE, TrainConfig, trackers
from pipeline.training.config import parse_args as _parse_args
from pipeline.training.loader import rank_loader
from pipeline.training.plan import RunPlan, check_visual_tokens, count_steps, start_up_checks
from pipeline.training.records import MetricsWriter, check_bad_samples, global_counts, peak_memory_mb, write_run_state

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from tqdm import tqdm

    from pipeline.core.flops import FlopModel
    from pipeline.core.models import Base

log = logging.getLogger("m2pt.train")


def parse_args(argv=None) -> TrainConfig:
    return _parse_args(argv, description=__doc__)


# ------------------------------------------------------------------------------------------------- the model
def build_model(cfg: TrainConfig, m2pt_config: M2PTConfig, rank: int):
    """(base, the model with the method applied, trainable count, total count)."""
    from pipeline.core import methods
    from pipeline.core.m2pt import load_adapter

    base = cfg.load_base(attn=cfg.attn_implementation)
    model = (load_adapter(base.model, cfg.init_adapter) if cfg.init_adapter
             else methods.get(cfg.method).apply(base.model, m2pt_config, cfg.lora, cfg.text_prompts))
    model.train()  # from_pretrained returns eval mode; dropout / checkpointing act only in train mode
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise UsageError("nothing is trainable (prompt lengths 0, projector frozen, no LM head)")
    if rank == 0:
        from pipeline.core.m2pt import format_parameter_table

        log.info("method %s, trainable parameters:\n%s", cfg.method, format_parameter_table(model))
    return base, model, n_train, n_total


# --------------------------------------------------------------------------------------------------- setup
@dataclass
class TrainState:
    """What the loop works with, built once by `setup`."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    out: Path
    base: Base
    engine: DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Checkpointer
    progress: TrainingProgress
    metrics: MetricsWriter
    loader: Iterator[dict] | None  # batches; set last by `setup` (its worker processes must be stopped on exit)
    bar: tqdm  # set by `setup` after the start-up log lines (which must not share the bar's first line)
    n_samples: int
    steps_per_epoch: int
    total_steps: int
    run_id: str
    flop_model: FlopModel
    peak_tflops: float | None
    window: Counter = field(default_factory=Counter)
    t_window: float = field(default_factory=time.time)


def write_config(state: TrainState, plan: RunPlan, ckpt, model, n_train: int, n_total: int) -> None:
    """OUTPUT/config.json: the flags as resolved (the method's settings as they really train), the filled
    DeepSpeed config and what the run planned."""
    resolved = {"args": state.cfg.record(plan.m2pt_config), "deepspeed_config": plan.ds_config,
                "world_size": state.world, "data_slots": plan.data_slots,
                "samples": state.n_samples, "shards": len(plan.shards.paths),
                "steps_per_epoch": state.steps_per_epoch, "total_steps": state.total_steps,
                "method": state.cfg.method, "num_visual_tokens": num_visual_tokens(model),
                "m2pt": vars(model.m2pt_config) if hasattr(model, "m2pt_config") else None,
                "base_model": state.base.name, "trainable": n_train, "total_parameters": n_total,
                "attn_implementation": model.config._attn_implementation,
                "resumed_from": str(ckpt) if ckpt else None, "run_id": state.run_id, "run_identity": plan.identity,
                "run_name": state.cfg.run_name or state.out.name}
    (state.out / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    (state.out / CONFIG_FILE).write_text(yaml.safe_dump(state.cfg.as_config_file(plan.m2pt_config), sort_keys=False))


def _announce(state: TrainState, plan: RunPlan, ckpt, model, n_train: int, n_total: int, peak_from: str) -> None:
    """Rank 0: config.json, run_state "running", the metrics start line, two log lines."""
    cfg = state.cfg
    write_config(state, plan, ckpt, model, n_train, n_total)
    write_run_state(state.out, state="running", step=state.progress.step, total_steps=state.total_steps,
                    run_id=state.run_id)
    state.metrics.write({"event": "start", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "step": state.progress.step, "resumed_from": str(ckpt) if ckpt else None,
                         "world_size": state.world, "run_name": cfg.run_name or state.out.name,
                         "args": cfg.record(plan.m2pt_config)})
    log.info("%d samples in %d shard(s); %d ranks x %d x %d per step -> %d steps/epoch, %d steps", state.n_samples,
             len(plan.shards.paths), state.world, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
             state.steps_per_epoch, state.total_steps)
    log.info("peak for MFU: %.3g TFLOP/s per device (%s)", state.peak_tflops, peak_from)


def setup(cfg: TrainConfig, plan: RunPlan, rank: int, world: int) -> TrainState:
    """Model -> engine -> resume -> config.json / metrics start line -> data loader (last)."""
    from tqdm import tqdm

    from pipeline.core.flops import FlopModel, peak_tflops
    from pipeline.data.stream import count_samples
    from pipeline.training.engine import build_engine

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    base, trained, n_train, n_total = build_model(cfg, plan.m2pt_config, rank)
    model = unwrap(trained)  # the LlavaForConditionalGeneration (under a PeftModel for --method lora)
    check_visual_tokens(plan.shards, num_visual_tokens(model))
    n_samples = plan.shards.total if plan.shards.total is not None else count_samples(plan.shards.paths)
    steps_per_epoch, total_steps = count_steps(cfg, n_samples, world)
    universal = None
    if plan.changes_world(world):  # the ZeRO state of another rank count, through DeepSpeed's universal format
        pdist.agree_on(lambda: elastic.to_universal(plan.ckpt) if rank == 0 else None)
        universal = plan.ckpt / elastic.UNIVERSAL
    engine, scheduler = build_engine(cfg, plan.ds_config, trained, total_steps, load_universal=universal is not None)
    checkpointer = Checkpointer(engine, out, rank, world, cfg.save_total_limit, cfg.method, base.name, plan.identity,
                                plan.data_slots)
    progress = TrainingProgress()
    ckpt = checkpointer.resume(plan.ckpt, progress, universal)
    run_id = uuid.uuid4().hex[:12]
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    device = pdist.device()
    peak, peak_from = (cfg.peak_tflops, "--peak_tflops") if cfg.peak_tflops else peak_tflops(device, dtype)
    state = TrainState(cfg, rank, world, device, dtype, out, base, engine, scheduler, checkpointer, progress,
                       MetricsWriter(out, rank, trackers(cfg.report_to), run_id, cfg.run_name or out.name,
                                     cfg.record(plan.m2pt_config)), None, None, n_samples, steps_per_epoch,
                       total_steps, run_id, FlopModel.from_model(model), peak)
    if rank == 0:
        _announce(state, plan, ckpt, model, n_train, n_total, peak_from)
    state.bar = tqdm(total=total_steps, initial=progress.step, unit="step", disable=rank != 0, dynamic_ncols=True)
    # Last: once its worker processes exist, every exit path must stop them (train()'s finally; see close_loader).
    state.loader = rank_loader(cfg, plan, base, model, progress, rank, world)
    return state


# ------------------------------------------------------------------------------------------------ one step
def backprop_scale(n_tok_step: float, world: int, accumulation: int) -> float:
    """Factor from a micro-batch's summed token loss to the loss handed to `engine.backward`.

    The step's loss is sum over its supervised tokens / their count across all micro-batches and ranks
    (`n_tok_step`), not a mean of per-batch means. DeepSpeed divides gradients by the accumulation steps and
    averages them over ranks, so each micro-batch's sum is multiplied by world x accumulation / n_tok_step."""
    return world * accumulation / n_tok_step


def train_step(state: TrainState, micro: list[dict]) -> float:
    """Forward + backward over the step's micro-batches; returns the summed token loss (this rank)."""
    import deepspeed.comm as dist

    from pipeline.core.flops import batch_flops
    from pipeline.core.step import token_loss, vision_keepalive

    n_tok = torch.tensor([float(sum((b["labels"][:, 1:] != -100).sum() for b in micro))], device=state.device)
    dist.all_reduce(n_tok)
    n_tok_step = max(n_tok.item(), 1.0)
    state.window["sup_tok_global"] += n_tok_step
    loss_sum = 0.0
    scale = backprop_scale(n_tok_step, state.world, len(micro))
    model = unwrap(state.engine.module)
    for b in micro:
        tok_loss = token_loss(state.engine, model, b, state.device, state.dtype)
        loss = tok_loss * scale
        if b["pixel_values"] is None:
            # A text-only batch never runs the vision path: run it on a blank image x0 so the visual prompts and the
            # projector stay in the graph (ZeRO cannot handle a trainable set that changes between steps). Through
            # the modules' own forward, so ZeRO-3 gathers their partitioned weights.
            loss = loss + vision_keepalive(model, state.dtype, state.device)
        state.engine.backward(loss)
        state.engine.step()
        loss_sum += tok_loss.item()
        counts = {"samples": b["input_ids"].shape[0], "tokens": int(b["attention_mask"].sum())}
        state.progress.totals.update(counts)
        state.window.update(counts, flops=batch_flops(state.flop_model, b))
    return loss_sum


def log_window(state: TrainState) -> None:
    """Every --logging_steps: one metrics line (reduced over ranks), the progress bar, the bad-sample limit."""
    import deepspeed.comm as dist

    w = state.window
    reduced = torch.tensor([w["loss_sum"], w["samples"], w["tokens"], w["flops"]], device=state.device,
                           dtype=torch.float64)
    dist.all_reduce(reduced)
    counts = global_counts(state.progress.totals, state.device)
    elapsed = time.time() - state.t_window
    tflops = reduced[3].item() / state.world / elapsed / 1e12  # model TFLOP/s per device (pipeline/core/flops.py)
    rec = {"step": state.progress.step, "epoch": round(state.progress.step / state.steps_per_epoch, 4),
           "loss": reduced[0].item() / w["sup_tok_global"], "lr": state.scheduler.get_last_lr()[0],
           "grad_norm": float(state.engine.get_global_grad_norm() or 0.0),
           "samples_per_s": reduced[1].item() / elapsed, "tokens_per_s": reduced[2].item() / elapsed,
           "data_wait_share": w["t_data"] / max(w["t_step"], 1e-9), "sec_per_step": w["t_step"] / w["steps"],
           "tflops": tflops, "mfu": tflops / state.peak_tflops if state.peak_tflops else None,
           "peak_mem_mb": round(peak_memory_mb(), 1),
           **{k: v for k, v in counts.items() if k not in ("samples", "tokens")}}
    state.metrics.write(rec)
    state.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
    check_bad_samples(counts, state.cfg.max_bad_sample_fraction, state.n_samples)
    w.clear()
    state.t_window = time.time()


# ------------------------------------------------------------------------------------------------ the loop
def _stop(state: TrainState, reason: str | None) -> None:
    """A stop agreed by every rank: checkpoint, log how to resume, run_state "stopped"."""
    progress = state.progress
    state.checkpointer.save(progress, f"stop: {reason or 'requested on another rank'}")
    log.info("stopped (%s) at step %d/%d; resume with --resume auto", reason or "another rank", progress.step,
             state.total_steps)
    if state.rank == 0:
        write_run_state(state.out, state="stopped", step=progress.step, total_steps=state.total_steps,
                        run_id=state.run_id, signal=reason)


def train_loop(state: TrainState, stop) -> bool:
    """Steps until the planned total or a stop request (then a checkpoint); True when it was stopped."""
    cfg, progress = state.cfg, state.progress
    while progress.step < state.total_steps:
        t0 = time.time()
        micro = [next(state.loader) for _ in range(cfg.gradient_accumulation_steps)]
        for b in micro:
            progress.consumed(b)
        t_data = time.time() - t0
        loss_sum = train_step(state, micro)
        progress.step += 1
        state.bar.update()
        state.window.update(loss_sum=loss_sum, steps=1, t_data=t_data, t_step=time.time() - t0)
        if progress.step % cfg.logging_steps == 0 or progress.step == state.total_steps:
            log_window(state)
        if pdist.any_rank(stop.poll()):  # every rank stops at the same step (a signal may reach only some)
            _stop(state, stop.reason)
            return True
        if progress.step == cfg.stop_at_step and progress.step < state.total_steps:
            _stop(state, f"--stop_at_step {cfg.stop_at_step}")
            return True
        if cfg.save_steps > 0 and progress.step % cfg.save_steps == 0 and progress.step < state.total_steps:
            state.checkpointer.save(progress, "periodic")
    return False


def _summary(counts: dict, steps: int, adapter_dir: Path) -> str:
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    skipped = {k[8:]: v for k, v in counts.items() if k.startswith("skipped_") and v}
    return (f"trained {counts['samples']:,} samples ({counts['tokens']:,} tokens) in {steps} steps; skipped "
            f"{counts['skipped']:,}" + (f" {skipped}" if skipped else "")
            + f"\nadapter ({size / 2**20:.2f} MiB) written to {adapter_dir}")


def finish(state: TrainState) -> None:
    """Final checkpoint, adapter, end line and summary; on the embedded default, the zero-shot table (every rank
    answers its share of the questions, rank 0 prints it)."""
    import deepspeed.comm as dist

    state.checkpointer.save(state.progress, "final")
    steps = torch.tensor([float(state.progress.step)], device=state.device)
    all_steps = [torch.zeros_like(steps) for _ in range(state.world)]
    dist.all_gather(all_steps, steps)
    counts = global_counts(state.progress.totals, state.device)
    tensors = state.checkpointer.adapter_tensors()
    adapter_dir = state.out / "adapter"
    if state.rank == 0:
        state.checkpointer.write_adapter(adapter_dir, tensors, base=state.base)  # every rank reads it there
        state.metrics.write({"event": "end", "step": state.progress.step,
                             "steps_per_rank": [int(s.item()) for s in all_steps], **counts})
        state.metrics.close()
        write_run_state(state.out, state="finished", step=state.progress.step, total_steps=state.total_steps,
                        run_id=state.run_id, adapter=str(adapter_dir))
        state.bar.close()  # the bar's last line before the summary, not after the table
        print(_summary(counts, state.progress.step, adapter_dir), flush=True)
    table = None
    if uses_demo_data(state.cfg) and state.cfg.final_eval:
        dist.barrier()  # the adapter is on disk before any rank reads it
        table = closing_table(adapter_dir, state.out / "eval", defaults.demo_sample())
        if table:
            print(table, end="", flush=True)
    if state.rank == 0:  # the adapter's model card (pipeline/core/card.py), the closing table as its results
        from pipeline.core import card, methods

        card.write_card(adapter_dir, method=methods.get(state.cfg.method), base_name=state.base.name,
                        training=card.training_lines(state.cfg.record(), state.cfg.explicit, counts,
                                                     state.progress.step, state.world, state.engine.module),
                        settings_yaml=(state.out / CONFIG_FILE).read_text(), results=table)


def closing_table(adapter: Path, output_dir: Path, sample: Path) -> str | None:
    """The table that ends a run on the embedded default: the majority answer, the un-tuned base and the new adapter
    on the held-out task types (zero-shot) and on fresh records of the training task types. Every rank answers its
    share; rank 0 gets the table, the others None."""
    from pipeline.demo.sample_data import DEFAULT_TASKS, TITLES, VAL_TASK
    from pipeline.evaluation.runner import EvalConfig, evaluate
    from pipeline.evaluation.scoring import markdown_table

    res = evaluate(EvalConfig(adapter=[str(adapter)], with_base=True, data_root=sample, output_dir=output_dir,
                              tasks=f"{DEFAULT_TASKS},{VAL_TASK}={sample / 'val.json'}"))
    if not res:
        return None
    return ("zero-shot on the held-out task types of the sample set (and the training task types' validation "
            "records, for comparison):\n" + markdown_table(res, TITLES))


def train(cfg: TrainConfig, plan: RunPlan, rank: int, world: int, stop) -> dict:
    import deepspeed.comm as dist

    from pipeline.training.run_control import close_loader

    state = setup(cfg, plan, rank, world)
    try:
        stopped = train_loop(state, stop)
        if not stopped:
            finish(state)
    finally:
        state.bar.close()
        state.metrics.close()  # also when a signal, an error or the bad-sample limit ends the run
        close_loader(state.loader)
    if not stopped:
        dist.barrier()
    return {"engine": state.engine, "step": state.progress.step, "stopped": stopped, "output_dir": state.out}


# ------------------------------------------------------------------------------------------------- the app
def uses_demo_data(cfg: TrainConfig) -> bool:
    """The embedded default: the demo model on the demo's sample set (no --train_shards)."""
    return not cfg.train_shards and cfg.uses_demo_model()


def set_threads(cfg: TrainConfig) -> None:
    """Intra-op threads per rank. The embedded default runs on one unless told otherwise: float sums differ with
    the thread count, and its closing table must not depend on how busy the machine is."""
    n, why = launcher.intra_op_threads(cfg.num_threads, launcher.local_world_size())
    if why not in ("--num_threads", "OMP_NUM_THREADS") and uses_demo_data(cfg):
        n, why = 1, "the embedded default: reproducible numbers (--num_threads to change)"
    torch.set_num_threads(n)
    log.info("intra-op threads per rank: %d (%s)", n, why)
    if cfg.tf32 and torch.cuda.is_available():  # LLaVA's --tf32 True: TF32 tensor cores for fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, CheckpointError, hub.PushError) as e:
        # User mistakes (a wrong path, a config that disagrees with the flags, an adapter for another model, a busy
        # output folder) and failed checkpoints (a full disk): one clear line, no traceback (M2PT_DEBUG=1 shows it).
        if os.environ.get("M2PT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, (CheckpointError, hub.PushError)) else 2
    finally:
        pdist.close()
    return 0


def run(cfg: TrainConfig) -> dict:
    """Train; returns {"engine", "step", "stopped", "output_dir"} (the engine is for in-process tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.training.run_control import OutputLock, StopFlag

    under_launcher = "RANK" in os.environ or "SLURM_PROCID" in os.environ  # before init fills them in
    rank, world, _ = pdist.init(cfg.dist_timeout)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = StopFlag().install(under_launcher)
    set_threads(cfg)
    out = Path(cfg.output_dir)
    lock, plan = OutputLock(out), None
    try:
        plan = start_up_checks(cfg, rank, world, lock)
        result = train(cfg, plan, rank, world, stop)
        if cfg.push_to_hub and rank == 0 and not result["stopped"]:  # after every rank's last collective
            print(f"pushed to {hub.push(result['output_dir'] / 'adapter', cfg.push_to_hub)}", flush=True)
        return result
    except BaseException as e:
        # Rank 0 of a run that passed its start-up checks only: a refused start (another run holds the folder, the
        # folder holds a run of other settings, a bad flag) must not rewrite the folder's record, nor a finished
        # run whose upload failed.
        if lock.held and plan is not None and not isinstance(e, hub.PushError):
            first = (str(e).strip().splitlines() or [""])[0]
            write_run_state(out, state="failed", error=f"{type(e).__name__}: {first}")
        raise
    finally:
        lock.release()
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
