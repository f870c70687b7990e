"""The training forward (pipeline/core/step.py) does less work than the stock model and computes the same thing:
supervised-only logits, the index splice, the vision tower cut after its deepest feature layer."""

import pytest
import torch

from pipeline.core.m2pt import M2PTConfig, attach_m2pt, num_visual_tokens, vision_core
from pipeline.core.models import skip_unused_vision_layers
from pipeline.core.step import image_features, linear_cross_entropy, splice, supervised_rows, token_loss
from pipeline.demo.tiny import build_tiny


def full_logits_loss(model, b):
    """The reference: the stock forward's logits at every position, shifted cross-entropy over supervised labels."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def _batch(model, layout: str, images: bool = True, seed: int = 0):
    """Three rows of different lengths; `layout`: right / left padding; row 2 has no supervised token."""
    g = torch.Generator().manual_seed(seed)
    cfg, nv = model.config, num_visual_tokens(model)
    lengths, n = [nv + 14, nv + 9, nv + 6], nv + 14
    ids = torch.zeros(3, n, dtype=torch.long)
    labels = torch.full((3, n), -100)
    mask = torch.zeros(3, n, dtype=torch.long)
    for r, k in enumerate(lengths):
        row = torch.randint(5, cfg.text_config.vocab_size, (k,), generator=g)
        row[0] = 1
        if images:
            row[2:2 + nv] = cfg.image_token_id
        lab = torch.full((k,), -100)
        if r < 2:
            lab[-(3 + r):] = row[-(3 + r):]  # the answer at the end of the row
        cols = slice(0, k) if layout == "right" else slice(n - k, n)
        ids[r, cols], labels[r, cols], mask[r, cols] = row, lab, 1
    px = torch.randn(3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g) if images else None
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}


def _grads(model):
    """Gradients of the trainables (None: no graph edge, e.g. the vision side of a batch without images)."""
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tune_lm_head", [False, True])
@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("images", [True, False])
def test_supervised_only_loss_and_gradients_equal_the_full_logits_path(monkeypatch, tune_lm_head, layout, images):
    monkeypatch.setattr("pipeline.core.step.CHUNK_ROWS", 2)  # several chunks, the last one short
    model = attach_m2pt(build_tiny().model, M2PTConfig(tune_lm_head=tune_lm_head)).train()
    skip_unused_vision_layers(model)
    b = _batch(model, layout, images)
    assert supervised_rows(b["labels"])[1].numel() == 7  # 3 + 4 answer tokens; row 2 none

    want = full_logits_loss(model, b)
    want.backward()
    want_g = _grads(model)
    model.zero_grad()
    got = token_loss(model, model, b, "cpu", torch.float32)
    got.backward()
    got_g = _grads(model)

    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(got_g) == set(want_g) and ("lm_head.weight" in got_g) == tune_lm_head
    for name, g in want_g.items():
        if not images and name.startswith(("m2pt.vision", "model.multi_modal_projector")):
            assert g is None and got_g[name] is None  # neither path has a graph edge (the trainer adds a x0 one)
            continue
        assert g.abs().sum() > 0, name
        # float32 sums in another order (chunks): equal to 1e-4 relative, 1e-5 of the largest entry absolute
        assert torch.allclose(got_g[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item()), name


def test_linear_cross_entropy_without_supervised_rows_is_zero_and_keeps_the_graph():
    head = torch.nn.Linear(4, 7, bias=False)
    h = torch.randn(0, 4, requires_grad=True)
    loss = linear_cross_entropy(h, head, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and head.weight.grad is not None and head.weight.grad.abs().sum() == 0


def test_splice_equals_masked_scatter_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 9, 5, generator=g, requires_grad=True)
    ids = torch.tensor([[1, 4, 4, 4, 7, 8, 0, 0, 0], [1, 2, 4, 4, 4, 3, 9, 9, 2]])
    feats = torch.randn(6, 5, generator=g, requires_grad=True)
    up = torch.randn(2, 9, 5, generator=g)

    mask = (ids == 4).unsqueeze(-1).expand_as(embeds)
    want = embeds.masked_scatter(mask, feats)
    want_e, want_f = torch.autograd.grad((want * up).sum(), (embeds, feats))
    got = splice(embeds, feats, (ids.reshape(-1) == 4).nonzero().squeeze(1))
    got_e, got_f = torch.autograd.grad((got * up).sum(), (embeds, feats))

    assert torch.equal(got, want) and torch.equal(got_e, want_e) and torch.equal(got_f, want_f)
    with pytest.raises(ValueError, match="6 image tokens, 5 feature rows"):
        splice(embeds, feats[:5], (ids.reshape(-1) == 4).nonzero().squeeze(1))


@pytest.mark.parametrize("mode", ["official", "clean"])
@pytest.mark.parametrize("feature_layer,skipped", [(-2, 1), (-1, 0), ([0, 1], 2)])
def test_vision_tower_stops_after_its_deepest_feature_layer_with_the_same_features(mode, feature_layer, skipped):
    def model():
        base = build_tiny().model
        base.config.vision_feature_layer = feature_layer
        if isinstance(feature_layer, list):  # concatenated layers: a projector twice as wide, seeded alike
            from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

            torch.manual_seed(0)
            base.model.multi_modal_projector = LlavaMultiModalProjector(base.config)
        return attach_m2pt(base, M2PTConfig(visual_token_mode=mode)).eval()

    full, cut = model(), model()
    assert skip_unused_vision_layers(cut) == skipped
    ran = []
    for layer in vision_core(cut).encoder.layers:
        layer.mlp.register_forward_hook(lambda *a: ran.append(1))
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = image_features(full, px), image_features(cut, px)
    assert len(ran) == 3 - skipped  # one MLP call per layer that still runs (3 layers)
    assert got.shape[0] == 2 * num_visual_tokens(cut) and torch.equal(got, want)


def test_flop_formula_matches_a_hand_count_on_the_tiny_config():
    from pipeline.core.flops import FlopModel, batch_flops

    # pv = pt = 10, official mode, projector trains; textual prompts as slots (the prefix form: below)
    model = attach_m2pt(build_tiny().model, M2PTConfig(), text_prompts="slots")
    fm = FlopModel.from_model(model)
    vocab = model.config.text_config.vocab_size
    # One row: 40 real tokens + 5 pads, one image, labels on its last 3 tokens.
    ids = torch.zeros(1, 45, dtype=torch.long)
    mask = torch.zeros(1, 45, dtype=torch.long)
    mask[0, :40] = 1
    labels = torch.full((1, 45), -100)
    labels[0, 37:40] = 7
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.zeros(1, 3, 32, 32)}

    # vision: width 64, MLP 128, 2 of 3 layers run (feature layer -2), 16 patches + CLS + 10 prompts = 27 positions
    v_layer = 8 * 27 * 64 * 64 + 4 * 27 * 64 * 128  # q, k, v, o + MLP
    v_att = 2 * 4 * 27 * 27 * 64
    patch = 2 * 16 * (3 * 8 * 8) * 64
    v_mm = 2 * v_layer + patch
    # projector: gelu MLP 64 -> 128 -> 128 on 26 visual tokens (official: 16 patches + CLS + 9 prompts)
    proj = 2 * 26 * (64 * 128 + 128 * 128)
    # LLM: width 128, 2 kv heads of 32 (k/v width 64), MLP 256, 4 layers; 40 tokens + 10 prompt slots = 50
    t_layer = 2 * 50 * 128 * 128 * 2 + 2 * 50 * 128 * 64 * 2 + 3 * 2 * 50 * 128 * 256
    t_mm = 4 * t_layer
    t_att = 4 * 2 * 50 * 51 * 128  # causal: 50 * 51 / 2 query-key pairs, two products
    head = 2 * 3 * 128 * vocab  # the 3 supervised rows only
    forward = v_mm + v_att + proj + t_mm + t_att + head
    backward = (v_mm - patch) + 2 * v_att + proj + t_mm + 2 * t_att + head + proj  # + the projector's weight grads
    assert (v_layer, t_layer) == (1_769_472, 14_745_600)
    assert batch_flops(fm, batch) == forward + backward

    # --tune_lm_head adds exactly the head's weight gradient
    head_model = attach_m2pt(build_tiny().model, M2PTConfig(tune_lm_head=True), text_prompts="slots")
    assert batch_flops(FlopModel.from_model(head_model), batch) == forward + backward + head

    # Prompts as a key/value prefix: the 40 tokens through q, k, v, o and the MLP, the 10 prompts through k and v
    # only, and each token sees 10 more keys.
    p_layer = 2 * 40 * 128 * 128 * 2 + 2 * 40 * 128 * 64 * 2 + 3 * 2 * 40 * 128 * 256 + 2 * 10 * 128 * 64 * 2
    p_att = 4 * (2 * 40 * 41 * 128 + 4 * 40 * 10 * 128)
    prefix = FlopModel.from_model(attach_m2pt(build_tiny().model, M2PTConfig(), text_prompts="prefix"))
    p_fwd = v_mm + v_att + proj + 4 * p_layer + p_att + head
    p_bwd = (v_mm - patch) + 2 * v_att + proj + 4 * p_layer + 2 * p_att + head + proj
    assert batch_flops(prefix, batch) == p_fwd + p_bwd < forward + backward
