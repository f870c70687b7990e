"""What only a GPU shows, run by scripts/gpu_check.sh on a lent GPU and skipped everywhere else: bf16 training of
the embedded data through DeepSpeed on CUDA against the CPU fp32 run, and which SDPA kernel the prompted, padded
batches get. Findings go to $M2PT_GPU_REPORT (JSON) as well as into the assertions."""

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ENV, read_metrics, train_args, train_cmd

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _report(key: str, value) -> None:
    path = os.environ.get("M2PT_GPU_REPORT")
    if path:
        found = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps(found | {key: value}, indent=2) + "\n")


def _train(shards, out: Path, env: dict, *flags) -> list[float]:
    args = train_args(shards, out, "--max_steps", "30", "--dataloader_num_workers", "1", *flags)
    r = subprocess.run(train_cmd(*args), env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [s["loss"] for s in read_metrics(out)[0]]


def test_bf16_training_on_cuda_follows_the_cpu_fp32_run(shards, tmp_path):
    cpu = _train(shards, tmp_path / "cpu", ENV)  # ENV: DS_ACCELERATOR=cpu
    gpu = _train(shards, tmp_path / "gpu", dict(ENV, DS_ACCELERATOR="cuda"), "--bf16", "True")
    cfg = json.loads((tmp_path / "gpu" / "config.json").read_text())
    steps = read_metrics(tmp_path / "gpu")[0]
    late_cpu, late_gpu = statistics.fmean(cpu[-10:]), statistics.fmean(gpu[-10:])
    _report("bf16_vs_cpu_fp32", {"steps": len(gpu), "first_loss": [cpu[0], gpu[0]],
                                 "mean_loss_last_10": [late_cpu, late_gpu],
                                 "attn_implementation": cfg["attn_implementation"],
                                 "peak_mem_mb": max(s["peak_mem_mb"] for s in steps),
                                 "samples_per_s": statistics.median(s["samples_per_s"] for s in steps[5:])})
    assert cfg["deepspeed_config"]["bf16"]["enabled"] is True
    assert abs(gpu[0] - cpu[0]) <= 0.05 * cpu[0] + 0.02  # the same first batch, the same init
    assert abs(late_gpu - late_cpu) <= 0.15 * late_cpu + 0.05  # the same descent, within bf16's noise


def test_which_sdpa_kernel_the_prompted_padded_batches_get():
    """flash_attention_2 is used when flash-attn is installed; otherwise SDPA picks its kernel per call. A padded
    batch hands SDPA an attention mask, which its flash kernel does not take: the memory-efficient kernel must run
    (not only the math fallback)."""
    from test_m2pt import CONV, _batch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline import M2PTConfig, attach_m2pt, load_base

    base = load_base("tiny", dtype=torch.bfloat16)
    model = attach_m2pt(base.model, M2PTConfig()).cuda().eval()
    short = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    ids, mask, px = _batch(base, model, [CONV, short])
    batch = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=px.cuda().to(torch.bfloat16))
    ran = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                model(**batch)
            ran[name] = "ran"
        except RuntimeError as e:
            ran[name] = "refused: " + (str(e).strip().splitlines() or [""])[0][:200]
    _report("sdpa_kernels_for_a_padded_prompted_batch", ran)
    assert ran["math"] == "ran" and "ran" in (ran["efficient"], ran["cudnn"], ran["flash"]), ran
