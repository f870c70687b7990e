"""Open-loop load on the server's batcher: static batches vs continuous batching (issue 34, item 3), on the embedded
base or at real width, in-process (no HTTP: what is measured is the scheduling).

    .venv/bin/python benchmarks/bench_load.py [--rates 20,40,80] [--requests 96] [--rounds 3] [--append FILE]
    .venv/bin/python benchmarks/bench_load.py --shape real [--rates 0.3,0.6] [--requests 32] [--rounds 2]

`--shape tiny` is the embedded base (one intra-op thread); `--shape real` is `benchmarks/bench_serve_real.py`'s base
(LLaVA-v1.5 widths, 2 + 2 layers, 32,000 vocabulary, random weights; two threads) and its adapters.

Requests arrive at a fixed mean rate (a Poisson process: exponential gaps, seeded, the same arrival times for both
modes in a round), whatever the server's progress - an open loop, as users arrive. Each is an image question of the
held-out sample tasks for one of 16 adapters drawn at random; half ask for 2 new tokens, half for 32, with EOS
forbidden (`logit_bias`) so every answer has exactly its length and both modes do the same model work. The batcher
is the server's (`pipeline.serving.batcher.Batcher`, window 20 ms, up to 16 rows, mixed adapters), with
`continuous=True` (rows join a running batch between decode steps) or False (a batch runs until its last row ends).
Latency: from a request's arrival to its last token. One intra-op thread (tiny) or two (real). The rounds
interleave every (rate, mode) pair; the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LENGTHS = (2, 32)


SHAPES = {"tiny": dict(rates="20,40,80", requests=96, threads=1), "real": dict(rates="0.3,0.6", requests=32, threads=2)}


def build_bank(n_adapters: int, shape: str):
    from pipeline.serving.bank import AdapterBank

    root = Path(tempfile.mkdtemp(prefix="bench_load_"))
    if shape == "real":
        import bench_serve_real as real  # its base and adapters

        paths = real.make_adapters(shape, "cpu", root, n_adapters)
        bank = AdapterBank(real.build_base(shape, "cpu"))
        names = [p.name for p in paths]
    else:
        from bench_serve import make_adapters  # the same 16 generated adapters as the HTTP benchmark

        from pipeline import defaults

        names = make_adapters(root, n_adapters)
        bank = AdapterBank(defaults.load_base("tiny"))
    for name in names:
        bank.add(name, root / name)
    return bank, names


def make_rows(bank, names, items, n: int, seed: int):
    """(rows, their lengths): fresh rows (a row keeps decoding state), the same draw for a given seed."""
    from pipeline.evaluation.generate import _load_image
    from pipeline.serving import mixed

    rng = random.Random(seed)
    no_eos = {bank.base.tokenizer.eos_token_id: -100.0}
    rows, lengths = [], []
    for _ in range(n):
        adapter, it, length = bank.get(rng.choice(names)), rng.choice(items), rng.choice(LENGTHS)
        rows.append(mixed.Row(adapter, mixed.encode(bank, adapter, "<image>\n" + it["question"]),
                              _load_image(it["image"], bank.base.image_processor), length, logit_bias=no_eos))
        lengths.append(length)
    return rows, lengths


def run_load(bank, rows, arrivals: list[float], continuous: bool) -> tuple[list[float], float]:
    """(each request's latency, the wall time from the first arrival to the last answer)."""
    from pipeline.serving.batcher import Batcher

    batcher = Batcher(bank, window_ms=20, max_batch_size=16, continuous=continuous)

    async def one(row, at: float, t0: float) -> float:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        out = batcher.submit(row)
        while (await out.get())[0] == "token":
            pass
        return time.perf_counter() - (t0 + at)

    async def all_of():
        t0 = time.perf_counter()
        lat = await asyncio.gather(*(one(r, a, t0) for r, a in zip(rows, arrivals)))
        return list(lat), time.perf_counter() - t0

    try:
        return asyncio.run(all_of())
    finally:
        batcher.stop()


def main(argv=None) -> int:
    import torch
    from bench_serve import pct  # the same percentile as the HTTP benchmark

    from pipeline.evaluation.runner import EvalConfig, plan_runs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny", help="the embedded base, or real widths")
    ap.add_argument("--rates", default=None, help="mean arrival rates, requests/s, comma-separated (default: "
                    + "; ".join(f"{k} {v['rates']}" for k, v in SHAPES.items()) + ")")
    ap.add_argument("--requests", type=int, default=None, help="requests per measurement (default: "
                    + "; ".join(f"{k} {v['requests']}" for k, v in SHAPES.items()) + ")")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--adapters", type=int, default=16, help="adapters in the mix")
    ap.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    args.rates = args.rates or SHAPES[args.shape]["rates"]
    args.requests = args.requests or SHAPES[args.shape]["requests"]
    torch.set_num_threads(SHAPES[args.shape]["threads"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bank, names = build_bank(args.adapters, args.shape)
    items = [it for its in plan_runs(EvalConfig(limit=8)).items.values() for it in its]
    rates = [float(r) for r in args.rates.split(",")]
    got: dict = {}
    for rnd in range(args.rounds):
        for rate in rates:
            gaps = random.Random(1000 * rnd + int(rate))
            arrivals = list(itertools.accumulate(gaps.expovariate(rate) for _ in range(args.requests)))
            for continuous in ((True, False) if rnd % 2 == 0 else (False, True)):
                rows, lengths = make_rows(bank, names, items, args.requests, seed=rnd)
                lat, wall = run_load(bank, rows, arrivals, continuous)
                short = [x for x, n in zip(lat, lengths) if n == LENGTHS[0]]
                rec = {"rps": args.requests / wall, "tok_s": sum(lengths) / wall, "p50": pct(lat, 0.5),
                       "p95": pct(lat, 0.95), "p99": pct(lat, 0.99), "short_p95": pct(short, 0.95)}
                got.setdefault((rate, continuous), []).append(rec)
                print(f"round {rnd} rate {rate:g}/s {'continuous' if continuous else 'static'}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()), file=sys.stderr, flush=True)
    table = report(got, rates, args)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table)
    return 0


def report(got: dict, rates: list[float], args) -> str:
    med = {k: {m: statistics.median(r[m] for r in recs) for m in recs[0]} for k, recs in got.items()}
    base = "embedded base" if args.shape == "tiny" else "real widths (bench_serve_real's base), 2 threads"
    lines = [f"Open-loop load (`benchmarks/bench_load.py --shape {args.shape} --rates {args.rates} --requests "
             f"{args.requests} --rounds {args.rounds}`): {base}, {args.adapters} adapters, half 2-token / half "
             "32-token answers, latency in seconds from arrival to the last token, medians of the rounds.", "",
             "| arrivals/s | batching | requests/s | tokens/s | p50 | p95 | p99 | p95 of 2-token requests |",
             "|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        for continuous in (False, True):
            m = med[(rate, continuous)]
            lines.append(f"| {rate:g} | {'continuous' if continuous else 'static'} | {m['rps']:.3g} | "
                         f"{m['tok_s']:.3g} | {m['p50']:.3f} | {m['p95']:.3f} | {m['p99']:.3f} | "
                         f"{m['short_p95']:.3f} |")
        s, c = med[(rate, False)], med[(rate, True)]
        lines.append(f"| {rate:g} | continuous / static | {c['rps'] / s['rps']:.2f}x | | "
                     f"{c['p50'] / s['p50']:.2f}x | {c['p95'] / s['p95']:.2f}x | {c['p99'] / s['p99']:.2f}x | "
                     f"{c['short_p95'] / s['short_p95']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
