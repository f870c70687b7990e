import os
import signal
import time
import uuid
from pathlib import Path

# Every process the tests start inherits this mark (subprocesses, launchers, servers, the Slurm daemons and jobs):
# the last check of the session finds what is still alive by it. Each session has its own, so a pytest run by a
# test is told apart from the one that runs it.
SESSION_MARK = f"M2PT_TEST_SESSION={uuid.uuid4().hex}"
os.environ["M2PT_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # in-process trainings keep the test process at one thread

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _launcher_env_restored():
    """In-process training fills RANK / WORLD_SIZE / MASTER_PORT into os.environ (pipeline.training.dist): don't let
    them leak into later tests' subprocesses (a Slurm job would inherit 'rank 0 of 1' and a used port)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tiny():
    from pipeline.demo.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """170 records of the sample set in 11 shards of unequal size (10 x 16 + 10), under shards/ (+ sample/)."""
    from data_prep.build_shards import main as build_main
    from pipeline.demo.sample_data import build as make_sample

    d = tmp_path_factory.mktemp("data")
    make_sample(d / "sample", per_task=20, text_only=10, heldout_per_task=2, seed=0)
    assert build_main(["--input", str(d / "sample" / "train.json"), "--image_root", str(d / "sample"),
                       "--output", str(d / "shards"), "--samples_per_shard", "16", "--shuffle", "--workers", "1",
                       "--quiet"]) == 0
    return d


# ------------------------------------------------------------------------------------- nothing outlives the suite
def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _is_ours(pid: int, me: int) -> bool:
    """Started by this session: it carries the session's mark, or descends from this process (a forked child's
    environment is the parent's at exec, which the mark set later is not part of)."""
    try:
        if SESSION_MARK.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return True
    except OSError:  # gone, or a zombie
        return False
    p = pid
    for _ in range(64):
        p = _ppid(p)
        if p <= 1:
            return False
        if p == me:
            return True
    return False


def leftover_processes() -> list[str]:
    """`pid command` of each live process this session started (zombies excluded: they hold nothing)."""
    me, left = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if "multiprocessing.resource_tracker" in cmd:  # this process's own helper: it ends when we do
            continue
        if state not in ("Z", "X") and _is_ours(int(d.name), me):
            left.append(f"{d.name} {cmd[:160]}")
    return left


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a process the tests started is still alive (after a grace of a few seconds for those
    being stopped); kill them, so the failure is the only thing they leave."""
    if not Path("/proc").is_dir():
        return
    deadline = time.time() + 10
    left = leftover_processes()
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = leftover_processes()
    if not left:
        return
    for line in left:
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = "processes started by the tests were still running at the end (killed now):\n  " + "\n  ".join(left)
    if reporter is not None:
        reporter.write_line(msg, red=True)
    else:
        print(msg)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
