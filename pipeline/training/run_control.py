"""What keeps a training run from being lost or corrupted by the world around it: one run per output folder, and a
stop request that every launcher can deliver.

Which signal stops a run cleanly (a checkpoint at the next step boundary, then exit status 0 on every rank):

  * `deepspeed pipeline/train.py …` on one node: SIGTERM or SIGINT (Ctrl-C) to the `deepspeed` command. It does not
    forward signals on one node and simply dies, so each rank watches it (and its per-node `deepspeed.launcher.launch`
    child, through PR_SET_PDEATHSIG) and stops when it is gone. SIGTERM to the per-node launcher also works: it
    SIGTERMs every rank and its loader workers, and kills what is left after 30 s - the checkpoint must fit in that.
  * `torchrun`: SIGTERM / SIGINT to torchrun; it forwards the signal to the ranks (and kills them after its own
    timeout).
  * Slurm: `scancel` (SIGTERM to every task, SIGKILL after the cluster's KillWait, 30 s by default), or
    `scancel --signal=USR1 --batch` / the time-limit signal of slurm/train_m2pt.sh, which the batch script forwards.
  * a rank directly: SIGTERM, SIGINT or SIGUSR1. A second SIGINT stops at once, without a checkpoint.

DataLoader workers ignore SIGTERM/SIGINT: launchers that signal the whole process tree would otherwise kill them,
and the rank would die with "DataLoader worker … is killed by signal" instead of saving. A worker still exits when
its rank does (PyTorch's workers watch their parent).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UsageError

log = logging.getLogger(__name__)
LOCK_FILE = ".train.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


# ------------------------------------------------------------------------------------------ one run per folder
class OutputDirBusy(UsageError):
    """Another live run holds the output folder."""


class OutputLock:
    """An advisory `fcntl` lock on OUTPUT/.train.lock, held by rank 0 for the life of the run. The OS drops it when
    the process dies (kill -9 included), so a stale file never blocks a later run. The file names the holder."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self._f = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            raise OutputDirBusy(
                f"--output_dir {self.path.parent} is in use by another training run (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for it to end or choose "
                "another --output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
        self._f = f

    @property
    def held(self) -> bool:
        return self._f is not None

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the flock
            self._f = None


# ------------------------------------------------------------------------------------------------ stop requests
def _stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces): [state, ppid, ...]; [] when
    the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_start_time(pid: int) -> str | None:
    """Start time of a live process (field 22), to tell a live launcher from a reused pid; None when it is gone or
    a zombie (a dead launcher whose parent has not reaped it yet is still dead)."""
    fields = _stat(pid)
    return None if not fields or fields[0] in ("Z", "X") else fields[19]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _deepspeed_runner() -> tuple[int, str] | None:
    """(pid, start time) of the `deepspeed` command above this rank, when the rank was started by it: the rank's
    parent runs `deepspeed.launcher.launch` and the grandparent is the `deepspeed` script."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return None
    fields = _stat(parent)
    grand = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    if grand <= 1 or not any(Path(a).name == "deepspeed" for a in _cmdline(grand)[:2]):
        return None
    start = _proc_start_time(grand)
    return (grand, start) if start else None


def _set_parent_death_signal(sig: int) -> None:
    """Linux: deliver `sig` to this process when its parent (the per-node launcher) dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


class StopFlag:
    """Turns stop signals and the death of the launcher into a flag the loop reads at step boundaries (the handler
    does nothing else: saving inside a signal handler could interleave with a collective)."""

    def __init__(self):
        self.reason: str | None = None
        self._runner = None

    def install(self, under_launcher: bool) -> "StopFlag":
        """under_launcher: a launcher (deepspeed, torchrun, srun) started this process. Only then is the parent's
        death a stop request: a plain `python train.py` under nohup must outlive its shell."""
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        if under_launcher:
            _set_parent_death_signal(signal.SIGTERM)
        self._runner = _deepspeed_runner()
        if self._runner:
            log.info("watching the deepspeed launcher (pid %d): the run stops with a checkpoint if it exits",
                     self._runner[0])
        return self

    def restore(self) -> None:
        """Once the run is over (finished, stopped or failed), signals act as before again: a process stuck at exit
        must still die of SIGTERM. Except a default SIGUSR1, which is ignored from then on: a stop request that comes
        after the run has nothing left to stop. Why: srun forwards the batch shell's USR1 to every node, and under load
        it can reach one rank after the ranks have agreed to stop (on another rank's flag) and checkpointed; the
        default action then killed that rank, srun reported the step failed and the job was not requeued (seen in
        tests/training/test_slurm.py's preemption test, with CI sharing the 2 cores)."""
        for s, h in getattr(self, "_previous", {}).items():
            signal.signal(s, signal.SIG_IGN if (s, h) == (signal.SIGUSR1, signal.SIG_DFL) else h)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.reason == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.reason = self.reason or signal.Signals(signum).name

    def poll(self) -> str | None:
        if self.reason is None and self._runner and _proc_start_time(self._runner[0]) != self._runner[1]:
            self.reason = "the deepspeed launcher exited"
        return self.reason


def quiet_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave stop signals to the rank (see the module docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_loader(loader_iter) -> None:
    """Stop a DataLoader iterator's workers now, on every exit path of the rank.

    Why: the workers ignore SIGTERM (above), and multiprocessing's exit handler stops leftover workers with
    SIGTERM and then waits for them - forever. A normal run's iterator is collected (and its workers told to stop)
    before that, but after an exception the traceback keeps it alive until interpreter exit. So: PyTorch's own
    graceful shutdown (private API, hence the getattr), then SIGKILL for a straggler."""
    shutdown = getattr(loader_iter, "_shutdown_workers", None)
    if shutdown is None:  # num_workers=0: nothing to stop
        return
    shutdown()
    for w in getattr(loader_iter, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
