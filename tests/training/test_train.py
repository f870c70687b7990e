"""The main job on the real DeepSpeed engine (CPU accelerator, gloo): training, freezing, learning, loss
normalisation, resume equivalence, SIGTERM, 1 and 2 processes over uneven shards."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, TINY_TRAINABLE, deepspeed_cmd, read_metrics, run_inprocess, train_args, train_cmd
from safetensors.torch import load_file

from data_prep.build_shards import main as build_main


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """$M2PT_DATA for the embedded-default runs of this module: the sample set and its shards are built by the
    first run that needs them and reused by the next."""
    return tmp_path_factory.mktemp("m2pt_data")


def _metrics(out):
    return read_metrics(out)[:2]


def test_trains_freezes_base_and_writes_trainables_only(shards, tmp_path):
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt
    from pipeline.demo.tiny import build_tiny

    res = run_inprocess(train_args(shards, tmp_path, "--max_steps", "8", "--dataloader_num_workers", "0"))
    trained = dict(res["engine"].module.named_parameters())
    fresh = dict(attach_m2pt(build_tiny().model, M2PTConfig(seed=42)).named_parameters())
    assert set(trained) == set(fresh)
    n_frozen = 0
    for n, p in trained.items():
        if p.requires_grad:
            assert not torch.equal(p.detach(), fresh[n].detach()), f"{n} did not train"
        else:
            assert torch.equal(p.detach(), fresh[n].detach()), f"frozen {n} changed"
            n_frozen += 1
    assert n_frozen > 30
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in adapter.values()) == TINY_TRAINABLE  # only the trainables, nothing frozen
    logged, end = _metrics(tmp_path)
    assert [x["step"] for x in logged] == list(range(1, 9))
    assert end[0]["steps_per_rank"] == [8]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_visual_tokens"] == 26 and cfg["trainable"] == TINY_TRAINABLE and cfg["samples"] == 170


@pytest.mark.slow
def test_loss_falls_by_half_on_a_small_fixed_set(shards, tmp_path):
    recs = json.loads((shards / "sample" / "train.json").read_text())
    small = [r for r in recs if r["task_name"] in ("colour_recognition", "counting")][:8]
    (tmp_path / "small.json").write_text(json.dumps(small))
    assert build_main(["--input", str(tmp_path / "small.json"), "--image_root", str(shards / "sample"),
                       "--output", str(tmp_path / "s"), "--workers", "1", "--quiet"]) == 0
    argv = ["--train_shards", str(tmp_path / "s"), "--output_dir", str(tmp_path / "o"), "--report_to", "none",
            "--logging_steps", "1", "--save_steps", "0", "--max_steps", "150", "--learning_rate", "3e-3",
            "--dataloader_num_workers", "0", "--shuffle_buffer", "1"]
    run_inprocess(argv)
    losses = [x["loss"] for x in _metrics(tmp_path / "o")[0]]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, (first, last)


def test_loss_is_normalised_by_tokens_across_micro_batches(tmp_path):
    """bs 4 x accum 1 and bs 2 x accum 2 see the same 4 samples, whose answers have very different lengths: a
    token-weighted loss gives the same loss and the same (pre-clip) gradient norm; a mean of per-micro-batch means
    would weight the two micro-batches' tokens differently."""
    answers = ["yes", "one two three four five six seven eight nine ten eleven twelve", "red",
               "a small blue square on the left"]
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                              {"from": "gpt", "value": a}]} for i, a in enumerate(answers)]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    assert build_main(["--input", str(tmp_path / "r.json"), "--output", str(tmp_path / "s"), "--workers", "1",
                       "--quiet"]) == 0
    res = []
    for bs, acc in ((4, 1), (2, 2)):
        out = tmp_path / f"{bs}x{acc}"
        run_inprocess(["--train_shards", str(tmp_path / "s"), "--output_dir", str(out), "--report_to", "none",
                        "--logging_steps", "1", "--save_steps", "0", "--max_steps", "1", "--dataloader_num_workers",
                        "0", "--per_device_train_batch_size", str(bs), "--gradient_accumulation_steps", str(acc),
                        "--shuffle_buffer", "1"])
        res.append(_metrics(out)[0][0])
    assert res[0]["loss"] == pytest.approx(res[1]["loss"], rel=1e-5)
    assert res[0]["grad_norm"] == pytest.approx(res[1]["grad_norm"], rel=1e-4)


def test_zero3_matches_zero2_and_handles_text_only_batches(shards, tmp_path):
    """The same script and flags on ds_configs/zero3.json: identical per-step losses and adapter (the prompts are
    gathered through their own module forward), also for batches without any image (the x0 vision keep-alive)."""
    # Persistence threshold 0: every parameter is really partitioned (with the tiny model's small tensors the
    # default threshold would keep them whole and leave ZeRO-3's code path untested).
    z3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(z3))
    configs = {"zero2": str(REPO / "ds_configs" / "zero2.json"), "zero3": str(tmp_path / "zero3.json")}
    outs = {}
    for cfg, path in configs.items():
        outs[cfg] = tmp_path / cfg
        run_inprocess(train_args(shards, outs[cfg], "--max_steps", "6", "--dataloader_num_workers", "0",
                             "--deepspeed", path))
    a, b = _metrics(outs["zero2"])[0], _metrics(outs["zero3"])[0]
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-5)
    ta = load_file(str(outs["zero2"] / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(outs["zero3"] / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb) and sum(t.numel() for t in tb.values()) == TINY_TRAINABLE
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)

    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                              {"from": "gpt", "value": str(i + 1)}]} for i in range(8)]
    (tmp_path / "text.json").write_text(json.dumps(recs))
    assert build_main(["--input", str(tmp_path / "text.json"), "--output", str(tmp_path / "ts"), "--workers", "1",
                       "--quiet"]) == 0
    res = run_inprocess(["--train_shards", str(tmp_path / "ts"), "--output_dir", str(tmp_path / "t3"),
                          "--report_to", "none", "--max_steps", "2", "--dataloader_num_workers", "0",
                          "--deepspeed", configs["zero3"]])
    assert res["step"] == 2


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_and_sigterm_saves(shards, tmp_path):
    common = ["--max_steps", "120", "--dist_timeout", "120", "--save_total_limit", "0"]
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(*train_args(shards, straight, *common)), env=ENV, check=True, timeout=600,
                   capture_output=True)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(*train_args(shards, out, *common)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 15:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log_text[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file(), log_text[-2000:]
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 15 <= stopped_at < 120, "the run finished before SIGTERM arrived"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpts[0].name
    assert {p.name for p in (ckpts[0] / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    # Debris a crash could leave: a half-written checkpoint must never be picked by --resume auto.
    (out / "checkpoints" / "step-99999999" / "ds").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-99999998").mkdir()
    (out / "checkpoints" / "latest").write_text("step-99999999\n")

    r = subprocess.run(train_cmd(*train_args(shards, out, *common)), env=ENV, timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ckpts[0]} at step {stopped_at}" in r.stderr

    a, b = _metrics(straight)[0], _metrics(out)[0]
    assert [x["step"] for x in b] == list(range(1, 121))  # no step lost or repeated
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]
    ta = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nprocs", [1, 2])
@pytest.mark.slow
def test_deepspeed_launcher_over_uneven_shards(shards, tmp_path, nprocs):
    """`deepspeed --num_gpus N` (gloo); with 2 ranks the 11 unequal shards split 6/5 with different sample counts,
    and both ranks must still take exactly the same number of steps (no hang: bounded by timeouts)."""
    cmd = deepspeed_cmd(nprocs, 29500 + os.getpid() % 1000 + nprocs,
                        *train_args(shards, tmp_path, "--max_steps", "30", "--dist_timeout", "60",
                                    "--per_device_train_batch_size", "4"))
    r = subprocess.run(cmd, env=ENV, timeout=400, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    end = _metrics(tmp_path)[1]
    assert end[0]["steps_per_rank"] == [30] * nprocs
    assert end[0]["samples"] == 30 * 4 * nprocs  # the end line counts every rank's samples, not rank 0's
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["world_size"] == nprocs and cfg["steps_per_epoch"] == 170 // (4 * nprocs)


def _fake_checkpoint(d: Path, marker: bool = True) -> Path:
    from pipeline.training.checkpoint import REQUIRED, _write_marker

    for f in REQUIRED:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text("x" * 10)
    if marker:
        _write_marker(d)
    return d


def test_find_resume_takes_only_verified_checkpoints(tmp_path):
    from pipeline.training.checkpoint import find_resume

    root = tmp_path / "checkpoints"
    ok = _fake_checkpoint(root / "step-00000010")
    _fake_checkpoint(root / "step-00000020", marker=False)  # never finished
    assert find_resume(tmp_path, "auto") == ok
    (root / "latest").write_text("step-00000020\n")
    assert find_resume(tmp_path, "auto") == ok
    damaged = _fake_checkpoint(root / "step-00000030")  # marker, then a file lost (a kill while pruning)
    (damaged / "ds" / "latest").unlink()
    (root / "latest").write_text("step-00000030\n")
    assert find_resume(tmp_path, "auto") == ok
    (ok / "trainer_state.json").write_text("short")  # size differs from what COMPLETE recorded
    assert find_resume(tmp_path, "auto") is None
    assert find_resume(tmp_path / "empty", "auto") is None
    with pytest.raises(FileNotFoundError, match="step-00000020: not a resumable checkpoint .no COMPLETE marker"):
        find_resume(tmp_path, str(root / "step-00000020"))
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing, e.g. ds/latest"):
        find_resume(tmp_path, str(damaged))


def test_ds_config_autofill_and_conflicts(tmp_path):
    from pipeline.train import parse_args
    from pipeline.training.engine import ds_config

    args = parse_args(["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2", "--bf16"])
    cfg = ds_config(str(REPO / "ds_configs" / "zero2.json"), args, world=4)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 8 but the flags say 3"):
        ds_config(str(bad), args, world=1)
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        ds_config(str(bad), args, world=1)


def test_training_progress_round_trips_through_json_with_int_slots():
    from pipeline.training.checkpoint import TrainingProgress

    p = TrainingProgress()
    p.consumed({"cursor": (3, 1, 17), "skipped": {"too_long": 2, "tar_read_errors": 1}})
    p.step = 5
    q = TrainingProgress()
    q.load_state_dict(json.loads(json.dumps(p.state_dict())), step=5)
    assert q == p and q.cursors == {3: [1, 17]}
    assert q.totals == {"skipped_too_long": 2, "tar_read_errors": 1}


def test_shards_built_for_other_visual_tokens_are_refused(shards, tmp_path, capsys):
    from pipeline.train import main

    assert build_main(["--input", str(shards / "sample" / "train.json"), "--image_root", str(shards / "sample"),
                       "--output", str(tmp_path / "s5"), "--visual_prompt_length", "5", "--workers", "1",
                       "--quiet"]) == 0
    assert main(["--train_shards", str(tmp_path / "s5"), "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                 "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 's5' / 'manifest.json'} was built for 21 visual tokens per image, but this model " \
           "and M2PT config give 26" in err


@pytest.mark.slow
def test_the_default_job_on_two_ranks_ends_cleanly_with_one_table(demo_data, tmp_path):
    """Before: trained, wrote the adapter, then 'error: trying to initialize the default process group twice!' and
    exit 2 (the closing table's evaluation started a second group). Now both ranks answer the table's questions on
    the trainer's group, rank 0 prints it once, every process exits 0."""
    out = tmp_path / "two"
    r = subprocess.run(deepspeed_cmd(2, 29400 + os.getpid() % 100, "--output_dir", str(out), "--max_steps", "6",
                                     "--report_to", "none"),
                       env=ENV | {"M2PT_DATA": str(demo_data)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("| run | sample digits |") == 1
    assert "trained 48 samples" in r.stdout and "in 6 steps" in r.stdout
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res) == {"majority answer", "base", "two"}
    assert res["base"]["provenance"]["world_size"] == 2
    assert res["two"]["tasks"]["sample_mnist"]["questions"] == 200
    # exit 0 from the launcher means every rank exited 0; and nothing aborted on the way out
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr


def _row_spread_isas() -> dict:
    """scripts/row_spread.py's kernel sets: the test forces AVX2 exactly as the README's band was measured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("row_spread", REPO / "scripts" / "row_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ISAS


def _readme_quickstart() -> tuple[list[str], list[str], dict]:
    """The README's printed block (its lines and table rows) and the band its `default` row is stated to land in:
    {column title: (low, high)}."""
    quick = (REPO / "README.md").read_text().split("## Quickstart")[1].split("## On your cluster")[0]
    block = quick.split("```text")[1].split("```")[0]
    titles = [c.strip() for c in next(ln for ln in block.splitlines() if ln.startswith("| run |")).split("|")[2:-1]]
    band_line = next(ln for ln in quick.splitlines() if ln.startswith("| a run lands in |"))
    cells = [c.strip() for c in band_line.split("|")[2:-1]]
    band = {t: tuple(float(x) for x in c.split(" – ")) for t, c in zip(titles, cells)}
    return block.strip().splitlines(), [ln for ln in block.splitlines() if ln.startswith("|")], band


def _row(line: str) -> list[float]:
    return [float(c) for c in line.split("|")[2:-1]]


def _outside(row: list[float], band: dict) -> list[str]:
    return [f"{t} {x} not in {lo}-{hi}" for (t, (lo, hi)), x in zip(band.items(), row) if not lo <= x <= hi]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_the_default_run_prints_the_readmes_table(demo_data, tmp_path, isa):
    """The README's main command as a fresh clone runs it: the embedded sample set and shards built on first use,
    1,830 steps on one thread whatever the machine's load (no OMP_NUM_THREADS here), then the zero-shot table.
    Exact where the figures are the same on every CPU: the counts, the table's head, the majority answer and base
    rows. The trained row is a float result of 1,830 steps that another CPU's kernels move (AVX-512 vs AVX2: up to
    6 points): it must land in the band the README states for it, which the base's row (an adapter that did not
    train) does not."""
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"} | {"M2PT_DATA": str(demo_data)}
    env |= _row_spread_isas()[isa]  # avx2: ATen's vectorised kernels, oneDNN's and MKL's, as on a CPU without AVX-512
    r = subprocess.run(train_cmd("--output_dir", str(tmp_path / "default")), env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "intra-op threads per rank: 1 (the embedded default" in r.stderr
    lines, shown, band = _readme_quickstart()
    assert lines[0] in r.stdout.splitlines()  # trained 7,320 samples (588,396 tokens) in 1830 steps; skipped 0
    printed = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(shown) == len(printed) == 5 and printed[:4] == shown[:4]
    assert printed[4].startswith("| default |") and list(band) == [c.strip() for c in shown[0].split("|")[2:-1]]
    assert not _outside(_row(printed[4]), band), (printed[4], _outside(_row(printed[4]), band))
    assert _outside(_row(shown[3]), band)  # the band tells a trained adapter from the base
    res = json.loads((tmp_path / "default" / "eval" / "results.json").read_text())
    assert set(res) == {"majority answer", "base", "default"}
    assert res["default"]["tasks"]["sample_mnist"]["questions"] == 200


def test_intra_op_threads_share_of_the_cores_lowered_under_load(monkeypatch):
    from pipeline import launcher as dist

    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dist.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert dist.intra_op_threads(None, 1)[0] == 4 and dist.intra_op_threads(None, 2)[0] == 2
    monkeypatch.setattr(dist.os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # two busy processes beside us
    n, why = dist.intra_op_threads(None, 1)
    assert n == 2 and "2.0 free by the 1-min load average" in why
    monkeypatch.setattr(dist.os, "getloadavg", lambda: (7.5, 0.0, 0.0))
    assert dist.intra_op_threads(None, 2)[0] == 1
    assert dist.intra_op_threads(3, 2) == (3, "--num_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert dist.intra_op_threads(None, 1) == (5, "OMP_NUM_THREADS")


def test_embedded_shards_are_kept_per_visual_token_count():
    """One shared folder would make --visual_prompt_length 20 (36 tokens per image) refuse shards measured for 26."""
    from pipeline.defaults import DATA_HOME, demo_shards_dir
    from pipeline.train import parse_args
    from pipeline.training.config import resolve_m2pt_config
    from pipeline.training.plan import expected_visual_tokens

    def folder(*flags):
        args = parse_args(["--output_dir", "/tmp/unused", *flags])
        return demo_shards_dir(expected_visual_tokens(args, resolve_m2pt_config(args)))

    assert folder() == DATA_HOME / "sample_shards-vt26"
    assert folder("--visual_prompt_length", "20") == DATA_HOME / "sample_shards-vt36"
    assert folder("--method", "lora") == DATA_HOME / "sample_shards-vt16"


def test_a_cpu_run_names_its_accelerator_instead_of_warning_that_it_found_none(shards, tmp_path):
    """Without DS_ACCELERATOR, DeepSpeed's detection warned "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it." in every rank (issue 35); a rank now names the CPU itself where no
    accelerator is there, and a value the user set is kept."""
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run(train_cmd(*train_args(shards, tmp_path / "run", "--max_steps", "2")), env=env,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Setting accelerator" not in r.stdout + r.stderr
    assert "trained 8 samples" in r.stdout
    from pipeline import launcher

    nothing_else = not torch.cuda.is_available()  # on a GPU machine DeepSpeed's own detection picks it
    for given, left in ((None, "cpu" if nothing_else else None), ("cuda", "cuda")):
        env = dict(os.environ)
        try:
            os.environ.pop("DS_ACCELERATOR", None)
            if given:
                os.environ["DS_ACCELERATOR"] = given
            launcher.name_cpu_accelerator()
            assert os.environ.get("DS_ACCELERATOR") == left
        finally:
            os.environ.clear()
            os.environ.update(env)
