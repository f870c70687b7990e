"""CLI: Vision-Flan / LLaVA records + images -> validated WebDataset shards (+ manifest.json, rejected.jsonl).

    python -m data_prep.build_shards --input data/sample/train.json --image_root data/sample \\
        --output data/sample_shards

Every input record ends up either in a shard or as one line of rejected.jsonl with its file, index, id and a
reason code, so `read = written + rejected` always holds. Output depends only on the input and the arguments, not on
--workers. An interrupted build re-run with the same arguments keeps the completed shards and redoes the rest.
How: pipeline/data/shards.py. Flags are spelled with underscores; the old kebab-case spellings still work, with a
warning.

Exit status: 0 when at least one sample was written (rejections are normal and summarised), 1 when nothing could
be written, 2 when the input itself is unreadable or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli import HelpFormatter, add_config_flags, normalize_kebab_flags
from pipeline.core.m2pt import M2PTConfig
from pipeline.data.shards import REJECTED, InputError, ShardBuildConfig, build
from pipeline.defaults import load_text_side


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2pt-build-shards", description=__doc__,
                                 formatter_class=HelpFormatter)
    add_config_flags(ap, ShardBuildConfig, exclude=("visual_prompt_length", "visual_token_mode"))
    g = ap.add_argument_group("M2PT settings the trainer will use (they set the visual tokens per <image>)")
    add_config_flags(g, M2PTConfig, include=("visual_prompt_length", "visual_token_mode"))
    return ap


def main(argv=None) -> int:
    ap = parser()
    argv = normalize_kebab_flags(sys.argv[1:] if argv is None else argv, ap, {"--max-length": "--model_max_length"})
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        m = build(ShardBuildConfig(**vars(args)), load_text_side(args.model))
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = m["totals"]
    print(f"read {t['read']}, written {t['written']} in {len(m['shards'])} shard(s), rejected {t['rejected']}"
          + (f" {t['rejected_by_reason']}" if t["rejected"] else "") + f" -> {args.output} ({m['seconds']} s)")
    if t["rejected"]:
        print(f"rejections: {Path(args.output) / REJECTED}")
    if t["written"] == 0:
        print("error: nothing could be written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
