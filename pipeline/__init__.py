"""M²PT training pipeline: learnable prompts in every layer of a LLaVA model's vision encoder and LLM, plus the
vision->language projector, on stock `transformers` classes.

    from pipeline import M2PTConfig, attach_m2pt, load_base, save_adapter

Layout (docs/architecture.md):
  core/        the method and the model: M2PTConfig, prompt hooks, adapters, other methods, loaders, chat template,
               the training forward, FLOPs
  data/        the shard-builder library and the stream that reads shards into batches
  training/    the recipe's reusable parts: config, engine, checkpoints, records, run control, process group
  evaluation/  benchmark layouts, generation, scoring
  demo/        the embedded demo world (tiny model, sample data, pretraining, the method comparison)
  train.py, evaluate.py   the entry points; defaults.py   what they fall back to

The names below are imported on first use (PEP 562), so `import pipeline` and every app's --help stay fast.
"""

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "M2PTConfig": "pipeline.core.m2pt",
    "attach_m2pt": "pipeline.core.m2pt",
    "save_adapter": "pipeline.core.m2pt",
    "load_adapter": "pipeline.core.m2pt",
    "read_adapter_config": "pipeline.core.m2pt",
    "num_visual_tokens": "pipeline.core.m2pt",
    "parameter_table": "pipeline.core.m2pt",
    "METHODS": "pipeline.core.methods",
    "LoraSettings": "pipeline.core.methods",
    "apply_method": "pipeline.core.methods",
    "load_artifact": "pipeline.core.methods",
    "load_base": "pipeline.defaults",
    "Base": "pipeline.core.models",
    "VicunaTemplate": "pipeline.core.chat",
    "TrainConfig": "pipeline.training.config",
    "EvalConfig": "pipeline.evaluate",
}
_RENAMED = {"apply_method": "apply"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
