"""Training methods in one pipeline, so they can be compared on the same data, engine and evaluation.

  --method   what trains                                            artifact (OUTPUT/adapter)
  m2pt       deep visual + textual prompts, the projector           M2PT adapter (pipeline.core.m2pt)
  visual     deep visual prompts only (pt = 0; VPT-style), proj.    M2PT adapter
  text       deep textual prompts only (pv = 0; PTUM-style), proj.  M2PT adapter
  projector  the projector only (more LLaVA stage-1 alignment)      M2PT adapter
  lora       peft LoRA on the LLM's attention + MLP, projector      PEFT adapter (PeftModel.from_pretrained)
  full       every weight that can reach the loss (LLaVA-FT)        a model folder (save_pretrained)

One object per method behind a registry (PEFT's shape: a class per tuner, looked up by name), so no caller tests
method names: `get(name)` gives the method that applies itself to a model, lists the tensors its artifact holds,
writes that artifact and says which flags it fixes; `read_artifact(path)` gives an `Artifact` that knows its method,
its weight files, the base it records and how to load itself onto a base.

The prompt methods are M2PT with a prompt length set to 0 (so `visual` equals `m2pt` with pt = 0 exactly). LoRA is
PEFT's own (`get_peft_model`, with the projector in `modules_to_save`), so its artifact is PEFT's format.
`full` leaves frozen only what can never receive a gradient: the vision layers after the deepest feature layer
(skipped, see models.skip_unused_vision_layers) and the tower's post-layernorm, which LLaVA never reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the registry (flag choices, --help, artifact checks) must not load torch
    from torch import nn

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


def _write_aside(path, write) -> Path:
    """Run `write(tmp)` into a sibling folder, then swap it in whole: a reader never sees half an artifact."""
    from pipeline.files import replace_dir, umask_modes

    final = Path(path)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    umask_modes(tmp)
    replace_dir(tmp, final)
    return final


# ------------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    """What every method answers."""

    name: str
    help: str

    kind = "full"  # the artifact's format: m2pt, lora or full
    library = "transformers"  # what loads the artifact (the model card's library_name)
    prompts = False  # trains M2PT prompts (its artifact is an M2PT adapter)
    visual_prompts = False  # has deep visual prompts (the visual-token mode matters)
    is_model = False  # its artifact is a model of its own, not something applied to a base
    takes_init_adapter = False  # can start from an M2PT adapter (--init_adapter)
    takes_lora_flags = False

    def fixes(self) -> dict:
        """The M2PT flags this method fixes, with their values (an explicit flag that disagrees is an error)."""
        return {"visual_prompt_length": 0, "text_prompt_length": 0, "tune_lm_head": False, "tune_projector": True}

    def identity(self, cfg) -> dict:
        """Settings of a TrainConfig, beyond the M2PT ones, that change this method's trajectory."""
        return {}

    def apply(self, model, m2pt_cfg, lora: LoraSettings | None = None, text_prompts: str = "auto"):
        """Attach the method to a stock LLaVA model and set its trainable set; returns the module to train."""
        raise NotImplementedError

    def artifact_tensors(self, module) -> dict:
        """The tensors the artifact holds, by name (Parameters, so a caller can map them to fp32 masters by
        identity)."""
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def save(self, module, path, tensors: dict, base_name: str = "", base=None) -> Path:
        """Write the artifact to `path`. `base` (tokenizer + image processor) makes a `full` folder loadable on its
        own."""
        def write(tmp: Path):
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            module.save_pretrained(str(tmp), state_dict=cpu)
            if base is not None and self.is_model:
                base.tokenizer.save_pretrained(str(tmp))
                base.image_processor.save_pretrained(str(tmp))
            (tmp / TRAINING_METHOD_FILE).write_text(json.dumps({"training_method": self.name,
                                                                "base_model": base_name}) + "\n")
        return _write_aside(path, write)


@dataclass(frozen=True)
class PromptMethod(Method):
    """M2PT with each prompt length fixed to 0 or left to its flag (None)."""

    visual: int | None = None
    text: int | None = None
    kind = "m2pt"
    library = "m2pt-pipeline"
    prompts = True
    takes_init_adapter = True

    @property
    def visual_prompts(self) -> bool:
        return self.visual is None

    def fixes(self) -> dict:
        return {k: v for k, v in (("visual_prompt_length", self.visual), ("text_prompt_length", self.text))
                if v is not None}

    def apply(self, model, m2pt_cfg, lora=None, text_prompts="auto"):
        from pipeline.core.m2pt import attach_m2pt

        return attach_m2pt(model, m2pt_cfg, text_prompts)

    def artifact_tensors(self, module) -> dict:
        from pipeline.core.m2pt import adapter_state_dict

        return adapter_state_dict(module)

    def save(self, module, path, tensors, base_name="", base=None) -> Path:
        from pipeline.core.m2pt import save_adapter

        return _write_aside(path, lambda tmp: save_adapter(module, tmp, state_dict=tensors, base_name=base_name,
                                                           extra={"training_method": self.name}))


@dataclass(frozen=True)
class LoraMethod(Method):
    kind = "lora"
    library = "peft"
    takes_lora_flags = True

    def identity(self, cfg) -> dict:
        return dataclasses.asdict(cfg.lora)

    def apply(self, model, m2pt_cfg, lora=None, text_prompts="auto"):
        from peft import LoraConfig, get_peft_model

        s = lora or LoraSettings()
        names = "|".join(t.strip() for t in s.lora_target_modules.split(",") if t.strip())
        return get_peft_model(model, LoraConfig(
            r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
            target_modules=rf".*language_model.*\.({names})", modules_to_save=["multi_modal_projector"]))


@dataclass(frozen=True)
class FullMethod(Method):
    is_model = True

    def apply(self, model, m2pt_cfg, lora=None, text_prompts="auto"):
        from pipeline.core.m2pt import _feature_layers, vision_core

        model.requires_grad_(True)
        core = vision_core(model)
        for layer in core.encoder.layers[max(_feature_layers(model)):]:
            layer.requires_grad_(False)
        post = getattr(core, "post_layernorm", None)
        if post is not None:
            post.requires_grad_(False)
        return model

    def artifact_tensors(self, module) -> dict:
        return dict(module.state_dict(keep_vars=True))


REGISTRY: dict[str, Method] = {m.name: m for m in (
    PromptMethod("m2pt", "visual + textual prompts + projector"),
    PromptMethod("visual", "visual prompts + projector", text=0),
    PromptMethod("text", "textual prompts + projector", visual=0),
    PromptMethod("projector", "the projector only", visual=0, text=0),
    LoraMethod("lora", "LoRA on the LLM + projector"),
    FullMethod("full", "every weight"),
)}
METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}") from None


# ---------------------------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """A trained method's folder: an M2PT adapter, a PEFT LoRA adapter or a model folder."""

    path: Path
    method: Method  # the method that produced it (its `kind` is the folder's format)
    config: dict  # the folder's adapter_config.json (M2PT, PEFT) or config.json (full)

    @property
    def kind(self) -> str:
        return self.method.kind

    def weight_files(self) -> list[Path]:
        if not self.method.is_model:
            return [self.path / "adapter_model.safetensors"]
        return sorted(self.path.glob("*.safetensors")) or [self.path / "model.safetensors"]

    def recorded_base(self) -> str | None:
        """The base model the artifact says it was trained on (None when it does not say, or is a model itself)."""
        if self.method.prompts:
            return self.config.get("base_model") or None
        record = self.path / TRAINING_METHOD_FILE
        if not self.method.is_model and record.is_file():
            return json.loads(record.read_text()).get("base_model") or None
        return None

    def settings(self) -> dict | None:
        """The method's hyper-parameters, as results record them."""
        if self.method.prompts:
            return self.config.get("m2pt_config")
        return None if self.method.is_model else self.config

    def load(self, base_model):
        """`base_model` with the artifact applied, as a stock LlavaForConditionalGeneration for evaluation."""
        if self.method.prompts:
            from pipeline.core.m2pt import load_adapter

            return load_adapter(base_model, self.path)
        if self.method.is_model:
            raise ValueError(f"{self.path}: a {self.kind} artifact is a model of its own; load it with --model")
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(self.path)).merge_and_unload()


def read_artifact(path) -> Artifact:
    """What an artifact folder (or Hub repo id: core/hub.py) holds; a clear error for one that is none of them."""
    from pipeline.core.hub import resolve
    from pipeline.core.m2pt import read_adapter_config

    path = resolve(path)
    cfg_file = path / "adapter_config.json"
    if cfg_file.is_file():
        meta = json.loads(cfg_file.read_text())
        if meta.get("peft_type"):
            return Artifact(path, REGISTRY["lora"], meta)
        meta = read_adapter_config(path)
        method = REGISTRY.get(meta.get("training_method"))  # absent in adapters saved by attach_m2pt users
        return Artifact(path, method if method is not None and method.prompts else REGISTRY["m2pt"], meta)
    if (path / "config.json").is_file():
        return Artifact(path, REGISTRY["full"], json.loads((path / "config.json").read_text()))
    raise FileNotFoundError(f"{path}: not an adapter (adapter_config.json: M2PT or PEFT) or a model folder "
                            "(config.json)")


def load_artifact(base_model, path):
    """The base model with the artifact at `path` applied (see Artifact.load)."""
    return read_artifact(path).load(base_model)
