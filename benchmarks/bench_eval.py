"""Evaluation throughput on 1 and 2 ranks, and what a resume saves, on the embedded default (base row, the four
held-out sample tasks, 800 questions).

    .venv/bin/python benchmarks/bench_eval.py [--rounds 3] [--batch_size 8] [--append docs/benchmarks.md]

Each round runs, side by side: one process (`python -m pipeline.evaluate`) and `torchrun --nproc_per_node 2`, each
rank on one intra-op thread, each into a fresh output folder; then the 1-process command again on its own folder
(every answer stored: the resume cost). Reported per setting: median wall seconds of the whole command (model load
included), questions/s over it, and the median of the generation part alone (results.json's provenance "seconds",
which starts at the model load). It also checks that the 2-rank predictions equal the 1-process ones (diff lines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = 800


def _run(cmd: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds of the command, provenance seconds of the base row)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--output_dir", str(out), "--batch_size", str(ARGS.batch_size)], env=env, check=True,
                   cwd=REPO, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "results.json").read_text())["base"]["provenance"]["seconds"]


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--batch_size", type=int, default=8, help="questions per generation batch")
    ap.add_argument("--append", type=Path, help="append the markdown table to this file")
    ARGS = ap.parse_args(argv)
    py = sys.executable
    one = [py, "-m", "pipeline.evaluate"]
    two = [str(Path(py).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29577", "-m",
           "pipeline.evaluate"]
    times: dict[str, list] = {"1 rank": [], "2 ranks": [], "1 rank, all answers stored": []}
    diff_lines = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ARGS.rounds):
            a, b = Path(tmp) / f"one{r}", Path(tmp) / f"two{r}"
            times["1 rank"].append(_run(one, a))
            times["2 ranks"].append(_run(two, b))
            times["1 rank, all answers stored"].append(_run(one, a))
            pa, pb = ((d / "base" / "predictions.jsonl").read_text().splitlines() for d in (a, b))
            diff_lines += sum(x != y for x, y in zip(pa, pb)) + abs(len(pa) - len(pb))
    base = statistics.median(w for w, _ in times["1 rank"])
    lines = [f"Embedded default, base row, {QUESTIONS} questions, batch {ARGS.batch_size}, {os.cpu_count()} CPU "
             f"core(s), 1 thread per rank, median of {ARGS.rounds} interleaved rounds; 2-rank vs 1-rank "
             f"predictions: {diff_lines} differing line(s).", "",
             "| setting | wall s (command) | questions/s | generation s (provenance) | wall vs 1 rank |",
             "|---|---|---|---|---|"]
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        gen = statistics.median(g for _, g in runs)
        lines.append(f"| {name} | {wall:.1f} | {QUESTIONS / wall:.0f} | {gen:.1f} | {wall / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if ARGS.append:
        with ARGS.append.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
