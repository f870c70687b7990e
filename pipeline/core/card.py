"""The model card every trained artifact gets: `README.md` in the Hugging Face Hub's form (YAML metadata through
huggingface_hub's own ModelCard / ModelCardData, then prose), so a folder pushed to the Hub is a repo that says what
it is, what it was trained on and how, how to load it and, where the run scored it, what it scored.

The metadata: `library_name` (the library that loads the artifact: this pipeline for an M2PT adapter, peft for LoRA,
transformers for a full model), `tags`, and `base_model` only when the base is a Hub id or a local folder whose
config records one (the Hub resolves it; a local path would mislead). `license` is left for the owner to fill in.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.hub import is_repo_id

CARD = "README.md"
RESULTS_HEADING = "\n## Results\n"
TAGS = ["m2pt", "prompt-tuning", "llava", "multimodal"]

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## How it was trained

{{ training }}

## How to use it

{{ usage }}
{{ results }}"""


def hub_base_model(base_name: str) -> str | None:
    """The Hub id of a base: the name itself when it is one, else what a local model folder's config.json records."""
    if _plain_repo_id(base_name):
        return base_name
    cfg = Path(base_name or "") / "config.json"
    if base_name and cfg.is_file():
        try:
            recorded = json.loads(cfg.read_text()).get("_name_or_path") or ""
        except (OSError, ValueError):
            return None
        return recorded if _plain_repo_id(recorded) else None
    return None


def _plain_repo_id(text: str) -> bool:
    """A repo id without a revision: the form the card's `base_model` takes."""
    return is_repo_id(text) and "@" not in text


def training_lines(flags: dict, explicit, counts: dict, steps: int, world: int, module) -> list[str]:
    """What a training run tells its card: the command (the flags it was given: `explicit`, their values in `flags`),
    the data it went through, the trainable count."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    given = [f"--{k} {flags[k]}" for k in explicit if k in flags and k not in ("output_dir", "local_rank")]
    return [f"command: `{' '.join(['deepspeed pipeline/train.py', *given])}`",
            f"data: {counts['samples']:,} samples ({counts['tokens']:,} tokens) in {steps} optimizer steps on "
            f"{world} rank(s); {counts['skipped']:,} skipped",
            f"trainable parameters: {trainable:,}"]


def write_card(folder, *, method, base_name: str, training: list[str], settings_yaml: str,
               results: str | None = None) -> Path:
    """Write `folder`/README.md. `method`: the core.methods.Method that made the artifact; `training`: lines saying
    how (command, data, steps); `settings_yaml`: the run's train_config.yaml; `results`: a markdown table."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    data = ModelCardData(library_name=method.library, tags=TAGS + [f"method:{method.name}"],
                         base_model=hub_base_model(base_name))
    if method.is_model:
        usage = (f"A model folder of its own: `load_base(\"{folder}\")`, or `python -m pipeline.evaluate --model "
                 f"{folder}`.")
    else:
        usage = ("```python\nfrom pipeline import load_base, load_artifact\n\n"
                 f"base = load_base({base_name!r})\nmodel = load_artifact(base.model, {str(folder)!r})\n```\n\n"
                 f"or `python -m pipeline.evaluate --model {base_name} --adapter {folder}` (also `pipeline.chat`, "
                 "and `pipeline.serve --adapters` for M2PT adapters).")
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{folder.name}: {method.name} on {base_name}",
        summary=f"Trained with the M2PT training pipeline, method `{method.name}` ({method.help}), on the base "
                f"`{base_name}`; everything else stays frozen.",
        training="\n".join(f"- {line}" for line in training)
                 + f"\n\nThe run's settings (`train_config.yaml`; `--config` reads it back):\n\n```yaml\n"
                   f"{settings_yaml.rstrip()}\n```",
        usage=usage, results=f"{RESULTS_HEADING}\n{results.rstrip()}\n" if results else "")
    card.save(str(folder / CARD))
    return folder / CARD


def add_results(folder, table: str, how: str) -> Path | None:
    """Put `table` (markdown) into the card in `folder` as its Results section, replacing the one there; `how`: one
    line saying what produced it (the command, the tasks). None when the folder has no card (nothing is made up)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    if not path.is_file():
        return None
    card = ModelCard.load(str(path))
    body = card.text.split(RESULTS_HEADING)[0].rstrip()
    card.text = f"{body}\n{RESULTS_HEADING}\n{how}\n\n{table.rstrip()}\n"
    card.save(str(path))
    return path
