"""Where every app's base model comes from and what it runs on: one definition of the model flags (`--model`, or
the three LLaVA-v1 parts) and of `--device` / `--dtype`, which the config of each app (training, evaluation, chat,
serving) inherits, as LLaVA keeps one `ModelArguments` and PEFT layers its config classes.

    cfg.load_base(dtype)      # the base model (pipeline.core.models.Base), the demo's names resolved in one place
    cfg.base_name()           # the name an adapter records as its base, without loading anything
    resolve_device(cfg.device), resolve_dtype(cfg.dtype, device)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline import defaults
from pipeline.errors import UsageError


@dataclass
class ModelSource:
    """The base model: a Hugging Face llava folder, the three LLaVA-v1 parts, or the embedded demo's."""

    model: str = field(default="tiny", metadata={"group": "model", "help": (
        "Hugging Face llava folder (llava-hf layout), 'tiny' (the embedded demo's pretrained base) or 'tiny-random' "
        "(the same architecture, random weights)")})
    model_llm: str | None = field(default=None, metadata={"group": "model", "help": (
        "LLaVA-v1 parts: Vicuna/Llama folder")})
    model_vision: str | None = field(default=None, metadata={"group": "model", "help": (
        "LLaVA-v1 parts: CLIP vision tower folder")})
    mm_projector: str | None = field(default=None, metadata={"group": "model", "help": (
        "LLaVA parts: stage-1 mm_projector.bin (LLaVA-v1 linear or LLaVA-1.5 mlp2x_gelu, told apart by its "
        "tensors)")})

    def source(self) -> dict:
        """The four model fields, as keyword arguments of another config."""
        return {f.name: getattr(self, f.name) for f in fields(ModelSource)}

    def parts(self) -> tuple:
        return self.model_llm, self.model_vision, self.mm_projector

    def uses_demo_model(self) -> bool:
        return defaults.uses_demo_model(self.model, *self.parts())

    def check_source(self) -> None:
        """A missing or inconsistent model source: one error naming the flag, before anything loads."""
        defaults.check_model_source(self.model, *self.parts())

    def load_base(self, dtype=None, attn=None, seed: int = 0):
        """The base (pipeline.core.models.Base: model, tokenizer, image_processor, name)."""
        llm, vision, projector = self.parts()
        return defaults.load_base(self.model, llm=llm, vision=vision, mm_projector=projector, dtype=dtype, attn=attn,
                                  seed=seed)

    def base_name(self) -> str:
        """The name `load_base` gives the base (what an adapter records), without loading it."""
        return defaults.base_name(self.model, *self.parts())


@dataclass
class Runtime:
    """Where an inference app runs the model, and in what precision."""

    device: str | None = field(default=None, metadata={"help": (
        "cuda / cpu (default: cuda when available; under a launcher each rank takes the GPU of its LOCAL_RANK)")})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float16", "bfloat16", "float32"), "help": (
        "weights and activations (auto: float16 on CUDA, float32 on CPU)")})


def resolve_device(requested: str | None) -> str:
    """`--device` as given, or cuda when there is one; asking for CUDA where there is none is a UsageError."""
    import torch

    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available here (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPU(s) visible); use --device cpu, or leave it unset")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str) -> str:
    """`--dtype` as given, or auto's choice for `device` (float16 on CUDA, float32 on CPU)."""
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"
