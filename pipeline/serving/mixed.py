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
attached alone (tests/serving/test_serve.py). Sampling draws each row from its own generator (seeded by the
request), so a row's sample does not depend on its batch either.
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
    cancelled: bool = False  # set by the server when the client has gone: the row leaves at the next step
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit at every step (OpenAI's logit_bias)


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
    logits = logits.float()
    for i, r in enumerate(rows):
        if r.logit_bias:
            index = torch.tensor(list(r.logit_bias), device=logits.device)
            logits[i, index] += torch.tensor(list(r.logit_bias.values()), device=logits.device)
    return logits


def _choose(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    out = logits.argmax(-1)
    for i, r in enumerate(rows):
        if r.temperature > 0:
            if r.generator is None:
                if r.seed is None:  # kept, so that the row can be decoded again with the same draws
                    r.seed = torch.seed()
                r.generator = torch.Generator(device=logits.device)
                r.generator.manual_seed(r.seed)
            # In float64 and after subtracting the maximum: a tiny temperature (1e-300, which float32 rounds to 0)
            # then tends to greedy instead of turning the logits into 0 / 0 or inf - inf = nan.
            scaled = (logits[i] - logits[i].max()).double() / r.temperature
            out[i] = torch.multinomial(torch.softmax(scaled, -1), 1, generator=r.generator)[0]
    return out


def _prefill(bank: AdapterBank, rows: list[Row]):
    """The LLM's output over the left-padded prompts behind their prefixes, with the cache, mask and positions."""
    pad = bank.base.tokenizer.pad_token_id
    n = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r.ids)) + r.ids for r in rows], device=bank.device)
    mask = torch.tensor([[0] * (n - len(r.ids)) + [1] * len(r.ids) for r in rows], device=bank.device)
    cache, prefix_mask = _prefix_cache(bank, rows)
    pt = torch.tensor([[r.adapter.pt] for r in rows], device=bank.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + pt
    mask = torch.cat([prefix_mask, mask], dim=1)
    out = language_model(bank.model)(inputs_embeds=_embeds(bank, rows, ids), attention_mask=mask, position_ids=pos,
                                     past_key_values=cache, use_cache=True)
    return out, cache, mask, pos


@torch.no_grad()
def decode(bank: AdapterBank, rows: list[Row]):
    """Yields, per decoding step, each row's new token id (None once the row has finished: EOS, its max_new_tokens,
    or `cancelled` set while it ran). A finished row leaves the batch: its cache, mask and position rows are dropped
    before the next step, so the steps after it cost what the remaining rows cost."""
    eos = bank.base.tokenizer.eos_token_id
    lm = language_model(bank.model)
    out, cache, mask, pos = _prefill(bank, rows)
    live = list(range(len(rows)))  # the rows still in the batch, by their index in `rows`
    left = [r.max_new_tokens for r in rows]
    while True:
        active = [rows[i] for i in live]
        tokens = _choose(active, _logits(bank, active, out.last_hidden_state[:, -1]))
        step: list[int | None] = [None] * len(rows)
        for i, t in zip(live, tokens.tolist()):
            step[i] = t
            left[i] = 0 if t == eos else left[i] - 1
        yield step
        keep = [k for k, i in enumerate(live) if left[i] > 0 and not rows[i].cancelled]
        if not keep:
            return
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        pos = pos[:, -1:] + 1
        if len(keep) < len(live):
            index = torch.tensor(keep, device=bank.device)
            cache.batch_select_indices(index)
            mask, pos, tokens = mask[index], pos[index], tokens[index]
            live = [live[k] for k in keep]
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
