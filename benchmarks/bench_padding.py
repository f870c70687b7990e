"""Share of padded tokens in training batches, in stream order vs length-grouped (`--group_by_length`).

    .venv/bin/python benchmarks/bench_padding.py [--seed 0]

Two length distributions:
  embedded    the embedded sample set (data/sample/train.json), tokenised with the trainer's template, 26 visual
              tokens per image (the tiny model, pv = 10, official mode)
  vision-flan a Vision-Flan-like model: every sample has an image of 576 + 10 visual tokens (CLIP-L/14-336,
              pv = 10, official mode), the Vicuna system prompt and roles (~45 tokens), an instruction of
              lognormal length (median 40 tokens, sigma 0.7) and an answer of lognormal length (median 6, sigma
              1.2), capped at 2048. A model of the distribution, not a measurement of the real data set.
Batches are formed exactly as pipeline.data.stream does (group_by_length over a shuffled stream); the padded share is
pad tokens / (rows x longest row) summed over all batches.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def embedded_lengths() -> list[int]:
    from pipeline.core.chat import VicunaTemplate
    from pipeline.demo.sample_data import build as make_sample
    from pipeline.demo.tiny import tiny_tokenizer

    path = REPO / "data" / "sample" / "train.json"
    if not path.is_file():
        make_sample(path.parent)
    tok = tiny_tokenizer()
    t = VicunaTemplate(tok, tok.convert_tokens_to_ids("<image>"), 26)
    return [len(t.encode(r["conversations"]).input_ids) for r in json.loads(path.read_text())]


def vision_flan_lengths(n: int, rng: random.Random) -> list[int]:
    return [min(2048, 586 + 45 + round(rng.lognormvariate(3.69, 0.7)) + round(rng.lognormvariate(1.79, 1.2)))
            for _ in range(n)]


def padded_share(lengths: list[int], batch_size: int, group: int, rng: random.Random) -> float:
    from pipeline.data.stream import group_by_length

    items = [{"input_ids": range(n)} for n in lengths]
    rng.shuffle(items)
    batches = []
    step = batch_size * (group or 1)
    for k in range(0, len(items) - step + 1, step):
        chunk = items[k:k + step]
        batches += group_by_length(chunk, batch_size, rng) if group else [
            chunk[i:i + batch_size] for i in range(0, step, batch_size)]
    real = sum(len(it["input_ids"]) for b in batches for it in b)
    total = sum(len(b) * max(len(it["input_ids"]) for it in b) for b in batches)
    return 1 - real / total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffles and the modelled lengths")
    args = ap.parse_args(argv)
    sets = {"embedded": embedded_lengths(), "vision-flan": vision_flan_lengths(20000, random.Random(args.seed))}
    print("| lengths | samples | batch | stream order | grouped x16 | grouped x64 |")
    print("|---|---|---|---|---|---|")
    for name, lengths in sets.items():
        for bs in (4, 16):
            cells = [f"{100 * padded_share(lengths, bs, g, random.Random(args.seed)):.1f} %" for g in (0, 16, 64)]
            print(f"| {name} | {len(lengths)} | {bs} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
