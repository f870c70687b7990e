"""What a training run writes as it goes: metrics.jsonl (+ TensorBoard) with a run id on every line,
run_state.json for the Slurm template, and the sample / token / skip counts summed over ranks with the
bad-sample limit they are checked against."""

from __future__ import annotations

import json
import resource
from collections import Counter
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.files import atomic_write_json


def write_run_state(out: Path, **state) -> None:
    """OUTPUT/run_state.json: "running" | "stopped" (by a signal, resumable) | "finished" | "failed" (with the
    error's first line). The Slurm template reads it to decide whether to requeue the job."""
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


def check_bad_samples(counts: dict, max_fraction: float, n_samples: int) -> None:
    """Stop the run once more than `max_fraction` of the samples read so far were skipped (checked from 200
    samples, or one epoch if smaller)."""
    seen = counts["samples"] + counts["skipped"]
    if seen >= min(200, n_samples) and counts["skipped"] > max_fraction * seen:
        reasons = {k[8:]: v for k, v in counts.items() if k.startswith("skipped_") and v}
        raise UsageError(f"{counts['skipped']} of {seen} samples read so far were skipped ({reasons}), above "
                         f"--max_bad_sample_fraction {max_fraction}: check the data")
