"""CLI: write the embedded sample set (Vision-Flan-style JSON + images, offline and deterministic).

    python -m data_prep.make_sample --output data/sample

What it contains and why: pipeline/demo/sample_data.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli import normalize_kebab_flags
from pipeline.demo.sample_data import build


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=Path("data/sample"),
                    help="folder to write train.json, eval.json and images/ into (default: %(default)s)")
    ap.add_argument("--per_task", type=int, default=300,
                    help="records per image task type in train.json (default: %(default)s; 8 image tasks)")
    ap.add_argument("--text_only", type=int, default=40, help="text-only records in train.json (default: %(default)s)")
    ap.add_argument("--heldout_per_task", type=int, default=200,
                    help="records per held-out task type in eval.json (default: %(default)s)")
    ap.add_argument("--val_per_task", type=int, default=20,
                    help="records per training task type in val.json (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    args = ap.parse_args(normalize_kebab_flags(sys.argv[1:] if argv is None else argv, ap))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = build(args.output, args.per_task, args.text_only, args.heldout_per_task, args.seed, args.val_per_task)
    print(f"wrote {info['records']['train']} training, {info['records']['val']} validation and "
          f"{info['records']['eval']} held-out records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
