"""Zero-shot evaluation: batched, left-padded, KV-cached generation with the training template, then the standard
metrics. One invocation evaluates the base model and/or several adapters and writes one comparison table.

    python -m pipeline.evaluate --model /models/llava-1.5-7b-hf --adapter runs/a/adapter runs/b/adapter --with_base \\
        --tasks mme,pope,textvqa,vsr,snli_ve,cifar10,cifar100,mnist --data_root /data/eval --output_dir eval_out
    python -m pipeline.evaluate --score_only eval_out/base/predictions.jsonl      # re-score, no model
    python -m pipeline.evaluate                                                   # the embedded default

With no --model it evaluates the embedded demo model, and with no --tasks the held-out task types of the embedded
sample set (digits, existence yes/no, the bigger object's colour, the shape of the object of a given colour).
Add `--adapter out/default/adapter` for the default training run's adapter.

Outputs under --output_dir: `<run>/predictions.jsonl` (one line per question: task, scoring, category, image_id,
qid, question, target, prediction, correct), `results.json` (run -> task -> metrics, with provenance) and
`results.md` (one row per run). The parts live in pipeline/evaluation/: datasets (layouts), generate, scoring.
"""

from __future__ import annotations

import logging
import random
import sys

from pipeline.cli import config_parser
from pipeline.evaluation.datasets import LayoutError
from pipeline.evaluation.runner import EvalConfig, evaluate

log = logging.getLogger("m2pt.evaluate")


def parse_args(argv=None):
    ap = config_parser(EvalConfig, __doc__)
    args = ap.parse_args(argv)
    # Values that would answer other questions than asked: --limit -1 scored all but the last of each task,
    # --batch_size 0 ended in "range() arg 3 must not be zero".
    for bad, why in ((args.limit is not None and args.limit < 1, "--limit must be >= 1 (or left out: every question)"),
                     (args.batch_size < 1, "--batch_size must be >= 1"),
                     (args.max_new_tokens < 1, "--max_new_tokens must be >= 1"),
                     (not 0 <= args.temperature < float("inf"), "--temperature must be a finite number >= 0")):
        if bad:
            ap.error(why)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    cfg = EvalConfig(**vars(args))
    try:
        results = evaluate(cfg)
    except (LayoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:  # a rank other than 0: rank 0 prints the table
        return 0
    out = cfg.results_dir()
    print((out / "results.md").read_text(), end="")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
