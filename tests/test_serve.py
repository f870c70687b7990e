"""Many M²PT adapters in one batch, and the OpenAI-compatible server over them.

Every answer is compared with the one `pipeline.evaluation.generate` gives with the adapter attached alone (greedy,
fp32). The adapters differ in everything a row can differ in: prompt lengths, visual token mode (so the number of
visual tokens), projector weights and LM head."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ENV

from pipeline.core.m2pt import M2PTConfig, attach_m2pt, load_adapter, save_adapter

ADAPTERS = {
    "a": M2PTConfig(seed=1),
    "b": M2PTConfig(seed=2, visual_token_mode="clean", visual_prompt_length=3, text_prompt_length=4),
    "c": M2PTConfig(seed=3, tune_lm_head=True),
    "d": M2PTConfig(seed=4, text_prompt_length=0, visual_prompt_length=6),
}
NEW_TOKENS = 12


def _make(folder, name, cfg):
    """An adapter whose prompts and projector matter (scaled prompts, perturbed projector and head)."""
    import torch

    from pipeline.demo.tiny import build_tiny

    m = attach_m2pt(build_tiny().model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in m.m2pt.parameters():
            p.mul_(30)
        for p in m.model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if cfg.tune_lm_head:
            m.lm_head.weight.add_(torch.randn(m.lm_head.weight.shape, generator=g) * 0.05)
    return save_adapter(m, folder / name, base_name="tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Adapters on disk, held-out questions, and each model's answers alone (generate, batch 4)."""
    from pipeline import defaults
    from pipeline.core.chat import VicunaTemplate
    from pipeline.core.m2pt import num_visual_tokens
    from pipeline.evaluate import EvalConfig, plan_runs
    from pipeline.evaluation.generate import generate

    root = tmp_path_factory.mktemp("adapters")
    paths = {n: _make(root, n, c) for n, c in ADAPTERS.items()}
    items = [it for its in plan_runs(EvalConfig(limit=2)).items.values() for it in its]
    alone = {}
    for name in ["base", *ADAPTERS]:
        base = defaults.load_base("tiny")
        model = (base.model if name == "base" else load_adapter(base.model, paths[name])).eval()
        template = VicunaTemplate(base.tokenizer, model.config.image_token_id, num_visual_tokens(model))
        alone[name] = generate(model, base.tokenizer, base.image_processor, template, items, 4, NEW_TOKENS,
                               show_progress=False)
    return root, paths, items, alone


def _bank(paths):
    from pipeline import defaults
    from pipeline.serving.bank import AdapterBank

    bank = AdapterBank(defaults.load_base("tiny"))
    for name, path in paths.items():
        bank.add(name, path)
    return bank


def test_a_mixed_batch_gives_each_row_the_answer_of_its_adapter_alone(world):
    from pipeline.evaluation.generate import _load_image
    from pipeline.serving import mixed

    _, paths, items, alone = world
    bank = _bank(paths)
    names = ["base", *ADAPTERS]
    rows, want = [], []
    for k, it in enumerate(items):  # every question under every model, the models in a different order each time
        for name in names[k % len(names):] + names[:k % len(names)]:
            adapter = bank.get(name)
            rows.append(mixed.Row(adapter, mixed.encode(bank, adapter, "<image>\n" + it["question"]),
                                  _load_image(it["image"], bank.base.image_processor), NEW_TOKENS))
            want.append(alone[name][k])
    assert mixed.answers(bank, rows) == want
    # the adapters matter: each answers some question differently from the base
    for name in ADAPTERS:
        assert alone[name] != alone["base"], name
    # the prefix was computed once, at load, and the base model was left as it was
    assert bank.get("a").pt == 10 and bank.get("b").pt == 4 and bank.get("d").kv is None
    from pipeline.core.m2pt import vision_core

    encoder = vision_core(bank.model).encoder
    assert not hasattr(bank.model, "m2pt") and not encoder._forward_pre_hooks and not encoder._forward_hooks
    assert bank.model.model.multi_modal_projector is bank.base_projector


def test_an_adapter_that_does_not_fit_the_base_and_other_kinds_are_refused(world, tmp_path):
    from pipeline.serving.bank import AdapterBank

    _, paths, _, _ = world
    from pipeline import defaults

    bank = AdapterBank(defaults.load_base("tiny"))
    # the same config with another base's shapes: rewrite the tensors' file with a mismatched width
    from safetensors.torch import load_file, save_file

    t = load_file(str(paths["a"] / "adapter_model.safetensors"))
    t["text_prompts.0"] = t["text_prompts.0"][:, :-1].contiguous()
    (tmp_path / "narrow").mkdir()
    (tmp_path / "narrow" / "adapter_config.json").write_text((paths["a"] / "adapter_config.json").read_text())
    save_file(t, str(tmp_path / "narrow" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="text_prompts.0"):
        bank.add("narrow", tmp_path / "narrow")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LoRA adapter changes the base's weights"):
        bank.add("lora", tmp_path / "lora")
    with pytest.raises(ValueError, match="cannot take the base's model name"):
        bank.add("base", paths["a"])
    assert sorted(bank.adapters) == ["base"]


def test_request_messages_are_checked_with_clear_errors(tmp_path):
    from pipeline.serving.requests import RequestError, parse_messages

    ok = parse_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}], None)
    assert (ok.system, ok.question, ok.image) == ("Be brief.", "and?", None)
    assert ok.history == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    bad = [
        ([], 400, "non-empty"),
        ([{"role": "assistant", "content": "x"}], 400, "alternate"),
        ([{"role": "user", "content": "look: <image>"}], 400, "placeholder"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], 400,
         "network"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
         400, "base64"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}], 400,
         "--image_root"),
        ([{"role": "user", "content": [{"type": "audio"}]}], 400, "parts"),
    ]
    for messages, status, words in bad:
        with pytest.raises(RequestError, match=words) as e:
            parse_messages(messages, None)
        assert e.value.status == status
    with pytest.raises(RequestError, match="outside --image_root") as e:
        parse_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../x.png"}}]}],
                       tmp_path)
    assert e.value.status == 403


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def _question(it, url=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or _data_url(it["image"])}},
                                         {"type": "text", "text": it["question"]}]}]


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    root, _, items, _ = world
    log = tmp_path_factory.mktemp("log") / "serve.log"
    image_root = os.path.dirname(items[0]["image"])
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--adapters", str(root), "--port", "0",
                             "--image_root", image_root, "--api_key", "sesame", "--max_batch_size", "16"],
                            env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:  # the server goes, also when it failed to start or a test failed
        port = None
        for _ in range(600):
            text = log.read_text()
            if "Application startup complete" in text:
                port = int(text.split("http://127.0.0.1:")[1].split("/")[0])
                break
            assert proc.poll() is None, text[-3000:]
            time.sleep(0.2)
        assert port, log.read_text()[-3000:]
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow
def test_the_server_answers_as_generate_does_over_real_http(world, server):
    import openai
    from openai import OpenAI

    root, paths, items, alone = world
    proc, port, log = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
    listed = {m.id: m.model_extra.get("parent") for m in client.models.list().data}
    assert listed == {"base": None, "a": "base", "b": "base", "c": "base", "d": "base"}

    def ask(name, k, **kw):
        r = client.chat.completions.create(model=name, messages=_question(items[k]), max_tokens=NEW_TOKENS, **kw)
        return r.choices[0].message.content

    for name in listed:  # one question per model, whole and streamed
        assert ask(name, 1) == alone[name][1], name
        chunks = client.chat.completions.create(model=name, messages=_question(items[1]), max_tokens=NEW_TOKENS,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone[name][1], name

    jobs = [(["a", "b", "c", "d"][k % 4], k % len(items)) for k in range(32)]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda j: ask(*j), jobs))
    assert got == [alone[name][k] for name, k in jobs]
    assert "batch of" not in log.read_text()  # no batch failed

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask("nope", 0)
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(model="a", messages=_question(items[0], "data:image/png;base64,aGVsbG8="))
    with pytest.raises(openai.PermissionDeniedError, match="outside --image_root"):
        client.chat.completions.create(model="a", messages=_question(items[0], "/etc/hostname"))
    local = os.path.basename(items[0]["image"])  # a path under --image_root is read
    r = client.chat.completions.create(model="a", messages=_question(items[0], local), max_tokens=NEW_TOKENS)
    assert r.choices[0].message.content == alone["a"][0]
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|takes at most"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "word " * 5000}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()

    # an adapter copied in while the server runs is served; one that does not fit is a 400, the server goes on
    import shutil

    shutil.copytree(paths["b"], root / "late")
    assert ask("late", 1) == alone["b"][1]
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text((paths["a"] / "adapter_config.json").read_text())
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(openai.BadRequestError, match="does not fit the base"):
        ask("broken", 0)
    assert ask("a", 0) == alone["a"][0]

    # SIGTERM while a streamed answer is open: the answer is finished, then the server exits 0
    chunks = iter(client.chat.completions.create(model="c", messages=_question(items[2]), max_tokens=NEW_TOKENS,
                                                 stream=True))
    first = next(chunks)  # the response has started: the request is in flight
    proc.send_signal(signal.SIGTERM)
    text = "".join(c.choices[0].delta.content or "" for c in [first, *chunks])
    assert text == alone["c"][2]
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "stopped after" in log.read_text()
