"""The method on the stock transformers classes: counts, token counts, gradients, semantics, adapters, generation."""


import pytest
import torch
from helpers import prompts_that_matter
from torch import nn

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

CONV = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]


def _batch(base, model, convs, images=True, seed=0):
    t = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
    encs = [t.encode(c) for c in convs]
    n = max(len(e.input_ids) for e in encs)
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (n - len(e.input_ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in encs])
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(len(convs), 3, 32, 32, generator=g) if images else None
    return ids, mask, px


# ----------------------------------------------------------------------------------------------- counts
def test_trainable_counts_tiny(tiny):
    m = attach_m2pt(tiny.model, M2PTConfig())
    tr = sum(p.numel() for p in trainable_parameters(m).values())
    # 3 vision layers x 10 x 64 + 4 LLM layers x 10 x 128 + projector (64*128+128 + 128*128+128)
    assert tr == 1920 + 5120 + 24832 == 31872
    clean = attach_m2pt(build_tiny().model, M2PTConfig(visual_token_mode="clean"))
    assert len(clean.m2pt.vision_prompts) == 2  # the last layer's prompt could never reach the LLM
    assert sum(p.numel() for p in trainable_parameters(clean).values()) == 31872 - 640
    head = attach_m2pt(build_tiny().model, M2PTConfig(tune_lm_head=True))
    assert sum(p.numel() for p in trainable_parameters(head).values()) == 31872 + 640 * 128


def _llava_v1_7b_on_meta():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32000, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.device("meta"):
        m = LlavaForConditionalGeneration(cfg)
        m.model.multi_modal_projector = nn.Linear(1024, 4096)  # LLaVA-v1's linear projector
    return m


def test_trainable_counts_llava_v1_7b_shape():
    m = attach_m2pt(_llava_v1_7b_on_meta(), M2PTConfig(visual_prompt_length=10, text_prompt_length=10))
    tr = sum(p.numel() for p in trainable_parameters(m).values())
    total = sum(p.numel() for p in m.parameters())
    assert tr == 5_754_880
    assert round(100 * tr / total, 3) == 0.082
    assert num_visual_tokens(m) == 266  # 256 patches + 10 (official)
    h = attach_m2pt(_llava_v1_7b_on_meta(), M2PTConfig(tune_lm_head=True))
    assert sum(p.numel() for p in trainable_parameters(h).values()) == 5_754_880 + 131_072_000


# ------------------------------------------------------------------------------------------ token counts
@pytest.mark.parametrize("mode,expected", [("official", 16 + 10), ("clean", 16)])
def test_visual_token_count_on_real_forward(tiny, mode, expected):
    m = attach_m2pt(tiny.model, M2PTConfig(visual_token_mode=mode))
    assert num_visual_tokens(m) == expected
    seen = []
    m.model.multi_modal_projector.register_forward_hook(lambda mod, a, out: seen.append(tuple(out.shape)))
    ids, mask, px = _batch(tiny, m, [CONV, CONV])
    out = m(input_ids=ids, attention_mask=mask, pixel_values=px)
    assert seen == [(2, expected, 128)]
    assert out.logits.shape[:2] == ids.shape


# ------------------------------------------------------------------------------------------ gradients
def test_gradients_reach_every_trainable_and_frozen_stay_bit_identical(tiny):
    m = attach_m2pt(tiny.model, M2PTConfig())
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    ids, mask, px = _batch(tiny, m, [CONV, CONV])
    m.train()
    m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainable_parameters(m).items()}
    for _ in range(3):
        opt.zero_grad()
        m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids).loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def test_prompt_init_is_seeded_xavier_bound(tiny):
    a = attach_m2pt(tiny.model, M2PTConfig(seed=3))
    b = attach_m2pt(build_tiny().model, M2PTConfig(seed=3))
    c = attach_m2pt(build_tiny().model, M2PTConfig(seed=4))
    assert torch.equal(a.m2pt.text_prompts[2], b.m2pt.text_prompts[2])
    assert not torch.equal(a.m2pt.text_prompts[2], c.m2pt.text_prompts[2])
    bound = (6 / (11 * 128)) ** 0.5
    tp = a.m2pt.text_prompts[0]
    assert tp.abs().max() <= bound and tp.abs().max() > 0.9 * bound


# ------------------------------------------------------------------------------- semantics (reference loop)
def _reference_logits(m, ids, px, cfg):
    """Overwrite-per-layer M2PT written out explicitly over the stock layers (one unpadded sequence)."""
    pv, pt = cfg.visual_prompt_length, cfg.text_prompt_length
    vt = m.model.vision_tower
    x = vt.pre_layrnorm(vt.embeddings(px))
    x = torch.cat([torch.zeros(x.shape[0], pv, x.shape[2]), x], 1)
    vp = m.m2pt.vision_prompts
    states = []
    for i, layer in enumerate(vt.encoder.layers):
        if i < len(vp):
            x = torch.cat([vp[i].expand(x.shape[0], -1, -1), x[:, pv:]], 1)
        states.append(x)  # input of layer i, after its overwrite
        out = layer.forward(x, None)  # .forward: bypass the hooks under test
        x = out[0] if isinstance(out, tuple) else out
    states.append(x)
    feat = states[m.config.vision_feature_layer][:, 1:]  # LLaVA "default": drop position 0
    if cfg.visual_token_mode == "clean":
        feat = feat[:, pv:]
    img = m.model.multi_modal_projector.forward(feat)
    lm = m.model.language_model
    h = lm.embed_tokens(ids)
    h = h.masked_scatter((ids == m.config.image_token_id).unsqueeze(-1), img.reshape(-1, img.shape[-1]))
    h = torch.cat([torch.zeros(h.shape[0], pt, h.shape[2]), h], 1)
    pos = torch.arange(h.shape[1]).unsqueeze(0)
    pe = lm.rotary_emb(h, pos)
    for j, layer in enumerate(lm.layers):
        h = torch.cat([m.m2pt.text_prompts[j].expand(h.shape[0], -1, -1), h[:, pt:]], 1)
        out = layer.forward(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return m.lm_head(lm.norm(h))[:, pt:]


@pytest.mark.parametrize("mode", ["official", "clean"])
def test_hooks_equal_explicit_reference_loop(tiny, mode):
    cfg = M2PTConfig(visual_token_mode=mode)
    m = attach_m2pt(tiny.model, cfg).eval()
    ids, mask, px = _batch(tiny, m, [CONV])
    with torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        ref = _reference_logits(m, ids, px, cfg)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel
    # and the prompts really matter: different prompts -> different logits
    with torch.no_grad():
        m.m2pt.text_prompts[-1].add_(1.0)
        moved = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert (moved - got).abs().max() > 1e-3


def test_right_padded_rows_equal_rows_alone(tiny):
    m = attach_m2pt(tiny.model, M2PTConfig()).eval()
    long = [CONV[0], {"from": "gpt", "value": "a red circle on the left of a blue square"}]
    ids, mask, px = _batch(tiny, m, [CONV, long])
    with torch.no_grad():
        both = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        n = int(mask[0].sum())
        alone = m(input_ids=ids[:1, :n], attention_mask=mask[:1, :n], pixel_values=px[:1]).logits
    assert (both[0, :n] - alone[0]).abs().max() < 1e-4


def test_gradient_checkpointing_same_loss_and_grads():
    grads = []
    for gc in (False, True):
        base = build_tiny()
        m = attach_m2pt(base.model, M2PTConfig())
        if gc:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        ids, mask, px = _batch(base, m, [CONV, CONV])
        loss = m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in trainable_parameters(m).items()}))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-6
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n


# ---------------------------------------------------------------------------------------------- adapters
def test_adapter_round_trip(tmp_path, tiny):
    m = attach_m2pt(tiny.model, M2PTConfig(tune_lm_head=True, seed=5)).eval()
    with torch.no_grad():
        for p in trainable_parameters(m).values():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(m, tmp_path / "a")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == {f"vision_prompts.{i}" for i in range(3)} | {f"text_prompts.{j}" for j in range(4)} | {
        "projector.linear_1.weight", "projector.linear_1.bias", "projector.linear_2.weight",
        "projector.linear_2.bias", "lm_head.weight"}
    m2 = load_adapter(build_tiny().model, tmp_path / "a").eval()
    ids, mask, px = _batch(tiny, m, [CONV])
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, attention_mask=mask, pixel_values=px).logits,
                           m2(input_ids=ids, attention_mask=mask, pixel_values=px).logits)


def test_adapter_on_other_base_names_key_and_shapes(tmp_path, tiny):
    from transformers import LlavaForConditionalGeneration

    from pipeline.demo.tiny import tiny_config

    save_adapter(attach_m2pt(tiny.model, M2PTConfig()), tmp_path / "a")
    cfg = tiny_config(tiny.tokenizer)
    cfg.text_config.hidden_size = 96
    want = r"made for 'tiny'.*'text_prompts\.0': adapter \(10, 128\) vs model \(10, 96\)"
    with pytest.raises(ValueError, match=want):
        load_adapter(LlavaForConditionalGeneration(cfg), tmp_path / "a")
    cfg = tiny_config(tiny.tokenizer)
    cfg.text_config.num_hidden_layers = 2
    with pytest.raises(ValueError, match=r"unexpected keys \['text_prompts\.2', 'text_prompts\.3'\]"):
        load_adapter(LlavaForConditionalGeneration(cfg), tmp_path / "a")


# ---------------------------------------------------------------------------------------- LLaVA-v1 parts
def _save_llm_and_clip_parts(tiny, folder):
    """The tiny model's LLM (with its tokenizer) and CLIP tower saved as separate HF folders, as LLaVA parts ship:
    folder/llm and folder/clip."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    cfg = tiny.model.config
    llm = LlamaForCausalLM(cfg.text_config)
    llm.model.load_state_dict(tiny.model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(tiny.model.lm_head.state_dict())
    llm.save_pretrained(folder / "llm")
    tiny.tokenizer.save_pretrained(folder / "llm")
    clip = CLIPVisionModel(cfg.vision_config)
    clip.load_state_dict(tiny.model.model.vision_tower.state_dict())
    clip.save_pretrained(folder / "clip")


def test_llava_v1_parts_give_the_logits_of_the_same_weights_in_the_hf_layout(tmp_path, tiny):
    """The LLM, the CLIP tower and the stage-1 projector saved as separate parts and assembled by the loader give
    the same logits as the same weights inside one HF LLaVA model (whose projector is swapped for the v1 Linear)."""
    from pipeline.defaults import load_base
    from pipeline.demo.tiny import build_tiny

    _save_llm_and_clip_parts(tiny, tmp_path)
    proj = {"model.mm_projector.weight": torch.randn(128, 64), "model.mm_projector.bias": torch.randn(128)}
    torch.save(proj, tmp_path / "mm_projector.bin")

    base = load_base(llm=tmp_path / "llm", vision=tmp_path / "clip", mm_projector=tmp_path / "mm_projector.bin")
    assert isinstance(base.model.model.multi_modal_projector, nn.Linear)
    ref = build_tiny().model
    ref.model.multi_modal_projector = nn.Linear(64, 128)
    with torch.no_grad():
        ref.model.multi_modal_projector.weight.copy_(proj["model.mm_projector.weight"])
        ref.model.multi_modal_projector.bias.copy_(proj["model.mm_projector.bias"])
    m, r = attach_m2pt(base.model, M2PTConfig()).eval(), attach_m2pt(ref, M2PTConfig()).eval()
    ids, mask, px = _batch(base, m, [CONV])
    with torch.no_grad():
        got, want = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits, r(
            input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert got.shape == (1, ids.shape[1], 640)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - got.mean()).abs().max() > 0.1  # not a degenerate constant
    torch.save({"model.mm_projector.weight": torch.randn(128, 32)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="model.mm_projector.weight has shape"):
        load_base(llm=tmp_path / "llm", vision=tmp_path / "clip", mm_projector=tmp_path / "bad.bin")


# -------------------------------------------------------------------------------------------- generation
def _prompt_batch(base, m, questions):
    t = VicunaTemplate(base.tokenizer, m.config.image_token_id, num_visual_tokens(m))
    prompts = [t.prompt(q) for q in questions]
    n = max(map(len, prompts))
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _trained_like(seed=1):
    base = build_tiny()
    return base, prompts_that_matter(attach_m2pt(base.model, M2PTConfig(seed=seed)).eval())


def test_generation_cached_equals_uncached_and_batched_equals_single():
    base, m = _trained_like()
    qs = ["<image>\nWhat colour is the shape?", "<image>\nHow many circles are there in this picture today?"]
    ids, mask = _prompt_batch(base, m, qs)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        cached = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
        uncached = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        for r in range(2):
            n = int(mask[r].sum())
            one = m.generate(input_ids=ids[r:r + 1, -n:], attention_mask=mask[r:r + 1, -n:],
                             pixel_values=px[r:r + 1], **kw)
            assert one[0, n:].tolist() == cached[r, ids.shape[1]:].tolist()


def test_config_from_dict_warns_on_unknown_keys():
    from pipeline.core.m2pt import M2PTConfig

    with pytest.warns(UserWarning, match=r"ignoring unknown key\(s\) \['text_prompt_lenght'\]"):
        cfg = M2PTConfig.from_dict({"visual_prompt_length": 4, "text_prompt_lenght": 3})
    assert cfg.visual_prompt_length == 4 and cfg.text_prompt_length == 10


def test_a_llava_15_mlp2x_gelu_projector_file_gives_the_logits_of_the_hf_layout(tmp_path, tiny):
    """LLaVA-1.5's stage-1 mm_projector.bin (`mlp2x_gelu`: keys 0.* and 2.*) is the stock LlavaMultiModalProjector:
    loaded from the file beside the LLM and CLIP parts, the model gives the logits of the same weights in one HF
    LLaVA model. Before: only LLaVA-v1's linear projector file was accepted."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from pipeline.defaults import load_base
    from pipeline.demo.tiny import build_tiny

    _save_llm_and_clip_parts(tiny, tmp_path)
    hf = tiny.model.model.multi_modal_projector  # the shipped base's pretrained projector
    torch.save({f"model.mm_projector.{i}.{w}": getattr(getattr(hf, name), w).detach().clone()
                for i, name in (("0", "linear_1"), ("2", "linear_2")) for w in ("weight", "bias")},
               tmp_path / "mm_projector.bin")

    base = load_base(llm=tmp_path / "llm", vision=tmp_path / "clip", mm_projector=tmp_path / "mm_projector.bin")
    assert type(base.model.model.multi_modal_projector) is LlavaMultiModalProjector
    m, r = attach_m2pt(base.model, M2PTConfig()).eval(), attach_m2pt(build_tiny().model, M2PTConfig()).eval()
    ids, mask, px = _batch(base, m, [CONV])
    with torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        want = r(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - got.mean()).abs().max() > 0.1
    torch.save({"model.mm_projector.0.weight": torch.randn(128, 64)}, tmp_path / "half.bin")
    with pytest.raises(ValueError, match=r"'model.mm_projector.0.bias' missing.*mlp2x_gelu"):
        load_base(llm=tmp_path / "llm", vision=tmp_path / "clip", mm_projector=tmp_path / "half.bin")
