"""What several test files share: paths, the environment of subprocess runs, and small readers."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1")
TINY_TRAINABLE = 31872  # prompts + projector of the embedded tiny model at 10/10, official mode


def prompts_that_matter(model, factor: float = 30.0):
    """`model` (M2PT attached) with its prompts scaled up: at their init scale they barely move the logits, and a test
    that tells adapters (or forms, or batch layouts) apart needs answers that depend on them. Returns `model`."""
    import torch

    with torch.no_grad():
        for p in model.m2pt.parameters():
            p.mul_(factor)
    return model


def train_args(shards: Path, out: Path, *extra) -> list[str]:
    return ["--train_shards", str(shards / "shards"), "--output_dir", str(out), "--report_to", "none",
            "--logging_steps", "1", "--save_steps", "0", *extra]


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), *args]


def deepspeed_cmd(nprocs: int, port: int, *args) -> list[str]:
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nprocs), "--master_port", str(port),
            str(REPO / "pipeline" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), *args]


def run_inprocess(argv):
    from pipeline.train import parse_args, run

    return run(parse_args(argv))


def read_metrics(out: Path):
    """(per-step lines, end lines, start lines) of OUTPUT/metrics.jsonl."""
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return ([x for x in lines if "loss" in x], [x for x in lines if x.get("event") == "end"],
            [x for x in lines if x.get("event") == "start"])
