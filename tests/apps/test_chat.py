"""python -m pipeline.chat: the answer evaluate generates for the same question and image, a multi-turn session
whose mistakes are one line each, and an adapter that does not fit the base refused before it loads."""

import json
import subprocess
import sys

import pytest
from helpers import ENV, prompts_that_matter

from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter


def _chat(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pipeline.chat", "--max_new_tokens", "32", *args], env=ENV,
                          capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An M2PT adapter whose prompts matter (scaled up), recorded for the embedded base."""

    from pipeline.demo.tiny import build_tiny

    m = prompts_that_matter(attach_m2pt(build_tiny().model, M2PTConfig(seed=1)))
    return save_adapter(m, tmp_path_factory.mktemp("a") / "adapter", base_name="tiny")


@pytest.mark.slow
def test_prompt_prints_the_answer_evaluate_generates(tmp_path, adapter):
    from pipeline.evaluate import main

    out = tmp_path / "eval"
    assert main(["--output_dir", str(out), "--limit", "2", "--with_base", "--adapter", str(adapter),
                 "--names", "tuned"]) == 0
    from pipeline.evaluation.runner import EvalConfig, plan_runs

    items = [it for its in plan_runs(EvalConfig(limit=2)).items.values() for it in its]
    for row, extra in (("base", []), ("tuned", ["--adapter", str(adapter)])):
        preds = [json.loads(x)["prediction"] for x in (out / row / "predictions.jsonl").read_text().splitlines()]
        for it, want in list(zip(items, preds))[::3]:  # three questions of different tasks
            r = _chat("--image", it["image"], "--prompt", it["question"], *extra)
            assert r.returncode == 0, r.stderr[-2000:]
            assert r.stdout.strip() == want, (row, it["question"])
    assert len({json.loads(x)["prediction"] for x in (out / "tuned" / "predictions.jsonl").read_text().splitlines()}
               ^ {json.loads(x)["prediction"] for x in (out / "base" / "predictions.jsonl").read_text().splitlines()})


def test_a_session_goes_on_after_a_missing_image_and_an_unknown_command(tmp_path):
    from pipeline.evaluation.runner import EvalConfig, plan_runs

    it = plan_runs(EvalConfig(limit=1)).items["sample_bigger"][0]
    session = (f"{it['question']}\n/image {tmp_path / 'missing.png'}\nAnd the other one?\n/reset\n/nope\n"
               f"/image {it['image']}\n{it['question']}\n/exit\nnever read\n")
    r = _chat("--image", it["image"], stdin=session)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert f"error: {tmp_path / 'missing.png'}: no such image file" in out
    assert "error: /nope: unknown command" in out
    answers = [line.split("ASSISTANT:", 1)[1].strip() for line in out.splitlines() if "ASSISTANT:" in line]
    assert len(answers) == 3  # three questions answered; the line after /exit never read
    assert answers[0] == answers[2]  # the same question on the same image, each time a fresh conversation
    one = _chat("--image", it["image"], "--prompt", it["question"])
    assert one.stdout.strip() == answers[0]


def test_an_adapter_for_another_base_or_a_missing_image_is_one_line(tmp_path, adapter):
    r = _chat("--model", "tiny-random", "--adapter", str(adapter), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "was trained on 'tiny'" in r.stderr, r.stderr
    r = _chat("--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.png'}: no such image file"
