"""What a training run writes as it goes: metrics.jsonl (+ TensorBoard) with a run id on every line,
run_state.json for the Slurm template, and the sample / token / skip counts summed over ranks with the
bad-sample limit they are checked against."""

from __future__ import annotations

import json
import os
import resource
from collections import Counter
from pathlib import Path

from pipeline.errors import UsageError, first_line
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


def check_trackers(names: list[str]) -> None:
    """A tracker that cannot log is an error before the model loads, not a traceback minutes later: its package is
    missing, wandb has no API key (and is not offline), or MLflow's tracking URI cannot be used."""
    for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise UsageError(f"--report_to {name}: the {module} package is not installed (pip install {module}, "
                                 "or pip install -e .[trackers])") from None
    if "wandb" in names:
        _check_wandb_key()
    if "mlflow" in names:
        _check_mlflow_store()


def _check_wandb_key() -> None:
    """Online wandb needs an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes. Without one, wandb.init
    asked for it on a terminal nobody reads, or failed after the model had loaded."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UsageError("--report_to wandb: no W&B API key (set WANDB_API_KEY or run `wandb login`), or set "
                     "WANDB_MODE=offline to log into OUTPUT/wandb and `wandb sync` it later")


def _check_mlflow_store() -> None:
    """One cheap request to the tracking store MLflow would use (MLFLOW_TRACKING_URI, else its default), without
    its retries: the default URI of mlflow-skinny (sqlite, without a model registry) and the file store (in
    maintenance mode) failed only at the first logged value."""
    import mlflow
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for an unusable store
        raise UsageError(f"--report_to mlflow: the tracking URI {mlflow.get_tracking_uri()} cannot be used "
                         f"({first_line(e)[:200]}); "
                         "set MLFLOW_TRACKING_URI to a tracking server (http://...), or to a file: URI with "
                         "MLFLOW_ALLOW_FILE_STORE=true") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MetricsWriter:
    """metrics.jsonl on rank 0, and the trackers of --report_to (TensorBoard in OUTPUT/tb, wandb, MLflow) with the
    same numbers under train/<name>. Every metrics.jsonl line carries the run id, and each run (a resumed one too)
    starts with a "start" line, so appended runs stay distinguishable; metrics.jsonl is the record the trackers
    mirror."""

    def __init__(self, out: Path, rank: int, report_to: list[str], run_id: str, run_name: str | None = None,
                 params: dict | None = None):
        self.run_id, self.f, self.tb, self.wandb, self.mlflow = run_id, None, None, None, None
        if rank != 0:
            return
        self.f = open(out / "metrics.jsonl", "a")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        if "wandb" in report_to:
            import wandb  # WANDB_PROJECT / WANDB_MODE / WANDB_DIR as usual; a resumed run continues its wandb run

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "m2pt"), name=run_name, id=run_id,
                                    dir=os.environ.get("WANDB_DIR", str(out)), config=params, resume="allow")
        if "mlflow" in report_to:
            import mlflow  # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME as usual

            self.mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in (params or {}).items()})

    def write(self, rec: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps({"run_id": self.run_id, **rec}, default=str) + "\n")
        self.f.flush()
        if "step" not in rec or "event" in rec:
            return
        scalars = {f"train/{k}": v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, rec["step"])
        if self.wandb:
            self.wandb.log(scalars, step=rec["step"])
        if self.mlflow:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=rec["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
            self.mlflow = None


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
