"""Careless and hostile input (issue 33): each test is a value, record or request that used to be read where it must
not, hurt another user or mislead silently, now refused with one line naming it, or handled."""

import json

import pytest


# ------------------------------------------------------------------------------------ config files typed like flags
@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", True, "learning_rate: expected a number, got True"),  # trained at lr 1.0 (True == 1)
    ("per_device_train_batch_size", 2.5, "per_device_train_batch_size: expected an integer, got 2.5"),
    ("seed", 1.9, "seed: expected an integer, got 1.9"),
    ("max_steps", [3], "max_steps: expected an integer, got [3]"),
    ("max_steps", None, "max_steps: expected an integer, got None"),
    ("bf16", "maybe", "bf16: expected true or false, got 'maybe'"),
    ("report_to", [["wandb"]], "report_to: expected a string or a list of them, got [['wandb']]"),
])
def test_a_config_value_of_the_wrong_type_is_one_error_line_naming_key_and_type(tmp_path, capsys, key, value,
                                                                                expected):
    """Before: `learning_rate: true` trained at lr 1.0; 2.5, 1.9 and [3] ended in tracebacks."""
    from pipeline.train import parse_args

    (tmp_path / "c.yaml").write_text(json.dumps({key: value}))  # JSON is YAML
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --config {tmp_path / 'c.yaml'}: {expected} (see --help)\n"


def test_config_values_the_command_line_would_accept_are_read_as_it_reads_them(tmp_path):
    from pipeline.train import parse_args

    # PyYAML reads 1e-3 (no dot) as a string, as the shell hands every flag over: converted like a flag
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\nmax_steps: '7'\nbf16: true\nreport_to: [none]\n"
                                     "num_threads: null\nwarmup_ratio: 0\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "o")])
    assert (cfg.learning_rate, cfg.max_steps, cfg.bf16, cfg.num_threads, cfg.warmup_ratio) == (1e-3, 7, True, None, 0.0)
    assert isinstance(cfg.warmup_ratio, float) and cfg.report_to == ["none"]


# ------------------------------------------------------------------ chat and evaluation answer only what they saw
def test_an_over_long_chat_prompt_is_an_error_not_an_empty_answer(capsys):
    """Before: an empty answer and exit 0 (the server refuses the same prompt as context_length_exceeded)."""
    from pipeline.chat import main

    assert main(["--prompt", "word " * 1100, "--max_new_tokens", "8"]) == 2
    out = capsys.readouterr()
    assert "ASSISTANT" not in out.out and out.err.startswith("error: the prompt is ")
    assert "this model takes at most 1016 with --max_new_tokens 8" in out.err  # the base: 1024 positions - 8


@pytest.mark.parametrize("flags,message", [
    (["--limit", "-1"], "--limit must be >= 1"),  # scored all but the last question of each task
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),  # range() arg 3 must not be zero
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_evaluation_values_that_would_answer_other_questions_are_refused(capsys, flags, message):
    from pipeline.evaluate import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------- files only from where the user said
@pytest.mark.parametrize("form", ["parquet file", "parquet folder"])
def test_an_hf_image_value_that_kept_only_its_path_is_read_only_inside_the_image_root(tmp_path, form):
    """Before: a parquet row whose Image cell held only a path (a .parquet file, or a folder of them as Hub data sets
    ship) was read from wherever it pointed; the same path in a JSON record was refused. (A folder written by
    `save_to_disk` always holds the images' bytes.)"""
    import datasets
    from PIL import Image

    from data_prep.build_shards import main as build_main

    root, secret = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    secret.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "ok.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(secret / "private.png")
    (root / "link.png").symlink_to(secret / "private.png")
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a square"}]
    paths = {"inside": str(root / "ok.png"), "inside2": str(root / "." / "ok.png"),
             "outside": str(secret / "private.png"), "dotdot": str(root / ".." / "elsewhere" / "private.png"),
             "symlink": str(root / "link.png")}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(decode=False),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    ds = datasets.Dataset.from_list([{"id": k, "image": {"path": p, "bytes": None}, "conversations": conv}
                                     for k, p in paths.items()], features=features)
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet" if form == "parquet file" else tmp_path / "hub" / "data"
    src.parent.mkdir(exist_ok=True)
    if form == "parquet folder":
        src.mkdir()
        src = src.parent
    # as pyarrow writes it, with the features in its metadata (Dataset.to_parquet would embed the files' bytes)
    pq.write_table(ds.data.table, str(src if form == "parquet file" else src / "data" / "train-0.parquet"))
    out = tmp_path / "out"
    build_main(["--input", str(src), "--image_root", str(root), "--output", str(out), "--quiet", "--workers", "1"])
    rejected = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {"outside": "path_outside_root", "dotdot": "path_outside_root", "symlink": "path_outside_root"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 2 and manifest["totals"]["rejected"] == 3


# ------------------------------------------------------------------------------------- trackers fail before work
@pytest.mark.parametrize("tracker,env,message", [
    ("wandb", {}, "--report_to wandb: no W&B API key (set WANDB_API_KEY or run `wandb login`), or set "
                  "WANDB_MODE=offline"),
    ("mlflow", {}, "--report_to mlflow: the tracking URI sqlite:///"),  # mlflow-skinny's default: no registry
    ("mlflow", {"MLFLOW_TRACKING_URI": "file:///{tmp}/mlruns"}, "--report_to mlflow: the tracking URI file:///"),
    ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "--report_to mlflow: the tracking URI http://127.0.0."),
])
def test_a_tracker_that_cannot_log_is_one_line_before_the_model_loads(shards, tmp_path, capsys, monkeypatch, tracker,
                                                                      env, message):
    """Before: tracebacks after 9-109 s (the model loaded, the first step ran)."""
    from helpers import train_args

    from pipeline.train import main

    for k in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    assert main([*train_args(shards, tmp_path / "o"), "--report_to", tracker]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------- evaluation outputs
def _adapter(folder, seed):
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny

    return save_adapter(attach_m2pt(build_tiny().model, M2PTConfig(seed=seed)), folder, base_name="tiny")


def test_a_second_evaluation_into_one_folder_keeps_the_first_row(tmp_path, caplog):
    import logging

    from pipeline.evaluate import main

    a, b, out = _adapter(tmp_path / "a", 1), _adapter(tmp_path / "b", 2), tmp_path / "eval"
    caplog.set_level(logging.INFO)
    assert main(["--output_dir", str(out), "--limit", "2", "--adapter", str(a), "--names", "a"]) == 0
    assert main(["--output_dir", str(out), "--limit", "2", "--adapter", str(b), "--names", "b"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["majority answer", "a", "b"] and res["a"]["provenance"]["adapter"] == str(a)
    rows = [line.split(" | ")[0] for line in (out / "results.md").read_text().splitlines()[2:]]
    assert rows == ["| majority answer", "| a", "| b"]
    assert "kept 1 earlier row(s) of this folder: a" in caplog.text
    # a row of the same name is replaced where it stood, not repeated
    assert main(["--output_dir", str(out), "--limit", "2", "--adapter", str(b), "--names", "a"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["majority answer", "a", "b"] and res["a"]["provenance"]["adapter"] == str(b)
    # a results file that is not one is moved aside, named in the log, not overwritten unread
    (out / "results.json").write_text("{not json")
    assert main(["--output_dir", str(out), "--limit", "2", "--adapter", str(b), "--names", "b"]) == 0
    assert list(json.loads((out / "results.json").read_text())) == ["majority answer", "b"]
    assert [p.read_text() for p in out.glob("results.json.unreadable-*")] == ["{not json"]
    assert "could not be read" in caplog.text


def test_an_edited_stored_answer_is_asked_again(tmp_path, caplog):
    import logging

    from pipeline.evaluate import main

    out = tmp_path / "eval"
    assert main(["--output_dir", str(out), "--limit", "2"]) == 0
    answers = out / "base" / "answers" / "rank-00000.jsonl"
    lines = answers.read_text().splitlines()
    rec = json.loads(lines[0])
    original, rec["prediction"] = rec["prediction"], "edited in place"
    answers.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")  # still valid JSON, still the same key
    caplog.set_level(logging.INFO)
    assert main(["--output_dir", str(out), "--limit", "2"]) == 0
    prov = json.loads((out / "results.json").read_text())["base"]["provenance"]
    assert (prov["generated"], prov["reused"]) == (1, len(lines) - 1)
    assert "1 stored answers set aside as stale" in caplog.text
    preds = [json.loads(x)["prediction"] for x in (out / "base" / "predictions.jsonl").read_text().splitlines()]
    assert "edited in place" not in preds and preds.count(original) >= 1


# ------------------------------------------------------------------------------------------------- resuming
def test_resuming_another_runs_checkpoint_names_that_checkpoint(tmp_path):
    from pipeline.errors import UsageError
    from pipeline.training.identity import check_same_run

    ckpt = tmp_path / "old-run" / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"run": {"learning_rate": 0.01}}))
    with pytest.raises(UsageError) as e:  # named by path, from another run's folder
        check_same_run(ckpt, {"learning_rate": 0.02}, tmp_path / "new-run")
    assert str(e.value).startswith(f"--resume_from_checkpoint {ckpt} was written by a run with other settings")
    assert "new-run" not in str(e.value) and "0.01 -> 0.02" in str(e.value)
    with pytest.raises(UsageError, match="old-run holds a run with other settings"):  # found in its own folder
        check_same_run(ckpt, {"learning_rate": 0.02}, tmp_path / "old-run")
