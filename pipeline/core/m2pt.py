"""M²PT: deep visual + textual prompts on a stock `transformers` LlavaForConditionalGeneration.

Nothing here forks a modeling file. Prompts are attached with module hooks:

Vision tower (sequence `[pv prompt slots ; CLS ; N patches]`):
  * a pre-hook on the encoder prepends `pv` zero slots (after the embeddings and the pre-layer-norm, so prompts
    get no position embedding);
  * a pre-hook on layer 0 writes `V_0` into the slots, and a forward hook on layer `i` writes `V_{i+1}` into its
    *output*. Writing the next layer's prompt at the end of layer `i` (instead of at the start of layer `i+1`) is
    the same computation, but it makes the hidden state that `transformers` records for layer `i+1`'s input the
    post-overwrite one, which is exactly what the reference implementation hands to the projector
    (`visual_token_mode="official"`: `pv - 1` raw prompts + CLS + N patches).
  * `clean` mode drops the prompt slots (and CLS, for the "default" strategy) with a pre-hook on the projector.

Language model, by default as a key/value prefix (pipeline/core/prefix.py: each layer's prompt keys/values computed
from `T_j` alone and handed to the stock attention as a cache; real tokens at positions `pt + ...`; the same function
with less work). Where the LLM's attention does not allow that, and with `text_prompts="slots"`, as slots
(sequence `[pt prompt slots ; BOS ; ...]`):
  * a pre-hook on the LLM prepends `pt` zero slots to `inputs_embeds`, `pt` ones to the attention mask and puts
    the real tokens at positions `pt + (cumsum(mask) - 1)`, so right- and left-padded rows are both correct;
  * a pre-hook on decoder layer `j` overwrites the slots with `T_j` (replace style: what layer `j-1` wrote there is
    discarded);
  * a forward hook strips the slots again, so logits line up with `input_ids` / labels as usual.
  During cached generation the slots are prepended only at prefill; their keys/values, computed from `T_j` at every
  layer, stay in the KV cache, and decode steps only shift positions and extend the mask.

Hooks on decoder/encoder layers run outside gradient checkpointing (transformers v5 checkpoints `layer.forward`,
not `__call__`), and every prompt tensor enters exactly one layer, so non-reentrant checkpointing under ZeRO-2
never sees a tensor "computed twice".
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from pipeline.core.hub import resolve

METHOD = "m2pt"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VISUAL_TOKEN_MODES = ("official", "clean")


@dataclass
class M2PTConfig:
    """Configuration of the M²PT adapter (the method's hyper-parameters)."""

    visual_prompt_length: int = field(default=10, metadata={"help": "Prompt slots per vision-encoder layer (pv)."})
    text_prompt_length: int = field(default=10, metadata={"help": "Prompt slots per LLM decoder layer (pt)."})
    visual_token_mode: str = field(
        default="official",
        metadata={
            "choices": VISUAL_TOKEN_MODES,
            "help": "'official': the reference code's features (drop only position 0: N + pv visual tokens); "
            "'clean': drop prompt slots and CLS (standard LLaVA patches: N visual tokens)."
        },
    )
    tune_projector: bool = field(default=True, metadata={
        "help": "Train the vision->language projector.", "no_help": "Keep the vision->language projector frozen."})
    tune_lm_head: bool = field(default=False, metadata={"help": "Also train the LM head (reference launch script)."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt initialisation."})

    def __post_init__(self):
        if self.visual_token_mode not in VISUAL_TOKEN_MODES:
            raise ValueError(f"visual_token_mode must be one of {VISUAL_TOKEN_MODES}, got {self.visual_token_mode!r}")
        if self.visual_prompt_length < 0 or self.text_prompt_length < 0:
            raise ValueError("prompt lengths must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "M2PTConfig":
        """Unknown keys (an adapter from a newer version, a typo in a hand-written config) are ignored with a
        warning that names them, as PEFT does - never silently."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"M2PTConfig: ignoring unknown key(s) {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------- model anatomy
def vision_core(model) -> nn.Module:
    """The module holding `.encoder.layers` (CLIPVisionModel in v5; `.vision_model` in older releases)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def language_model(model) -> nn.Module:
    return model.model.language_model


def projector(model) -> nn.Module:
    return model.model.multi_modal_projector


def _feature_layers(model) -> list[int]:
    """Hidden-state indices (0 = encoder input, L = last layer output) that LLaVA hands to the projector."""
    layer = model.config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    n = model.config.vision_config.num_hidden_layers + 1
    return [i % n for i in layers]


def num_patches(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _init_prompt(n: int, p: int, d: int, gen: torch.Generator) -> list[nn.Parameter]:
    # xavier_uniform_ of the reference's [1, p, d] tensors: fan_in = p*d, fan_out = d -> a = sqrt(6 / ((p+1) d)).
    a = math.sqrt(6.0 / ((p + 1) * d))
    return [nn.Parameter((torch.rand(p, d, generator=gen) * 2 - 1) * a) for _ in range(n)]


class PromptList(nn.ParameterList):
    """A ParameterList read through its own forward (`prompts(i)`), never by indexing inside another module's
    hook. Under ZeRO-3 a parameter is gathered only around the forward/backward of the module that owns it;
    reading it from a hook of the encoder would leave it partitioned (size 0) when autograd accumulates its
    gradient."""

    __call__ = nn.Module.__call__  # ParameterList forbids calls; the normal call path runs the ZeRO-3 hooks

    def forward(self, i: int) -> torch.Tensor:
        return self[i]


class M2PTPrompts(nn.Module):
    """Holds the prompt parameters; attached to the model as `model.m2pt` so optimisers and DeepSpeed see them."""

    def __init__(self, cfg: M2PTConfig, n_vision: int, d_vision: int, n_text: int, d_text: int):
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.seed)
        pv, pt = cfg.visual_prompt_length, cfg.text_prompt_length
        self.vision_prompts = PromptList(_init_prompt(n_vision if pv else 0, pv, d_vision, gen))
        self.text_prompts = PromptList(_init_prompt(n_text if pt else 0, pt, d_text, gen))
        self.text_form: str | None = None  # how the LLM runs them: "prefix" or "slots" (attach_m2pt sets it)


class _LMState:
    """Per-forward flag shared by the LLM hooks: were prompt slots prepended in this call (prefill)?"""

    prefixed: bool = False


def _expand(prompt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return prompt.to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)


def _overwrite(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    # Out-of-place on purpose: `hidden` may be saved for backward by the previous layer.
    return torch.cat([_expand(prompt, hidden), hidden[:, prompt.shape[0] :]], dim=1)


def _replace_first_arg(args, kwargs, name, fn):
    """Apply `fn` to the argument `name` whether it was passed positionally (first) or by keyword."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = fn(kwargs[name])
    return args, kwargs


def _install_vision_hooks(model, prompts: M2PTPrompts, cfg: M2PTConfig) -> list:
    """Called only when there are visual prompts."""
    pv, vp, handles = cfg.visual_prompt_length, prompts.vision_prompts, []
    core = vision_core(model)
    encoder, layers = core.encoder, core.encoder.layers

    def add_slots(module, args, kwargs):
        def f(x):
            return torch.cat([x.new_zeros(x.shape[0], pv, x.shape[2]), x], dim=1)

        return _replace_first_arg(args, kwargs, "inputs_embeds", f)

    def strip_slots(module, args, kwargs, output):
        # Keep the encoder's own output standard-shaped (CLS at 0) for anything that reads last_hidden_state;
        # the recorded per-layer hidden states keep their prompt slots (official mode reads them).
        output.last_hidden_state = output.last_hidden_state[:, pv:]
        return output

    handles.append(encoder.register_forward_pre_hook(add_slots, with_kwargs=True))
    handles.append(encoder.register_forward_hook(strip_slots, with_kwargs=True))
    handles.append(
        layers[0].register_forward_pre_hook(
            lambda m, a, k: _replace_first_arg(a, k, "hidden_states", lambda h: _overwrite(h, vp(0))), with_kwargs=True
        )
    )
    for i in range(len(vp) - 1):

        def write_next(module, args, output, nxt=i + 1):
            if isinstance(output, tuple):
                return (_overwrite(output[0], vp(nxt)),) + tuple(output[1:])
            return _overwrite(output, vp(nxt))

        # prepend=True: run before transformers' lazily installed hidden-state recorder, which must see the result.
        handles.append(layers[i].register_forward_hook(write_next, prepend=True))

    if cfg.visual_token_mode == "clean":
        # LLaVA already dropped position 0 for the "default" strategy; the first pv rows left are prompts (+CLS).
        handles.append(
            projector(model).register_forward_pre_hook(lambda m, a: (a[0][:, pv:],) + tuple(a[1:]))
        )
    return handles


def _lm_inputs(module, args, kwargs, pt: int):
    """(args, kwargs with inputs_embeds, 2-D mask and real positions shifted by pt, past length): the part of the
    LLM pre-hook both prompt forms share. Real tokens sit at `pt + (cumsum(mask) - 1)`, so right- and left-padded
    rows are both correct, and the mask gets `pt` ones in front."""
    kwargs = dict(kwargs)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:  # LLaVA always passes embeddings; a direct LM call with ids gets them embedded here
        embeds = module.embed_tokens(kwargs.pop("input_ids") if "input_ids" in kwargs else args[0])
        args = ()
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    bsz, q = embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("M2PT text prompts need a 2-D attention mask (batch, seq), got a %d-D mask" % mask.dim())
    real_past = past - pt if past else 0
    if mask is None:
        mask = torch.ones(bsz, real_past + q, dtype=torch.long, device=embeds.device)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
    kwargs["attention_mask"] = torch.cat([torch.ones(bsz, pt, dtype=mask.dtype, device=mask.device), mask], dim=1)
    kwargs["position_ids"], kwargs["inputs_embeds"] = pos + pt, embeds
    return args, kwargs, past


def _install_slot_hooks(lm, tp, pt: int) -> list:
    """Text prompts as `pt` slots in front of the tokens, overwritten with `T_j` before every decoder layer."""
    state, handles = _LMState(), []

    def before_lm(module, args, kwargs):
        args, kwargs, past = _lm_inputs(module, args, kwargs, pt)
        state.prefixed = past == 0
        if state.prefixed:
            embeds, pos = kwargs["inputs_embeds"], kwargs["position_ids"]
            prompt_pos = torch.arange(pt, device=pos.device, dtype=pos.dtype).unsqueeze(0).expand(pos.shape[0], -1)
            kwargs["position_ids"] = torch.cat([prompt_pos, pos], dim=1)
            kwargs["inputs_embeds"] = torch.cat([embeds.new_zeros(embeds.shape[0], pt, embeds.shape[2]), embeds], 1)
        return args, kwargs

    def after_lm(module, args, kwargs, output):
        if state.prefixed:
            output.last_hidden_state = output.last_hidden_state[:, pt:]
            if getattr(output, "hidden_states", None) is not None:
                # (None: a layer not selected by an `output_hidden_states=[...]` selection)
                output.hidden_states = tuple(h[:, pt:] if h is not None else None for h in output.hidden_states)
        return output

    handles.append(lm.register_forward_pre_hook(before_lm, with_kwargs=True))
    handles.append(lm.register_forward_hook(after_lm, with_kwargs=True))
    for j, layer in enumerate(lm.layers[: len(tp)]):

        def write(module, args, kwargs, j=j):
            if not state.prefixed:
                return None
            return _replace_first_arg(args, kwargs, "hidden_states", lambda h: _overwrite(h, tp(j)))

        handles.append(layer.register_forward_pre_hook(write, with_kwargs=True))
    return handles


def _install_prefix_hooks(lm, tp, pt: int) -> list:
    """Text prompts as each layer's key/value prefix (pipeline/core/prefix.py): one pre-hook on the LLM."""
    from pipeline.core import prefix

    def before_lm(module, args, kwargs):
        args, kwargs, past = _lm_inputs(module, args, kwargs, pt)
        if past == 0:  # a training forward or a prefill: the prompts' keys/values go in front
            kv = prefix.prefix_kv(module, tp, pt, kwargs["inputs_embeds"])
            cache = kwargs.get("past_key_values")
            if cache is None:
                kwargs["past_key_values"] = prefix.training_cache(module.config, kv)
            else:
                prefix.fill(cache, kv)
        return args, kwargs

    # transformers drops a layer's cache under gradient checkpointing unless the layer only reads it: a training
    # forward's PrefixCache does (it stores nothing), so the recomputed layer sees the same prefix.
    for layer in lm.layers:
        layer._can_checkpoint_with_cache = True
    return [lm.register_forward_pre_hook(before_lm, with_kwargs=True)]


def _install_text_hooks(model, prompts: M2PTPrompts, cfg: M2PTConfig, form: str) -> list:
    """Called only when there are text prompts; `form`: "prefix" or "slots"."""
    pt, tp, lm = cfg.text_prompt_length, prompts.text_prompts, language_model(model)
    return _install_prefix_hooks(lm, tp, pt) if form == "prefix" else _install_slot_hooks(lm, tp, pt)


def text_prompt_form(model, requested: str = "auto") -> str:
    """"prefix" (the prompts as each layer's key/value prefix) where the LLM allows it, else "slots"."""
    from pipeline.core.prefix import prefix_unsupported

    if requested not in ("auto", "prefix", "slots"):
        raise ValueError(f"text prompt form {requested!r}: auto, prefix or slots")
    if requested == "slots":
        return "slots"
    why = prefix_unsupported(language_model(model), model.config.text_config.num_hidden_layers)
    if why and requested == "prefix":
        raise ValueError(f"text prompts cannot be a key/value prefix here: {why}")
    return "slots" if why else "prefix"


def new_prompts(model, cfg: M2PTConfig) -> M2PTPrompts:
    """Freshly initialised prompts for `model` (not attached). Only prompts whose values can reach the LLM are
    created: layers before the feature layer always do; in official mode the feature layer's own (raw) prompt is
    handed over too."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    top = max(_feature_layers(model))
    n_vision = min(top + 1, vcfg.num_hidden_layers) if cfg.visual_token_mode == "official" else top
    return M2PTPrompts(cfg, n_vision, vcfg.hidden_size, tcfg.num_hidden_layers, tcfg.hidden_size)


# ------------------------------------------------------------------------------------------------- public API
def attach_m2pt(model, cfg: M2PTConfig, text_prompts: str = "auto"):
    """Attach M²PT prompts to a `LlavaForConditionalGeneration` in place and set the trainable set. Returns model.

    `text_prompts`: "prefix" computes the textual prompts as each decoder layer's key/value prefix
    (pipeline/core/prefix.py), "slots" runs them through every layer as extra positions (the reference's form; the
    same function), "auto" the prefix where the LLM allows it."""
    if getattr(model, "m2pt", None) is not None:
        raise ValueError("this model already has M2PT prompts attached")
    prompts = new_prompts(model, cfg)
    ref = next(model.parameters())
    if ref.device.type != "meta":
        prompts.to(device=ref.device)
    else:
        prompts.to(device="meta")

    for p in model.parameters():
        p.requires_grad_(False)
    model.m2pt = prompts  # registers the parameters on the model (state_dict key prefix "m2pt.")
    for p in prompts.parameters():
        p.requires_grad_(True)
    if cfg.tune_projector:
        for p in projector(model).parameters():
            p.requires_grad_(True)
    if cfg.tune_lm_head:
        head = model.get_output_embeddings().weight
        if head is model.get_input_embeddings().weight:
            raise ValueError("tune_lm_head: this model ties lm_head to the input embeddings; both would train")
        head.requires_grad_(True)

    model.m2pt_config = cfg
    prompts.text_form = text_prompt_form(model, text_prompts) if len(prompts.text_prompts) else None
    model._m2pt_hooks = ((_install_vision_hooks(model, prompts, cfg) if len(prompts.vision_prompts) else [])
                         + (_install_text_hooks(model, prompts, cfg, prompts.text_form)
                            if len(prompts.text_prompts) else []))
    return model


def visual_tokens_for_config(llava_config, cfg: M2PTConfig | None) -> int:
    """Visual tokens per image for a LLaVA config with (or without: cfg=None) M2PT attached."""
    n = num_patches(llava_config.vision_config)
    n += 0 if llava_config.vision_feature_select_strategy == "default" else 1  # "full" keeps CLS
    if cfg is not None and cfg.visual_token_mode == "official":
        n += cfg.visual_prompt_length  # pv - 1 raw prompts + CLS (default) / pv prompts (full)
    return n


def num_visual_tokens(model) -> int:
    """Visual tokens per image the LLM receives (what one `<image>` placeholder must expand to)."""
    return visual_tokens_for_config(model.config, getattr(model, "m2pt_config", None))


def trainable_parameters(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_table(model) -> list[tuple[str, int, int]]:
    """(module, trainable, total) per top-level module group, for the start-up table."""
    groups = {
        "LoRA": None,  # any name with a lora_ part (peft), wherever it sits
        "vision prompts": "m2pt.vision_prompts",
        "text prompts": "m2pt.text_prompts",
        "projector": "model.multi_modal_projector",
        "vision tower": "model.vision_tower",
        "language model": "model.language_model",
        "lm_head": "lm_head",
    }
    rows = {k: [0, 0] for k in groups}
    rows["other"] = [0, 0]
    seen = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = n.removeprefix("base_model.model.")  # under a peft PeftModel
        key = "LoRA" if ".lora_" in n else next(
            (k for k, pre in groups.items() if pre and n.startswith(pre)), "other")
        rows[key][1] += p.numel()
        if p.requires_grad:
            rows[key][0] += p.numel()
    return [(k, t, tot) for k, (t, tot) in rows.items() if tot]


def format_parameter_table(model) -> str:
    """`parameter_table` as the aligned text the trainer logs, with the total row."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    lines = [f"{'module':<16}{'trainable':>14}{'total':>16}{'share':>9}"]
    for name, t, tot in parameter_table(model):
        lines.append(f"{name:<16}{t:>14,}{tot:>16,}{100 * t / tot:>8.3f}%")
    lines.append(f"{'all':<16}{n_train:>14,}{n_total:>16,}{100 * n_train / n_total:>8.3f}%")
    return "\n".join(lines)


def adapter_tensors(prompts, cfg: M2PTConfig, proj: nn.Module, lm_head: torch.Tensor | None) -> dict:
    """The adapter file's tensors by name - its one layout, for a model with prompts attached (adapter_state_dict)
    and for the serving bank's adapters alike. keep_vars: the Parameters themselves, not detached copies, so callers
    can map them (e.g. to ZeRO-3's gathered fp32 masters by identity) and copy_adapter_tensors can load into them."""
    out = {f"vision_prompts.{i}": p for i, p in enumerate(prompts.vision_prompts)}
    out |= {f"text_prompts.{j}": p for j, p in enumerate(prompts.text_prompts)}
    if cfg.tune_projector:
        out |= {f"projector.{k}": v for k, v in proj.state_dict(keep_vars=True).items()}
    if cfg.tune_lm_head:
        out["lm_head.weight"] = lm_head
    return out


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors of a model with M2PT attached (only trainables; nothing frozen)."""
    return adapter_tensors(model.m2pt, model.m2pt_config, projector(model), model.get_output_embeddings().weight)


def _adapter_meta(model, cfg: M2PTConfig, base_name: str | None) -> dict:
    import transformers

    from pipeline import __version__

    vcfg, tcfg = model.config.vision_config, model.config.text_config
    proj = projector(model)
    return {
        "method": METHOD,
        "m2pt_config": asdict(cfg),
        # how the LLM ran the textual prompts in training (the same function either way; a loader may choose)
        "text_prompt_form": model.m2pt.text_form,
        "base_model": base_name or getattr(model, "m2pt_base", "") or getattr(model.config, "_name_or_path", ""),
        "vision": {"num_layers": vcfg.num_hidden_layers, "hidden_size": vcfg.hidden_size,
                   "num_prompt_layers": len(model.m2pt.vision_prompts), "model_type": vcfg.model_type},
        "text": {"num_layers": tcfg.num_hidden_layers, "hidden_size": tcfg.hidden_size,
                 "num_prompt_layers": len(model.m2pt.text_prompts), "model_type": tcfg.model_type},
        "projector_type": "linear" if isinstance(proj, nn.Linear) else type(proj).__name__,
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "num_visual_tokens": num_visual_tokens(model),
        "versions": {"m2pt_pipeline": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def save_adapter(model, path, state_dict: dict[str, torch.Tensor] | None = None, base_name: str | None = None,
                 extra: dict | None = None):
    """Write `adapter_config.json` + `adapter_model.safetensors` to `path` (created). Returns the path.

    `state_dict` overrides the tensors (e.g. the fp32 master copies gathered from a DeepSpeed engine); `extra` adds
    keys to the config (e.g. the training method that produced it)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_dict if state_dict is not None else adapter_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt", "method": METHOD})
    meta = _adapter_meta(model, model.m2pt_config, base_name) | (extra or {})
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    from pipeline.files import umask_modes

    umask_modes(path)  # safetensors writes 0600 whatever the umask
    return path


def read_adapter_config(path) -> dict:
    path = resolve(path)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no adapter config here (expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("method") != METHOD:
        raise ValueError(f"{cfg_file}: method is {meta.get('method')!r}, not {METHOD!r}")
    return meta


def load_adapter(base_model, path):
    """Attach prompts to `base_model` per the adapter's config and load its tensors. Shape mismatches (another
    base model) fail with an error naming the key and both shapes."""
    from safetensors.torch import load_file

    path = resolve(path)  # a folder, or a Hub repo id through the Hugging Face cache
    meta = read_adapter_config(path)
    cfg = M2PTConfig.from_dict(meta["m2pt_config"])
    model = attach_m2pt(base_model, cfg)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    copy_adapter_tensors(path, meta, tensors, adapter_state_dict(model))
    return model


def copy_adapter_tensors(path: Path, meta: dict, tensors: dict, expected: dict) -> None:
    """Copy an adapter file's `tensors` into the `expected` parameters (adapter_state_dict's names), after checking
    that the keys and shapes fit: a ValueError naming the file, the keys or shapes, and the adapter's base."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path / ADAPTER_WEIGHTS} does not fit this base model: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]} (adapter was made for {meta.get('base_model')!r}: "
            f"vision {meta['vision']}, text {meta['text']})"
        )
    bad = [f"{k!r}: adapter {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
           for k, t in sorted(tensors.items()) if tuple(t.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(
            f"{path / ADAPTER_WEIGHTS} does not fit this base model (adapter was made for "
            f"{meta.get('base_model')!r}); shape mismatches: " + "; ".join(bad[:8])
        )
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t.to(expected[k].dtype))
