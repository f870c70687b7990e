"""Training methods in one pipeline, so they can be compared on the same data, engine and evaluation.

  --method   what trains                                            artifact (OUTPUT/adapter)
  m2pt       deep visual + textual prompts, the projector           M2PT adapter (pipeline.core.m2pt)
  visual     deep visual prompts only (pt = 0; VPT-style), proj.    M2PT adapter
  text       deep textual prompts only (pv = 0; PTUM-style), proj.  M2PT adapter
  projector  the projector only (more LLaVA stage-1 alignment)      M2PT adapter
  lora       peft LoRA on the LLM's attention + MLP, projector      PEFT adapter (PeftModel.from_pretrained)
  full       every weight that can reach the loss (LLaVA-FT)        a model folder (save_pretrained)

The prompt methods are M2PT with a prompt length set to 0 (so `visual` equals `m2pt` with pt = 0 exactly). LoRA is
PEFT's own (`get_peft_model`, with the projector in `modules_to_save`), so its artifact is PEFT's format.
`full` leaves frozen only what can never receive a gradient: the vision layers after the deepest feature layer
(skipped, see models.skip_unused_vision_layers) and the tower's post-layernorm, which LLaVA never reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

METHODS = ("m2pt", "visual", "text", "projector", "lora", "full")
PROMPT_METHODS = ("m2pt", "visual", "text", "projector")
# Prompt lengths a method fixes (None: the flag decides).
FIXED_LENGTHS = {"m2pt": (None, None), "visual": (None, 0), "text": (0, None), "projector": (0, 0)}
TRAINING_METHOD_FILE = "training_method.json"  # beside a LoRA / full artifact: what produced it


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft.LoraConfig's fields; LLaVA's --lora_* flag spelling)."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank (peft: r)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (peft: lora_alpha)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path (peft: lora_dropout)."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated LLM linear layers that get LoRA (peft: target_modules), matched inside "
                          "the language model only."})


def unwrap(module) -> nn.Module:
    """The LlavaForConditionalGeneration under a PeftModel (or the model itself)."""
    get = getattr(module, "get_base_model", None)
    return get() if get is not None else module


def _lora_config(s: LoraSettings):
    from peft import LoraConfig

    names = "|".join(t.strip() for t in s.lora_target_modules.split(",") if t.strip())
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=rf".*language_model.*\.({names})", modules_to_save=["multi_modal_projector"])


def apply(model, method: str, m2pt_cfg, lora: LoraSettings | None = None, text_prompts: str = "auto"):
    """Attach `method` to a stock LLaVA model and set its trainable set. Returns the module to train (for `lora`,
    a PeftModel wrapping `model`). `text_prompts`: the prompt methods' LLM form (pipeline.core.m2pt.attach_m2pt)."""
    from pipeline.core.m2pt import _feature_layers, attach_m2pt, vision_core

    if method in PROMPT_METHODS:
        return attach_m2pt(model, m2pt_cfg, text_prompts)
    if method == "lora":
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(lora or LoraSettings()))
    if method == "full":
        model.requires_grad_(True)
        core = vision_core(model)
        for layer in core.encoder.layers[max(_feature_layers(model)):]:
            layer.requires_grad_(False)
        post = getattr(core, "post_layernorm", None)
        if post is not None:
            post.requires_grad_(False)
        return model
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def artifact_tensors(module, method: str) -> dict:
    """The tensors the artifact holds, by name (Parameters, so a caller can map them to fp32 masters by identity)."""
    from pipeline.core.m2pt import adapter_state_dict

    if method in PROMPT_METHODS:
        return adapter_state_dict(module)
    if method == "lora":
        return {n: p for n, p in module.named_parameters() if p.requires_grad}
    return dict(module.state_dict(keep_vars=True))


def save_artifact(module, path, method: str, tensors: dict, base_name: str = "", base=None) -> Path:
    """Write the method's artifact to `path`. `base` (tokenizer + image processor) makes a `full` folder loadable on
    its own."""
    import shutil

    from pipeline.files import replace_dir, umask_modes

    final = Path(path)
    path = final.with_name(f".tmp-{final.name}")  # written aside, then swapped in whole
    shutil.rmtree(path, ignore_errors=True)
    if method in PROMPT_METHODS:
        _save_prompt_artifact(module, path, method, tensors, base_name)
    else:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        module.save_pretrained(str(path), state_dict=cpu)
        if base is not None and method == "full":
            base.tokenizer.save_pretrained(str(path))
            base.image_processor.save_pretrained(str(path))
        (path / TRAINING_METHOD_FILE).write_text(json.dumps({"training_method": method, "base_model": base_name})
                                                 + "\n")
    umask_modes(path)
    replace_dir(path, final)
    return final


def _save_prompt_artifact(module, path: Path, method: str, tensors: dict, base_name: str) -> None:
    from pipeline.core.m2pt import save_adapter

    save_adapter(module, path, state_dict=tensors, base_name=base_name, extra={"training_method": method})


def read_artifact(path) -> dict:
    """{"training_method", "kind": m2pt | lora | full, "config": ...} of an artifact folder; a clear error for a
    folder that is none of them."""
    from pipeline.core.m2pt import read_adapter_config

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if cfg_file.is_file():
        meta = json.loads(cfg_file.read_text())
        if meta.get("peft_type"):
            return {"training_method": "lora", "kind": "lora", "config": meta}
        meta = read_adapter_config(path)
        return {"training_method": meta.get("training_method", "m2pt"), "kind": "m2pt", "config": meta}
    if (path / "config.json").is_file():
        return {"training_method": "full", "kind": "full", "config": json.loads((path / "config.json").read_text())}
    raise FileNotFoundError(f"{path}: not an adapter (adapter_config.json: M2PT or PEFT) or a model folder "
                            "(config.json)")


def load_artifact(base_model, path, kind: str):
    """The base model with the artifact applied, as a stock LlavaForConditionalGeneration for evaluation."""
    from pipeline.core.m2pt import load_adapter

    if kind == "m2pt":
        return load_adapter(base_model, path)
    if kind == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path)).merge_and_unload()
    raise ValueError(f"{path}: a {kind} artifact is a model of its own; load it with --model")
