"""What the launchers leave in the environment (`deepspeed`, `torchrun`, `srun`, plain `python`), read the same way
by training (pipeline/training/dist.py) and data-parallel evaluation (pipeline/evaluation/parallel.py): the rank
variables, a free rendezvous port, the ranks on this node and each rank's share of its cores."""

from __future__ import annotations

import os
import socket


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


def name_cpu_accelerator() -> None:
    """DS_ACCELERATOR=cpu on a machine DeepSpeed would find no accelerator on, before deepspeed is imported.

    Why: DeepSpeed's own detection ends on such a machine in a WARNING per process, "Setting accelerator to CPU. If
    you have GPU or other accelerator, we were unable to detect it." - noise on every CPU run. A value the user set is
    kept, and anything DeepSpeed could pick instead of the CPU (CUDA, MPS, an XPU / NPU / HPU / MLU extension) leaves
    the choice to DeepSpeed's detection."""
    import importlib.util

    import torch

    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    extensions = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_mlu", "torch_sdaa")
    if any(importlib.util.find_spec(m) is not None for m in extensions):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


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
