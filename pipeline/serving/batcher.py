"""The one thread that runs the model: requests that arrive within a short window (or until the batch is full) are
decoded together, whatever adapters they use (pipeline/serving/mixed.py), and each request's tokens are handed back
to its waiting HTTP handler as they are generated.

Why one thread: the model is shared, and the vision hooks of an adapter are attached to it around that adapter's
rows. Scheduling is per decode step (continuous batching, `mixed.Decoding`): a row leaves its batch when it finishes
or its client goes (`Row.cancelled`), and is answered then; requests that arrive while a batch decodes join it before
its next step, up to --max_batch_size rows, so a short request does not wait for a long batch to end. With
`continuous=False` (--no_continuous_batching, for comparison) a batch runs until its last row has left and requests
arriving meanwhile wait for the next one.

A batch that fails answers only the rows that make it fail: its rows are decoded again one by one (the tokens a
client already has are not sent twice: greedy rows and seeded draws give the same tokens again), so one poisoned
request is its own 500 and the others in its batch are answered as if it had not been there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass

from pipeline.serving.bank import AdapterBank
from pipeline.serving.mixed import Decoding, Row

log = logging.getLogger("m2pt.serve")


@dataclass
class Job:
    row: Row
    out: asyncio.Queue  # ("token", id) ... then ("end", "stop" | "length") or ("error", message)
    loop: asyncio.AbstractEventLoop

    def push(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


class Batcher:
    def __init__(self, bank: AdapterBank, window_ms: float, max_batch_size: int, mix_adapters: bool = True,
                 continuous: bool = True):
        self.bank, self.window, self.max_batch = bank, window_ms / 1000.0, max_batch_size
        self.mix = mix_adapters  # False: a batch holds one adapter's rows (what serving without mixing does)
        self.continuous = continuous  # False: no row joins a batch once it decodes
        self.queue: queue.Queue = queue.Queue()
        self.held: collections.deque = collections.deque()  # jobs set aside for a later batch (mix off)
        self.batches = 0  # how many batches ran, and their sizes (the benchmark reads them)
        self.sizes: list[int] = []
        self.thread = threading.Thread(target=self._run, name="m2pt-batcher", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> asyncio.Queue:
        """Queue `row`; its tokens arrive on the returned queue (call from the event loop)."""
        out: asyncio.Queue = asyncio.Queue()
        self.queue.put(Job(row, out, asyncio.get_running_loop()))
        return out

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _next(self, timeout: float | None):
        """The next job (set-aside ones first); None at stop; queue.Empty when none came within `timeout`."""
        if self.held:
            return self.held.popleft()
        return self.queue.get(timeout=timeout)

    def _joiners(self, room: int, adapter) -> list[Job]:
        """Jobs already waiting that may join the running batch now (no waiting for more), at most `room`; with
        mixing off only rows of the batch's `adapter`. A stop request met here is put back for `_run`."""
        got, later = [], []
        while len(got) < room:
            try:
                job = self._next(0)
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)
                break
            if job.row.cancelled:
                continue
            (got if self.mix or job.row.adapter is adapter else later).append(job)
        self.held.extendleft(reversed(later))
        return got

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and whatever arrives within the window, up to the batch size; True once stop was asked."""
        batch, deadline, later = [first], time.monotonic() + self.window, []
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic()
            if wait <= 0 and not self.held:
                break
            try:
                job = self._next(max(wait, 0.0))
            except queue.Empty:
                break
            if job is None:
                self.held.extendleft(reversed(later))
                return batch, True
            if self.mix or job.row.adapter is first.row.adapter:
                batch.append(job)
            else:
                later.append(job)
        self.held.extendleft(reversed(later))
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping or self.held:
            job = self._next(None) if not stopping else self.held.popleft()
            if job is None:
                stopping = True
                continue
            batch, stop = self._collect(job)
            stopping = stopping or stop
            self._serve(batch)

    def _serve(self, batch: list[Job]) -> None:
        waited = len(batch)
        batch = [j for j in batch if not j.row.cancelled]
        if len(batch) < waited:
            log.info("%d client(s) went before their rows started", waited - len(batch))
        if not batch:
            return
        sent = [0] * len(batch)  # tokens each job has been sent (the list grows as jobs join)
        ended: set[int] = set()  # jobs answered whole
        error = self._decode(batch, sent, ended, joining=self.continuous)
        if error is None:
            return
        rest = [k for k in range(len(batch)) if k not in ended]
        if len(batch) == 1:
            batch[0].push("error", error)
            return
        log.warning("a batch of %d failed (%s); decoding its rows one by one (%d not answered yet)", len(batch), error,
                    len(rest))
        for k in rest:
            batch[k].row.generator = None  # the same draws again from the row's seed
            again = self._decode([batch[k]], [0], set(), skip=sent[k])
            if again is not None:
                batch[k].push("error", again)

    def _decode(self, batch: list[Job], sent: list[int], ended: set[int], skip: int = 0,
                joining: bool = False) -> str | None:
        """Decode `batch` (jobs that join it are appended to it, and to `sent`), pushing each job its tokens and its
        end as it finishes; the error message if decoding failed (its unfinished jobs are then not ended). `skip`:
        tokens not to send again (one-job batches only)."""
        eos = self.bank.base.tokenizer.eos_token_id
        last: list[int | None] = [None] * len(batch)
        try:
            self.batches += 1
            self.sizes.append(len(batch))  # the rows it served in all, once it ends
            with self.bank.lock:
                running = Decoding(self.bank, [j.row for j in batch])
            while not running.done:
                # The bank's lock per step, not per batch: a continuous batch lasts as long as requests keep coming,
                # and an adapter being loaded (bank.add) must get in between two steps, not wait for a lull.
                with self.bank.lock:
                    skip = self._step(running, batch, sent, last, ended, skip, eos, joining)
                time.sleep(0)  # hand the lock over to a waiting loader now, not at the next GIL switch
        except Exception as e:  # noqa: BLE001 - a failing batch must answer its requests, not kill the server
            log.exception("a batch of %d failed", len(batch))
            return f"{type(e).__name__}: {e}"
        return None

    def _step(self, running: Decoding, batch: list[Job], sent: list[int], last: list, ended: set[int], skip: int,
              eos: int, joining: bool) -> int:
        """One decode step of `running`: tokens pushed, finished rows answered, waiting rows joined. Returns the
        tokens still to skip."""
        for i, t in enumerate(running.choose()):
            if t is None:
                continue
            last[i] = t
            if skip:
                skip -= 1
                continue
            sent[i] += 1
            batch[i].push("token", t)
        for i in running.advance():
            self._end(batch[i], last[i], sent[i], eos)
            ended.add(i)
        new = self._joiners(self.max_batch - len(running.live), batch[0].row.adapter) if joining else []
        if new:  # in the batch first: if joining fails, they are decoded again with the others
            batch += new
            sent += [0] * len(new)
            last += [None] * len(new)
            self.sizes[-1] = len(batch)
            running.join([j.row for j in new])
        return skip

    @staticmethod
    def _end(job: Job, last: int | None, n: int, eos: int) -> None:
        if job.row.cancelled and last != eos and n < job.row.max_new_tokens:
            log.info("a client went after %d of its %d token(s); its row left the batch", n, job.row.max_new_tokens)
        job.push("end", "stop" if last == eos else "length")
