"""Generation for evaluation: batched, left-padded, KV-cached, with the training chat template; and the
reference's LLM judge.

Greedy decoding gives the same answers at any batch size and on any number of ranks (tests/evaluation/test_evaluate.py,
tests/evaluation/test_eval_parallel.py): rows are left-padded, and the attention mask gives each row its own positions.
Sampled decoding (temperature > 0) draws each question's answer alone, from a generator seeded by --seed and the
question's key, so it too is the same at any batch size and rank count (at the cost of batching).
"""

from __future__ import annotations

import zlib

from pipeline.files import open_rgb

JUDGE_PROMPT = ("Please decide if the prediction is correct given the question and the answer.\n"
                "Questions: {question}\nAnswer: {target}\nPrediction: {prediction}\n"
                "Your response should only be Yes or No.")


def _load_image(image, image_processor):
    if image is None:
        return None
    if not hasattr(image, "convert"):  # bytes or a path, not an in-memory PIL image
        image = open_rgb(image)
    return image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def question_seed(seed: int, key: str) -> int:
    """The sampling seed of one question: --seed and the question's key (task / index), not its batch or rank."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63


def _batch(items: list[dict], template, tokenizer, image_processor, dev, dtype) -> dict:
    """Left-padded prompts (+ images) of one batch, as generate() takes them."""
    import torch

    pad = tokenizer.pad_token_id
    prompts = [template.prompt(("<image>\n" if it["image"] is not None else "") + it["question"]) for it in items]
    n = max(map(len, prompts))
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=dev)
    px = [_load_image(it["image"], image_processor) for it in items]
    px = [p for p in px if p is not None]
    # A batch without any image must not pass pixel_values=None: transformers 5.23's generate runs the vision
    # tower for any pixel_values key it is given.
    images = {"pixel_values": torch.stack(px).to(dev, dtype)} if px else {}
    return {"input_ids": ids, "attention_mask": mask, **images}


def generate_batches(model, tokenizer, image_processor, template, items: list[dict], batch_size: int,
                     max_new_tokens: int, temperature: float = 0.0, seed: int = 0, keys: list[str] | None = None):
    """Yields (the batch's items, their predictions), batch after batch. Greedy unless temperature > 0: then each
    question is sampled alone with question_seed(seed, its key) (`keys`, default its position)."""
    import torch

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               top_p=None, top_k=None)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature)
        batch_size = 1
    else:
        gen.update(do_sample=False, temperature=None)
    keys = keys or [str(i) for i in range(len(items))]
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        inputs = _batch(chunk, template, tokenizer, image_processor, dev, dtype)
        if temperature > 0:
            torch.manual_seed(question_seed(seed, keys[s]))
        with torch.no_grad():
            seqs = model.generate(**inputs, **gen)
        n = inputs["input_ids"].shape[1]
        yield chunk, [tokenizer.decode(q[n:], skip_special_tokens=True).strip() for q in seqs]


def generate(model, tokenizer, image_processor, template, items: list[dict], batch_size: int, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, show_progress: bool = True, keys: list[str] | None = None
             ) -> list[str]:
    """Predictions for `items`, in order (generate_batches, collected)."""
    from tqdm import tqdm

    out: list[str] = []
    with tqdm(total=len(items), desc="generate", unit="q", disable=not show_progress) as bar:
        for chunk, preds in generate_batches(model, tokenizer, image_processor, template, items, batch_size,
                                             max_new_tokens, temperature, seed, keys):
            out += preds
            bar.update(len(chunk))
    return out


class Judge:
    """The reference's LLM judge (it used vicuna-13b-v1.5): any local HF causal LM is asked, in the Vicuna chat
    format, whether the prediction is correct; "yes" in its (<= 5 token) reply counts as correct."""

    def __init__(self, path: str, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.core.chat import SYSTEM
        from pipeline.core.models import ensure_pad_token

        self.tok = ensure_pad_token(AutoTokenizer.from_pretrained(path))
        dtype = torch.float32 if device == "cpu" else torch.float16
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.to(device).eval()
        self.system, self.device = SYSTEM, device

    def __call__(self, records: list[dict]) -> list[bool]:
        import torch

        out = []
        for r in records:
            text = f"{self.system} USER: {JUDGE_PROMPT.format(**r)} ASSISTANT:"
            enc = self.tok(text, return_tensors="pt").to(self.device)
            with torch.no_grad():
                seq = self.model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=self.tok.pad_token_id)
            out.append("yes" in self.tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).lower())
        return out


