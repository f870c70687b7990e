"""The spread of the README's `default` row: the embedded default job run under several CPU kernel sets and seeds.

Why: the row is a float result after 1,830 steps. Each run is bit-repeatable on its own machine (one thread), but
another CPU's kernels round differently (AVX-512 vs AVX2 moved it by up to 6 points), and that difference grows
over the steps like a change of seed does. So the README shows one machine's row and, beside it, the range this
script measures; tests/training/test_train.py checks that a run lands inside the README's band.

    .venv/bin/python scripts/row_spread.py --seeds 42 0 1 2 3 --isas native avx512 avx2 --jobs 2 \\
        --out docs/default_row_spread.json

Each run is `pipeline/train.py` on the embedded default (one intra-op thread), with the environment below forcing the
kernel set; the runs share one data folder, built once first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What each name forces: ATen's own vectorised kernels, oneDNN's and MKL's (torch's BLAS here) instruction sets.
ISAS = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
COLUMNS = ("sample_mnist", "sample_pope", "sample_bigger", "sample_shape", "sample_train_val")


def run_one(isa: str, seed: int, work: Path, data: Path) -> dict:
    out = work / f"{isa}-s{seed}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ISAS[isa] | {
        "M2PT_DATA": str(data), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(REPO / "pipeline" / "train.py"), "--output_dir", str(out), "--seed", str(seed),
           "--report_to", "none"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"{isa} seed {seed}: exit {r.returncode}\n{r.stderr[-2000:]}")
    res = json.loads((out / "eval" / "results.json").read_text())
    row = res[out.name]["tasks"]
    return {"machine": cpu_name(), "isa": isa, "seed": seed, **{c: round(row[c]["score"], 1) for c in COLUMNS}}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def distinct(runs: list[dict]) -> list[dict]:
    """One run per distinct computation: a kernel set that gives the very same row as another at the same seed
    (forced AVX-512 and native on a CPU whose fp32 paths do not use AMX) is the same draw, counted once."""
    seen, out = set(), []
    for r in runs:
        key = (r["seed"], *(r[c] for c in COLUMNS))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summary(runs: list[dict]) -> dict:
    """Per column over the distinct runs: min, max, mean, std, and the band a run is expected to land in: mean +-
    4 std, rounded outward to half a point (the scores are multiples of 0.5 on 200 questions)."""
    cols, once = {}, distinct(runs)
    for c in COLUMNS:
        xs = [r[c] for r in once]
        mean, std = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
        band = (max(0.0, math.floor((mean - 4 * std) * 2) / 2), min(100.0, math.ceil((mean + 4 * std) * 2) / 2))
        cols[c] = {"min": min(xs), "max": max(xs), "mean": round(mean, 2), "std": round(std, 2), "band": band}
    return cols


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3], help="--seed of each run")
    ap.add_argument("--isas", nargs="+", default=list(ISAS), choices=list(ISAS), help="kernel sets to force")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    ap.add_argument("--out", type=Path, help="write the runs and the summary here (JSON)")
    ap.add_argument("--also", type=Path, help="a JSON file of this script's form whose runs join the summary (rows "
                    "measured on other machines, or an earlier call: their runs are not repeated)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work, data = Path(tmp), Path(tmp) / "data"
        first, *rest = [(i, s) for s in args.seeds for i in args.isas]
        runs = [run_one(*first, work, data)]  # builds the sample set and shards the others share
        with ThreadPoolExecutor(args.jobs) as pool:
            runs += list(pool.map(lambda p: run_one(*p, work, data), rest))
    if args.also:
        runs += json.loads(args.also.read_text())["runs"]
    for r in runs:
        print(json.dumps(r), flush=True)
    result = {"runs": runs, "distinct_runs": len(distinct(runs)), "summary": summary(runs)}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
