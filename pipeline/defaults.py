"""What the entry points fall back to when a flag is not given: the repository's default folders, and the
embedded demo (its tiny model, its sample data, its held-out tasks).

This is the one module outside pipeline/demo that knows the demo, and it imports the demo only inside the
functions that serve a demo default: a run on your own model and data never loads pipeline.demo
(tests/test_layout.py checks both).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_HOME = Path(os.environ.get("M2PT_DATA", REPO / "data"))  # where the embedded sample set is built
TRAIN_OUTPUT = REPO / "out" / "default"
EVAL_OUTPUT = REPO / "out" / "eval"

# --model names of the embedded demo model; pipeline/demo/tiny.py records the same ones as the base's name
# (tests/demo/test_base.py checks both agree: spelled twice so that neither module imports the other).
TINY, TINY_RANDOM = "tiny", "tiny-random"
DEMO_MODELS = (None, "", TINY, TINY_RANDOM)  # None / "": no --model given (the apps' default is "tiny")


def _parts(llm, vision, mm_projector) -> bool:
    return bool(llm or vision or mm_projector)


def uses_demo_model(model, llm=None, vision=None, mm_projector=None) -> bool:
    return model in DEMO_MODELS and not _parts(llm, vision, mm_projector)


def _folder(model):
    """--model as pipeline.core.models takes it: a folder, or None when the flag was left at the demo default."""
    return None if model in DEMO_MODELS else model


def check_model_source(model, llm=None, vision=None, mm_projector=None) -> None:
    """pipeline.core.models.check_model_source, with the demo names accepted."""
    if uses_demo_model(model, llm, vision, mm_projector):
        return
    from pipeline.core.models import check_model_source as check

    check(_folder(model), llm, vision, mm_projector)


def load_base(model=None, llm=None, vision=None, mm_projector=None, dtype=None, attn=None, seed: int = 0):
    """A base model by --model name: a Hugging Face llava folder, LLaVA-v1 parts (llm + vision + mm_projector),
    or the embedded demo model ('tiny', 'tiny-random'; also when nothing is given). Returns a
    pipeline.core.models.Base (model, tokenizer, image_processor, name)."""
    import torch

    dtype = dtype or torch.float32
    if uses_demo_model(model, llm, vision, mm_projector):
        from pipeline.demo.tiny import load_tiny

        return load_tiny(pretrained=model != TINY_RANDOM, dtype=dtype, attn=attn, seed=seed)
    from pipeline.core.models import load_base as load

    return load(_folder(model), llm, vision, mm_projector, dtype=dtype, attn=attn)


def load_text_side(model=None):
    """(tokenizer, LlavaConfig) for a --model name, without loading weights."""
    if model in DEMO_MODELS:
        from pipeline.demo.tiny import tiny_text_side

        return tiny_text_side()
    from pipeline.core.models import load_text_side as load

    return load(model)


# ------------------------------------------------------------------------------------ data and tasks
def demo_sample() -> Path:
    """The embedded sample set under $M2PT_DATA (./data), built on first use."""
    from pipeline.demo.sample_data import ensure_sample

    return ensure_sample(DATA_HOME / "sample")


def demo_shards_dir(visual_tokens: int) -> Path:
    """Where the sample set's training shards live: one folder per visual-token count their lengths were measured
    with (a run with other prompt settings must not reuse them)."""
    return DATA_HOME / f"sample_shards-vt{visual_tokens}"


def build_demo_shards(folder: Path, visual_prompt_length: int, visual_token_mode: str, model_max_length: int):
    from pipeline.demo.sample_data import build_sample_shards

    return build_sample_shards(demo_sample(), folder, visual_prompt_length, visual_token_mode, model_max_length)


def known_tasks(spec: str | None) -> dict:
    """The tasks `--tasks` may name: the benchmarks, plus the demo's held-out tasks when the spec is the default
    (None) or names something that is neither a benchmark nor a path (a typo's error then lists both)."""
    from pipeline.evaluation.datasets import BENCHMARKS

    names = [e.split("=")[0].strip() for e in (spec or "").split(",") if e.strip() and "=" not in e]
    if spec is not None and all(n in BENCHMARKS or Path(n).suffix or Path(n).exists() for n in names):
        return BENCHMARKS
    from pipeline.demo.sample_data import SAMPLE_TASKS

    return BENCHMARKS | SAMPLE_TASKS


def demo_task_spec() -> str:
    from pipeline.demo.sample_data import DEFAULT_TASKS

    return DEFAULT_TASKS



def base_name(model=None, llm=None, vision=None, mm_projector=None) -> str:
    """The name `load_base` gives a base (recorded in every adapter it trains), without loading it."""
    if uses_demo_model(model, llm, vision, mm_projector):
        return model or TINY
    if _parts(llm, vision, mm_projector):
        return f"llava-v1 parts: {Path(llm)} + {Path(vision)} + {Path(mm_projector)}"
    return str(Path(model))
