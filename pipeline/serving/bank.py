"""Many M²PT adapters over one frozen base, ready to share a batch.

An adapter here is what differs between rows of a mixed batch: its visual prompts and projector (the image features
it hands the LLM), its textual prompts as each decoder layer's key/value prefix (pipeline/core/prefix.py), computed
once when the adapter loads and reused by every request, and, where it was trained, its LM head. The base model is
loaded once and never modified: the vision hooks of one adapter are attached only around its rows' image encoding
(`image_features`), and the LLM runs without hooks, the prefix handed to it as a cache (pipeline/serving/mixed.py).

Only M²PT adapters batch this way. A LoRA adapter changes the frozen weights themselves and a fully fine-tuned model
is a model of its own: both are refused with the reason.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.core import prefix
from pipeline.core.m2pt import (
    ADAPTER_WEIGHTS,
    M2PTConfig,
    _install_vision_hooks,
    adapter_tensors,
    copy_adapter_tensors,
    language_model,
    new_prompts,
    projector,
    visual_tokens_for_config,
)

log = logging.getLogger("m2pt.serve")


@dataclass
class Adapter:
    """One servable model: the base (cfg None) or the base + an M²PT adapter."""

    name: str
    cfg: M2PTConfig | None
    prompts: nn.Module | None  # M2PTPrompts
    projector: nn.Module  # the base's own, or a copy holding the adapter's weights
    lm_head: torch.Tensor | None  # None: the base's
    kv: list | None  # per decoder layer (keys, values), each (1, kv heads, pt, head dim)
    num_visual_tokens: int
    source: str = ""

    @property
    def pt(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[2]


class AdapterBank:
    """The base (served as `base_id`) and the adapters loaded so far, by name. `lock` is held while a batch runs
    and while an adapter is added, so a batch never sees a half-loaded adapter."""

    def __init__(self, base, device: str = "cpu", base_id: str = "base"):
        self.base = base
        self.model = base.model.to(device).eval()
        lm = language_model(self.model)
        why = prefix.prefix_unsupported(lm, self.model.config.text_config.num_hidden_layers)
        if why:
            raise ValueError(f"mixed-adapter serving hands the textual prompts to the LLM as a key/value prefix, "
                             f"which this model cannot take: {why}")
        self.device, self.dtype = torch.device(device), next(self.model.parameters()).dtype
        self.base_id = base_id
        self.lock = threading.RLock()
        # Kept apart: while a batch runs, the model holds that batch's adapter's projector (image_features).
        self.base_projector = projector(self.model)
        self.adapters: dict[str, Adapter] = {base_id: Adapter(
            base_id, None, None, self.base_projector, None, None,
            visual_tokens_for_config(self.model.config, None), source=str(base.name))}

    def get(self, name: str) -> Adapter | None:
        return self.adapters.get(name)

    def remove(self, name: str) -> None:
        """Stop serving `name` (a batch already running with it finishes with it)."""
        with self.lock:
            self.adapters.pop(name, None)

    def add(self, name: str, path) -> Adapter:
        """Load the M²PT adapter folder `path` as `name`. A folder that is not an M²PT adapter, or one that does not
        fit the base, is a ValueError / FileNotFoundError naming the file and the reason."""
        from safetensors.torch import load_file

        from pipeline.evaluation.rows import check_safetensors

        path = Path(path)
        if name == self.base_id:
            raise ValueError(f"{path}: an adapter cannot take the base's model name {name!r} (rename its folder, or "
                             "give the base another --base_id)")
        meta = _m2pt_meta(path)
        check_safetensors(path / ADAPTER_WEIGHTS)  # a truncated or foreign file: a clear error, not a Rust panic
        cfg = M2PTConfig.from_dict(meta["m2pt_config"])
        prompts = new_prompts(self.model, cfg).to(self.device, self.dtype)
        proj = copy.deepcopy(self.base_projector) if cfg.tune_projector else self.base_projector
        head = nn.Parameter(self.model.get_output_embeddings().weight.detach().clone()) if cfg.tune_lm_head else None
        expected = adapter_tensors(prompts, cfg, proj, head)
        copy_adapter_tensors(path, meta, load_file(str(path / ADAPTER_WEIGHTS)), expected)
        with self.lock, torch.no_grad():
            adapter = Adapter(name, cfg, prompts, proj, head, self._prefix(prompts, cfg),
                              visual_tokens_for_config(self.model.config, cfg), source=str(path))
            self.adapters[name] = adapter
        log.info("adapter %s loaded from %s (pv=%d, pt=%d, %s)", name, path, cfg.visual_prompt_length,
                 cfg.text_prompt_length, cfg.visual_token_mode)
        return adapter

    def _prefix(self, prompts, cfg: M2PTConfig):
        if not len(prompts.text_prompts):
            return None
        lm = language_model(self.model)
        like = torch.zeros(1, 1, lm.config.hidden_size, device=self.device, dtype=self.dtype)
        return prefix.prefix_kv(lm, prompts.text_prompts, cfg.text_prompt_length, like)

    def image_features(self, adapter: Adapter, pixels: torch.Tensor) -> torch.Tensor:
        """(images, visual tokens, LLM width): what `adapter` hands the LLM for `pixels` (images, 3, H, W). The
        adapter's vision hooks and projector are put on the base only for this call."""
        core = self.model.model
        core.multi_modal_projector = adapter.projector
        hooks = []
        try:
            if adapter.prompts is not None and len(adapter.prompts.vision_prompts):
                hooks = _install_vision_hooks(self.model, adapter.prompts, adapter.cfg)
            out = core.get_image_features(pixel_values=pixels.to(self.device, self.dtype),
                                          vision_feature_layer=self.model.config.vision_feature_layer,
                                          vision_feature_select_strategy=(
                                              self.model.config.vision_feature_select_strategy),
                                          return_dict=True)
            return torch.stack(list(out.pooler_output))
        finally:
            for h in hooks:
                h.remove()
            core.multi_modal_projector = self.base_projector


def _m2pt_meta(path: Path) -> dict:
    """The adapter's config, or why this artifact cannot be served in a mixed batch."""
    from pipeline.core.methods import read_artifact

    art = read_artifact(path)
    if art.method.is_model:
        raise ValueError(f"{path}: a fully fine-tuned model is a model of its own; serve it with --model")
    if not art.method.prompts:
        raise ValueError(f"{path}: a LoRA adapter changes the base's weights, so it cannot share a batch with other "
                         "adapters; merge it and serve the merged model with --model")
    return art.config
