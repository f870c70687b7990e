"""Textual prompts as a key/value prefix (pipeline/core/prefix.py) against the slot form they replace: the same logits
and gradients, padded either side, with gradient checkpointing, in generation and through the trainer."""

import pytest
import torch
from helpers import REPO, prompts_that_matter, read_metrics, run_inprocess, train_args

from pipeline.core.chat import VicunaTemplate
from pipeline.core.m2pt import (
    M2PTConfig,
    attach_m2pt,
    load_adapter,
    num_visual_tokens,
    save_adapter,
    trainable_parameters,
)
from pipeline.demo.tiny import build_tiny

SHORT = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
LONG = [{"from": "human", "value": "<image>\nDescribe the picture in a few words, please."},
        {"from": "gpt", "value": "a red circle on the left of a blue square"}]


def _pair(mode: str, gc: bool = False, seed: int = 1):
    """The same adapter (scaled up so prompts matter) in both forms, each on its own copy of the base."""
    models = {}
    for form in ("slots", "prefix"):
        base = build_tiny()
        m = prompts_that_matter(attach_m2pt(base.model, M2PTConfig(visual_token_mode=mode, seed=seed),
                                            text_prompts=form))
        if gc:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[form] = (base, m)
    assert models["prefix"][1].m2pt.text_form == "prefix" and models["slots"][1].m2pt.text_form == "slots"
    return models


def _batch(base, m, side: str):
    t = VicunaTemplate(base.tokenizer, m.config.image_token_id, num_visual_tokens(m))
    encs = [t.encode(c) for c in (SHORT, LONG)]
    n = max(len(e.input_ids) for e in encs)
    pad = base.tokenizer.pad_token_id
    rows, masks, labels = [], [], []
    for e in encs:
        k = n - len(e.input_ids)
        fill = ([pad] * k, [0] * k, [-100] * k)
        if side == "right":
            rows.append(e.input_ids + fill[0]), masks.append([1] * len(e.input_ids) + fill[1])
            labels.append(e.labels + fill[2])
        else:
            rows.append(fill[0] + e.input_ids), masks.append(fill[1] + [1] * len(e.input_ids))
            labels.append(fill[2] + e.labels)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(labels), px


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("mode", ["official", "clean"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("gc", [False, True])
def test_prefix_gives_the_slots_logits_and_gradients(mode, side, gc):
    out = {}
    for form, (base, m) in _pair(mode, gc).items():
        m.train()
        ids, mask, labels, px = _batch(base, m, side)
        res = m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
        res.loss.backward()
        keep = mask.bool()
        out[form] = (res.logits[keep].detach(), res.loss.item(),
                     {n: p.grad.clone() for n, p in trainable_parameters(m).items()})
    (la, loss_a, ga), (lb, loss_b, gb) = out["slots"], out["prefix"]
    assert _rel(lb, la) < 1e-5 and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert set(ga) == set(gb) and any(k.startswith("m2pt.text_prompts") for k in ga)
    for k in ga:
        assert ga[k].abs().max() > 0, k  # every prompt and the projector get a gradient
        assert _rel(gb[k], ga[k]) < 1e-5, k


def test_an_adapter_saved_in_one_form_scores_the_same_in_the_other(tmp_path):
    base, m = _pair("official")["slots"]
    save_adapter(m, tmp_path / "a", base_name="tiny")
    ids, mask, _, px = _batch(base, m, "right")
    logits = {}
    for form in ("slots", "prefix"):
        fresh = build_tiny()
        loaded = load_adapter(fresh.model, tmp_path / "a") if form == "prefix" else m
        assert loaded.m2pt.text_form == form
        with torch.no_grad():
            logits[form] = loaded.eval()(input_ids=ids, attention_mask=mask, pixel_values=px).logits[mask.bool()]
    assert _rel(logits["prefix"], logits["slots"]) < 1e-5


def test_cached_generation_with_the_prefix_equals_uncached_and_the_slots():
    pair = _pair("official")
    seqs = {}
    for form, (base, m) in pair.items():
        t = VicunaTemplate(base.tokenizer, m.config.image_token_id, num_visual_tokens(m))
        prompts = [t.prompt(q) for q in ("<image>\nWhat colour is the shape?", "<image>\nHow many circles are there?")]
        n = max(map(len, prompts))
        ids = torch.tensor([[base.tokenizer.pad_token_id] * (n - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            cached = m.eval().generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
            uncached = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False, **kw)
        assert torch.equal(cached, uncached), form
        seqs[form] = cached
    assert torch.equal(seqs["prefix"], seqs["slots"])


def test_a_model_whose_attention_normalises_keys_keeps_the_slots():
    from pipeline.core.prefix import prefix_unsupported

    lm = build_tiny().model.model.language_model
    assert prefix_unsupported(lm, len(lm.layers)) is None
    assert prefix_unsupported(lm, len(lm.layers) - 1) == f"prompts in {len(lm.layers) - 1} of {len(lm.layers)} layers"
    for form, expect in (("auto", "slots"), ("prefix", None)):
        model = build_tiny().model
        for layer in model.model.language_model.layers:  # as Qwen3's attention has
            layer.self_attn.k_norm = torch.nn.Identity()
        if expect is None:
            with pytest.raises(ValueError, match="cannot be a key/value prefix here: .* normalises keys"):
                attach_m2pt(model, M2PTConfig(), text_prompts=form)
        else:
            assert attach_m2pt(model, M2PTConfig(), text_prompts=form).m2pt.text_form == expect


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_the_trainer_takes_the_same_steps_with_either_form(shards, tmp_path, zero):
    losses = {}
    for form in ("slots", "prefix"):
        out = tmp_path / form
        run_inprocess(train_args(shards, out, "--max_steps", "4", "--dataloader_num_workers", "0", "--text_prompts",
                                 form, "--deepspeed", str(REPO / "ds_configs" / f"{zero}.json"),
                                 "--gradient_checkpointing"))
        losses[form] = [x["loss"] for x in read_metrics(out)[0]]
    assert len(losses["slots"]) == 4
    assert losses["prefix"] == pytest.approx(losses["slots"], rel=1e-5)
