"""Artifacts by Hub repo id (pipeline/core/hub.py): read through a real Hugging Face cache with HF_HUB_OFFLINE=1 in
the library, evaluate, chat and serve; pushing refused in one line, before any work, without a token or a Hub.

The cache is built with huggingface_hub's own functions (the folder name, blobs, snapshot symlinks, the `main` ref)
and the library's `scan_cache_dir` must see it as a cached repo: what `snapshot_download` finds offline is what a
download would have left."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
import torch
from helpers import ENV, REPO, prompts_that_matter, train_cmd

from pipeline.core.m2pt import M2PTConfig, attach_m2pt, save_adapter
from pipeline.errors import UsageError

REPO_ID = "someone/tiny-m2pt"


def hub_cache(cache, repo_id: str, folder):
    """`folder` as the `main` revision of model repo `repo_id` in the Hugging Face cache at `cache`."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (storage / "snapshots" / commit).mkdir(parents=True)  # as hf_hub_download makes it before linking
    for f in sorted(folder.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        _create_symlink(str(blob), str(storage / "snapshots" / commit / f.name))
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert {f.file_name for rev in repos[repo_id].revisions for f in rev.files} == {p.name for p in folder.iterdir()}
    return storage / "snapshots" / commit


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(adapter folder, HF cache holding it as REPO_ID): an adapter whose prompts matter (scaled up)."""
    from pipeline.demo.tiny import build_tiny

    m = prompts_that_matter(attach_m2pt(build_tiny().model, M2PTConfig(seed=5)))
    root = tmp_path_factory.mktemp("hub")
    folder = save_adapter(m, root / "adapter", base_name="tiny")
    hub_cache(root / "cache", REPO_ID, folder)
    return folder, root / "cache"


def test_a_repo_id_in_the_cache_loads_the_folders_adapter_offline(cached, monkeypatch):
    from huggingface_hub import constants

    from pipeline.core.methods import load_artifact, read_artifact
    from pipeline.demo.tiny import build_tiny

    folder, cache = cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE
    art = read_artifact(REPO_ID)
    assert art.path.parent.parent.name == "models--someone--tiny-m2pt" and art.method.name == "m2pt"
    assert read_artifact(f"{REPO_ID}@main").path == art.path
    tiny = build_tiny()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    want = load_artifact(build_tiny().model, folder).eval()(input_ids=ids).logits
    got = load_artifact(tiny.model, REPO_ID).eval()(input_ids=ids).logits
    assert torch.equal(got, want)
    with pytest.raises(FileNotFoundError, match="someone/absent: no such folder, and as a Hub repo id it could not "
                                                "be read .*HF_HUB_OFFLINE=1"):
        read_artifact("someone/absent")
    with pytest.raises(FileNotFoundError, match="runs/a/adapter"):  # three parts: a path only, never looked up
        read_artifact("runs/a/adapter")


def _env(cache, **kw):
    return dict(ENV, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **kw)


@pytest.mark.slow
def test_evaluate_chat_and_serve_take_a_repo_id_offline(cached, tmp_path):
    """The same answers by repo id as from the folder: evaluate (both rows in one table), chat and the server."""
    folder, cache = cached
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--limit", "2", "--output_dir", str(out),
                        "--adapter", str(folder), REPO_ID, "--names", "local", "hub"],
                       env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {n: [json.loads(x) for x in (out / n / "predictions.jsonl").read_text().splitlines()]
            for n in ("local", "hub")}
    assert len(rows["hub"]) == len(rows["local"]) > 0
    assert [x["prediction"] for x in rows["hub"]] == [x["prediction"] for x in rows["local"]]
    provenance = json.loads((out / "results.json").read_text())["hub"]["provenance"]
    assert REPO_ID in json.dumps(provenance)
    item = rows["hub"][0]
    from pipeline.evaluation.runner import EvalConfig, plan_runs

    image = next(it["image"] for its in plan_runs(EvalConfig(limit=2)).items.values() for it in its
                 if it["question"] == item["question"])
    r = subprocess.run([sys.executable, "-m", "pipeline.chat", "--max_new_tokens", "32", "--adapter", REPO_ID,
                        "--image", image, "--prompt", item["question"]],
                       env=_env(cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == item["prediction"]
    assert _served_answer(cache, tmp_path, image, item["question"]) == item["prediction"]


def _served_answer(cache, tmp_path, image, question) -> str:
    """`pipeline.serve --adapters REPO_ID`: the model list names it, and its greedy answer to one question."""
    import base64

    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--port", "0", "--adapters", REPO_ID],
                            env=_env(cache), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        import time

        for _ in range(600):
            if "Application startup complete" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.2)
        text = log.read_text()
        assert "Application startup complete" in text, text[-3000:]
        assert f"model {REPO_ID}: the adapter in {cache}" in text
        port = int(text.split("http://127.0.0.1:")[1].split("/")[0])
        url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
        body = {"model": REPO_ID, "max_tokens": 32, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["message"]["content"]
    finally:
        proc.kill()
        proc.wait()


def _no_token_env(tmp_path, **kw):
    env = {k: v for k, v in ENV.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    return env | {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"} | kw


@pytest.mark.parametrize("case, extra, said", [
    ("no token", {}, "cannot push to someone/x: no Hugging Face token (run `hf auth login` or set HF_TOKEN)"),
    ("offline", {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_token"},
     "cannot push to someone/x: HF_HUB_OFFLINE is set"),
    ("no hub", {"HF_TOKEN": "hf_not_a_token", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "cannot push to someone/x: the Hub did not accept the token or cannot be reached"),
])
def test_push_is_refused_in_one_line_without_a_token_or_a_hub(cached, tmp_path, case, extra, said):
    folder, _ = cached
    r = subprocess.run([sys.executable, "-m", "pipeline.push", str(folder), "someone/x"],
                       env=_no_token_env(tmp_path, **extra), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {said}") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


def test_push_refuses_a_folder_that_is_no_artifact_before_looking_for_a_token(tmp_path):
    (tmp_path / "notes").mkdir()
    r = subprocess.run([sys.executable, "-m", "pipeline.push", str(tmp_path / "notes"), "someone/x"],
                       env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "notes: not an adapter" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_training_with_push_to_hub_and_no_token_stops_before_the_model_loads(shards, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(train_cmd("--train_shards", str(shards / "shards"), "--output_dir", str(out),
                                 "--push_to_hub", "someone/x", "--max_steps", "2"),
                       env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: cannot push to someone/x: no Hugging Face token" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()  # no model, no step
    assert not os.path.exists(out / "adapter")


def test_only_rank_0_asks_the_hub_who_the_token_belongs_to(monkeypatch):
    """Every rank checks the flag and the token; only rank 0, the one that uploads, calls whoami (hundreds of ranks
    at once would meet the Hub's rate limit). The Hub here is an address nothing listens on, so asking it fails."""
    from huggingface_hub import constants

    from pipeline.training.config import parse_args
    from pipeline.training.plan import _check_flags_against_files

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    cfg = parse_args(["--push_to_hub", "someone/x"])
    ds_cfg, m2pt_config = _check_flags_against_files(cfg, rank=1, world=2)  # no Hub call: passes
    assert ds_cfg["zero_optimization"]["stage"] == 2 and m2pt_config.text_prompt_length > 0
    with pytest.raises(UsageError, match="the Hub did not accept the token or cannot be reached"):
        _check_flags_against_files(cfg, rank=0, world=2)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/hf-token")  # no stored token either
    with pytest.raises(UsageError, match="no Hugging Face token"):
        _check_flags_against_files(cfg, rank=1, world=2)  # the token is every rank's check
