"""Length-grouped batching (--group_by_length): same samples, less padding, exact resume, equal steps per rank."""

import subprocess

import pytest
from helpers import ENV, deepspeed_cmd, read_metrics, train_args

BS, GROUP = 2, 3  # 6 samples per length group


def _stream(shards, rank=0, world=1, group=GROUP, start=None):
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream, resolve_shards
    from pipeline.demo.tiny import build_tiny

    base = build_tiny()
    pre = Preprocess(VicunaTemplate(base.tokenizer, base.model.config.image_token_id, 26), base.image_processor, 512)
    return iter(ShardStream(resolve_shards(str(shards / "shards")).paths, rank=rank, world=world, seed=0,
                            batch_size=BS, preprocess=pre, pad_id=0, shuffle_buffer=20, start=start,
                            group_batches=group))


def _pads(b):
    return int((b["attention_mask"] == 0).sum())


@pytest.mark.parametrize("rank", [0, 1])
def test_groups_hold_the_same_samples_once_each_with_less_padding(shards, rank):
    """The 11 shards (10 x 16 + 10 samples) split 6/5 between two ranks, so each rank has at least 74 samples: the
    first 72 (12 groups) of each rank's grouped stream are exactly its first 72 in stream order (epoch 0), once each."""
    plain, grouped = _stream(shards, rank, 2, group=0), _stream(shards, rank, 2)
    a = [next(plain) for _ in range(36)]
    b = [next(grouped) for _ in range(36)]
    ids_a = [i for x in a for i in x["ids"]]
    ids_b = [i for x in b for i in x["ids"]]
    assert len(set(ids_b)) == len(ids_b) == 72 and set(ids_b) == set(ids_a)
    assert all(x["cursor"][1] == 0 for x in b)  # all from epoch 0
    assert sum(map(_pads, b)) < sum(map(_pads, a))
    for g in range(0, 36, GROUP):  # within a group, batches are consecutive runs of the length-sorted samples
        spans = sorted((min(x), max(x)) for x in (b[k]["attention_mask"].sum(1).tolist() for k in range(g, g + GROUP)))
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans


@pytest.mark.parametrize("stop_after", [7, 9])  # inside a group (7 = 2 groups + 1 batch), at a group's end
def test_grouped_stream_resumes_exactly_where_it_stopped(shards, stop_after):
    it = _stream(shards)
    straight = [next(it)["ids"] for _ in range(20)]
    it = _stream(shards)
    for _ in range(stop_after):
        cursor = next(it)["cursor"]
    slot, *position = cursor
    assert len(position) == (4 if stop_after % GROUP else 2)
    resumed = _stream(shards, start={slot: position})
    assert [next(resumed)["ids"] for _ in range(20 - stop_after)] == straight[stop_after:]
    # Resumed without grouping: the interrupted group is finished as it was built, then stream order.
    plain = _stream(shards, start={slot: position}, group=0)
    rest = (GROUP - stop_after % GROUP) % GROUP
    assert [next(plain)["ids"] for _ in range(rest)] == straight[stop_after:stop_after + rest]


@pytest.mark.slow
def test_grouped_training_resumes_to_the_uninterrupted_losses_on_two_ranks(shards, tmp_path):
    """Two ranks through the deepspeed launcher: 12 steps straight vs 7 steps (inside a length group) + resume to
    12. Same per-step losses, same steps on both ranks."""
    common = ["--group_by_length", "--length_group_batches", str(GROUP), "--per_device_train_batch_size", str(BS),
              "--lr_scheduler_type", "constant", "--dist_timeout", "120", "--save_total_limit", "0",
              "--dataloader_num_workers", "1"]

    def run(out, port, *extra):
        cmd = deepspeed_cmd(2, port, *train_args(shards, out, *common, "--max_steps", "12", *extra))
        r = subprocess.run(cmd, env=ENV, timeout=400, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    run(tmp_path / "a", 29611)
    run(tmp_path / "b", 29612, "--stop_at_step", "7")
    r = run(tmp_path / "b", 29613)
    assert "resumed from" in r.stderr and "at step 7" in r.stderr
    a, b = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert [x["step"] for x in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]
    assert read_metrics(tmp_path / "b")[1][-1]["steps_per_rank"] == [12, 12]
