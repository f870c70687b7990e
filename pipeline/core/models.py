"""Base models: the two ways to get a stock `LlavaForConditionalGeneration` (+ tokenizer + image processor)
from files on disk.

(a) a Hugging Face llava directory (`llava-hf/*` layout)     -> `load_base(model=DIR)`
(b) LLaVA parts like the reference: LLM dir + CLIP dir + stage-1 `mm_projector.bin` (v1 linear or 1.5 mlp2x_gelu)
                                                               -> `load_base(llm=DIR, vision=DIR, mm_projector=FILE)`

The embedded demo model ("tiny", "tiny-random") is not loaded here: `pipeline.defaults.load_base` routes those
names to pipeline/demo/tiny.py and everything else to this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

@dataclass
class Base:
    model: nn.Module  # LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    name: str


def pick_attn_implementation(requested: str | None = None) -> str:
    """flash_attention_2 when CUDA and flash-attn are both present, else SDPA (transformers does not fall back)."""
    from transformers.utils import is_flash_attn_2_available

    if requested and requested != "auto":
        if requested == "flash_attention_2" and not (torch.cuda.is_available() and is_flash_attn_2_available()):
            raise ValueError("--attn_implementation flash_attention_2 needs CUDA and the flash-attn package")
        return requested
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def clip_image_processor(size: int, **kw):
    # The PIL backend needs no torchvision (PyPI's torchvision does not import beside the pinned torch build).
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kw)


def _check_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {p}: no such directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {p}: no config.json (is this a Hugging Face model directory?)")
    return p


LLAVA_MODEL_TYPES = ("llava",)  # what LlavaForConditionalGeneration loads
VISION_MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")


def _read_config(p: Path, what: str) -> dict:
    import json

    try:
        return json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {p}: unreadable config.json ({e})") from None


def _check_weights(p: Path, what: str) -> None:
    """Weights must be there before anything loads (from_pretrained's own error is a bare OSError traceback)."""
    import json

    for index in sorted(p.glob("*.index.json")):
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{what} {p}: unreadable {index.name} ({e})") from None
        missing = sorted(f for f in files if not (p / f).is_file())
        if missing:
            raise FileNotFoundError(f"{what} {p}: {len(missing)} weight file(s) listed in {index.name} are missing, "
                                    f"e.g. {missing[0]}")
        return
    if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        raise FileNotFoundError(f"{what} {p}: config.json but no weights (*.safetensors or pytorch_model*.bin)")


def check_model_source(model: str | None = None, llm=None, vision=None, mm_projector=None) -> None:
    """Check a model source from its files alone, before any weight is read: the folder's `model_type` must be
    LLaVA (or, for LLaVA-v1 parts, a causal LM + a CLIP/SigLIP vision model + a projector file) and its weights
    must exist. A Llama folder given as --model would otherwise be loaded into LLaVA defaults (a 7B random model,
    tens of GB) before anything failed."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if llm or vision or mm_projector:
        if not (llm and vision and mm_projector) or model:
            raise ValueError("LLaVA-v1 parts need all of --model_llm, --model_vision and --mm_projector (and no "
                             "--model)")
        p = _check_dir(llm, "--model_llm")
        mt = _read_config(p, "--model_llm").get("model_type")
        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or mt in LLAVA_MODEL_TYPES:
            raise ValueError(f"--model_llm {p}: model_type {mt!r} is not a causal language model (Llama, Vicuna, "
                             "Mistral, Qwen2, ...)")
        _check_weights(p, "--model_llm")
        v = _check_dir(vision, "--model_vision")
        vt = _read_config(v, "--model_vision").get("model_type")
        if vt not in VISION_MODEL_TYPES:
            raise ValueError(f"--model_vision {v}: model_type {vt!r} is not a CLIP/SigLIP vision model "
                             f"({', '.join(VISION_MODEL_TYPES)})")
        _check_weights(v, "--model_vision")
        if not Path(mm_projector).is_file():
            raise FileNotFoundError(f"--mm_projector {mm_projector}: no such file")
        return
    if not model:
        raise ValueError("no model given: --model FOLDER, or --model_llm, --model_vision and --mm_projector")
    p = _check_dir(model, "--model")
    mt = _read_config(p, "--model").get("model_type")
    if mt not in LLAVA_MODEL_TYPES:
        hint = ("; for LLaVA-v1 parts (this LLM + a CLIP tower + a stage-1 mm_projector.bin) use --model_llm, "
                "--model_vision and --mm_projector" if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "")
        raise ValueError(f"--model {p}: model_type {mt!r} is not a LLaVA model ({', '.join(LLAVA_MODEL_TYPES)}){hint}")
    _check_weights(p, "--model")


def load_hf_llava(path, dtype=torch.float32, attn: str = "sdpa") -> Base:
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    p = _check_dir(path, "--model")
    model = LlavaForConditionalGeneration.from_pretrained(str(p), dtype=dtype, attn_implementation=attn)
    tok = AutoTokenizer.from_pretrained(str(p))
    try:
        ip = AutoImageProcessor.from_pretrained(str(p), backend="pil")
    except TypeError:
        ip = AutoImageProcessor.from_pretrained(str(p))
    _ensure_pad(tok, model)
    model.m2pt_base = str(p)
    return Base(model, tok, ip, str(p))


def ensure_pad_token(tok):
    """The one pad-token rule: Vicuna/Llama ship no pad token; the reference pads with unk (else eos)."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _ensure_pad(tok, model):
    ensure_pad_token(tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id


def load_llava_v1_parts(llm, vision, mm_projector, dtype=torch.float32, attn: str = "sdpa") -> Base:
    """Assemble LLaVA-v1 from its parts into stock classes, as the reference does.

    The stage-1 projector file decides the projector (`load_stage1_projector`): LLaVA-v1's single Linear (dv -> dt,
    with bias) replaces LlavaMultiModalProjector (a thin module swap, no fork); LLaVA-1.5's mlp2x_gelu is that
    module. `<image>` is added to the tokenizer and only the *input* embedding gets a row for it (its value
    never matters: LLaVA overwrites those positions with image features); the LM head keeps the LLM's vocabulary,
    so the model can never emit the placeholder and the trainable count with --tune_lm_head stays the LLM's."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    llm_dir, vis_dir = _check_dir(llm, "--model_llm"), _check_dir(vision, "--model_vision")
    proj_file = Path(mm_projector)
    if not proj_file.is_file():
        raise FileNotFoundError(f"--mm_projector {proj_file}: no such file")
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    vis_cfg = AutoConfig.from_pretrained(str(vis_dir))
    vis_cfg = getattr(vis_cfg, "vision_config", vis_cfg)  # a full CLIP dir holds a CLIPConfig
    text_cfg = AutoConfig.from_pretrained(str(llm_dir))
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=vis_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_id=image_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    cfg.vision_config.model_type, cfg.text_config.model_type = vis_cfg.model_type, text_cfg.model_type
    cfg._attn_implementation = attn
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    lm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, attn_implementation=attn)
    tower = CLIPVisionModel.from_pretrained(str(vis_dir), dtype=dtype, attn_implementation=attn)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.vision_tower = tower
    model.model.multi_modal_projector = load_stage1_projector(proj_file, cfg, dtype)
    emb = model.model.language_model.embed_tokens
    if image_id >= emb.num_embeddings:
        new = nn.Embedding(image_id + 1, emb.embedding_dim, padding_idx=emb.padding_idx, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight[: emb.num_embeddings] = emb.weight
            new.weight[emb.num_embeddings :] = emb.weight.mean(0)
        model.model.language_model.embed_tokens = new
    model.config.text_config.vocab_size = model.lm_head.out_features
    model.generation_config = lm.generation_config
    _ensure_pad(tok, model)
    ip = clip_image_processor(vis_cfg.image_size)
    model.m2pt_base = f"llava-v1 parts: {llm_dir} + {vis_dir} + {proj_file}"
    return Base(model, tok, ip, model.m2pt_base)


def load_stage1_projector(path: Path, config, dtype) -> nn.Module:
    """LLaVA's stage-1 `mm_projector.bin`, as the tensors say: LLaVA-v1's `linear` projector (one Linear, swapped in
    for LlavaMultiModalProjector) or LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear: exactly the stock
    LlavaMultiModalProjector, which keeps its class)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    d_in, d_out = config.vision_config.hidden_size, config.text_config.hidden_size
    prefix = "model.mm_projector."
    if f"{prefix}0.weight" in sd:
        shapes = {"0.weight": (d_out, d_in), "0.bias": (d_out,), "2.weight": (d_out, d_out), "2.bias": (d_out,)}
        _check_projector_keys(path, sd, {prefix + k: v for k, v in shapes.items()}, f"mlp2x_gelu ({d_in} -> {d_out})")
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        proj = LlavaMultiModalProjector(config).to(dtype)
        names = {"0": "linear_1", "2": "linear_2"}
    else:
        _check_projector_keys(path, sd, {f"{prefix}weight": (d_out, d_in), f"{prefix}bias": (d_out,)},
                              f"linear ({d_in} -> {d_out})")
        proj, names = nn.Linear(d_in, d_out, dtype=dtype), {}
    with torch.no_grad():
        for k, v in sd.items():
            idx, _, what = k[len(prefix):].rpartition(".")
            target = getattr(proj, names[idx]) if idx else proj
            getattr(target, what).copy_(v)
    return proj


def _check_projector_keys(path: Path, sd: dict, want: dict, kind: str) -> None:
    for k, shape in want.items():
        if k not in sd:
            raise ValueError(f"{path}: key {k!r} missing (has {sorted(sd)[:6]}); expected a LLaVA stage-1 {kind} "
                             "projector")
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape} for a {kind} projector "
                             "(vision tower -> LLM)")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected key(s) {extra[:3]} for a {kind} projector")


def load_base(model: str | None = None, llm=None, vision=None, mm_projector=None, dtype=torch.float32,
              attn: str | None = None) -> Base:
    """A Hugging Face llava folder (`model`) or LLaVA-v1 parts, checked first (`check_model_source`); the vision
    layers after the deepest feature layer are skipped (`skip_unused_vision_layers`)."""
    check_model_source(model, llm, vision, mm_projector)
    attn = pick_attn_implementation(attn)
    log.info("attention implementation: %s", attn)
    if llm or vision or mm_projector:
        base = load_llava_v1_parts(llm, vision, mm_projector, dtype=dtype, attn=attn)
    else:
        base = load_hf_llava(model, dtype=dtype, attn=attn)
    log_skipped_vision_layers(base.model)
    return base


def log_skipped_vision_layers(model) -> None:
    # DEBUG: every app loads a base and the line is the same each time; it explains a count, not something to act on
    n = skip_unused_vision_layers(model)
    if n:
        log.debug("vision tower: the last %d layer(s) feed no feature layer (vision_feature_layer %s) and are skipped",
                 n, model.config.vision_feature_layer)


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def skip_unused_vision_layers(model) -> int:
    """Make the vision-encoder layers after the deepest `vision_feature_layer` return their input unchanged.

    LLaVA takes layer -2's hidden state, yet the stock tower runs every layer (1/24 of CLIP-L's work, thrown away).
    Each skipped layer keeps its weights and its place in the list, only its instance `forward` is replaced: the
    tower still records num_layers + 1 hidden states, so every index (-2, a list of layers, official-mode prompt
    reads) selects the same tensor as before, and no modeling file is forked. Only the tower's `last_hidden_state`
    (and pooled output) change, which LLaVA never reads. Returns the number of layers skipped."""
    from pipeline.core.m2pt import _feature_layers, vision_core

    layers = vision_core(model).encoder.layers
    deepest = max(_feature_layers(model))  # hidden state d = output of layer d-1 = what layer d would read
    for layer in layers[deepest:]:
        layer.forward = _passthrough
    return max(len(layers) - deepest, 0)


def load_text_side(model: str | None = None):
    """(tokenizer, LlavaConfig) without loading any weights: what the shard builder needs to measure lengths."""
    from transformers import AutoConfig, AutoTokenizer

    p = _check_dir(model, "--model")
    cfg = AutoConfig.from_pretrained(str(p))
    if not hasattr(cfg, "vision_config"):
        raise ValueError(f"--model {p} is not a LLaVA model directory (config has no vision_config)")
    return AutoTokenizer.from_pretrained(str(p)), cfg
