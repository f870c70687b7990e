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
