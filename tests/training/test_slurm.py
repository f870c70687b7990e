"""slurm/train_m2pt.sh against a real Slurm controller: two simulated nodes on localhost
(tests/training/slurm/cluster.sh).

Runs the file users submit, unchanged: only resources are overridden on the sbatch line (--gpus-per-node=0 etc.)
and MASTER_ADDR=127.0.0.1, because the simulated node names do not resolve.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.build_shards import main as build_main
from pipeline.demo.sample_data import build as make_sample

REPO = Path(__file__).resolve().parents[2]
HAVE_SLURM = shutil.which("slurmctld") is not None and os.geteuid() == 0
if not HAVE_SLURM and os.environ.get("CI") == "true":
    raise RuntimeError("CI must run the Slurm tests: .ci/run failed to install slurm-wlm + munge")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_SLURM, reason="needs root and Debian's slurm-wlm + munge "
                                                        "(.ci/run installs them)")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(REPO / "tests" / "training" / "slurm" / "cluster.sh"), "start", str(d)],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        env = dict(os.environ, SLURM_CONF=r.stdout.strip().splitlines()[-1])
        yield env, d
    finally:  # the daemons go, whatever happened
        subprocess.run(["bash", str(REPO / "tests" / "training" / "slurm" / "cluster.sh"), "stop", str(d)], timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-data")
    make_sample(d / "sample", per_task=20, text_only=10, heldout_per_task=2, seed=0)
    assert build_main(["--input", str(d / "sample" / "train.json"), "--image_root", str(d / "sample"),
                       "--output", str(d / "shards"), "--samples_per_shard", "16", "--workers", "1", "--quiet"]) == 0
    return d / "shards"


def _submit(script, env, out, exports, extra, wait):
    """`sbatch` a 2-node, 1-task-per-node job of slurm/`script` with `exports`, its log at OUT.log."""
    exports = {"MASTER_ADDR": "127.0.0.1", "OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               **exports}
    cmd = ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "1", "--gpus-per-node=0", "--cpus-per-task", "1",
           "--time", "30", "-o", str(out) + ".log",
           "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()), *extra]
    if wait:
        cmd.append("--wait")
    cmd.append(str(REPO / "slurm" / script))
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _sbatch(env, out, shards, train_args, *extra, wait=True, python=None):
    return _submit("train_m2pt.sh", env, out, {"TRAIN_SHARDS": str(shards), "TRAIN_ARGS": train_args,
                                               "DS_ACCELERATOR": "cpu", "PYTHON": python or sys.executable},
                   extra, wait)


def _metrics(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if r.get("event") == "end"]


ARGS = "--max_steps 120 --logging_steps 1 --save_steps 0 --report_to none --dist_timeout 120"


@pytest.fixture(scope="module")
def straight(cluster, shards, tmp_path_factory):
    env, _ = cluster
    out = tmp_path_factory.mktemp("runs") / "straight"
    t0 = time.time()
    r = _sbatch(env, out, shards, ARGS)
    log = Path(str(out) + ".log").read_text() if Path(str(out) + ".log").exists() else ""
    assert r.returncode == 0, r.stderr + log[-4000:]
    return out, time.time() - t0


def test_two_nodes_train_and_take_the_same_steps(straight):
    out, seconds = straight
    end = _metrics(out)[1]
    assert end and end[-1]["steps_per_rank"] == [120, 120]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run_state.json").read_text())["state"] == "finished"


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_adapter(cluster, shards, straight, tmp_path):
    env, _ = cluster
    ref, _ = straight
    out = tmp_path / "preempted"
    r = _sbatch(env, out, shards, ARGS, wait=False)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    # One deadline for the whole job (20 steps, stop, requeue, 100 more steps): about 2.5 min alone; 300 s was missed
    # once with CI sharing the 2 cores with two training runs. The loops below end as soon as each state is reached.
    deadline = time.time() + 600
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 20:
            break
        time.sleep(0.05)
    # What --signal=B:USR1@600 does at the time limit: signal the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    while time.time() < deadline:
        st = out / "run_state.json"
        if st.exists() and json.loads(st.read_text())["state"] == "finished":
            break
        time.sleep(0.5)
    log = Path(str(out) + ".log").read_text()
    assert json.loads((out / "run_state.json").read_text())["state"] == "finished", log[-4000:]
    assert "got USR1: forwarding" in log and "requeueing job" in log, log[-4000:]
    assert "restart 1)" in log  # the second run of the same job id
    stopped = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert stopped and max(stopped) == 120
    losses, end = _metrics(out)
    assert [x["step"] for x in losses] == list(range(1, 121))  # resumed, not restarted
    ref_losses = _metrics(ref)[0]
    for a, b in zip(ref_losses, losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    ta = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_a_crashing_rank_brings_the_job_down_promptly(cluster, shards, tmp_path):
    env, _ = cluster
    wrapper = tmp_path / "python_rank1_dies.sh"
    wrapper.write_text(f"""#!/usr/bin/env bash
# rank 1 is killed -9 once it is training; rank 0 would wait in a collective for --dist_timeout (600 s)
if [ "${{SLURM_PROCID:-0}}" = 1 ]; then (sleep 12; kill -9 $$) & fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    t0 = time.time()
    r = _sbatch(env, tmp_path / "crash", shards,
                "--max_steps 100000 --logging_steps 50 --save_steps 0 --report_to none --dist_timeout 600",
                python=str(wrapper))
    elapsed = time.time() - t0
    log = Path(str(tmp_path / "crash") + ".log").read_text()
    assert r.returncode != 0, log[-3000:]
    assert elapsed < 120, f"job took {elapsed:.0f} s: a rank hung instead of being killed"
    assert "requeueing" not in log


def _sbatch_eval(env, out, eval_args, *extra, wait=True):
    return _submit("eval_m2pt.sh", env, out, {"TASKS": "", "WITH_BASE": "1", "EVAL_ARGS": eval_args,
                                              "PYTHON": sys.executable}, extra, wait)


def test_evaluation_on_two_nodes_equals_one_process_and_continues_after_a_requeue(cluster, tmp_path):
    """slurm/eval_m2pt.sh on 2 nodes x 1 rank: the predictions and metrics of one plain process. Then a job
    signalled as at its time limit: it requeues itself and the second run answers only what the first left."""
    env, _ = cluster
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--output_dir", str(single), "--limit", "7"],
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "two"
    r = _sbatch_eval(env, out, "--limit 7")
    log = Path(str(out) + ".log").read_text() if Path(str(out) + ".log").exists() else ""
    assert r.returncode == 0, r.stderr + log[-4000:]
    assert (out / "base" / "predictions.jsonl").read_text() == (single / "base" / "predictions.jsonl").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["tasks"] == json.loads((single / "results.json").read_text())["base"]["tasks"]
    assert results["base"]["provenance"]["world_size"] == 2

    out = tmp_path / "requeued"
    r = _sbatch_eval(env, out, "--limit 60 --batch_size 1", wait=False)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    answers = out / "base" / "answers"
    deadline = time.time() + 600
    while time.time() < deadline and sum(len(f.read_text().splitlines()) for f in answers.glob("*.jsonl")) < 20:
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    while time.time() < deadline and not (out / "results.json").exists():
        time.sleep(0.5)
    log = Path(str(out) + ".log").read_text()
    assert (out / "results.json").exists(), log[-4000:]
    assert "got USR1: requeueing" in log and "restart 1)" in log, log[-4000:]
    prov = json.loads((out / "results.json").read_text())["base"]["provenance"]
    assert prov["reused"] >= 20 and prov["generated"] + prov["reused"] == 4 * 60
