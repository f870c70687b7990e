"""The embedded demo model: a 0.9 M-parameter LLaVA (CLIP-style tower 3 x 64 at 32 px, Llama-style LM 4 x 128)
with a committed 640-token byte-level BPE, built offline and deterministically from its config.

"tiny" is the shipped pretrained base (assets/tiny_base.safetensors, made by `python -m pipeline.pretrain_base
--eval_every 2000`, checked against the sha256 recorded beside it in tiny_base.json); "tiny-random" is the same
architecture at its seeded random init (what pretraining starts from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.core.models import Base, clip_image_processor, log_skipped_vision_layers, pick_attn_implementation

ASSETS = Path(__file__).resolve().parent / "assets"
# The names this model goes by. pipeline/defaults.py (TINY, TINY_RANDOM) resolves the same --model names to it
# without importing the demo; tests/demo/test_base.py checks that both agree.
NAME, RANDOM_NAME = "tiny", "tiny-random"
TINY_WEIGHTS = ASSETS / "tiny_base.safetensors"  # + tiny_base.json: command, seed, sha256, losses, scores


class BaseWeightsError(ValueError):
    """The shipped base's weight file is missing, altered or does not fit the tiny architecture."""


def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tiny_tokenizer.json"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
    )


def tiny_config(tokenizer, attn: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=64,
    )
    # initializer_range 0.1 (not 0.02): the random init pretraining starts from (tiny-random). The shipped weights
    # were pretrained from it, so changing it changes what `python -m pipeline.pretrain_base` reproduces.
    text = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.1,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    return cfg


def build_tiny(seed: int = 0, attn: str = "sdpa", pretrained: bool = True, weights: Path = TINY_WEIGHTS) -> Base:
    """The embedded default: CLIP-style tower (3 x 64, 32 px / 8 px patches) + Llama-style LM (4 x 128) with
    a committed 640-token byte-level BPE. `pretrained`: the shipped weights (`weights`, hash-checked); else a seeded
    random init, the same in every process without any file on disk."""
    from transformers import LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    cfg = tiny_config(tok, attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    if pretrained:
        load_tiny_weights(model, weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.m2pt_base = NAME if pretrained else RANDOM_NAME  # recorded in the adapters trained on it
    return Base(model, tok, clip_image_processor(32), model.m2pt_base)


def tiny_record(path: Path = TINY_WEIGHTS) -> dict:
    """The record written beside the shipped base by `pipeline.demo.pretrain_base`: command, sha256, losses, scores."""
    record = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not record.is_file():
        raise BaseWeightsError(f"the embedded base {path} (or its record {record.name}) is missing: it ships with "
                               "the repository; rebuild it with `python -m pipeline.pretrain_base` (about an hour)")
    return json.loads(record.read_text())


def load_tiny_weights(model, path: Path = TINY_WEIGHTS) -> None:
    """Fill `model` with the shipped base after checking the file against the sha256 recorded beside it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.files import sha256_file

    path, record = Path(path), Path(path).with_suffix(".json")
    want = tiny_record(path).get("sha256")
    got = sha256_file(path)
    if got != want:
        raise BaseWeightsError(f"the embedded base {path} has sha256 {got}, but {record.name} records {want}: the "
                               "file was altered or replaced (restore it with git, or rebuild it with "
                               "`python -m pipeline.pretrain_base`)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BaseWeightsError(f"the embedded base {path}: unreadable safetensors file ({e})") from None
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if bad:
        raise BaseWeightsError(f"the embedded base {path} does not fit the tiny architecture: {len(bad)} "
                               f"missing, unexpected or differently shaped tensor(s), e.g. {bad[0]!r}")
    model.load_state_dict(state)


def load_tiny(pretrained: bool, dtype=torch.float32, attn: str | None = None, seed: int = 0) -> Base:
    """`load_base` for the embedded names (pipeline/defaults.py): the shipped base or its random init."""
    attn = pick_attn_implementation(attn)
    base = build_tiny(seed=seed, attn=attn, pretrained=pretrained)
    base.model.to(dtype)
    log_skipped_vision_layers(base.model)
    return base


def tiny_text_side():
    """(tokenizer, LlavaConfig) without building the model: what the shard builder measures lengths with."""
    tok = tiny_tokenizer()
    return tok, tiny_config(tok)
