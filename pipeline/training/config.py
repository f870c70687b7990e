"""The training recipe's settings. Every field of `TrainConfig` is a flag of pipeline/train.py, generated as
EvalConfig's and ShardBuildConfig's are (pipeline/cli.py), in Hugging Face TrainingArguments spelling; the
method's own flags come from `M2PTConfig` and `LoraSettings`.

    cfg = parse_args(["--learning_rate", "1e-3"])      # -> TrainConfig; cfg.m2pt_flags, cfg.lora: the method flags

`parse_args` checks values no run can use (one `error:` line, exit 2) and records which flags were given
(`cfg.explicit`), so a start-up check can tell a flag the user set from a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.cli import HelpFormatter, add_config_flags, normalize_kebab_flags, parse_bool
from pipeline.core import methods
from pipeline.core.m2pt import M2PTConfig
from pipeline.core.methods import METHODS, LoraSettings
from pipeline.defaults import REPO, TRAIN_OUTPUT
from pipeline.errors import UsageError
from pipeline.source import ModelSource

M2PT_FLAGS = tuple(f.name for f in fields(M2PTConfig) if f.name != "seed")  # the prompt init is seeded by --seed
# Other spellings of the same flag: the reference M2PT scripts' and LLaVA's (docs/llava_flags.md has the whole table).
M2PT_ALIASES = {"visual_prompt_length": ["--PT_len_vision_encoder"], "text_prompt_length": ["--PT_len_llm"],
                "tune_projector": ["--tune_mm_mlp_adapter"], "tune_lm_head": ["--tune_lm_header"]}
TRAIN_ALIASES = {"model": ["--model_name_or_path"]}
GROUPS = {
    "model": "model (one of: --model, or the three LLaVA-v1 parts; default: the embedded demo model)",
    "method": "method (pipeline/core/methods.py)",
    "data": "data",
    "optim": "optimisation (Hugging Face TrainingArguments spelling)",
    "logging": "logging and checkpoints",
}


def _f(group: str, default, help: str, **meta):
    """A flag field: its --help group, default, help text and any add_argument extras (choices, type, no_help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"group": group, "help": help, **meta})
    return field(default=default, metadata={"group": group, "help": help, **meta})


@dataclass
class TrainConfig(ModelSource):
    """One training run (pipeline/train.py); `m2pt_flags` (the M2PT flags as given), `lora` and `explicit` are
    filled by `parse_args`. The model flags come from ModelSource (pipeline/source.py), shared with every app."""

    # model
    config: str | None = _f("model", None, "a YAML or JSON file of flags (keys as --help spells them); flags given "
                            "here override it. Every run writes its own as OUTPUT/train_config.yaml")
    attn_implementation: str = _f("model", "auto", "auto: flash_attention_2 when CUDA + flash-attn are present, "
                                  "else sdpa", choices=("auto", "flash_attention_2", "sdpa", "eager"))
    init_adapter: str | None = _f("model", None, "start from this adapter's prompts/projector (and its config)")
    # method
    method: str = _f("method", "m2pt", "; ".join(f"{m.name}: {m.help}" for m in methods.REGISTRY.values()),
                     choices=METHODS)
    # data
    train_shards: str | None = _f("data", None, "shard folder with manifest.json, brace pattern or glob "
                                  "(comma-separated for several); default: the embedded sample set, built under "
                                  "$M2PT_DATA (./data) if missing")
    model_max_length: int = _f("data", 2048, "max tokens per sample after <image> expansion (text prompts not "
                               "counted); longer samples are skipped and counted, never truncated")
    group_by_length: bool = _f("data", False, "batch samples of similar token length: each loader worker sorts "
                               "--length_group_batches batches' worth of samples by length and emits them as "
                               "batches in a seeded random order (less padding; resume stays exact)")
    length_group_batches: int = _f("data", 16, "with --group_by_length: batches per length group (larger: less "
                                   "padding, less mixing)")
    dataloader_num_workers: int = _f("data", 1, "loader processes per rank (each reads whole data slots: lowered "
                                     "to a divisor of the rank's slot count when it does not divide it)")
    data_slots: int = _f("data", 0, "streams the shards are split into for the whole run (0: ranks x loader "
                         "workers at the start). A run resumes on any rank count that divides it, when each step's "
                         "micro-batches (ranks x accumulation) are a multiple of it: give a multiple of every rank "
                         "count a requeued job may come back with, e.g. 8 for 1, 2, 4 or 8 ranks")
    shuffle_buffer: int = _f("data", 1000, "samples in each worker's shuffle buffer")
    max_bad_sample_fraction: float = _f("data", 0.05, "abort when more than this share of samples read so far was "
                                        "skipped (corrupt, too long, no supervised token, lost in a broken shard, "
                                        "...); checked once 200 samples (or one epoch, if smaller) were read")
    verify_shards: bool = _f("data", False, "also compare every shard's sha256 with manifest.json at start-up "
                             "(sizes are always compared); reads all the data once")
    # optimisation
    deepspeed: str = _f("optim", str(REPO / "ds_configs" / "zero2.json"),
                        "DeepSpeed JSON config; 'auto' values are filled from these flags")
    output_dir: str = _f("optim", str(TRAIN_OUTPUT), "checkpoints, logs and the adapter")
    per_device_train_batch_size: int = _f("optim", 4, "micro-batch per rank")
    gradient_accumulation_steps: int = _f("optim", 1, "micro-batches per optimizer step")
    learning_rate: float = _f("optim", 7e-4, "peak learning rate (reference recipe)")
    num_train_epochs: float = _f("optim", 3.0, "epochs over the shards' sample count")
    max_steps: int = _f("optim", -1, "if > 0: optimizer steps to run (overrides epochs)")
    warmup_ratio: float = _f("optim", 0.03, "share of steps for linear warm-up")
    warmup_steps: int = _f("optim", 0, "if > 0: warm-up steps (overrides --warmup_ratio)")
    lr_scheduler_type: str = _f("optim", "cosine", "transformers scheduler name: cosine, linear, constant, "
                                "constant_with_warmup, cosine_with_min_lr, warmup_stable_decay, ... (every one is "
                                "built once at start-up, so a missing kwarg fails before the model loads)")
    lr_scheduler_kwargs: str = _f("optim", "{}", "JSON object of the scheduler's own arguments, e.g. "
                                  "'{\"min_lr_rate\": 0.1}' for cosine_with_min_lr")
    weight_decay: float = _f("optim", 0.0, "AdamW weight decay (not applied to biases)")
    adam_beta1: float = _f("optim", 0.9, "AdamW beta1")
    adam_beta2: float = _f("optim", 0.999, "AdamW beta2")
    max_grad_norm: float = _f("optim", 1.0, "gradient clipping (DeepSpeed gradient_clipping)")
    bf16: bool = _f("optim", False, "bfloat16 training (fp32 master weights of the trainables)")
    fp16: bool = _f("optim", False, "float16 training (GPU only)")
    gradient_checkpointing: bool = _f("optim", False, "non-reentrant activation checkpointing")
    text_prompts: str = _f("optim", "auto", "how the LLM runs the textual prompts (the same function): prefix: each "
                           "layer's keys/values, computed from its prompt alone; slots: extra positions through every "
                           "layer (the reference's form); auto: prefix where the LLM allows it",
                           choices=("auto", "prefix", "slots"))
    tf32: bool = _f("optim", False, "allow TF32 matmuls and convolutions on Ampere+ GPUs (no effect elsewhere)")
    seed: int = _f("optim", 42, "seed of prompts, data order and dropout")
    peak_tflops: float | None = _f("optim", None, "peak TFLOP/s of one device for the 'mfu' metric (default: the "
                                   "GPU's dense bf16 datasheet value, or on CPU a short fp32 GEMM probe at "
                                   "start-up; formula in pipeline/core/flops.py)", type=float)
    num_threads: int | None = _f("optim", None, "intra-op threads per rank (default: OMP_NUM_THREADS if set, else "
                                 "this rank's share of the node's cores, lowered when the machine is already busy; "
                                 "the embedded default run uses 1, so its numbers do not depend on the machine's "
                                 "load; logged at start-up)", type=int)
    # logging and checkpoints
    logging_steps: int = _f("logging", 10, "log every N optimizer steps")
    save_steps: int = _f("logging", 500, "checkpoint every N optimizer steps (0: only at end)")
    save_total_limit: int = _f("logging", 2, "keep at most this many checkpoints (0: all)")
    resume: str | None = _f("logging", "auto", "'auto': continue from the newest complete checkpoint in "
                            "--output_dir if there is one (only a run of the same settings: another learning rate, "
                            "seed, batch, method, data or length is refused); a checkpoint path; or 'none'")
    stop_at_step: int = _f("logging", 0, "if > 0: stop at this step with a checkpoint, as a stop signal would "
                           "(run_state 'stopped'; resume with --resume auto): splits a run into shorter jobs without "
                           "changing its schedule")
    overwrite_output_dir: bool = _f("logging", False, "start over in a folder that holds a run: first remove its "
                                    "checkpoints, adapter and logs (pipeline/training/identity.py: RUN_FILES)")
    run_name: str | None = _f("logging", None, "a name for this run, recorded in config.json and every "
                              "metrics.jsonl start line (default: the output folder's name)")
    report_to: list = _f("logging", ["tensorboard"], "trackers besides metrics.jsonl (always written): "
                         "tensorboard (OUTPUT/tb), wandb, mlflow (optional packages: pip install -e .[trackers]), "
                         "all, or none; several as a list or comma-separated", nargs="+", type=str)
    dist_timeout: int = _f("logging", int(os.environ.get("M2PT_DIST_TIMEOUT", 1800)),
                           "seconds before a stuck collective fails instead of hanging")
    push_to_hub: str | None = _f("logging", None, "after the final adapter (and its model card) is written, rank 0 "
                                 "uploads OUTPUT/adapter to this Hub model repo, user/name (created if missing). A "
                                 "token (hf auth login, or HF_TOKEN) and the Hub are checked before the model loads; "
                                 "`python -m pipeline.push` uploads a finished run's folder later")
    final_eval: bool = _f("logging", True, "end a run on the embedded default data with the zero-shot table (base "
                          "vs the new adapter on the held-out task types)",
                          no_help="skip the zero-shot table that ends a run on the embedded default data")
    local_rank: int = _f("logging", -1, argparse.SUPPRESS)  # passed by the deepspeed launcher
    # filled by parse_args, not flags
    m2pt_flags: M2PTConfig = field(default_factory=M2PTConfig, metadata={"group": None})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"group": None})
    explicit: tuple = field(default=(), metadata={"group": None})

    def as_config_file(self, m2pt_config: M2PTConfig) -> dict:
        """The flags as `--config` reads them back: the method's settings as they really train, LoRA's only for
        --method lora (another method refuses LoRA flags). Not the one-time actions of this invocation: a file
        that said --overwrite_output_dir would wipe the folder of whoever repeats it."""
        lora = set() if methods.get(self.method).takes_lora_flags else {f.name for f in fields(LoraSettings)}
        skip = {"explicit", "local_rank", "config", "overwrite_output_dir", "stop_at_step", "resume"} | lora
        return {k: v for k, v in self.record(m2pt_config).items() if k not in skip}

    def scheduler_kwargs(self) -> dict:
        return json.loads(self.lr_scheduler_kwargs or "{}")

    def record(self, m2pt_config: M2PTConfig | None = None) -> dict:
        """The flags as one flat dict (config.json's "args"), with the method flags of `m2pt_config` (the resolved
        config; default: as given)."""
        m2pt_config = m2pt_config or self.m2pt_flags
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("group")}
        method = {k: getattr(m2pt_config, k) for k in M2PT_FLAGS} | vars(self.lora)
        return flat | method | {"explicit": list(self.explicit)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other start-up error, not usage + "train.py: error:"
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    ap = _Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    for key, title in GROUPS.items():
        g = ap.add_argument_group(title)
        add_config_flags(g, TrainConfig, include=[f.name for f in fields(TrainConfig) if f.metadata["group"] == key],
                         aliases=TRAIN_ALIASES)
        if key == "method":
            add_config_flags(g, LoraSettings)
            g = ap.add_argument_group("M2PT (pipeline.core.m2pt.M2PTConfig; the prompt init is seeded by --seed)")
            add_config_flags(g, M2PTConfig, exclude=("seed",), aliases=M2PT_ALIASES)
    return ap


def _explicit(argv) -> tuple:
    """Which flags were given (a parse with every default suppressed): --init_adapter and --method must not
    silently override a flag the user set."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return tuple(sorted(vars(probe.parse_args(argv))))


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text or "{}"), dict)
    except ValueError:
        return False


TRACKERS = ("tensorboard", "wandb", "mlflow")


def trackers(report_to) -> list[str]:
    """--report_to as a list of trackers: `a b`, `a,b`, `all`, `none` (HF TrainingArguments' values)."""
    names = [n.strip() for item in ([report_to] if isinstance(report_to, str) else report_to or [])
             for n in item.split(",") if n.strip()]
    if "all" in names:
        return list(TRACKERS)
    return [n for n in dict.fromkeys(names) if n != "none"]


def flag_problems(c: TrainConfig) -> list[str]:
    """Values no run can use (a batch of 0 would surface as a ZeroDivisionError traceback after a step)."""
    rules = [
        (c.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
        (c.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (c.logging_steps >= 1, "--logging_steps must be >= 1"),
        (c.save_steps >= 0, "--save_steps must be >= 0 (0: only at the end)"),
        (c.save_total_limit >= 0, "--save_total_limit must be >= 0 (0: keep all)"),
        (c.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0"),
        (c.data_slots >= 0, "--data_slots must be >= 0 (0: ranks x loader workers)"),
        (c.shuffle_buffer >= 0, "--shuffle_buffer must be >= 0"),
        (c.model_max_length >= 1, "--model_max_length must be >= 1"),
        (0 <= c.max_bad_sample_fraction <= 1, "--max_bad_sample_fraction must be within [0, 1]"),
        (c.learning_rate > 0, "--learning_rate must be > 0"),
        (c.max_steps > 0 or c.num_train_epochs > 0, "--num_train_epochs must be > 0 (or set --max_steps)"),
        (0 <= c.warmup_ratio < 1, "--warmup_ratio must be within [0, 1)"),
        (c.weight_decay >= 0, "--weight_decay must be >= 0"),
        (0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, "--adam_beta1 / --adam_beta2 must be within [0, 1)"),
        (c.max_grad_norm >= 0, "--max_grad_norm must be >= 0"),
        (c.dist_timeout >= 1, "--dist_timeout must be >= 1"),
        (c.num_threads is None or c.num_threads >= 1, "--num_threads must be >= 1"),
        (c.peak_tflops is None or c.peak_tflops > 0, "--peak_tflops must be > 0"),
        (c.length_group_batches >= 1, "--length_group_batches must be >= 1"),
        (c.warmup_steps >= 0, "--warmup_steps must be >= 0"),
        (c.stop_at_step >= 0, "--stop_at_step must be >= 0"),
        (set(trackers(c.report_to)) <= set(TRACKERS), f"--report_to: one or more of {', '.join(TRACKERS)}, all, "
                                                      "none"),
        (_json_object(c.lr_scheduler_kwargs), "--lr_scheduler_kwargs must be a JSON object, e.g. '{\"min_lr_rate\": "
                                              "0.1}'"),
        (not (c.bf16 and c.fp16), "choose one of --bf16 / --fp16"),
        (not (c.overwrite_output_dir and c.resume not in (None, "auto")),
         "--overwrite_output_dir starts the folder over: drop --resume PATH"),
    ]
    return [msg for ok, msg in rules if not ok]


# LLaVA flags that mean something else here: one line that names this project's way instead of "unrecognized".
LLAVA_HINTS = {
    "--data_path": "this trainer reads WebDataset shards: build them once with `python -m data_prep.build_shards "
                   "--input DATA_PATH --image_root IMAGE_FOLDER --output SHARDS --model MODEL --shuffle`, then pass "
                   "--train_shards SHARDS",
    "--vision_tower": "the vision tower comes with --model (a llava-hf folder) or --model_vision (LLaVA-v1 parts)",
    "--pretrain_mm_mlp_adapter": "a stage-1 projector file is --mm_projector (with --model_llm and --model_vision)",
    "--deepspeed_config": "the DeepSpeed JSON is --deepspeed",
}
LLAVA_HINTS["--image_folder"] = LLAVA_HINTS["--data_path"]
# LLaVA flags whose usual value is what this trainer does anyway: accepted with that value (and ignored), refused
# with the reason for any other. Values compare case-insensitively; None: any value.
LLAVA_IMPLIED = {
    "--version": ({"v1", "vicuna_v1"}, "this trainer uses the Vicuna-v1 template (pipeline/core/chat.py)"),
    "--mm_vision_select_layer": ({"-2"}, "the feature layer is the model config's vision_feature_layer"),
    "--mm_projector_type": ({"mlp2x_gelu", "linear"}, "the projector is the model's own (llava-hf: mlp2x_gelu; "
                                                      "LLaVA-v1 parts: linear)"),
    "--mm_use_im_start_end": ({"false"}, "no image start/end tokens are used"),
    "--mm_use_im_patch_token": ({"false"}, "no image patch token is used"),
    "--lazy_preprocess": ({"true"}, "samples are always decoded lazily, from the shards"),
    "--group_by_modality_length": ({"false"}, "use --group_by_length (batches of similar token length)"),
    "--image_aspect_ratio": (set(), "images go through the model's image processor (resize, center crop), not "
                                    "padded to a square"),
    "--evaluation_strategy": ({"no"}, "training runs no evaluation: python -m pipeline.evaluate scores adapters"),
    "--save_strategy": ({"steps"}, "checkpoints are written every --save_steps steps"),
    "--per_device_eval_batch_size": (None, ""),
}


def _value(argv: list[str], i: int) -> tuple[str, int]:
    """The value of argv[i] (`--x=v` or `--x v`; a bare `--x` is "true") and how many tokens it took."""
    name, eq, value = argv[i].partition("=")
    if eq:
        return value, 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], 2
    return "true", 1


def _llava_spellings(argv: list[str], ap) -> list[str]:
    """Rewrite LLaVA / Hugging Face spellings into this trainer's, refuse the ones that mean something else with a
    hint, drop the ones whose value is what happens anyway. `--resume_from_checkpoint True|False|PATH` ->
    `--resume auto|none|PATH`."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].partition("=")[0]
        if name in LLAVA_HINTS:
            ap.error(f"{name}: {LLAVA_HINTS[name]}")
        if name not in LLAVA_IMPLIED and name != "--resume_from_checkpoint":
            out.append(argv[i])
            i += 1
            continue
        value, took = _value(argv, i)
        i += took
        if name == "--resume_from_checkpoint":
            out += ["--resume", {"true": "auto", "false": "none"}.get(value.lower(), value)]
            continue
        accepted, why = LLAVA_IMPLIED[name]
        if accepted is not None and value.lower() not in accepted:
            ap.error(f"{name} {value}: {why}")
    return normalize_kebab_flags(out, ap)


CONFIG_FILE = "train_config.yaml"  # what a run writes into its folder: `--config` reads it back


def _config_file(argv: list[str], ap) -> tuple[list[str], dict, str | None]:
    """`--config FILE` (YAML or JSON: flag names as keys, as --help spells them) out of argv, and its values. Flags
    on the command line override the file. A key that is no flag is an error naming it."""
    import yaml

    names = [a.partition("=")[0] for a in argv]
    if "--config" not in names:
        return argv, {}, None
    i = names.index("--config")
    path = argv[i].partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
    rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        ap.error(f"--config {path}: unreadable ({e})")
    if not isinstance(data, dict):
        ap.error(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in ap._actions} - {"help", "local_rank"}
    unknown = sorted(set(data) - known)
    if unknown:
        ap.error(f"--config {path}: {unknown[0]!r} is not a flag of this trainer (see --help)")
    return rest, {k: _typed(ap, path, k, v) for k, v in data.items()}, path


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", parse_bool: "true or false"}


def _typed(ap, path: str, key: str, value):
    """A file's value checked as the command line checks a flag's, then converted by the flag's own type.

    Why: argparse applies a flag's type to what is typed on the command line, never to a default, and a file's
    values become defaults. Unchecked, `learning_rate: true` trained at lr 1.0 (True == 1) and `seed: 1.9` or
    `max_steps: [3]` ended in tracebacks far from the file."""
    action = next(a for a in ap._actions if a.dest == key and not isinstance(a, argparse._StoreFalseAction))
    want, listed = action.type or str, action.nargs in ("+", "*")
    try:
        out = _convert(action, want, listed, value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        expected = _TYPE_NAMES.get(want, getattr(want, "__name__", "a value"))
        ap.error(f"--config {path}: {key}: expected {expected}{' or a list of them' if listed else ''}, got {value!r}")
    for v in out if isinstance(out, list) else [out]:
        if action.choices and v not in action.choices:
            ap.error(f"--config {path}: {key}: expected one of {', '.join(map(str, action.choices))}, got {v!r}")
    return out


def _convert(action, want, listed: bool, value):
    if value is None and (action.default is None or want is str):  # a path or name may be unset, a number not
        return None
    if isinstance(value, list) and listed:
        return [_scalar(want, v) for v in value]
    return _scalar(want, value)


def _scalar(want, v):
    """One value through a flag's type; ValueError for what the command line could not have said."""
    if v is None or isinstance(v, (list, dict)) or (isinstance(v, bool) and want is not parse_bool):
        raise ValueError
    if want is int and isinstance(v, float):
        raise ValueError  # 2.5 is no integer (int() would make it 2)
    if want is parse_bool and isinstance(v, bool):
        return v
    return want(v)  # a string as the command line reads it: YAML reads 1e-3 (no dot) as the string '1e-3'


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    ap = build_parser(description)
    argv = _llava_spellings(list(sys.argv[1:] if argv is None else argv), ap)
    argv, from_file, config_path = _config_file(argv, ap)
    ap.set_defaults(**from_file)
    values = vars(ap.parse_args(argv)) | {"config": config_path}
    m2pt = {k: values.pop(k) for k in M2PT_FLAGS}
    lora = LoraSettings(**{f.name: values.pop(f.name) for f in fields(LoraSettings)})
    try:
        m2pt_flags = M2PTConfig(**m2pt, seed=values["seed"])
    except ValueError as e:
        ap.error(str(e))
    explicit = tuple(sorted(set(_explicit(argv)) | set(from_file)))  # the file's settings were chosen too
    cfg = TrainConfig(**values, m2pt_flags=m2pt_flags, lora=lora, explicit=explicit)
    if cfg.resume == "none":
        cfg.resume = None
    problems = flag_problems(cfg)
    if problems:
        ap.error("; ".join(problems))
    return cfg


# ------------------------------------------------------------------ what the method flags resolve to
def _method_fixes(cfg: TrainConfig) -> dict:
    """What --method fixes (prompt lengths; lora / full also the projector and LM head). An explicit flag that
    disagrees, or a LoRA flag for another method, is an error."""
    method = methods.get(cfg.method)
    if cfg.init_adapter and not method.takes_init_adapter:
        raise UsageError(f"--init_adapter starts from an M2PT adapter; --method {cfg.method} cannot use one")
    fixed = method.fixes()
    clash = [f"--{k}" for k, v in fixed.items() if k in cfg.explicit and getattr(cfg.m2pt_flags, k) != v]
    if not method.takes_lora_flags:
        clash += [f"--{f.name}" for f in fields(LoraSettings) if f.name in cfg.explicit]
    if clash:
        raise UsageError(f"--method {cfg.method} fixes or ignores {', '.join(clash)}: drop the flag(s) or choose "
                         "another method")
    return fixed


def _adapter_m2pt_config(cfg: TrainConfig, fixed: dict) -> M2PTConfig:
    """--init_adapter's config; an explicit method flag that disagrees with it is an error."""
    from pipeline.core.m2pt import read_adapter_config

    m2pt_config = M2PTConfig.from_dict(read_adapter_config(cfg.init_adapter)["m2pt_config"])
    wrong = [f"{k} {getattr(m2pt_config, k)}" for k, v in fixed.items() if getattr(m2pt_config, k) != v]
    if wrong:
        raise UsageError(f"--init_adapter {cfg.init_adapter} has {', '.join(wrong)}, which --method {cfg.method} "
                         "does not train")
    clash = [f"--{k} {getattr(cfg.m2pt_flags, k)} (adapter: {getattr(m2pt_config, k)})" for k in M2PT_FLAGS
             if k in cfg.explicit and getattr(cfg.m2pt_flags, k) != getattr(m2pt_config, k)]
    if clash:
        raise UsageError(f"--init_adapter {cfg.init_adapter} fixes the method's shape; conflicting flag(s): "
                         + ", ".join(clash) + ". Drop them, or start without --init_adapter")
    return m2pt_config


def resolve_m2pt_config(cfg: TrainConfig) -> M2PTConfig:
    """The prompt / projector settings this run really trains: the flags with what --method fixes, or
    --init_adapter's. For lora / full: prompt lengths 0 (no prompts; the visual-token count is the stock one)."""
    fixed = _method_fixes(cfg)
    if cfg.init_adapter:
        return _adapter_m2pt_config(cfg, fixed)
    m2pt_config = dataclasses.replace(cfg.m2pt_flags, **fixed)
    c = m2pt_config
    trains = c.visual_prompt_length or c.text_prompt_length or c.tune_projector or c.tune_lm_head
    if methods.get(cfg.method).prompts and not trains:
        raise UsageError("nothing would train: both prompt lengths are 0, the projector is frozen and the LM head "
                         "is not tuned")
    return m2pt_config
