"""Decoding a batch whose rows use different adapters (or the base), each row getting the answer its adapter gives
alone.

One sample's path: the prompt is encoded with the training template, `<image>` expanded to the row's adapter's
visual-token count, and the rows are left-padded. Image features are computed per adapter (its visual prompts and
projector, pipeline/serving/bank.py) and written over the image placeholders. Each row's textual prompts are its
adapter's precomputed key/value prefix: the prefixes are left-padded to the longest and laid in front of the tokens
in one cache, with the mask hiding the padding, and the real tokens sit at positions `pt + …` of their own adapter,
exactly as with the adapter alone. Then the stock LLM runs prefill and one decode step per new token; the LM head is
the row's adapter's where it trained one.

Greedy decoding (temperature 0) gives each row the answer `pipeline.evaluation.generate` gives it with the adapter
attached alone (tests/test_serve.py). Sampling draws each row from its own generator (seeded by the request), so a
row's sample does not depend on its batch either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.core import prefix
from pipeline.core.chat import SYSTEM, VicunaTemplate
from pipeline.core.m2pt import language_model
from pipeline.serving.bank import Adapter, AdapterBank


@dataclass
class Row:
    """One request: its adapter, its prompt token ids (images already expanded) and image, how to decode."""

    adapter: Adapter
    ids: list[int]
    pixels: torch.Tensor | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)


def encode(bank: AdapterBank, adapter: Adapter, question: str, history=(), system: str = SYSTEM) -> list[int]:
    """The prompt ids of `question` after `history` (training template; `<image>` expands to this adapter's visual
    tokens)."""
    template = VicunaTemplate(bank.base.tokenizer, bank.model.config.image_token_id, adapter.num_visual_tokens,
                              system=system)
    return template.prompt(question, history=list(history))


def max_prompt_tokens(bank: AdapterBank, adapter: Adapter, max_new_tokens: int) -> int:
    """The longest prompt `adapter` can take with `max_new_tokens` to generate (the LLM's position limit)."""
    return bank.model.config.text_config.max_position_embeddings - adapter.pt - max_new_tokens


def _embeds(bank: AdapterBank, rows: list[Row], ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each row's image features (of its own adapter) over its image placeholders."""
    emb = language_model(bank.model).embed_tokens(ids)
    image = bank.model.config.image_token_id
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.pixels is not None:
            groups.setdefault(r.adapter.name, []).append(i)
    for idx in groups.values():
        feats = bank.image_features(rows[idx[0]].adapter, torch.stack([rows[i].pixels for i in idx]))
        for f, i in zip(feats, idx):
            where = ids[i] == image
            if int(where.sum()) != f.shape[0]:
                raise ValueError(f"row {i}: {int(where.sum())} image placeholders for {f.shape[0]} visual tokens")
            emb[i, where] = f.to(emb.dtype)
    return emb


def _prefix_cache(bank: AdapterBank, rows: list[Row]):
    """(cache holding every row's prefix, left-padded to the longest; the prefix part of the attention mask)."""
    from transformers import DynamicCache

    lm = language_model(bank.model)
    width = max(r.adapter.pt for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=bank.device)
    cache = DynamicCache(config=lm.config)
    if width == 0:
        return cache, mask
    k0 = next(r.adapter.kv for r in rows if r.adapter.kv)
    kv = []
    for j in range(len(lm.layers)):
        shape = (len(rows), k0[j][0].shape[1], width, k0[j][0].shape[3])
        keys = torch.zeros(shape, dtype=bank.dtype, device=bank.device)
        values = torch.zeros_like(keys)
        for i, r in enumerate(rows):
            if r.adapter.pt:
                keys[i, :, width - r.adapter.pt:] = r.adapter.kv[j][0][0]
                values[i, :, width - r.adapter.pt:] = r.adapter.kv[j][1][0]
        kv.append((keys, values))
    for i, r in enumerate(rows):
        mask[i, width - r.adapter.pt:] = 1
    prefix.fill(cache, kv)
    return cache, mask


def _logits(bank: AdapterBank, rows: list[Row], hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits (rows, vocab) from the last hidden states, through each row's LM head."""
    logits = bank.model.get_output_embeddings()(hidden)
    for i, r in enumerate(rows):
        if r.adapter.lm_head is not None:
            logits[i] = hidden[i] @ r.adapter.lm_head.t()
    return logits.float()


def _choose(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    out = logits.argmax(-1)
    for i, r in enumerate(rows):
        if r.temperature > 0:
            if r.generator is None:
                r.generator = torch.Generator(device=logits.device)
                r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
            probs = torch.softmax(logits[i] / r.temperature, -1)
            out[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
    return out


@torch.no_grad()
def decode(bank: AdapterBank, rows: list[Row]):
    """Yields, per decoding step, each row's new token id (None once the row has finished: EOS or its
    max_new_tokens)."""
    pad, eos = bank.base.tokenizer.pad_token_id, bank.base.tokenizer.eos_token_id
    n = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r.ids)) + r.ids for r in rows], device=bank.device)
    mask = torch.tensor([[0] * (n - len(r.ids)) + [1] * len(r.ids) for r in rows], device=bank.device)
    cache, prefix_mask = _prefix_cache(bank, rows)
    pt = torch.tensor([[r.adapter.pt] for r in rows], device=bank.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + pt
    mask = torch.cat([prefix_mask, mask], dim=1)
    lm = language_model(bank.model)
    out = lm(inputs_embeds=_embeds(bank, rows, ids), attention_mask=mask, position_ids=pos, past_key_values=cache,
             use_cache=True)
    left = [r.max_new_tokens for r in rows]
    while True:
        tokens = _choose(rows, _logits(bank, rows, out.last_hidden_state[:, -1]))
        step = []
        for i, t in enumerate(tokens.tolist()):
            step.append(t if left[i] > 0 else None)
            left[i] = 0 if t == eos else left[i] - 1
        yield step
        if max(left) <= 0:
            return
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = lm(inputs_embeds=lm.embed_tokens(tokens[:, None]), attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True)


def answers(bank: AdapterBank, rows: list[Row]) -> list[str]:
    """Every row's whole answer, decoded as `pipeline.evaluation.generate` decodes it."""
    got: list[list[int]] = [[] for _ in rows]
    for step in decode(bank, rows):
        for i, t in enumerate(step):
            if t is not None:
                got[i].append(t)
    tok = bank.base.tokenizer
    return [tok.decode(g, skip_special_tokens=True).strip() for g in got]
