"""Training speed of the embedded tiny model: seconds per step, samples/s, share of time waiting for data.

    .venv/bin/python benchmarks/bench_train.py [--steps 300] [--nprocs 1] [-- extra trainer flags]

Runs the real trainer (DeepSpeed launcher, ZeRO-2) and summarises metrics.jsonl, skipping the first 20 steps.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps to run")
    ap.add_argument("--nprocs", type=int, default=1, help="ranks (deepspeed --num_gpus)")
    ap.add_argument("extra", nargs="*", help="extra trainer flags (after --)")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // args.nprocs))))
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.nprocs),
               str(REPO / "pipeline" / "train.py"), "--max_steps", str(args.steps), "--logging_steps", "10",
               "--save_steps", "0", "--report_to", "none", "--output_dir", out, *args.extra]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r and r["step"] > 20]
        print(json.dumps({
            "nprocs": args.nprocs, "steps": args.steps, "extra": args.extra,
            "sec_per_step_median": round(statistics.median(r["sec_per_step"] for r in rows), 4),
            "samples_per_s_median": round(statistics.median(r["samples_per_s"] for r in rows), 1),
            "data_wait_share_median": round(statistics.median(r["data_wait_share"] for r in rows), 3),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
        }))


if __name__ == "__main__":
    main()
