"""Resume on another number of ranks (pipeline/training/elastic.py): the same steps from the same samples, the ZeRO
state through DeepSpeed's universal checkpoint, and a one-line refusal for what cannot be continued exactly."""

import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from helpers import ENV, deepspeed_cmd, read_metrics, train_args
from safetensors.torch import load_file

from pipeline.errors import UsageError
from pipeline.training.elastic import SavedLayout, check_world_change, loader_workers, merged_rank_state

BS = 2


# ------------------------------------------------------------------------------------------ the sample stream
def _rank_loader(shards, rank, world, nslots, workers, first_batch=0, start=None):
    """One rank's loader as the trainer builds it: real DataLoader worker processes taking turns."""
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream, resolve_shards
    from pipeline.demo.tiny import build_tiny

    base = build_tiny()
    pre = Preprocess(VicunaTemplate(base.tokenizer, base.model.config.image_token_id, 26), base.image_processor, 512)
    stream = ShardStream(resolve_shards(str(shards / "shards")).paths, rank=rank, world=world, seed=0,
                         batch_size=BS, preprocess=pre, pad_id=0, shuffle_buffer=20, start=start, nslots=nslots,
                         first_batch=first_batch)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))


def _steps(loaders, accumulation, n_steps, cursors=None):
    """The sample ids of each optimizer step over all ranks (a set: the order of ranks and micro-batches only
    changes how the gradient is summed), recording every slot's position in `cursors`."""
    steps = []
    for _ in range(n_steps):
        ids = []
        for it in loaders:
            for _ in range(accumulation):
                b = next(it)
                ids += b["ids"]
                if cursors is not None:
                    slot, *pos = b["cursor"]
                    cursors[slot] = pos
        steps.append(sorted(ids))
    return steps


def test_steps_hold_the_same_samples_on_1_2_and_4_ranks_and_after_a_resume_that_changes_them(shards):
    """4 data slots, 8 micro-batches of 2 per step: on 2 ranks x 4 accumulation (each rank's 2 slots read by one
    worker), on 1 rank x 8 (4 slots on 2 workers) and on 4 ranks x 2, every step holds the same 16 samples; a run
    stopped after 3 steps on 2 ranks continues on 1 and on 4 ranks with exactly the steps it would have taken."""
    two = _steps([_rank_loader(shards, r, 2, 4, 1) for r in range(2)], 4, 6)
    assert all(len(s) == len(set(s)) == 16 for s in two)
    assert len({i for s in two[:5] for i in s}) == 80  # 5 steps, 80 distinct samples of the 170: no slot repeats
    assert _steps([_rank_loader(shards, 0, 1, 4, 2)], 8, 6) == two
    assert _steps([_rank_loader(shards, r, 4, 4, 0) for r in range(4)], 2, 6) == two

    cursors = {}
    assert _steps([_rank_loader(shards, r, 2, 4, 1) for r in range(2)], 4, 3, cursors) == two[:3]
    assert sorted(cursors) == [0, 1, 2, 3]
    on_one = _steps([_rank_loader(shards, 0, 1, 4, 2, first_batch=3 * 8, start=cursors)], 8, 3)
    on_four = _steps([_rank_loader(shards, r, 4, 4, 1, first_batch=3 * 2, start=cursors) for r in range(4)], 2, 3)
    assert on_one == on_four == two[3:]


def test_a_rank_with_two_workers_resumes_on_the_right_workers_turn(shards):
    """Before: with 2 loader workers and 1 micro-batch per step, steps alternate between the workers' slots, and a
    resumed loader always began with worker 0, so a run stopped after an odd step took the other slot's batch."""
    straight = _steps([_rank_loader(shards, 0, 1, 2, 2)], 1, 6)
    cursors = {}
    _steps([_rank_loader(shards, 0, 1, 2, 2)], 1, 3, cursors)
    assert _steps([_rank_loader(shards, 0, 1, 2, 2, first_batch=3, start=cursors)], 1, 3) == straight[3:]


def test_loader_workers_divide_the_ranks_slots():
    assert [loader_workers(4, w) for w in (0, 1, 2, 3, 4, 8)] == [0, 1, 2, 2, 4, 4]
    assert loader_workers(1, 4) == 1 and loader_workers(6, 4) == 3


# ----------------------------------------------------------------------------------------------- refusals
def _cfg(micro=2, accumulation=1):
    return SimpleNamespace(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)


@pytest.mark.parametrize("world, cfg, message", [
    (1, _cfg(2, 1), "global batch is 8 samples per step, this command's 2; --gradient_accumulation_steps 4"),
    (3, _cfg(2, 1), "global batch is 8 samples per step, this command's 6; no accumulation keeps 8 samples"),
    (4, _cfg(1, 2), "keep --per_device_train_batch_size 2"),
    (8, _cfg(1, 1), "keep --per_device_train_batch_size 2"),
])
def test_a_changed_batch_is_refused_naming_the_flag(tmp_path, world, cfg, message):
    saved = SavedLayout(world=2, data_slots=4, global_batch=8, micro_batch=2)
    with pytest.raises(UsageError, match="written by 2 rank") as e:
        check_world_change(cfg, world, saved, tmp_path)
    assert message in str(e.value)


def test_slots_that_the_new_ranks_cannot_share_are_refused_with_the_reason(tmp_path):
    saved = SavedLayout(world=2, data_slots=2, global_batch=8, micro_batch=2)
    with pytest.raises(UsageError, match="read in 2 slots, which 4 ranks cannot share evenly.*--data_slots"):
        check_world_change(_cfg(2, 1), 4, saved, tmp_path)
    saved = SavedLayout(world=2, data_slots=4, global_batch=4, micro_batch=2)  # 2 micro-batches a step, 4 slots
    with pytest.raises(UsageError, match="takes 2 micro-batches from 4 data slots"):
        check_world_change(_cfg(2, 2), 1, saved, tmp_path)
    check_world_change(_cfg(2, 4), 1, SavedLayout(2, 4, 8, 2), tmp_path)  # 8 micro-batches, 4 slots: accepted
    check_world_change(_cfg(2, 1), 2, saved, tmp_path)  # the same rank count: nothing to check


def test_rank_states_are_merged_with_every_slot_once_and_the_totals_on_rank_0(tmp_path):
    for r, (cursors, totals) in enumerate([({"0": [0, 5], "1": [0, 7]}, {"samples": 10, "skipped_too_long": 1}),
                                           ({"2": [1, 3], "3": [0, 9]}, {"samples": 12})]):
        (tmp_path / f"rank-{r:05d}.json").write_text(json.dumps({"cursors": cursors, "totals": totals, "rng": f"r{r}"}))
    first = merged_rank_state(tmp_path, 0, 2)
    assert first["cursors"] == {"0": [0, 5], "1": [0, 7], "2": [1, 3], "3": [0, 9]} and first["rng"] == "r0"
    assert first["totals"] == {"samples": 22, "skipped_too_long": 1}
    last = merged_rank_state(tmp_path, 3, 2)
    assert last["cursors"] == first["cursors"] and last["totals"] == {} and "rng" not in last


# ----------------------------------------------------------------------------------- the real trainer, gloo
def _run(nprocs, port, out, shards, accumulation, *extra):
    args = train_args(shards, out, "--max_steps", "8", "--dist_timeout", "120", "--per_device_train_batch_size",
                      str(BS), "--gradient_accumulation_steps", str(accumulation), "--data_slots", "4", *extra)
    r = subprocess.run(deepspeed_cmd(nprocs, port, *args), env=ENV, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_a_run_saved_on_2_ranks_resumes_on_1_and_on_4_with_the_same_losses(shards, tmp_path):
    """2 ranks x 2 x 2 (global batch 8, 4 data slots), stopped at step 4, continued on 1 rank x 2 x 4 and on
    4 ranks x 2 x 1: every step's loss and the final adapter equal the uninterrupted 2-rank run's (up to the order
    in which gradients are summed). The ZeRO state goes through DeepSpeed's universal checkpoint."""
    port = 29800 + os.getpid() % 100
    straight = tmp_path / "straight"
    _run(2, port, straight, shards, 2)
    stopped = tmp_path / "stopped"
    _run(2, port + 1, stopped, shards, 2, "--stop_at_step", "4")
    runs = {}
    for world, accumulation in ((1, 4), (4, 1)):
        out = tmp_path / f"on{world}"
        shutil.copytree(stopped, out)
        log = _run(world, port + 1 + world, out, shards, accumulation)
        assert "at step 4 (written by 2 ranks)" in log
        assert (out / "checkpoints" / "step-00000004" / "universal" / "ds" / "zero" / "optimizer_state.pt").is_file()
        runs[world] = out
    want = [(x["step"], x["loss"]) for x in read_metrics(straight)[0]]
    assert [s for s, _ in want] == list(range(1, 9))
    ref = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    for world, out in runs.items():
        got = [(x["step"], x["loss"]) for x in read_metrics(out)[0]]
        assert [s for s, _ in got] == list(range(1, 9)), world
        for (step, a), (_, b) in zip(want, got):
            assert b == pytest.approx(a, rel=1e-5), (world, step)
        end = read_metrics(out)[1][-1]
        assert end["samples"] == 8 * 8 and end["steps_per_rank"] == [8] * world  # totals carried over, once
        tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        for k in ref:
            torch.testing.assert_close(tensors[k], ref[k], rtol=1e-5, atol=1e-6)
        assert json.loads((out / "config.json").read_text())["data_slots"] == 4
