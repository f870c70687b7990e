"""One training step of this project vs the frozen-model floor, measured side by side.

    .venv/bin/python benchmarks/bench_step.py --shape real [--rounds 5] [--threads 1] [--append docs/benchmarks.md]

Variants (each in its own process, built from the same seed, so the weights are identical):
  project  attach_m2pt (pv = pt = 10, official mode; textual prompts as each layer's key/value prefix) + the trainer's
           forward (pipeline/core/step.py: supervised-only logits, index splice, vision tower cut after its feature
           layer) + backward + fused AdamW step
  trainer  `project` stepped as pipeline/train.py steps it: a DeepSpeed ZeRO-2 engine (ds_configs/zero2.json, one
           rank; gloo on CPU) built by pipeline/training/engine.build_engine, the token count all-reduced, the loss
           scaled, engine.backward and engine.step
  slots    the same with the textual prompts as extra positions through every layer (`--text_prompts slots`)
  before   the same prompts through the stock forward (all logits, masked_scatter, full tower): the trainer's forward
           before supervised-only logits and the tower cut
  floor    the stock model with no prompts and every weight frozen, `pixel_values.requires_grad_(True)` so the
           backward runs through both towers, loss from `labels=`: the least a prompt method can cost with stock
           transformers
Rounds are interleaved (the order alternates each round) and each variant's median wall and CPU-seconds per step
are reported with its peak RSS (GPU: peak allocated), its model FLOPs (pipeline/core/flops.py) and their share of a
GEMM probe's rate (CPU fp32) or of the datasheet peak (GPU). Ratios are against the floor, from the same run.

Shapes (batch 2, labels on 56 answer tokens per row, 137 text tokens per row):
  small  CLIP-L width (1024, 16 heads) x 2 layers at 224 px, Vicuna width (4096, 32 heads) x 2 layers, MLPs 512,
         vocab 1000, linear projector
  real   the same with the real MLPs (4096 / 11008) and a 32000 vocabulary
  7b     CLIP-L/14-336 (24 layers) + Vicuna-7B (32 layers), MLP projector, random bf16 weights: GPU only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "small": dict(v_layers=2, v_mlp=512, image=224, t_layers=2, t_mlp=512, vocab=1000, projector="linear"),
    "real": dict(v_layers=2, v_mlp=4096, image=224, t_layers=2, t_mlp=11008, vocab=32000, projector="linear"),
    "7b": dict(v_layers=24, v_mlp=4096, image=336, t_layers=32, t_mlp=11008, vocab=32000, projector="mlp"),
}
BATCH, TEXT_TOKENS, ANSWER_TOKENS = 2, 137, 56
VARIANTS = ("trainer", "project", "slots", "before", "floor")
TRAINER_LIKE = ("trainer", "project", "slots")  # the trainer's forward


def build(shape: str, variant: str, device, dtype, attn: str):
    import torch
    from torch import nn
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.core.m2pt import M2PTConfig, attach_m2pt
    from pipeline.core.models import skip_unused_vision_layers

    s = SHAPES[shape]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=s["v_mlp"], num_hidden_layers=s["v_layers"],
                                       num_attention_heads=16, image_size=s["image"], patch_size=14),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=s["t_mlp"], num_hidden_layers=s["t_layers"],
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=s["vocab"],
                                max_position_embeddings=4096, tie_word_embeddings=False),
        image_token_id=s["vocab"] - 1, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
        if s["projector"] == "linear":  # LLaVA-v1's projector
            model.model.multi_modal_projector = nn.Linear(1024, 4096, dtype=dtype)
    if variant == "floor":
        model.requires_grad_(False)
    else:
        attach_m2pt(model, M2PTConfig(visual_prompt_length=10, text_prompt_length=10),
                    text_prompts="slots" if variant in ("slots", "before") else "auto")
        if variant in TRAINER_LIKE:
            skip_unused_vision_layers(model)
    return model.train()


def make_batch(model, variant: str, device, dtype) -> dict:
    import torch

    from pipeline.core.m2pt import num_visual_tokens

    cfg = model.config
    nv = num_visual_tokens(model)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, cfg.text_config.vocab_size - 1, (BATCH, TEXT_TOKENS), generator=g)
    img = torch.full((BATCH, nv), cfg.image_token_id)
    ids = torch.cat([text[:, :5], img, text[:, 5:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    px = torch.randn(BATCH, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": px}
    return {k: v.to(device) for k, v in b.items()}


def flops_of(model, variant: str, batch: dict) -> int:
    from pipeline.core.flops import FlopModel, batch_flops

    fm = FlopModel.from_model(model)
    if variant in TRAINER_LIKE:
        return batch_flops(fm, batch)
    # all logits; the floor's tower work is counted up to the feature layer (its useful work)
    rows = batch["attention_mask"].sum(1).tolist()
    return fm.step(rows, BATCH, logit_rows=int(batch["attention_mask"].sum()))


def worker(shape: str, variant: str, threads: int, device: str, conn) -> None:
    """Build one variant, then run a step each time the parent asks; report (wall, cpu) per step."""
    import resource

    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = "sdpa"
    if dev.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        attn = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    model = build(shape, variant, dev, dtype, attn)
    batch = make_batch(model, variant, dev, dtype)
    if variant == "floor":
        batch["pixel_values"].requires_grad_(True)
    step = trainer_step(model, batch, dev, dtype) if variant == "trainer" else plain_step(model, variant, batch,
                                                                                          dev, dtype)

    step()  # warm-up (allocator, kernels, lazy hooks)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    conn.send({"ready": True, "flops": flops_of(model, variant, batch), "attn": attn})
    while conn.recv() == "step":
        w0, c0 = time.perf_counter(), time.process_time()
        parts = step()
        conn.send((time.perf_counter() - w0, time.process_time() - c0, parts))
    mem = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    conn.send(mem)


def _sync(dev) -> float:
    """CPU-seconds so far, after the device has finished its work."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.process_time()


def plain_step(model, variant: str, batch: dict, dev, dtype):
    """A step function returning its parts' CPU-seconds: (forward, backward, optimizer)."""
    import torch

    from pipeline.core.step import token_loss

    opt = None if variant == "floor" else torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def forward():
        if variant in TRAINER_LIKE:
            return token_loss(model, model, batch, dev, dtype)
        if variant == "before":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"].to(dtype)).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                     reduction="sum")
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"].to(dtype), labels=batch["labels"]).loss

    def step():
        t0 = _sync(dev)
        loss = forward()
        t1 = _sync(dev)
        loss.backward()
        t2 = _sync(dev)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            batch["pixel_values"].grad = None
        return t1 - t0, t2 - t1, _sync(dev) - t2

    return step


def trainer_step(model, batch: dict, dev, dtype):
    """The trainer's step (pipeline/train.py train_step, one micro-batch) through a one-rank DeepSpeed engine."""
    import socket

    import deepspeed
    import deepspeed.comm as dist
    import torch

    from pipeline.core.step import token_loss
    from pipeline.train import backprop_scale
    from pipeline.training.config import TrainConfig
    from pipeline.training.engine import build_engine, ds_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    train = TrainConfig(per_device_train_batch_size=BATCH, bf16=dtype == torch.bfloat16)
    engine, _ = build_engine(train, ds_config(str(REPO / "ds_configs" / "zero2.json"), train, 1), model, 1000)

    def step():
        t0 = _sync(dev)
        n_tok = torch.tensor([float((batch["labels"][:, 1:] != -100).sum())], device=dev)
        dist.all_reduce(n_tok)
        loss = token_loss(engine, model, batch, dev, dtype) * backprop_scale(n_tok.item(), 1, 1)
        t1 = _sync(dev)
        engine.backward(loss)
        t2 = _sync(dev)
        engine.step()
        return t1 - t0, t2 - t1, _sync(dev) - t2

    return step


def peak(device: str, threads: int) -> tuple[float, str]:
    import torch

    from pipeline.core.flops import peak_tflops

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return peak_tflops(device, dtype)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    import multiprocessing as mp

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; one step per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each variant's process")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--append", default=None, help="also append the markdown table to this file")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if args.shape == "7b" and not args.device.startswith("cuda"):
        ap.error("--shape 7b needs a GPU (--device cuda)")

    load0 = os.getloadavg()
    ctx = mp.get_context("spawn")
    procs, conns, info = {}, {}, {}
    for v in variants:  # one at a time: building two large models at once would double peak memory
        parent, child = ctx.Pipe()
        procs[v] = ctx.Process(target=worker, args=(args.shape, v, args.threads, args.device, child), daemon=True)
        procs[v].start()
        child.close()  # so that a worker that dies (no GPU, out of memory) ends recv() with EOFError, not a hang
        conns[v] = parent
        info[v] = parent.recv()
        print(f"{v}: built and warmed up ({info[v]['attn']})", file=sys.stderr)
    pk, pk_from = peak(args.device, args.threads)
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            conns[v].send("step")
            times[v].append(conns[v].recv())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1][1]:.2f} cpu-s" for v in variants),
              file=sys.stderr)
    mem = {}
    for v in variants:
        conns[v].send("stop")
        mem[v] = conns[v].recv()
        procs[v].join()
    load1 = os.getloadavg()

    med = {v: (statistics.median(t[0] for t in times[v]), statistics.median(t[1] for t in times[v]))
           for v in variants}
    ref = "floor" if "floor" in variants else variants[0]
    unit = "GiB peak allocated" if args.device.startswith("cuda") else "GiB peak RSS"
    lines = [f"`benchmarks/bench_step.py --shape {args.shape} --rounds {args.rounds} --threads {args.threads}` on "
             f"{machine() if not args.device.startswith('cuda') else torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}; 1-min load {load0[0]:.2f} before, {load1[0]:.2f} after; peak {pk:.3g} TFLOP/s "
             f"({pk_from})", "",
             f"| variant | wall s/step (median) | CPU-s/step (median) | vs {ref} (CPU-s) | forward / backward / "
             f"optimizer CPU-s (medians) | {unit} | model TFLOP/step | share of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        wall, cpu = med[v]
        rate = info[v]["flops"] / wall / 1e12
        parts = " / ".join(f"{statistics.median(t[2][i] for t in times[v]):.3f}" for i in range(3))
        lines.append(f"| {v} | {wall:.3f} | {cpu:.3f} | {cpu / med[ref][1]:.3f}x | {parts} | {mem[v] / 1024:.2f} | "
                     f"{info[v]['flops'] / 1e12:.3f} | {rate / pk:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
