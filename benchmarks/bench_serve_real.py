"""Many M²PT adapters in one batch at a real model width, where batching should pay (issue 34, item 1).

    .venv/bin/python benchmarks/bench_serve_real.py [--adapters 1,4,16] [--mix decode,image] [--rounds 1]
    .venv/bin/python benchmarks/bench_serve_real.py --http --adapters 1,16 --requests 2 --rounds 2
    .venv/bin/python benchmarks/bench_serve_real.py --shape 7b --device cuda     # scripts/gpu_check.sh

The base has LLaVA-v1's widths with few layers (`--shape real`: CLIP-L width 1024 / MLP 4096 x 2 layers at 224 px,
Vicuna-7B width 4096 / MLP 11008 x 2 layers, a 32,000-token vocabulary; random weights - the shapes
`benchmarks/bench_step.py --shape real` builds) or the whole 7B (`--shape 7b`: 24 + 32 layers, 336 px, bf16; GPU).
One decode step reads every weight once (about 2.2 GB at `real` in fp32) whatever the batch size, so a batch of 16
rows should cost little more than a batch of 1. The tokenizer is the embedded one (its ids are a subset of the
vocabulary), and EOS is forbidden (`logit_bias`), so every answer has exactly its length in every mode.

Adapters: k M²PT adapters (10/10 prompts, own projector) made for that base with different random values. Clients:
16, each bound to adapter `i % k`, each sending --requests requests one after another (a closed loop) through the
server's own batcher (`pipeline.serving.batcher.Batcher`, in-process), or with `--http` (the decode mix only) as
chat completions to `python -m pipeline.serve --model <the base saved as a llava-hf folder>`, one server process per
mode, which shows what HTTP, JSON and the server's event loop add.
Modes, interleaved in each round:
  mixed          one batch across adapters (the server's default)
  per-adapter    a batch holds one adapter's rows (--no_mix_adapters)
  alone          every request decoded by itself (--max_batch_size 1)
Request mixes: `decode` (a short text prompt, 32 new tokens: decode-heavy) and `image` (an image question of the
sample set, 8 new tokens: prefill-heavy, the vision tower runs once per adapter group). Reported: requests/s,
generated tokens/s, p50/p95/p99 latency, and where the time went: prefill (prompt + image, `Decoding.join`) and
decode (`choose` + `advance`) seconds, decode steps and rows per step.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPES = {
    "real": dict(v_layers=2, image=224, t_layers=2, dtype="float32"),
    "7b": dict(v_layers=24, image=336, t_layers=32, dtype="bfloat16"),
}
MIXES = {"decode": ("Tell me a long story about a cat.", 32, False), "image": (None, 8, True)}
CLIENTS = 16


def build_base(shape: str, device: str):
    """A stock LlavaForConditionalGeneration at LLaVA-v1.5's widths, random weights, the embedded tokenizer."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.core.models import Base, clip_image_processor
    from pipeline.demo.tiny import tiny_tokenizer

    s, tok = SHAPES[shape], tiny_tokenizer()
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=s["v_layers"],
                                       num_attention_heads=16, image_size=s["image"], patch_size=14),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=s["t_layers"],
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=4096, tie_word_embeddings=False,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(getattr(torch, s["dtype"]))
    return Base(model, tok, clip_image_processor(s["image"]), f"bench-{shape}")


def make_adapters(shape: str, device: str, root: Path, n: int) -> list[Path]:
    """`n` adapter folders for the base (random prompts, perturbed projectors), saved from one attached copy."""
    import torch

    from pipeline.core.m2pt import M2PTConfig, adapter_state_dict, attach_m2pt, save_adapter

    model = attach_m2pt(build_base(shape, device).model, M2PTConfig())
    ref = adapter_state_dict(model)
    out = []
    for k in range(n):
        g = torch.Generator(device=device).manual_seed(k)
        tensors = {name: t.detach() + torch.randn(t.shape, generator=g, device=device, dtype=t.dtype)
                   * (0.5 if "m2pt" in name else 0.01) for name, t in ref.items()}
        out.append(save_adapter(model, root / f"ad{k:02d}", state_dict=tensors, base_name=f"bench-{shape}"))
    del model
    return out


class Timed:
    """Seconds spent in prefill (Decoding.join) and decode (choose + advance), steps and rows per step."""

    def __init__(self, sync):
        from pipeline.serving import mixed

        self.sync, self.t = sync, {"prefill": 0.0, "decode": 0.0, "steps": 0, "rows": 0}
        cls = mixed.Decoding
        for name, part in (("join", "prefill"), ("choose", "decode"), ("advance", "decode")):
            setattr(cls, name, self._wrap(getattr(cls, name), part, name == "choose"))

    def _wrap(self, fn, part, count):
        def timed(batch, *a, **kw):
            if count:
                self.t["steps"] += 1
                self.t["rows"] += len(batch.live)
            t0 = time.perf_counter()
            out = fn(batch, *a, **kw)
            self.sync()
            self.t[part] += time.perf_counter() - t0
            return out

        return timed

    def take(self) -> dict:
        got, self.t = self.t, {"prefill": 0.0, "decode": 0.0, "steps": 0, "rows": 0}
        return got


def rows_for(bank, names: list[str], k: int, mix: str, requests: int, items) -> list[list]:
    """Each client's requests (client i asks adapter i % k)."""
    from pipeline.evaluation.generate import _load_image
    from pipeline.serving import mixed

    text, new, image = MIXES[mix]
    no_eos = {bank.base.tokenizer.eos_token_id: -100.0}
    clients = []
    for i in range(CLIENTS):
        adapter = bank.get(names[i % k])
        rows = []
        for r in range(requests):
            it = items[(i * requests + r) % len(items)]
            q = "<image>\n" + it["question"] if image else text
            px = _load_image(it["image"], bank.base.image_processor) if image else None
            rows.append(mixed.Row(adapter, mixed.encode(bank, adapter, q), px, new, logit_bias=no_eos))
        clients.append(rows)
    return clients


def run_mode(bank, clients: list[list], mode: str) -> tuple[list[float], float]:
    """(each request's latency, the wall time of the whole load) in `mode`."""
    from pipeline.serving.batcher import Batcher

    batcher = Batcher(bank, window_ms=20, max_batch_size=1 if mode == "alone" else 16,
                      mix_adapters=mode != "per-adapter")

    async def client(rows):
        lat = []
        for row in rows:
            t0 = time.perf_counter()
            out = batcher.submit(row)
            while (await out.get())[0] == "token":
                pass
            lat.append(time.perf_counter() - t0)
        return lat

    async def everyone():
        t0 = time.perf_counter()
        lats = await asyncio.gather(*(client(rows) for rows in clients))
        return [x for lat in lats for x in lat], time.perf_counter() - t0

    try:
        return asyncio.run(everyone())
    finally:
        batcher.stop()


def save_base(shape: str, work: Path) -> Path:
    """The base as a llava-hf folder (weights, tokenizer, image processor) for `pipeline.serve --model`; built once."""
    folder = work / f"base-{shape}"
    if not (folder / "config.json").is_file():
        base = build_base(shape, "cpu")
        base.model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        base.image_processor.save_pretrained(folder)
    return folder


def run_http(port: int, names: list[str], k: int, requests: int, eos: int) -> tuple[list[float], float]:
    """The decode mix over HTTP: 16 client threads, client i bound to adapter i % k, each sending `requests` chat
    completions one after another (a short text prompt, 32 new tokens, EOS forbidden, greedy)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    text, new, _ = MIXES["decode"]

    def client(i: int) -> list[float]:
        body = {"model": names[i % k], "max_tokens": new, "temperature": 0, "logit_bias": {str(eos): -100},
                "messages": [{"role": "user", "content": text}]}
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=1200)
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == new, r.json()["usage"]
            lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        lats = list(pool.map(client, range(CLIENTS)))
    return [x for lat in lats for x in lat], time.perf_counter() - t0


HTTP_MODES = {"mixed": (), "per-adapter": ("--no_mix_adapters",), "alone": ("--max_batch_size", "1")}


def main_http(args, root: Path, paths: list[Path], ks: list[int]) -> dict:
    """Each mode in its own `pipeline.serve` process (all started first, measured in turn, interleaved rounds)."""
    from bench_serve import pct, start

    from pipeline.demo.tiny import tiny_tokenizer

    folder, eos = save_base(args.shape, Path(args.work)), tiny_tokenizer().eos_token_id
    modes = args.modes.split(",")
    servers = {m: start(root, root / f"serve-{m}.log", "--model", str(folder), *HTTP_MODES[m], threads=args.threads)
               for m in modes}
    names = [p.name for p in paths]
    got = {}
    try:
        for rnd in range(args.rounds):
            for k in ks:
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    if mode == "per-adapter" and k == 1:
                        continue
                    lat, wall = run_http(servers[mode][1], names, k, args.requests, eos)
                    rec = {"rps": len(lat) / wall, "tok_s": len(lat) * MIXES["decode"][1] / wall, "p50": pct(lat, .5),
                           "p95": pct(lat, .95), "p99": pct(lat, .99), "wall": wall}
                    got.setdefault(("decode (HTTP)", k, mode), []).append(rec)
                    print(f"round {rnd} http k={k} {mode}: " + ", ".join(f"{a} {b:.3f}" for a, b in rec.items()),
                          file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    return got


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="real", help="the base's depth (widths are LLaVA-v1.5's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--adapters", default="1,4,16", help="adapters in the mix, comma-separated")
    ap.add_argument("--mix", default="decode,image", help="request mixes, comma-separated: decode, image")
    ap.add_argument("--modes", default="mixed,per-adapter,alone", help="modes, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (16 clients)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians are reported)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (CPU)")
    ap.add_argument("--http", action="store_true", help="the decode mix over HTTP instead: one `pipeline.serve` "
                    "process per mode (CPU), the base saved as a llava-hf folder under --work")
    ap.add_argument("--work", default="/tmp/m2pt-bench-serve-real", help="with --http: where the base folder is kept")
    ap.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.shape == "7b" and args.device != "cuda":
        ap.error("--shape 7b is a GPU measurement (a random 7B in bf16); on a CPU use --shape real")
    if args.http and args.device != "cpu":
        ap.error("--http runs on the CPU")
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_serve_real_"))
    paths = make_adapters(args.shape, args.device, root, max(ks))
    got = main_http(args, root, paths, ks) if args.http else in_process(args, paths, ks)
    table = report(got, args)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table)
    return 0


def in_process(args, paths: list[Path], ks: list[int]) -> dict:
    """Every (mix, k, mode) through the server's batcher in this process, interleaved rounds."""
    import torch
    from bench_serve import pct  # the same percentile as the HTTP benchmark

    from pipeline.evaluation.runner import EvalConfig, plan_runs
    from pipeline.serving.bank import AdapterBank

    bank = AdapterBank(build_base(args.shape, args.device), args.device)
    names = []
    for p in paths:
        bank.add(p.name, p)
        names.append(p.name)
    items = [it for its in plan_runs(EvalConfig(limit=4)).items.values() for it in its]
    timed, got = Timed(torch.cuda.synchronize if args.device == "cuda" else (lambda: None)), {}
    for rnd in range(args.rounds):
        for mix in args.mix.split(","):
            for k in ks:
                modes = args.modes.split(",")
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    if mode == "per-adapter" and k == 1:
                        continue  # the same as mixed
                    lat, wall = run_mode(bank, rows_for(bank, names, k, mix, args.requests, items), mode)
                    t = timed.take()
                    n = len(lat)
                    rec = {"rps": n / wall, "tok_s": n * MIXES[mix][1] / wall, "p50": pct(lat, .5),
                           "p95": pct(lat, .95), "p99": pct(lat, .99), "prefill": t["prefill"], "decode": t["decode"],
                           "steps": t["steps"], "rows_per_step": t["rows"] / max(t["steps"], 1), "wall": wall}
                    got.setdefault((mix, k, mode), []).append(rec)
                    print(f"round {rnd} {mix} k={k} {mode}: " + ", ".join(f"{a} {b:.3f}" for a, b in rec.items()),
                          file=sys.stderr, flush=True)
    return got


def report(got: dict, args) -> str:
    med = {key: {m: statistics.median(r[m] for r in recs) for m in recs[0]} for key, recs in got.items()}
    lines = ["| mix | adapters | mode | requests/s | tokens/s | p50 (s) | p95 (s) | p99 (s) | prefill (s) | "
             "decode (s) | steps | rows/step | vs mixed (requests/s) |", "|---" * 13 + "|"]
    for (mix, k, mode), m in med.items():
        base = med.get((mix, k, "mixed"))
        ratio = f"{base['rps'] / m['rps']:.2f}x" if base and mode != "mixed" else ""
        split = (f"{m['prefill']:.1f} | {m['decode']:.1f} | {m['steps']:.0f} | {m['rows_per_step']:.1f}"
                 if "prefill" in m else "- | - | - | -")  # over HTTP the server's split is not read
        lines.append(f"| {mix} | {k} | {mode} | {m['rps']:.2f} | {m['tok_s']:.1f} | {m['p50']:.2f} | {m['p95']:.2f} | "
                     f"{m['p99']:.2f} | {split} | {ratio} |")
    how = "--http " if args.http else f"--mix {args.mix} "
    return (f"`benchmarks/bench_serve_real.py --shape {args.shape} --device {args.device} --adapters {args.adapters} "
            f"{how}--requests {args.requests} --rounds {args.rounds} --threads {args.threads}` "
            f"({CLIENTS} clients, each bound to adapter i % k; medians of the rounds; `vs mixed`: how many times "
            "mixed batching's requests/s):\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
