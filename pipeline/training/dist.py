"""Process-group set-up that works under every launcher we support: `deepspeed`, `torchrun`, `srun` (Slurm),
and plain `python` (one process)."""

from __future__ import annotations

import datetime
import logging
import os
import socket

log = logging.getLogger(__name__)


class PortTakenError(ValueError):
    """The rendezvous port is taken: another job on this node (the deepspeed launcher and torchrun both default to
    29500)."""

    def __init__(self, addr, port):
        super().__init__(f"port {port} on {addr} is taken, by another job on this node? Give this one another "
                         f"port: deepspeed --master_port {_free_port()} ... (torchrun: --master_port; srun: export "
                         "MASTER_PORT)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_launcher_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* when the launcher did not.

    * `srun` (and `deepspeed --launcher slurm`) export only SLURM_* variables: map them.
    * plain `python pipeline/train.py`: one process; without this DeepSpeed falls into MPI discovery and fails
      with "No module named 'mpi4py'"."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("under srun, export MASTER_ADDR (and MASTER_PORT) from the batch script "
                               "(slurm/train_m2pt.sh derives them from the allocation)")
        env.setdefault("MASTER_PORT", "29500")
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


def init(timeout_s: int) -> tuple[int, int, int]:
    """Initialise deepspeed.comm; returns (rank, world_size, local_rank)."""
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


def intra_op_threads(requested: int | None, local_world: int) -> tuple[int, str]:
    """How many intra-op threads this rank should use, and why (logged at start-up).

    An explicit --num_threads or OMP_NUM_THREADS wins. Otherwise: this rank's share of the cores it may run on,
    lowered to what the machine's recent load leaves free, at least 1. Why the load matters: with every core busy,
    two torch threads per process ran 4-10x slower than one on a 2-core machine (each OpenMP thread spins waiting
    for the other, which is descheduled)."""
    if requested:
        return requested, "--num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, local_world))
    free = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    n = max(1, min(share, round(free / max(1, local_world))))
    why = f"{cores} core(s) / {local_world} rank(s) on this node"
    return n, why + (f", {free:.1f} free by the 1-min load average" if n < share else "")


def local_world_size() -> int:
    """Ranks on this node, from whichever launcher started us (deepspeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE;
    srun: SLURM_NTASKS_PER_NODE), else 1."""
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(k, "").split("(")[0]
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


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
