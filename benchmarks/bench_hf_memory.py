"""Peak memory of a shard build from a Hugging Face `datasets` folder with an Image column, against its size.

    .venv/bin/python benchmarks/bench_hf_memory.py [--records 500,2000,8000] [--append docs/benchmarks.md]

Each size is a folder of 128 x 128 noise images (2 of 3 JPEG, 1 of 3 PNG; ~23 KB each) saved with save_to_disk,
built with one worker in a fresh process. Reported: that process's own peak RSS (VmHWM) and its anonymous memory at
the end (RssAnon), from /proc/self/status (a child's ru_maxrss keeps its parent's size from before the exec). The
memory-mapped Arrow file's pages count in the peak, but are page cache: the anonymous memory is what the build holds.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def image_dataset(n: int, size: int = 128, seed: int | None = None):
    """(Dataset, {id: encoded bytes}): n records with an HF `Image` column of noise images, 2 of 3 JPEG and 1 of 3
    PNG, stored as `datasets` stores them (bytes inside). Also the tests' data (tests/data/test_data_prep.py)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n if seed is None else seed)
    rows, encoded = [], {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            buf, format="PNG" if i % 3 == 2 else "JPEG")
        encoded[f"r{i}"] = buf.getvalue()
        rows.append({"id": f"r{i}", "image": {"bytes": buf.getvalue(), "path": None},
                     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                       {"from": "gpt", "value": "noise"}]})
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    return datasets.Dataset.from_list(rows, features=features), encoded


def make(folder: Path, n: int) -> int:
    """A saved data set of n records (image_dataset); returns the bytes of its images."""
    ds, encoded = image_dataset(n)
    ds.save_to_disk(str(folder))
    return sum(map(len, encoded.values()))


def measure(folder: Path, out: Path) -> tuple[float, float]:
    """(peak RSS MB, anonymous MB at the end) of a one-worker build of `folder` into `out`, in a fresh process."""
    code = ("import sys; from data_prep.build_shards import main; "
            f"rc = main(['--input', {str(folder)!r}, '--output', {str(out)!r}, '--quiet', '--workers', '1']); "
            "print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmHWM', 'RssAnon'))]); "
            "sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)), HF_HUB_OFFLINE="1")
    root = env["PYTHONPATH"].split(os.pathsep)[0]  # python -c puts its working folder first on sys.path
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    hwm, anon = (int(x) / 1024 for x in r.stdout.split()[-2:])
    return hwm, anon


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="500,2000,8000", help="comma-separated data set sizes")
    ap.add_argument("--append", default=None, help="also append the markdown table to this file")
    args = ap.parse_args(argv)
    lines = ["| records | image MB | peak RSS MB (VmHWM) | anonymous MB at the end |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.records.split(",")]:
            size = make(Path(tmp) / f"ds{n}", n)
            hwm, anon = measure(Path(tmp) / f"ds{n}", Path(tmp) / f"out{n}")
            lines.append(f"| {n:,} | {size / 2**20:.0f} | {hwm:.0f} | {anon:.0f} |")
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
