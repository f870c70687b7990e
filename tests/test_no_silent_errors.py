"""No silently wrong result: each test is a user mistake that used to pass silently, crash late or damage a record
(a changed command on an existing run folder, colliding evaluation rows, broken or mismatched artifacts, corrupt
comparison cells), now refused with one line before any work, or handled."""

import json

from helpers import read_metrics, run_inprocess, train_args


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
                        (["--method", "lora"], "--method m2pt -> lora")):
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
