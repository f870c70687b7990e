"""The suite's own last check: a process a test started and left running fails the run (tests/conftest.py)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get("M2PT_LEAK_INTO"), reason="run only by the test below, in a pytest of its own")
def test_leaks_a_process():
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)  # neither waited for nor stopped
    Path(os.environ["M2PT_LEAK_INTO"]).write_text(str(p.pid))


def test_a_process_left_running_fails_the_session_and_is_killed(tmp_path):
    pid_file = tmp_path / "leaked.pid"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{Path(__file__).name}::test_leaks_a_process"], cwd=REPO / "tests",
                       env=dict(os.environ, M2PT_LEAK_INTO=str(pid_file)), capture_output=True, text=True,
                       timeout=120)
    pid = int(pid_file.read_text())
    assert "1 passed" in r.stdout  # the test itself passed: the session's check is what fails the run
    assert r.returncode == 1, r.stdout[-2000:]
    assert "processes started by the tests were still running at the end (killed now)" in r.stdout
    assert f"{pid} sleep 300" in r.stdout
    for _ in range(50):  # killed by the check (a zombie until its parent, init here, reaps it)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the leaked process {pid} is still running")
