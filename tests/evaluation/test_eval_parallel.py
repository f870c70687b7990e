"""Evaluation over several ranks, resumable after a kill, with the same predictions at any batch size or rank count
(pipeline/evaluation/parallel.py), on the embedded base and held-out tasks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV

LIMIT = 7  # questions per task: odd, so 2 ranks get unequal shares


def _eval_cmd(out: Path, *extra, ranks: int = 1, port: int = 0, limit: int = LIMIT) -> list[str]:
    args = ["-m", "pipeline.evaluate", "--output_dir", str(out), "--limit", str(limit), *extra]
    if ranks == 1:
        return [sys.executable, *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(port), *args]


def _run(out: Path, *extra, ranks: int = 1, port: int = 0, limit: int = LIMIT) -> dict:
    r = subprocess.run(_eval_cmd(out, *extra, ranks=ranks, port=port, limit=limit), env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _preds(out: Path, row: str = "base") -> list[str]:
    return (out / row / "predictions.jsonl").read_text().splitlines()


def _stored(out: Path, row: str = "base") -> list[dict]:
    """Every complete answer line of every rank's answers file."""
    recs = []
    for f in sorted((out / row / "answers").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by the kill
    return recs


def _inprocess(out: Path, *extra) -> dict:
    from pipeline.evaluate import main

    assert main(["--output_dir", str(out), "--limit", str(LIMIT), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_batch_size_does_not_change_greedy_or_sampled_answers(tmp_path):
    """Greedy: batch 1 and 8 give the same predictions. Sampled (--temperature 0.7, each question seeded alone):
    also the same, and other than greedy (the sampling is real)."""
    for extra in ([], ["--temperature", "0.7", "--seed", "3"]):
        one = tmp_path / f"b1{len(extra)}"
        eight = tmp_path / f"b8{len(extra)}"
        _inprocess(one, "--batch_size", "1", *extra)
        _inprocess(eight, "--batch_size", "8", *extra)
        assert _preds(one) == _preds(eight)
        assert len(_preds(one)) == 4 * LIMIT
    assert _preds(tmp_path / "b10") != _preds(tmp_path / "b14")


def test_a_rerun_reuses_every_answer_and_a_changed_setting_or_adapter_none(tmp_path):
    from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
    from pipeline.demo.tiny import build_tiny

    out = tmp_path / "out"
    first = _inprocess(out)["base"]["provenance"]
    assert (first["generated"], first["reused"], first["world_size"]) == (4 * LIMIT, 0, 1)
    again = _inprocess(out, "--batch_size", "3")["base"]["provenance"]  # batch size is not part of the key
    assert (again["generated"], again["reused"]) == (0, 4 * LIMIT)
    assert again["fingerprint"] == first["fingerprint"]
    other = _inprocess(out, "--max_new_tokens", "5")["base"]["provenance"]
    assert (other["generated"], other["reused"]) == (4 * LIMIT, 0)

    adapter = tmp_path / "adapter"
    save_adapter(attach_m2pt(build_tiny().model, M2PTConfig(seed=1)), adapter, base_name="tiny")
    row = _inprocess(out, "--adapter", str(adapter), "--names", "a")["a"]["provenance"]
    assert (row["generated"], row["reused"]) == (4 * LIMIT, 0)
    save_adapter(attach_m2pt(build_tiny().model, M2PTConfig(seed=2)), adapter, base_name="tiny")  # new weights
    row = _inprocess(out, "--adapter", str(adapter), "--names", "a")["a"]["provenance"]
    assert (row["generated"], row["reused"]) == (4 * LIMIT, 0)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_predictions_and_metrics(tmp_path):
    """torchrun with 2 ranks (gloo): 7 questions per task split 4/3, merged back into dataset order; the
    predictions file and every metric equal one process's. Sampled decoding too."""
    port = 29900 + os.getpid() % 50
    for k, extra in enumerate(([], ["--temperature", "0.7"])):
        one, two = tmp_path / f"one{k}", tmp_path / f"two{k}"
        a, b = _run(one, *extra), _run(two, *extra, ranks=2, port=port + k)
        assert _preds(one) == _preds(two)
        assert a["base"]["tasks"] == b["base"]["tasks"]
        assert b["base"]["provenance"]["world_size"] == 2
        assert {f.name: len(f.read_text().splitlines()) for f in (two / "base" / "answers").iterdir()} == {
            "rank-00000.jsonl": 4 * 4, "rank-00001.jsonl": 4 * 3}


def _kill_halfway(cmd: list[str], out: Path, at: int) -> None:
    """Start `cmd`, SIGKILL its whole process group once `at` answers are stored."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(_stored(out)) >= at:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    import psutil  # (a DeepSpeed dependency) torchrun starts its workers in sessions of their own

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("ranks_before, ranks_after", [(1, 1), (2, 1)])
def test_killed_evaluation_resumes_without_losing_or_repeating_a_question(tmp_path, ranks_before, ranks_after):
    """kill -9 after some answers are stored, then the same command (on 1 rank, also after 2): it completes, the
    answers stored before the kill are not generated again (generated + reused = all, every question stored once),
    and the predictions equal an uninterrupted run's."""
    port = 29950 + os.getpid() % 40
    straight = tmp_path / "straight"
    _run(straight, "--batch_size", "1", limit=40)
    out = tmp_path / "killed"
    _kill_halfway(_eval_cmd(out, "--batch_size", "1", ranks=ranks_before, port=port, limit=40), out, at=30)
    before = {r["key"] for r in _stored(out)}
    assert 30 <= len(before) < 160
    res = _run(out, "--batch_size", "1", ranks=ranks_after, port=port + 1, limit=40)
    prov = res["base"]["provenance"]
    assert prov["reused"] == len(before) and prov["generated"] == 160 - len(before)
    keys = [r["key"] for r in _stored(out)]
    assert len(keys) == len(set(keys)) == 160  # no question answered twice, none lost
    assert _preds(out) == _preds(straight)


def test_a_replaced_image_file_changes_the_questions_key(tmp_path):
    """An answer is not reused for another image stored under the same name (size or time differ)."""
    from pipeline.evaluation.parallel import question_key

    img = tmp_path / "x.png"
    img.write_bytes(b"a" * 10)
    item = {"question": "What is it?", "image_id": "x", "image": str(img)}
    key = question_key("t", 0, item)
    assert question_key("t", 0, dict(item)) == key
    img.write_bytes(b"b" * 11)
    assert question_key("t", 0, item) != key
    assert question_key("t", 0, dict(item, image=b"png1")) != question_key("t", 0, dict(item, image=b"png2"))
