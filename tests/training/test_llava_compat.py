"""Command lines as LLaVA users bring them: HfArgumentParser booleans, LLaVA's and the reference's flag names, a
one-line hint for the ones that mean something else here, and every transformers scheduler either accepted with
its arguments or refused before the model loads."""

import json

import pytest
from helpers import read_metrics, run_inprocess, train_args


def test_booleans_parse_as_hfargumentparser_reads_them_in_every_app():
    from pipeline.evaluate import parse_args as eval_args
    from pipeline.train import parse_args

    cfg = parse_args(["--bf16", "True", "--gradient_checkpointing", "False", "--group_by_length", "--tf32=true"])
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.group_by_length, cfg.tf32) == (True, False, True, True)
    assert not parse_args(["--tune_projector", "False"]).m2pt_flags.tune_projector
    assert not parse_args(["--no_tune_projector"]).m2pt_flags.tune_projector
    assert parse_args(["--tune-lm-head", "True"]).m2pt_flags.tune_lm_head  # dashed spelling, with a warning
    assert not eval_args(["--majority_baseline", "False"]).majority_baseline
    assert eval_args(["--with_base", "True"]).with_base
    with pytest.raises(SystemExit):
        parse_args(["--bf16", "maybe"])


def test_a_llava_style_command_line_trains(shards, tmp_path):
    """LLaVA's finetune.sh spellings (with this project's data and output paths): they parse, mean what they mean in
    LLaVA, and train. Before: 'error: unrecognized arguments: True' at the first boolean."""
    llava = ["--model_name_or_path", "tiny", "--version", "v1", "--mm_projector_type", "mlp2x_gelu",
             "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
             "--bf16", "False", "--tf32", "True", "--gradient_checkpointing", "True", "--lazy_preprocess", "True",
             "--evaluation_strategy", "no", "--save_strategy", "steps", "--per_device_eval_batch_size", "4",
             "--tune_mm_mlp_adapter", "True", "--tune_lm_header", "False", "--warmup_steps", "1",
             "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}',
             "--run_name", "llava-style", "--resume_from_checkpoint", "False"]
    out = tmp_path / "run"
    run_inprocess(train_args(shards, out, *llava, "--max_steps", "4", "--dataloader_num_workers", "0"))
    steps, _, starts = read_metrics(out)
    assert starts[0]["run_name"] == "llava-style" and len(steps) == 4
    lrs = [s["lr"] for s in steps]
    assert lrs[0] == pytest.approx(7e-4) and lrs[-1] == pytest.approx(7e-5)  # warm-up 1 step, cosine to 10 %
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["gradient_checkpointing"] and cfg["args"]["tune_projector"] and not cfg["args"]["tune_lm_head"]


@pytest.mark.parametrize("flags, hint", [
    (["--data_path", "a.json", "--image_folder", "img"], "python -m data_prep.build_shards --input DATA_PATH"),
    (["--image_aspect_ratio", "pad"], "not padded to a square"),
    (["--mm_vision_select_layer", "-1"], "vision_feature_layer"),
    (["--group_by_modality_length", "True"], "--group_by_length"),
    (["--vision_tower", "openai/clip-vit-large-patch14-336"], "--model_vision"),
])
def test_llava_flags_that_mean_something_else_here_get_one_line_naming_our_way(flags, hint, capsys):
    from pipeline.train import main

    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flags[0]}") and hint in err and err.count("\n") == 1, err


def test_every_scheduler_is_accepted_with_its_arguments_or_refused_before_the_model_loads(shards, tmp_path, capsys,
                                                                                       monkeypatch):
    """Before: cosine_with_min_lr passed the start-up check and failed after the model loaded; warmup_stable_decay
    was a TypeError; reduce_lr_on_plateau was accepted and never changed the lr."""
    from transformers import SchedulerType

    from pipeline import defaults
    from pipeline.train import main

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(defaults, "load_base", refuse)
    refused = {}
    for t in SchedulerType:
        capsys.readouterr()
        try:
            main(train_args(shards, tmp_path / t.value, "--lr_scheduler_type", t.value, "--max_steps", "1"))
        except AssertionError:  # got past every start-up check: accepted without arguments
            continue
        err = capsys.readouterr().err
        assert err.startswith(f"error: --lr_scheduler_type {t.value}") and err.count("\n") == 1, err
        refused[t.value] = err
    assert {"reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "warmup_stable_decay"} <= set(refused)
    assert {"constant", "cosine", "linear"}.isdisjoint(refused)
    # ... and with its arguments, a scheduler that needs them trains.
    monkeypatch.undo()
    out = tmp_path / "wsd"
    run_inprocess(train_args(shards, out, "--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                             '{"num_decay_steps": 2}', "--max_steps", "4", "--warmup_steps", "1",
                             "--dataloader_num_workers", "0"))
    assert [round(s["lr"], 7) for s in read_metrics(out)[0]][:2] == [7e-4, 7e-4]


@pytest.mark.parametrize("method", ["m2pt", "lora"])
def test_the_gpu_users_first_flags_train_here(shards, tmp_path, method):
    """--gradient_checkpointing and --bf16 (the README's own example) as trainings, not only as config values:
    checkpointing gives the same losses as without; bf16 stays within 5 % + 0.05 of fp32 over the first steps and
    writes an fp32 artifact. Why + 0.05: bf16 rounds the logits to 8 bits of mantissa, an error in the loss that does
    not shrink with the loss (m2pt's first loss is 0.026 in fp32, 0.031 in bf16 on AVX-512, 0.040 with AVX2 forced;
    LoRA's third step differs by 0.038 natively, 0.014 with AVX2). A broken bf16 path (NaN, fp16 overflow, a lost
    cast) is off by far more."""
    from safetensors.torch import load_file

    def losses(name, *flags):
        run_inprocess(train_args(shards, tmp_path / name, "--method", method, "--max_steps", "3",
                                 "--dataloader_num_workers", "0", *flags))
        return [s["loss"] for s in read_metrics(tmp_path / name)[0]]

    fp32 = losses("fp32")
    assert losses("ckpt", "--gradient_checkpointing", "True") == fp32
    bf16 = losses("bf16", "--bf16", "True")
    assert all(abs(b - f) <= 0.05 * f + 0.05 for b, f in zip(bf16, fp32)), (bf16, fp32)
    tensors = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in tensors.values()} == {"torch.float32"}


def test_a_run_repeats_from_the_config_file_it_wrote(shards, tmp_path, capsys):
    """--config FILE (YAML or JSON), flags on the command line over it; every run writes OUTPUT/train_config.yaml,
    and a run from that file gives the same losses. A key that is no flag is an error naming it."""
    from pipeline.train import main

    first = tmp_path / "a"
    run_inprocess(train_args(shards, first, "--method", "text", "--learning_rate", "1e-3", "--max_steps", "3",
                             "--dataloader_num_workers", "0", "--seed", "5"))
    written = first / "train_config.yaml"
    assert "overwrite_output_dir" not in written.read_text() and "lora_r" not in written.read_text()
    again = tmp_path / "b"
    run_inprocess(["--config", str(written), "--output_dir", str(again)])
    assert [s["loss"] for s in read_metrics(again)[0]] == [s["loss"] for s in read_metrics(first)[0]]
    cfg = json.loads((again / "config.json").read_text())["args"]
    assert (cfg["method"], cfg["learning_rate"], cfg["seed"], cfg["visual_prompt_length"]) == ("text", 1e-3, 5, 0)
    assert cfg["config"] == str(written)
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 2e-3, "max_step": 3}))
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "c.json")])
    assert "'max_step' is not a flag of this trainer" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 2e-3, "max_steps": 2}))
    from pipeline.train import parse_args

    assert parse_args(["--config", str(tmp_path / "c.json"), "--max_steps", "4"]).max_steps == 4  # the flag wins
    assert parse_args(["--config", str(tmp_path / "c.json")]).learning_rate == 2e-3


def _wandb_history(root) -> list[dict]:
    """The history rows of an offline wandb run, from its .wandb file: a 7-byte ':W&B' header, then LevelDB-log
    records (4-byte crc, 2-byte length, 1-byte type: full / first / middle / last) in 32 KiB blocks, each a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    (log,) = list(root.rglob("run-*.wandb"))
    raw, i, chunks, rows = log.read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while i + 7 <= len(raw):
        left = 32768 - i % 32768
        length, kind = int.from_bytes(raw[i + 4:i + 6], "little"), raw[i + 6]
        if left < 7 or kind == 0:  # block trailer / zero padding
            i += left
            continue
        chunks += raw[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def test_trackers_log_what_metrics_jsonl_records(shards, tmp_path, monkeypatch):
    """--report_to takes a list (tensorboard, wandb, mlflow, all, none) and --run_name; each tracker gets the numbers
    metrics.jsonl holds. wandb runs offline, MLflow against a local file store; both are read back. Before: only
    tensorboard or none."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store is in maintenance mode, not gone
    out = tmp_path / "run"
    argv = train_args(shards, out, "--max_steps", "3", "--dataloader_num_workers", "0", "--run_name", "tracked")
    argv[argv.index("--report_to") + 1] = "all"
    try:
        run_inprocess(argv)
    finally:
        import wandb

        wandb.teardown()  # wandb's service process would live as long as this pytest
    losses = [s["loss"] for s in read_metrics(out)[0]]
    assert len(losses) == 3 and (out / "tb").is_dir()
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "tracked" and run.data.params["learning_rate"] == "0.0007"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == pytest.approx(losses)
    history = _wandb_history(tmp_path / "wb")
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(losses)


def test_a_tracker_that_is_not_installed_is_refused_before_the_model_loads(shards, tmp_path, capsys, monkeypatch):
    import builtins

    from pipeline.train import main

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    assert main([*train_args(shards, tmp_path / "o"), "--report_to", "wandb"]) == 2
    assert "--report_to wandb: the wandb package is not installed" in capsys.readouterr().err
