"""No silently wrong result: each test is a user mistake that used to pass silently, crash late or damage a record
(a changed command on an existing run folder, colliding evaluation rows, broken or mismatched artifacts, corrupt
comparison cells), now refused with one line before any work, or handled."""

import json

import pytest
from helpers import ENV, deepspeed_cmd, read_metrics, run_inprocess, train_args


def _finished_run(shards, out):
    run_inprocess(train_args(shards, out, "--max_steps", "3", "--dataloader_num_workers", "0"))
    return {f: (out / f).read_text() for f in ("run_state.json", "config.json")}


def test_a_changed_command_on_a_finished_run_is_refused_and_the_run_untouched(shards, tmp_path, capsys):
    """Before: exit 0, 'resumed from step-3', the old schedule ran under the new flags (and another batch size
    logged loss 0.0), --max_steps 6 restarted the cosine at the end of the old one, and --method lora failed after
    the model loaded and marked the finished run failed."""
    from pipeline.train import main

    out = tmp_path / "run"
    before = _finished_run(shards, out)
    common = train_args(shards, out, "--max_steps", "3", "--dataloader_num_workers", "0")
    for extra, diff in ((["--learning_rate", "0.01"], "--learning_rate 0.0007 -> 0.01"),
                        (["--seed", "7"], "--seed 42 -> 7"),
                        (["--per_device_train_batch_size", "2"], "global batch (per-device batch x accumulation x "
                                                                "ranks) 4 -> 2"),
                        (["--max_steps", "6"], "--max_steps 3 -> 6"),
                        (["--method", "lora"], "--method m2pt -> lora"),
                        (["--text_prompts", "slots"], "--text_prompts auto -> slots")):
        capsys.readouterr()
        assert main([*common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and diff in err, err
        assert "--overwrite_output_dir" in err and "another --output_dir" in err
        assert {f: (out / f).read_text() for f in before} == before  # the old run's record is untouched
    # The same command resumes the finished run (nothing to do) ...
    assert main(common) == 0
    # ... and --overwrite_output_dir starts the folder over: step 1 again, under the new settings.
    assert main([*common, "--learning_rate", "0.01", "--overwrite_output_dir"]) == 0
    steps, _, starts = read_metrics(out)
    assert len(starts) == 1 and starts[0]["resumed_from"] is None and [s["step"] for s in steps] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["run_identity"]["learning_rate"] == 0.01


# ------------------------------------------------------------------------------------------------- evaluation
def _adapter(folder):
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny

    return save_adapter(attach_m2pt(build_tiny().model, M2PTConfig()), folder)  # records base_model "tiny"


def _eval_args(shards, out, *extra):
    return ["--tasks", "sample_pope", "--data_root", str(shards / "sample"), "--limit", "4", "--output_dir", str(out),
            *extra]


def test_rows_named_alike_stay_apart_and_the_base_row_is_the_base(shards, tmp_path):
    """Before: `--with_base --adapter col/a/run/adapter col/b/run/adapter col/base/adapter` gave 2 rows: `run` was b
    (a lost), and the un-tuned `base` row held the adapter of the folder named base; prediction folders were
    overwritten."""
    from pipeline.evaluate import main

    a = _adapter(tmp_path / "col" / "a" / "run" / "adapter")
    adapters = [str(a), str(tmp_path / "col" / "b" / "run" / "adapter"), str(tmp_path / "col" / "base" / "adapter")]
    for d in adapters[1:]:
        _adapter(d)
    out = tmp_path / "ev"
    assert main(_eval_args(shards, out, "--with_base", "--adapter", *adapters)) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["majority answer", "base", "a/run", "b/run", "col/base"]
    assert res["base"]["provenance"]["adapter"] is None and res["base"]["provenance"]["method"] == "base"
    assert [res[r]["provenance"]["adapter"] for r in ("a/run", "b/run", "col/base")] == adapters
    assert sorted(p.parent.name for p in out.glob("*/predictions.jsonl")) == ["a__run", "b__run", "base", "col__base"]
    assert main(_eval_args(shards, tmp_path / "e2", "--adapter", adapters[0], adapters[0])) == 2  # the same one twice
    assert main(_eval_args(shards, tmp_path / "e3", "--adapter", adapters[0], "--names", "base")) == 2  # reserved


def test_a_broken_or_mismatched_artifact_fails_before_any_generation(shards, tmp_path, capsys):
    """Before: a truncated or empty adapter_model.safetensors was a SafetensorError traceback after the rows before
    it had been evaluated; an adapter trained on `tiny` evaluated on `tiny-random` scored silently; `--device cuda`
    without CUDA was an AssertionError traceback."""
    from pipeline.evaluate import main

    good = str(_adapter(tmp_path / "good" / "adapter"))
    weights = _adapter(tmp_path / "cut" / "adapter") / "adapter_model.safetensors"
    full = weights.read_bytes()
    for broken, why in ((full[: len(full) // 2], "truncated or altered"), (b"", "truncated or empty"),
                        (full[:6], "truncated or empty")):
        weights.write_bytes(broken)
        capsys.readouterr()
        out = tmp_path / f"ev{len(broken)}"
        assert main(_eval_args(shards, out, "--with_base", "--adapter", good, str(weights.parent))) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {weights}:") and why in err and err.count("\n") == 1, err
        assert not out.exists()  # nothing was generated, for no row
    capsys.readouterr()
    assert main(_eval_args(shards, tmp_path / "ev", "--model", "tiny-random", "--adapter", good)) == 2
    assert "was trained on 'tiny', but the model is 'tiny-random'" in capsys.readouterr().err
    assert main(_eval_args(shards, tmp_path / "ev", "--model", "tiny-random", "--adapter", good,
                           "--allow_other_base")) == 0
    row = json.loads((tmp_path / "ev" / "results.json").read_text())["good"]
    assert row["provenance"]["other_base"] == "trained on tiny, evaluated on tiny-random"
    import torch

    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(_eval_args(shards, tmp_path / "cuda", "--device", "cuda")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda: CUDA is not available here") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------- comparison cells
def _cell(tmp_path, lines):
    from pipeline.demo.compare.cells import predictions_record

    cell = tmp_path / "cell"
    (cell / "eval" / "run").mkdir(parents=True)
    f = cell / "eval" / "run" / "predictions.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return cell, predictions_record(f)


def test_a_cut_emptied_or_edited_cell_is_one_clear_error(tmp_path):
    """Before: predictions cut short, cut mid-line or emptied were KeyError / JSONDecodeError / ZeroDivisionError
    tracebacks; edited predictions passed with the old score in the table while the verdict's paired difference
    moved from -8.5 to -76.5."""
    import pytest

    from pipeline.demo.compare.cells import CellError, check_predictions, read_records
    from pipeline.demo.compare.stats import _check_questions

    recs = [{"task": "t", "qid": str(i), "target": "a", "prediction": "a", "correct": True} for i in range(4)]
    cell, recorded = _cell(tmp_path, recs)
    assert recorded["count"] == 4 and len(recorded["sha256"]) == 64
    check_predictions(cell, recorded)  # intact
    f = cell / "eval" / "run" / "predictions.jsonl"
    text = f.read_text()
    for damaged in ("".join(text.splitlines(True)[:2]),  # cut short
                    text[: len(text) - 30],  # cut mid-line
                    "",  # emptied
                    text.replace('"prediction": "a"', '"prediction": "b"', 1)):  # edited
        f.write_text(damaged)
        with pytest.raises(CellError, match=r"cut, emptied or edited since it was scored\); delete .*cell.json"):
            check_predictions(cell, recorded)
    # A cell recorded before predictions were fingerprinted: every line is still checked, and the questions too.
    f.write_text(text[: len(text) - 30])
    with pytest.raises(CellError, match=r"predictions.jsonl:4: not a complete prediction record"):
        read_records(cell)
    f.write_text("")
    with pytest.raises(CellError, match=r"predictions.jsonl: empty"):
        read_records(cell)
    with pytest.raises(CellError, match=r"answer 2 of the base's 4 questions"):
        _check_questions(cell, recs[:2], {("t", str(i)) for i in range(4)})


# ------------------------------------------------------------------------------------------- before the model
def _no_model(monkeypatch):
    """Fail the test if anything loads a model: the mistakes below must be caught from the files alone."""
    from pipeline import defaults

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was caught")

    monkeypatch.setattr(defaults, "load_base", refuse)


def test_mistakes_the_files_show_are_caught_before_the_model_loads(shards, tmp_path, capsys, monkeypatch):
    """Before: --fp16 where the device can't was 'Type fp16 is not supported on your device.' after the model loaded,
    naming neither the flag nor the remedy; too few samples and shards of other visual-token counts were clear errors
    but after the model loaded; reduce_lr_on_plateau was accepted and never changed the lr."""
    from deepspeed.accelerator import get_accelerator

    from data_prep.build_shards import main as build_main
    from pipeline.train import main

    _no_model(monkeypatch)
    three = tmp_path / "three.json"
    three.write_text(json.dumps(json.loads((shards / "sample" / "train.json").read_text())[:3]))
    assert build_main(["--input", str(three), "--image_root", str(shards / "sample"), "--output",
                       str(tmp_path / "s3"), "--workers", "1", "--quiet"]) == 0
    assert build_main(["--input", str(shards / "sample" / "train.json"), "--image_root", str(shards / "sample"),
                       "--output", str(tmp_path / "s5"), "--visual_prompt_length", "5", "--workers", "1",
                       "--quiet"]) == 0
    acc = get_accelerator()
    monkeypatch.setattr(type(acc), "is_fp16_supported", lambda self: False)
    cases = [(["--train_shards", str(shards / "shards"), "--fp16"],
              "error: --fp16: the cpu accelerator here does not support it; drop the flag"),
             (["--train_shards", str(tmp_path / "s3")], "error: 3 samples are fewer than one optimizer step needs (4)"),
             (["--train_shards", str(tmp_path / "s5")], "was built for 21 visual tokens per image, but this model and "
                                                       "M2PT config give 26"),
             (["--train_shards", str(shards / "shards"), "--lr_scheduler_type", "reduce_lr_on_plateau"],
              "error: --lr_scheduler_type reduce_lr_on_plateau: it changes the lr from a metric")]
    for flags, want in cases:
        capsys.readouterr()
        assert main([*flags, "--output_dir", str(tmp_path / "o"), "--report_to", "none"]) == 2, flags
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err


def test_artifacts_are_written_whole_and_as_the_umask_says(shards, tmp_path):
    """Before: adapter_model.safetensors (and LoRA's, and full's model.safetensors) came out 0600 whatever the umask,
    so a teammate on a shared cluster could not read the adapter; the final adapter was written in place."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run_inprocess(train_args(shards, out, "--max_steps", "2", "--dataloader_num_workers", "0"))
        lora = tmp_path / "lora"
        run_inprocess(train_args(shards, lora, "--max_steps", "1", "--dataloader_num_workers", "0", "--method",
                                 "lora"))
    finally:
        os.umask(old)
    files = [*(out / "adapter").iterdir(), *(lora / "adapter").iterdir(),
             *(out / "checkpoints").rglob("adapter/*")]
    assert any(f.name == "adapter_model.safetensors" for f in files)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files if f.is_file()} == {
        f.name: "0o644" for f in files if f.is_file()}
    assert not list(tmp_path.rglob(".tmp-adapter")) and not list(tmp_path.rglob(".old-adapter"))


def test_a_jsonl_line_that_is_not_utf8_rejects_that_line_only(shards, tmp_path):
    """Before: one Latin-1 line refused the whole file ('utf-8 codec can't decode byte ...'), where a line of bad
    JSON rejected only that line."""
    from data_prep.build_shards import main as build_main

    recs = json.loads((shards / "sample" / "train.json").read_text())[:5]
    lines = [json.dumps(r).encode() for r in recs]
    lines[2] = json.dumps(dict(recs[2], id="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "s"
    assert build_main(["--input", str(tmp_path / "in.jsonl"), "--image_root", str(shards / "sample"), "--output",
                       str(out), "--workers", "1", "--quiet"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["totals"]["read"] == 5 and man["totals"]["written"] == 4
    assert man["totals"]["rejected_by_reason"] == {"bad_encoding": 1}
    (rej,) = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert rej["reason"] == "bad_encoding" and rej["detail"].startswith("line 3: not UTF-8")


@pytest.mark.slow
def test_a_taken_rendezvous_port_names_master_port(shards, tmp_path):
    """Before: a second deepspeed job on the same node was a 40-line traceback ending in EADDRINUSE on port 29500."""
    import socket
    import subprocess

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run(deepspeed_cmd(1, port, *train_args(shards, tmp_path / "o", "--max_steps", "1")), env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert f"port {port} on 127.0.0.1 is taken" in line and "--master_port" in line
    assert "Traceback" not in r.stderr
