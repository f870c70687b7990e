"""The training run's process group, on DeepSpeed's communication layer, under every launcher we support
(`deepspeed`, `torchrun`, `srun`, plain `python`; what each launcher leaves in the environment: pipeline/launcher.py),
and the small collective helpers the recipe uses (every rank agrees on a value, a flag raised on any rank)."""

from __future__ import annotations

import datetime
import logging
import os

from pipeline.launcher import PortTakenError, map_launcher_env, name_cpu_accelerator

log = logging.getLogger(__name__)


def init(timeout_s: int) -> tuple[int, int, int]:
    """Initialise deepspeed.comm; returns (rank, world_size, local_rank)."""
    name_cpu_accelerator()
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    map_launcher_env()
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at init (1-3 min of g++,
        # and an indefinite hang if a previous build was killed holding its lock). Training never uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(),
                                   timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # torch's DistNetworkError: a 40-line traceback that never says what to do
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise PortTakenError(os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")) from None
        raise
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if acc.device_name() != "cpu":
        acc.set_device(local)
    return rank, world, local


def close() -> None:
    """End the process group while the interpreter is still whole; a no-op when there is none.

    Why: a process that exits with its gloo group alive leaves the group's C++ worker threads to interpreter
    finalization, and under load one of them may still be running there: the process prints "terminate called
    without an active exception" and dies of SIGABRT after its own last line (a refused start exited -6 instead of
    2; pytorch/pytorch#190489). Called by the entry point on its way out (finished, stopped, refused, failed), not
    from inside run(): the in-process tests run the trainer many times on one group."""
    import deepspeed.comm as dist
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        dist.destroy_process_group()


def device():
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device(int(os.environ.get("LOCAL_RANK", 0))) if acc.device_name() != "cpu" else "cpu"


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (a stop signal may reach only some ranks)."""
    import deepspeed.comm as dist
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=device())  # NCCL reduces on the GPU only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def agree_on(fn):
    """Run one start-up check on every rank; if any rank failed, every rank stops (the failing one with its own
    error) instead of the others hanging in the next collective. Returns fn's result."""
    from pipeline.errors import UsageError

    error, result = None, None
    try:
        result = fn()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        error = e
    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise UsageError("another rank failed its start-up checks (its error is above)")
    return result
