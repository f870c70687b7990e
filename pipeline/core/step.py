"""The training forward: a batch in, the step's loss out, doing only the work that loss needs.

The stock `LlavaForConditionalGeneration.forward` computes logits for every position (`[tokens x vocab]`, 16 % of a
Vicuna-width step although only the answer tokens carry labels) and splices the image features in with
`masked_scatter`. Here, with the same stock modules:

  input_ids ─ embed_tokens ─┐
  pixel_values ─ vision tower (up to its deepest feature layer, see `models.skip_unused_vision_layers`)
      ─ projector ─ index_copy into the image-token rows (`splice`) ─┘
  ─ the engine: the LLM (+ M2PT prompt hooks), returning its last hidden state
  ─ rows whose next token is supervised ─ lm_head + cross-entropy in chunks (`linear_cross_entropy`)

The loss keeps its semantics (sum over supervised tokens / the step's supervised-token count, see
`train.backprop_scale`) and equals the full-logits path to float rounding (tests/core/test_step.py).

Why the LLM still runs through the engine's own forward: DeepSpeed registers its backward prologue (ZeRO's reduction
bookkeeping, gradient-accumulation boundary) on the tensors the engine *returns*; a loss that does not flow through
one of them would skip it. So the engine returns the last hidden state (`output_hidden_states=-1`, the one layer
selected) and no logits (`logits_to_keep` = an empty row mask).
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ROWS = 1024  # rows of [rows x vocab] logits alive at once in `linear_cross_entropy`


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, T] bool: position t predicts a supervised label t+1, targets [n] in the same row-major order)."""
    nxt = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = nxt != IGNORE
    return keep, nxt[nxt != IGNORE]


def splice(embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`embeds` [B, T, H] with rows `positions` (flat indices into B*T) replaced by `features` [n, H].

    Same values as LLaVA's `masked_scatter`; its backward is one `index_select` of the incoming gradient instead of a
    `masked_select` over a [B, T, H] mask."""
    b, t, h = embeds.shape
    if positions.numel() != features.shape[0]:
        raise ValueError(f"image features and image tokens do not match: {positions.numel()} image tokens, "
                         f"{features.shape[0]} feature rows")
    return embeds.reshape(b * t, h).index_copy(0, positions, features.to(embeds.dtype)).view(b, t, h)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i), computed CHUNK_ROWS rows at a time. Forward also computes the gradients (softmax -
    one-hot, times W or h) so no chunk's logits outlive its loop iteration: the idea of fused linear-cross-entropy
    kernels, in plain torch. W's gradient only when W trains (`--tune_lm_head`)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
                g = g.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of the rows `h` [n, H] through `lm_head` (float32 softmax)."""
    w = lm_head.weight
    if lm_head.bias is not None or hasattr(w, "ds_id"):
        # A biased head, or ZeRO-3 (the weight is a partitioned stub outside its module's own forward): through the
        # module, on the supervised rows only.
        logits = lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if h.shape[0] == 0:
        return (h.sum() + w.sum()) * 0.0  # keep the graph edges (ZeRO needs every trainable in every step)
    return _LinearCrossEntropy.apply(h, w, targets, chunk or CHUNK_ROWS)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[images x visual tokens, H_llm]: the vision tower + projector as LLaVA runs them (M2PT hooks included)."""
    feats = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    return torch.cat(list(feats), dim=0)


def token_loss(engine, model, batch: dict, device, dtype) -> torch.Tensor:
    """Summed cross-entropy of this micro-batch's supervised tokens (float32 scalar).

    `engine` runs the LLM (a DeepSpeed engine, or the model itself outside training); `model` is the module under
    it, whose embeddings, vision tower and lm_head are called directly."""
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    embeds = model.get_input_embeddings()(ids)
    px = batch.get("pixel_values")
    if px is not None:
        positions = (ids.reshape(-1) == model.config.image_token_id).nonzero().squeeze(1)
        embeds = splice(embeds, image_features(model, px.to(device, dtype)), positions)
    keep, targets = supervised_rows(labels)
    out = engine(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                 logits_to_keep=torch.zeros_like(keep), output_hidden_states=-1)
    hidden = out.hidden_states[-1]  # the LLM's last hidden state, after its final norm
    return linear_cross_entropy(hidden[keep], model.get_output_embeddings(), targets)


def vision_keepalive(model, dtype, device):
    """0 x (vision tower + projector on one blank image): a graph edge to every visual trainable."""
    vc = model.config.vision_config
    px = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
    feats = model.model.get_image_features(
        pixel_values=px, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    return sum(f.float().sum() for f in feats) * 0.0
