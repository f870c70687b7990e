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


class Decoding:
    """A batch in flight (iteration-level scheduling): `choose` gives each live row its next token, `advance` lets the
    rows that finished leave (EOS, their max_new_tokens, or `cancelled`) and runs one decode step for the others, and
    `join` adds rows between steps. Rows are numbered in the order they came (`rows`); a step's list has one entry per
    row, None for a row not in the batch.

    Why a joining row's answer does not change: it is prefilled on its own (its prefix, its prompt, its positions),
    then its cache is laid beside the running rows', the shorter side left-padded with keys the mask hides. Every row
    keeps its own positions, so what it attends to is what it would attend to alone."""

    def __init__(self, bank: AdapterBank, rows: list[Row]):
        self.bank, self.rows, self.live, self.left = bank, [], [], []
        self.cache = self.mask = self.pos = self.hidden = self.tokens = None
        self.join(rows)

    @property
    def done(self) -> bool:
        return not self.live

    @torch.no_grad()
    def join(self, rows: list[Row]) -> None:
        out, cache, mask, pos = _prefill(self.bank, rows)
        self.live += range(len(self.rows), len(self.rows) + len(rows))
        self.rows += rows
        self.left += [r.max_new_tokens for r in rows]
        hidden, pos = out.last_hidden_state[:, -1], pos[:, -1:]
        if self.cache is None:
            self.cache, self.mask, self.pos, self.hidden = cache, mask, pos, hidden
            return
        width = max(self.mask.shape[1], mask.shape[1])
        kv = [(torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)]),
               torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)]))
              for a, b in zip(self.cache.layers, cache.layers)]
        from transformers import DynamicCache

        self.cache = DynamicCache(config=language_model(self.bank.model).config)
        prefix.fill(self.cache, kv)
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.pos = torch.cat([self.pos, pos])
        self.hidden = torch.cat([self.hidden, hidden])

    @torch.no_grad()
    def choose(self) -> list[int | None]:
        """Each live row's next token (None for the others)."""
        eos = self.bank.base.tokenizer.eos_token_id
        active = [self.rows[i] for i in self.live]
        self.tokens = _choose(active, _logits(self.bank, active, self.hidden))
        step: list[int | None] = [None] * len(self.rows)
        for i, t in zip(self.live, self.tokens.tolist()):
            step[i] = t
            self.left[i] = 0 if t == eos else self.left[i] - 1
        return step

    @torch.no_grad()
    def advance(self) -> list[int]:
        """The rows that finished leave (their cache, mask and position rows are dropped, so later steps cost what
        the remaining rows cost); the others take one decode step. Returns the rows that left."""
        keep = [k for k, i in enumerate(self.live) if self.left[i] > 0 and not self.rows[i].cancelled]
        kept = set(keep)
        gone = [i for k, i in enumerate(self.live) if k not in kept]
        if not keep:
            self.live, self.cache = [], None
            return gone
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=1)
        pos, tokens = self.pos + 1, self.tokens
        if gone:
            index = torch.tensor(keep, device=self.bank.device)
            self.cache.batch_select_indices(index)
            mask, pos, tokens = mask[index], pos[index], tokens[index]
            self.live = [self.live[k] for k in keep]
        lm = language_model(self.bank.model)
        out = lm(inputs_embeds=lm.embed_tokens(tokens[:, None]), attention_mask=mask, position_ids=pos,
                 past_key_values=self.cache, use_cache=True)
        self.mask, self.pos, self.hidden = mask, pos, out.last_hidden_state[:, -1]
        return gone


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`x` grown to `width` along `dim` with zeros in front (padding keys and values, or 0 in a mask)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def decode(bank: AdapterBank, rows: list[Row]):
    """Yields, per decoding step, each row's new token id (None once the row has finished: EOS, its max_new_tokens,
    or `cancelled` set while it ran): a Decoding no row joins."""
    batch = Decoding(bank, rows)
    while True:
        yield batch.choose()
        batch.advance()
        if batch.done:
            return


def answers(bank: AdapterBank, rows: list[Row]) -> list[str]:
    """Every row's whole answer, decoded as `pipeline.evaluation.generate` decodes it."""
    got: list[list[int]] = [[] for _ in rows]
    for step in decode(bank, rows):
        for i, t in enumerate(step):
            if t is not None:
                got[i].append(t)
    tok = bank.base.tokenizer
    return [tok.decode(g, skip_special_tokens=True).strip() for g in got]
