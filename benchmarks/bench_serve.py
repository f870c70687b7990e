"""Serving throughput and latency with 1, 4 and 16 adapters in the request mix: rows of different adapters batched
together vs one adapter per batch, on the embedded base.

    .venv/bin/python benchmarks/bench_serve.py [--rounds 3] [--requests 96] [--clients 16] [--append docs/benchmarks.md]

Two servers run side by side (`python -m pipeline.serve`, one intra-op thread each, the same 16 generated adapters):
one batching across adapters (the default), one with --no_mix_adapters (each batch holds one adapter's requests,
as a server without mixed batches must). Each measurement sends --requests chat completions (an image question of
the held-out sample tasks, 12 new tokens at most, each request's adapter drawn from the first k adapters) from
--clients concurrent clients over HTTP, and times them. The rounds interleave every (k, mode) pair; the table gives
medians over rounds: requests/s, p50 and p95 latency. The server's own batching window (20 ms) and batch size (16)
are the defaults. Each answer is checked against a one-request-at-a-time answer of the same server: batching must
not change it.

A second table takes HTTP, JSON and image decoding out: the same request mixes decoded in-process
(`pipeline.serving.mixed`, one thread), in batches of 16 across adapters vs batches of up to 16 of one adapter
each, interleaved rounds, median seconds. It shows what the batching itself saves in model work.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NEW_TOKENS = 12


def make_adapters(root: Path, n: int) -> list[str]:
    import torch

    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny

    names = []
    for k in range(n):
        m = attach_m2pt(build_tiny().model, M2PTConfig(seed=k))
        with torch.no_grad():
            for p in m.m2pt.parameters():
                p.mul_(30)
        save_adapter(m, root / f"ad{k:02d}", base_name="tiny")
        names.append(f"ad{k:02d}")
    return names


def start(root: Path, log: Path, *extra: str, threads: int = 1):
    """`python -m pipeline.serve --adapters root *extra` on a free port, `threads` intra-op threads: (process, port)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--adapters", str(root), "--port", "0",
                             "--log_level", "warning", *extra], env=env, cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    import httpx

    for _ in range(900):
        text = log.read_text()
        if "http://127.0.0.1:" in text:
            port = int(text.split("http://127.0.0.1:")[1].split("/")[0])
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).raise_for_status()
                return proc, port
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise SystemExit(text[-3000:])
        time.sleep(0.2)
    raise SystemExit("server did not start")


def ask(port: int, model: str, question: dict) -> tuple[str, float]:
    import httpx

    body = {"model": model, "max_tokens": NEW_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": question["url"]}}, {"type": "text", "text": question["text"]}]}]}
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t0


def measure(port: int, jobs: list, clients: int) -> tuple[float, list[float], list[str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda j: ask(port, *j), jobs))
    wall = time.perf_counter() - t0
    return len(jobs) / wall, [t for _, t in got], [a for a, _ in got]


def questions() -> list[dict]:
    from pipeline.evaluation.runner import EvalConfig, plan_runs

    items = [it for its in plan_runs(EvalConfig(limit=8)).items.values() for it in its]
    return [{"url": "data:image/png;base64," + base64.b64encode(Path(it["image"]).read_bytes()).decode(),
             "text": it["question"]} for it in items]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--requests", type=int, default=96, help="requests per measurement")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--append", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    qs = questions()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        names = make_adapters(root, 16)
        servers = {"mixed": start(root, Path(tmp) / "mixed.log"),
                   "one adapter per batch": start(root, Path(tmp) / "one.log", "--no_mix_adapters")}
        try:
            rows, changed = run_rounds(servers, names, qs, args)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=120)
    table = report(rows, args, changed) + "\n" + model_only(args)
    print(table)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + table)
    return 0


def run_rounds(servers: dict, names: list[str], qs: list[dict], args):
    rng = random.Random(0)
    mixes = {k: [(names[rng.randrange(k)], qs[rng.randrange(len(qs))]) for _ in range(args.requests)]
             for k in (1, 4, 16)}
    port0 = next(iter(servers.values()))[1]
    alone = {(m, q["text"], q["url"][-40:]): ask(port0, m, q)[0] for jobs in mixes.values() for m, q in jobs}
    rows: dict = {}
    changed = 0
    for _ in range(args.rounds):
        for k, jobs in mixes.items():
            for mode, (_, port) in servers.items():
                rps, lat, answers = measure(port, jobs, args.clients)
                changed += sum(a != alone[(m, q["text"], q["url"][-40:])] for a, (m, q) in zip(answers, jobs))
                rows.setdefault((k, mode), []).append((rps, pct(lat, 0.5), pct(lat, 0.95)))
    return rows, changed


def report(rows: dict, args, changed: int) -> str:
    lines = [f"Serving (`benchmarks/bench_serve.py`, {args.requests} requests from {args.clients} clients per "
             f"measurement, {NEW_TOKENS} new tokens at most, medians of {args.rounds} interleaved rounds; answers "
             f"that differ from the request sent alone: {changed}):", "",
             "| adapters in the mix | batching | requests/s | p50 latency (s) | p95 latency (s) |",
             "|---:|---|---:|---:|---:|"]
    for (k, mode), xs in rows.items():
        med = [statistics.median(x[i] for x in xs) for i in range(3)]
        lines.append(f"| {k} | {mode} | {med[0]:.1f} | {med[1]:.2f} | {med[2]:.2f} |")
    return "\n".join(lines) + "\n"


def model_only(args) -> str:
    """The same mixes decoded in-process: batches across adapters vs one adapter per batch."""
    import torch

    from pipeline import defaults
    from pipeline.evaluation.generate import _load_image
    from pipeline.evaluation.runner import EvalConfig, plan_runs
    from pipeline.serving import mixed
    from pipeline.serving.bank import AdapterBank

    torch.set_num_threads(1)
    items = [it for its in plan_runs(EvalConfig(limit=8)).items.values() for it in its]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(Path(tmp), 16)
        bank = AdapterBank(defaults.load_base("tiny"))
        for n in names:
            bank.add(n, Path(tmp) / n)
    px = [_load_image(it["image"], bank.base.image_processor) for it in items]

    def rows(k):
        out = []
        for _ in range(args.requests):
            a, q = bank.get(names[rng.randrange(k)]), rng.randrange(len(items))
            out.append(mixed.Row(a, mixed.encode(bank, a, "<image>\n" + items[q]["question"]), px[q], NEW_TOKENS))
        return out

    def batches(rs, mix):
        if mix:
            return [rs[i:i + 16] for i in range(0, len(rs), 16)]
        by = {}
        for r in rs:
            by.setdefault(r.adapter.name, []).append(r)
        return [g[i:i + 16] for g in by.values() for i in range(0, len(g), 16)]

    mixes = {k: rows(k) for k in (1, 4, 16)}
    times: dict = {}
    for _ in range(args.rounds):
        for k, rs in mixes.items():
            for mix in (True, False):
                bs = batches(rs, mix)
                t0 = time.perf_counter()
                for b in bs:
                    mixed.answers(bank, b)
                times.setdefault((k, mix), []).append((time.perf_counter() - t0, len(bs)))
    lines = [f"Model work alone ({args.requests} requests decoded in-process, one thread, medians of {args.rounds} "
             "rounds):", "", "| adapters in the mix | across adapters: batches, s | one adapter per batch: "
             "batches, s | ratio |", "|---:|---|---|---:|"]
    for k in mixes:
        a, b = (statistics.median(t for t, _ in times[(k, m)]) for m in (True, False))
        lines.append(f"| {k} | {times[(k, True)][0][1]}, {a:.2f} | {times[(k, False)][0][1]}, {b:.2f} | "
                     f"{b / a:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
