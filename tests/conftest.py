import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # in-process trainings keep the test process at one thread

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _launcher_env_restored():
    """In-process training fills RANK / WORLD_SIZE / MASTER_PORT into os.environ (pipeline.training.dist): don't let
    them leak into later tests' subprocesses (a Slurm job would inherit 'rank 0 of 1' and a used port)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tiny():
    from pipeline.demo.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """170 records of the sample set in 11 shards of unequal size (10 x 16 + 10), under shards/ (+ sample/)."""
    from data_prep.build_shards import main as build_main
    from pipeline.demo.sample_data import build as make_sample

    d = tmp_path_factory.mktemp("data")
    make_sample(d / "sample", per_task=20, text_only=10, heldout_per_task=2, seed=0)
    assert build_main(["--input", str(d / "sample" / "train.json"), "--image_root", str(d / "sample"),
                       "--output", str(d / "shards"), "--samples_per_shard", "16", "--shuffle", "--workers", "1",
                       "--quiet"]) == 0
    return d
