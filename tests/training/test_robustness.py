"""Runs that can't be lost or silently corrupted: each test is a fault a user or a cluster inflicts, and
each failed before its fix - the re-save kill window, a truncated shard, two runs on one folder, a Llama folder as
--model, SIGTERM to the deepspeed launcher, a full disk, zero-valued flags, a broken config file."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import ENV, REPO, deepspeed_cmd, read_metrics, run_inprocess, train_args, train_cmd


def _copy_shards(shards: Path, dst: Path) -> Path:
    shutil.copytree(shards / "shards", dst / "shards")
    return dst


def _wait_for_steps(out: Path, n: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(read_metrics(out)[0]) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"no {n} logged steps within {timeout} s")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_resave_killed_while_deleting_the_old_copy_stays_resumable(shards, tmp_path, monkeypatch):
    """A finished run launched again re-saves its last step. Before: the old folder was deleted while `latest`
    still named it, and a kill in that window left COMPLETE beside a half-deleted folder - every later resume died
    in DeepSpeed. Reproduced deterministically: the deletion 'dies' halfway."""
    from pipeline.core.m2pt import adapter_state_dict, save_adapter
    from pipeline.training import checkpoint

    res = run_inprocess(train_args(shards, tmp_path, "--max_steps", "2", "--dataloader_num_workers", "0"))
    engine, root = res["engine"], tmp_path / "checkpoints"
    old = root / "step-00000002"
    assert checkpoint.verify(old) is None

    real_rmtree = shutil.rmtree

    def killed_halfway(path, *a, **k):
        if Path(path) == old:
            files = sorted(p for p in old.rglob("*") if p.is_file())
            for p in files[: len(files) // 2]:
                p.unlink()
            raise KeyboardInterrupt("kill -9")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(engine, lambda d, t: save_adapter(engine.module, d, state_dict=t), tmp_path, 2, 0, 1,
                        {"reason": "re-save"}, {"cursors": {}, "totals": {}}, lambda: adapter_state_dict(engine.module),
                        2)
    monkeypatch.undo()
    assert checkpoint.verify(old) is not None  # the half-deleted copy is recognised as such
    found = checkpoint.find_resume(tmp_path, "auto")
    assert found == root / ".tmp-step-00000002" and checkpoint.verify(found) is None

    # ... and a real resume from there works, and its next save puts the step back under its own name.
    res = run_inprocess(train_args(shards, tmp_path, "--max_steps", "3", "--dataloader_num_workers", "0"))
    assert res["step"] == 3
    assert (root / "latest").read_text().strip() == "step-00000003"
    assert checkpoint.verify(root / "step-00000003") is None and not list(root.glob(".tmp-*"))
    assert checkpoint.verify(old) is None  # the intact copy took its step's name back


@pytest.mark.slow
def test_damaged_checkpoint_named_with_resume_is_one_line_before_the_model_loads(shards, tmp_path):
    from pipeline.training import checkpoint

    run_inprocess(train_args(shards, tmp_path, "--max_steps", "1", "--dataloader_num_workers", "0"))
    ck = tmp_path / "checkpoints" / "step-00000001"
    (ck / "ds" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint.find_resume(tmp_path, "auto") is None  # nothing else verifies: a fresh start, not a crash
    r = subprocess.run(train_cmd(*train_args(shards, tmp_path / "o2", "--resume", str(ck))), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --resume {ck}: not a resumable checkpoint (1 file(s) missing, e.g. "
        "ds/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt)")
    assert "trainable parameters" not in r.stderr  # before the model loaded


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a small tmpfs")
@pytest.mark.slow
def test_disk_full_names_enospc_removes_the_partial_copy_and_keeps_the_previous(shards, tmp_path):
    """Before: 'basic_ios::clear: iostream error' and a partial .tmp-step-* left behind."""
    out = tmp_path / "small"
    out.mkdir()
    # One checkpoint of the tiny model is ~0.73 MB: the first fits, the second runs out of space.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(out)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        # (one loader worker: a rank that ends on an error must still exit, not wait on its worker forever)
        r = subprocess.run(train_cmd(*train_args(shards, out, "--max_steps", "4", "--save_steps", "2",
                                                 "--dataloader_num_workers", "1")),
                           env=ENV, capture_output=True, text=True, timeout=300)
        err = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1, r.stderr[-3000:]
        assert err.startswith("error: No space left on device writing a checkpoint to ") and err.endswith(
            "removed the partial .tmp-step-00000004; step-00000002 is intact"), err
        from pipeline.training.checkpoint import verify

        root = out / "checkpoints"
        assert not list(root.glob(".tmp-*")) and verify(root / "step-00000002") is None
        assert (root / "latest").read_text().strip() == "step-00000002"
        state = json.loads((out / "run_state.json").read_text())
        assert state["state"] == "failed" and "No space left on device" in state["error"]
    finally:
        subprocess.run(["umount", "-l", str(out)])


# ------------------------------------------------------------------------------------------------------ shards
@pytest.mark.slow
def test_truncated_shard_is_an_error_naming_it_before_the_model_loads(shards, tmp_path):
    """Before: a shard cut to half its size trained to the end with exit 0 and 16 of 60 samples never seen."""
    d = _copy_shards(shards, tmp_path)
    victim = d / "shards" / "shard-000003.tar"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    r = subprocess.run(train_cmd(*train_args(d, tmp_path / "o")), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert f"error: shard {victim}: {size // 2} bytes but {d / 'shards' / 'manifest.json'} records {size}" in r.stderr
    assert "trainable parameters" not in r.stderr

    victim.write_bytes((shards / "shards" / "shard-000003.tar").read_bytes()[:-1] + b"!")  # same size, other bytes
    r = subprocess.run(train_cmd(*train_args(d, tmp_path / "o", "--verify_shards")), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and f"error: shard {victim}: sha256 differs" in r.stderr


def test_samples_lost_in_a_broken_shard_are_counted_as_samples(shards, tmp_path):
    """A tar that breaks mid-read (replaced while training, or shards without a size check) loses the samples the
    manifest promised; they count toward --max_bad_sample_fraction, not as a single read error."""
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream, resolve_shards
    from pipeline.demo.tiny import build_tiny
    from pipeline.errors import UsageError
    from pipeline.training.records import check_bad_samples

    d = _copy_shards(shards, tmp_path)
    found = resolve_shards(str(d / "shards"))
    victim = d / "shards" / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    base = build_tiny()
    pre = Preprocess(VicunaTemplate(base.tokenizer, base.model.config.image_token_id, 26), base.image_processor, 512)
    stream = ShardStream(found.paths, rank=0, world=1, seed=0, batch_size=1, preprocess=pre, pad_id=0,
                         shuffle_buffer=0, counts=found.counts)
    read, skipped = 0, Counter()
    for b in stream:
        skipped.update(b["skipped"])  # counts ride on the next batch, so also take the next epoch's first one's
        if b["cursor"][1] > 0:  # the next epoch began: one full pass is done
            break
        read += 1
    lost = skipped["lost_in_broken_shard"]
    # 16 listed: some read, a torn one skipped as image_mismatch, the rest lost - every sample accounted for.
    assert read + sum(v for k, v in skipped.items() if k != "tar_read_errors") == 170 and lost >= 6, (read, skipped)
    n_skipped = 170 - read  # 8 of 170 = 4.7 %
    counts = {"samples": read, "skipped": n_skipped, "skipped_lost_in_broken_shard": lost}
    check_bad_samples(counts, 0.05, 170)  # within the limit
    with pytest.raises(UsageError, match=rf"{n_skipped} of 170 samples read so far were skipped .*lost_in_broken_sh"):
        check_bad_samples(counts, 0.04, 170)


# --------------------------------------------------------------------------------------------- the output folder
@pytest.mark.slow
def test_second_run_on_a_busy_output_dir_is_refused_naming_the_holder(shards, tmp_path):
    """Before: both runs exited 0 with interleaved metrics and overwritten checkpoints. Then, under load (two busy
    processes beside it, as in a CI run), the refusal printed its line and died of SIGABRT ("terminate called
    without an active exception": its gloo group was left to interpreter finalization), exit -6 instead of 2."""
    import socket

    from pipeline.training.run_control import OutputLock

    lock = OutputLock(tmp_path)
    lock.acquire()  # what a live run holds
    (tmp_path / "run_state.json").write_text('{"state": "running"}\n')
    busy = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 120\nwhile time.time() < t: pass"])
            for _ in range(2)]
    try:
        r = subprocess.run(train_cmd(*train_args(shards, tmp_path)), env=ENV, capture_output=True, text=True,
                           timeout=300)
    finally:
        lock.release()
        for p in busy:
            p.kill()
            p.wait()
    assert "terminate called" not in r.stderr
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"error: --output_dir {tmp_path} is in use by another training run (host {socket.gethostname()}, "
            f"pid {os.getpid()}, since ") in r.stderr
    assert json.loads((tmp_path / "run_state.json").read_text()) == {"state": "running"}  # the holder's, untouched
    assert not (tmp_path / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------- checks before any work
def _llava_config_only(d: Path) -> Path:
    from pipeline.demo.tiny import build_tiny

    build_tiny().model.config.save_pretrained(d)
    return d


def _llama_folder(d: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=100)).save_pretrained(d)
    return d


@pytest.mark.parametrize("folder,message", [
    (_llama_folder, "model_type 'llama' is not a LLaVA model (llava); for LLaVA-v1 parts"),
    (_llava_config_only, "config.json but no weights"),
])
@pytest.mark.slow
def test_wrong_model_folder_fails_before_loading_with_bounded_memory(shards, tmp_path, folder, message):
    """Before: a Llama folder was loaded into LLaVA defaults (18.5 GB RSS, OOM-killed after 262 s); a folder
    without weights gave a raw OSError traceback."""
    model = folder(tmp_path / "model")
    def cap_memory():  # a regression must fail here, not take the machine down (the old code reached 20 GB)
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    proc = subprocess.Popen(train_cmd(*train_args(shards, tmp_path / "o", "--model", str(model))), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cap_memory)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    assert os.waitstatus_to_exitcode(status) == 2, err[-2000:]
    assert f"error: --model {model}: {message}" in err and "Traceback" not in err
    assert usage.ru_maxrss < 2 * 2**20  # KiB: well under 2 GiB, i.e. no model was built


@pytest.mark.parametrize("flag", ["--per_device_train_batch_size", "--gradient_accumulation_steps", "--logging_steps"])
def test_zero_valued_flags_are_one_line_errors(flag, capsys):
    """Before: ZeroDivisionError tracebacks (--logging_steps 0 only after the first step)."""
    from pipeline.train import main

    with pytest.raises(SystemExit) as e:
        main([flag, "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {flag} must be >= 1 (see --help)\n"


def test_broken_deepspeed_config_is_named(shards, tmp_path, capsys):
    from pipeline.train import main

    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    assert main(train_args(shards, tmp_path / "o", "--deepspeed", str(bad))) == 2
    assert capsys.readouterr().err.startswith(f"error: --deepspeed {bad}: not valid JSON: Expecting property name")


def test_init_adapter_with_conflicting_method_flags_is_an_error(shards, tmp_path, capsys):
    """Before: it trained 10/10 prompts while config.json recorded the flags' 5/3."""
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny
    from pipeline.train import main

    save_adapter(attach_m2pt(build_tiny().model, M2PTConfig()), tmp_path / "adapter")
    argv = train_args(shards, tmp_path / "o", "--init_adapter", str(tmp_path / "adapter"),
                      "--visual_prompt_length", "5", "--text_prompt_length", "3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "conflicting flag(s): --visual_prompt_length 5 (adapter: 10), --text_prompt_length 3 (adapter: 10)" in err
    # The same values as the adapter's are fine, and what config.json records is what trained.
    res = run_inprocess(train_args(shards, tmp_path / "ok", "--init_adapter", str(tmp_path / "adapter"),
                                   "--visual_prompt_length", "10", "--max_steps", "1", "--dataloader_num_workers", "0"))
    assert res["step"] == 1


# ------------------------------------------------------------------------------------------------------ signals
def test_a_stop_request_arriving_after_the_run_does_not_kill_the_rank():
    """srun forwards USR1 to every node; it can reach a rank after the ranks agreed to stop and checkpointed. Before,
    the restored default action killed that rank ("task 1: User defined signal 1") and the job was not requeued.
    SIGTERM still ends a process after the run (one stuck at exit must die of it)."""
    code = ("import os, signal, time\n"
            "from pipeline.training.run_control import StopFlag\n"
            "flag = StopFlag().install(False)\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "assert flag.poll() == 'SIGUSR1'\n"
            "flag.restore()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.2)\n"
            "print('alive after a late USR1', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert "alive after a late USR1" in r.stdout, r.stderr
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stderr)


@pytest.mark.parametrize("how", ["sigterm_to_deepspeed", "ctrl_c_to_the_group", "sigterm_to_torchrun"])
@pytest.mark.slow
def test_stopping_the_deepspeed_launcher_checkpoints_on_every_rank(shards, tmp_path, how):
    """Before: SIGTERM to `deepspeed` left the ranks training as orphans; SIGTERM from the per-node launcher also
    hit the DataLoader workers, and the ranks died with a traceback and no checkpoint. Two ranks, one loader
    worker each."""
    out = tmp_path / "o"
    port = 29600 + os.getpid() % 1000
    args = train_args(shards, out, "--max_steps", "100000", "--dist_timeout", "60")
    if how == "sigterm_to_torchrun":  # torchrun forwards SIGTERM to each rank's process group (loader workers too)
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "pipeline" / "train.py"), *args]
    else:
        cmd = deepspeed_cmd(2, port, *args)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_steps(out, 5, proc)
        if how != "ctrl_c_to_the_group":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        log = proc.communicate(timeout=120)[0]  # read until every rank and the node launcher have closed it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # (Ctrl-C prints the `deepspeed` script's own KeyboardInterrupt traceback; none may come from a rank.)
    assert "killed by signal" not in log and not re.search(r'File ".*/pipeline/', log), log[-4000:]
    state = json.loads((out / "run_state.json").read_text())
    assert state["state"] == "stopped", log[-3000:]
    from pipeline.training.checkpoint import verify

    ck = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert verify(ck) is None and {p.name for p in ck.glob("rank-*.json")} == {"rank-00000.json", "rank-00001.json"}
    assert int(ck.name.split("-")[1]) == state["step"] >= 5
    if how == "sigterm_to_deepspeed":  # the node launcher outlived `deepspeed` and saw both ranks exit 0
        assert log.count("exits successfully") == 2, log[-3000:]


@pytest.mark.slow
def test_a_rank_ending_on_an_uncaught_error_does_not_wait_on_its_loader_worker(shards, tmp_path):
    """Loader workers ignore SIGTERM; multiprocessing's exit handler stops leftover workers with SIGTERM and waits.
    A rank ending on an uncaught exception (a bug: here one injected into the final step) waited there forever,
    because the traceback kept the loader alive until interpreter exit."""
    out = tmp_path / "o"
    code = ("import sys, pipeline.train as t\n"
            "def boom(r): raise TypeError('injected')\n"
            "t.finish = boom\n"
            f"sys.exit(t.main({train_args(shards, out, '--max_steps', '3', '--dataloader_num_workers', '1')!r}))\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the rank did not exit within 120 s") from None
    assert r.returncode == 1 and "TypeError: injected" in r.stderr
    assert json.loads((out / "run_state.json").read_text()) == {"state": "failed", "error": "TypeError: injected"}
