"""Model FLOPs of a training step, read from the model config, and the peak they are compared with (MFU).

Counted: every matrix multiply, 2 FLOPs per multiply-add (elementwise work, norms and softmax are not counted: the
usual MFU convention). For one row of T real tokens (padding excluded: it is waste, not model work):

forward
  vision, per layer that runs (up to the deepest feature layer), S_v = N patches + 1 CLS + p_v prompt slots:
      8 S_v d_v^2 (q, k, v, o)  +  4 S_v d_v i_v (MLP)  +  4 S_v^2 d_v (scores, values; bidirectional)
  patch embedding: 2 N (c k^2) d_v;  projector: 2 V (d_v d_t) for a linear one, 2 V (d_v d_t + d_t d_t) for an MLP
  LLM, per layer, S = T + p_t (textual prompts as slots):
      4 S d_t^2 + 4 S d_t d_kv (q, o; k, v with grouped heads)  +  6 S d_t i_t (gated MLP)
      +  2 S (S + 1) d_t (causal: each query sees (S + 1) / 2 keys on average)
  or, prompts as a key/value prefix (pipeline/core/prefix.py): the T tokens as above, plus the prompts' k and v,
      4 p_t d_t d_kv, and each token's p_t extra keys, 4 T p_t d_t
  lm_head: 2 n d_t |vocab| for the n rows whose logits are computed (the supervised ones here; all for the stock model)
backward
  activation gradients: once more every forward matmul above the lowest trainable input (prompts enter at the first
  vision layer, so the whole tower and LLM), and twice the attention products (dQ, dK, dV, dP);
  weight gradients: only for trainable matrices (projector, lm_head with --tune_lm_head; every matmul with
  --method full): once their forward. LoRA's own small matmuls are not counted.

Peak: the GPU's dense bf16/fp16 datasheet value (`PEAK_TFLOPS`), `--peak_tflops`, or on a CPU a short fp32 GEMM probe
(`gemm_probe`) with the run's thread count, so MFU on a CPU reads "share of what this CPU's matmul reaches".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, bf16/fp16 and tf32/fp32-accumulate.
PEAK_TFLOPS = {  # name fragment -> (bf16/fp16, fp32)
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),  # SXM; PCIe: 756 / 51
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
}


@dataclass(frozen=True)
class FlopModel:
    """The dimensions that set a step's FLOPs; `from_model` reads them from a LLaVA config (+ M2PT config)."""

    d_v: int
    i_v: int
    vision_layers: int  # layers that run (up to the deepest feature layer)
    patches: int
    patch_in: int  # channels x patch^2
    pv: int
    visual_tokens: int  # per image, into the LLM
    proj_flops_per_token: int  # multiply-adds of the projector per visual token
    d_t: int
    d_kv: int
    i_t: int
    text_layers: int
    vocab: int
    pt: int
    prefix: bool = False  # textual prompts as each layer's key/value prefix, not slots
    train_projector: bool = True
    train_lm_head: bool = False
    train_all: bool = False  # --method full: weight gradients of every matmul

    @classmethod
    def from_model(cls, model) -> "FlopModel":
        from torch import nn

        from pipeline.core.m2pt import _feature_layers, language_model, num_patches, num_visual_tokens, projector

        vc, tc = model.config.vision_config, model.config.text_config
        m2 = getattr(model, "m2pt_config", None)
        proj = projector(model)
        # (under peft's modules_to_save the projector holds a frozen original and the trained copy: count one)
        lin = [m for n, m in proj.named_modules() if isinstance(m, nn.Linear) and "original_module" not in n]
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return cls(
            d_v=vc.hidden_size, i_v=vc.intermediate_size, vision_layers=max(_feature_layers(model)),
            patches=num_patches(vc), patch_in=vc.num_channels * vc.patch_size ** 2,
            pv=m2.visual_prompt_length if m2 else 0, visual_tokens=num_visual_tokens(model),
            proj_flops_per_token=sum(m.in_features * m.out_features for m in lin),
            d_t=tc.hidden_size, d_kv=getattr(tc, "num_key_value_heads", heads) * head_dim,
            i_t=tc.intermediate_size, text_layers=tc.num_hidden_layers, vocab=tc.vocab_size,
            pt=m2.text_prompt_length if m2 else 0, prefix=m2 is not None and model.m2pt.text_form == "prefix",
            train_projector=any(p.requires_grad for p in proj.parameters()),
            train_lm_head=model.get_output_embeddings().weight.requires_grad,
            train_all=any(p.requires_grad for n, p in language_model(model).named_parameters() if "lora_" not in n))

    # ------------------------------------------------------------------------------------------- pieces
    def vision_forward(self) -> tuple[int, int]:
        """(matmul FLOPs, attention FLOPs) of one image through the tower."""
        s, d = self.patches + 1 + self.pv, self.d_v
        mm = self.vision_layers * (8 * s * d * d + 4 * s * d * self.i_v) + 2 * self.patches * self.patch_in * d
        return mm, self.vision_layers * 4 * s * s * d

    def text_forward(self, tokens: int) -> tuple[int, int]:
        """(matmul FLOPs, attention FLOPs) of one row of `tokens` real tokens through the decoder layers."""
        d, layers = self.d_t, self.text_layers
        if self.prefix:
            t, p = tokens, self.pt
            mm = layers * (4 * t * d * d + 4 * t * d * self.d_kv + 6 * t * d * self.i_t + 4 * p * d * self.d_kv)
            return mm, layers * (2 * t * (t + 1) * d + 4 * t * p * d)
        s = tokens + self.pt
        mm = layers * (4 * s * d * d + 4 * s * d * self.d_kv + 6 * s * d * self.i_t)
        return mm, layers * 2 * s * (s + 1) * d

    def step(self, row_tokens: list[int], images: int, logit_rows: int) -> int:
        """Model FLOPs of forward + backward of one micro-batch (rows of `row_tokens` real tokens, `images` images,
        `logit_rows` rows through lm_head)."""
        v_mm, v_att = self.vision_forward()
        patch = 2 * self.patches * self.patch_in * self.d_v  # no backward: pixels and the conv are frozen
        proj = 2 * images * self.visual_tokens * self.proj_flops_per_token
        head = 2 * logit_rows * self.d_t * self.vocab
        t = [self.text_forward(n) for n in row_tokens]
        t_mm, t_att = sum(x[0] for x in t), sum(x[1] for x in t)
        fwd = images * (v_mm + v_att) + proj + t_mm + t_att + head
        bwd_act = images * (v_mm - patch + 2 * v_att) + proj + t_mm + 2 * t_att + head
        bwd_w = (proj if self.train_projector else 0) + (head if self.train_lm_head else 0)
        if self.train_all:
            bwd_w += images * v_mm + t_mm
        return fwd + bwd_act + bwd_w


def batch_flops(fm: FlopModel, batch: dict) -> int:
    """Model FLOPs of one training micro-batch as `pipeline.core.step.token_loss` runs it."""
    rows = batch["attention_mask"].sum(1).tolist()
    images = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
    sup = int((batch["labels"][:, 1:] != -100).sum())
    return fm.step(rows, images, sup)


def peak_tflops(device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, full) in PEAK_TFLOPS.items():
            if key in name:
                low = dtype in (torch.bfloat16, torch.float16)
                return (half if low else full), f"{name} datasheet, dense {'bf16/fp16' if low else 'tf32/fp32'}"
        return 0.0, f"{name}: no datasheet peak known; pass --peak_tflops"
    return gemm_probe(dtype=torch.float32), f"CPU fp32 GEMM probe, {torch.get_num_threads()} thread(s)"


def gemm_probe(n: int = 1024, reps: int = 8, dtype=torch.float32) -> float:
    """TFLOP/s of square matmuls on this CPU with the current thread count (best of `reps`, after a warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12
