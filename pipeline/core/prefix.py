"""M²PT's textual prompts as a per-layer key/value prefix: the same function as prompt slots, with less work.

With slots (pipeline/core/m2pt.py), every decoder layer `j` runs its whole computation on `pt` extra positions whose
input is overwritten with `T_j`. Their only effect on the real tokens is through layer `j`'s keys and values at
positions `0..pt-1`, and those depend on `T_j` alone: `rope(k_proj(input_layernorm(T_j)))` and
`v_proj(input_layernorm(T_j))`. Their queries, attention outputs and MLP are computed and thrown away. Here the
keys and values are computed directly, with the layer's own stock modules (its norm, k/v projections with their
grouped-query heads, and the model's rotary embedding), and handed to the stock attention as a prefix cache; the real
tokens keep the positions `pt + …` they have with slots. No modeling file is forked, and the adapter files are the
same.

* Training (no cache given): a `PrefixCache` holds the prefix and hands `[prefix ; tokens]` to each layer without
  storing the tokens, so gradient checkpointing's recomputation of a layer sees the same cache; gradients reach
  `T_j` through the cached tensors.
* Generation: at prefill the prefix is written into the cache `generate` passes, and the decode steps run as with
  slots (their keys/values were cached at prefill too).
* A row's prefix depends on its prompts alone, so rows of different adapters share a batch, each with its own
  prefix computed once per adapter (pipeline/serving/: the visual prompts and projector are applied per adapter).

Where it does not apply, the slots stay: an attention with per-head key norms (Qwen3, ...), a sliding window, or a
model whose layers do not all have prompts (`prefix_unsupported` says why). The vision tower keeps slots too: stock
CLIP attention takes no past keys/values, so a prefix there would need a forked attention.
"""

from __future__ import annotations

import sys

import torch


def prefix_unsupported(lm, n_prompted: int) -> str | None:
    """Why the LLM's layers cannot take the prompts as a key/value prefix (None: they can)."""
    layer = lm.layers[0]
    attn = getattr(layer, "self_attn", None)
    if n_prompted != len(lm.layers):
        return f"prompts in {n_prompted} of {len(lm.layers)} layers"
    if attn is None or not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim")):
        return f"{type(attn).__name__} has no k_proj / v_proj / head_dim"
    if not hasattr(layer, "input_layernorm") or not hasattr(lm, "rotary_emb"):
        return f"{type(layer).__name__}: no input_layernorm or rotary embedding"
    if any(hasattr(attn, a) for a in ("k_norm", "q_norm")):
        return f"{type(attn).__name__} normalises keys per head"
    if getattr(lm.config, "sliding_window", None) and getattr(lm.config, "use_sliding_window", True):
        return "sliding-window attention"
    if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
        return f"{type(attn).__module__} has no apply_rotary_pos_emb"
    return None


def layer_prefix(lm, j: int, prompt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(keys, values) of layer `j` for prompt rows `prompt` (rows, pt, d): (rows, kv heads, pt, head dim) each."""
    layer = lm.layers[j]
    attn = layer.self_attn
    h = layer.input_layernorm(prompt)
    shape = (*prompt.shape[:2], -1, attn.head_dim)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    _, k = rotate(k, k, cos, sin)
    return k, v


def prefix_kv(lm, prompts, pt: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's prefix for a batch shaped like `like` (batch, q, d); `prompts(j)`: layer j's (pt, d) prompt."""
    bsz = like.shape[0]
    pos = torch.arange(pt, device=like.device).unsqueeze(0)
    cos, sin = lm.rotary_emb(like, position_ids=pos)
    out = []
    for j in range(len(lm.layers)):
        k, v = layer_prefix(lm, j, prompts(j).to(like.dtype).unsqueeze(0), cos, sin)
        out.append((k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)))
    return out


def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A cache holding only the prompts' keys/values: each layer gets `[prefix ; its tokens]`, and nothing is
        stored, so a layer recomputed by gradient checkpointing sees the same cache."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    return PrefixCache


def fill(cache, kv) -> None:
    """Write every layer's prefix into `cache` (through DynamicCache's own update, which stores)."""
    from transformers import DynamicCache

    for j, (k, v) in enumerate(kv):
        DynamicCache.update(cache, k, v, j)


def training_cache(config, kv):
    cache = _prefix_cache_class()(config=config)
    fill(cache, kv)
    return cache
