"""Shard-builder throughput (records/s, images/s per worker) on the embedded sample set.

    .venv/bin/python benchmarks/bench_shards.py [--workers 1 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_prep.build_shards import main as build
from pipeline.demo.sample_data import build as make_sample


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    args = ap.parse_args()
    from pipeline.defaults import load_text_side

    load_text_side()  # warm-up: the one-off transformers import (~3 s) would otherwise land on the first run
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_sample(d / "s", per_task=300, text_only=40, heldout_per_task=1, seed=0)
        for w in args.workers:
            t0 = time.perf_counter()
            build(["--input", str(d / "s" / "train.json"), "--image_root", str(d / "s"), "--output", str(d / f"o{w}"),
                   "--workers", str(w), "--quiet"])
            dt = time.perf_counter() - t0
            m = json.loads((d / f"o{w}" / "manifest.json").read_text())
            n, imgs = m["totals"]["written"], m["totals"]["written"] - 40
            print(json.dumps({"workers": w, "records": n, "seconds": round(dt, 2), "records_per_s": round(n / dt, 1),
                              "images_per_s_per_worker": round(imgs / dt / w, 1)}))


if __name__ == "__main__":
    main()
