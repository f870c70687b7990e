"""Many M²PT adapters in one batch, and the OpenAI-compatible server over them.

Every answer is compared with the one `pipeline.evaluation.generate` gives with the adapter attached alone (greedy,
fp32). The adapters differ in everything a row can differ in: prompt lengths, visual token mode (so the number of
visual tokens), projector weights and LM head."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ENV, prompts_that_matter

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

    m = prompts_that_matter(attach_m2pt(build_tiny().model, cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
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
    from pipeline.evaluation.generate import generate
    from pipeline.evaluation.runner import EvalConfig, plan_runs

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
    yield from _running_server(log, "--adapters", str(root), "--image_root", image_root, "--api_key", "sesame",
                               "--max_batch_size", "16")


def _running_server(log, *flags):
    """(process, port, log) of `python -m pipeline.serve FLAGS` on a free port, once it has started; the server
    goes afterwards, also when it failed to start or a test failed."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--port", "0", *flags], env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
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


# ------------------------------------------------------------------ hostile and careless requests (issue 33)
def _collect(batcher, rows):
    """Each row's (tokens, how it ended) through the batcher, all submitted at once."""
    import asyncio

    async def run():
        outs = [batcher.submit(r) for r in rows]
        got = []
        for out in outs:
            tokens = []
            while True:
                kind, value = await out.get()
                if kind == "token":
                    tokens.append(value)
                else:
                    got.append((tokens, kind, value))
                    break
        return got

    return asyncio.run(run())


def test_a_row_that_breaks_its_batch_fails_alone_and_the_others_are_answered(world, caplog):
    import torch

    from pipeline.evaluation.generate import _load_image
    from pipeline.serving import mixed
    from pipeline.serving.batcher import Batcher

    _, paths, items, alone = world
    bank = _bank(paths)

    def row(name, k, pixels=None, **kw):
        adapter = bank.get(name)
        px = _load_image(items[k]["image"], bank.base.image_processor) if pixels is None else pixels
        return mixed.Row(adapter, mixed.encode(bank, adapter, "<image>\n" + items[k]["question"]), px, NEW_TOKENS,
                         **kw)

    poisoned = row("b", 0, pixels=torch.zeros(3, 5, 5))  # an image the vision tower cannot take fails the batch
    rows = [row("a", 0), poisoned, row("c", 1), row("base", 2), row("a", 1, temperature=1e-300)]
    batcher = Batcher(bank, window_ms=500, max_batch_size=16)
    try:
        got = _collect(batcher, rows)
    finally:
        batcher.stop()
    assert batcher.sizes[0] == 5, batcher.sizes  # they did share a batch
    tok = bank.base.tokenizer
    text = [tok.decode(t, skip_special_tokens=True).strip() for t, _, _ in got]
    assert [g[1] for g in got] == ["end", "error", "end", "end", "end"]
    assert (text[0], text[2], text[3]) == (alone["a"][0], alone["c"][1], alone["base"][2])
    assert text[4] == alone["a"][1]  # a temperature of 1e-300 samples what greedy picks, no nan
    assert "decoding its rows one by one" in caplog.text


def test_a_row_whose_client_went_leaves_its_batch(world):
    from pipeline.serving import mixed

    _, paths, _, _ = world
    bank = _bank(paths)
    a = bank.get("a")
    eos = {bank.base.tokenizer.eos_token_id: -100.0}  # no row ends by itself
    rows = [mixed.Row(a, mixed.encode(bank, a, "hello"), None, 40, logit_bias=eos) for _ in range(3)]
    seen = {0: 0, 1: 0, 2: 0}
    for step in mixed.decode(bank, rows):
        for i, t in enumerate(step):
            seen[i] += t is not None
        if seen[1] == 3:
            rows[1].cancelled = True
    assert seen == {0: 40, 1: 3, 2: 40}  # no token after the step it left at; the others went on


@pytest.fixture
def strict_server(world, tmp_path):
    """A server over a copy of the adapters that the test may change, with a 1 MiB body limit."""
    import shutil

    root, paths, items, _ = world
    adapters = tmp_path / "adapters"
    for name in ("a", "b"):
        shutil.copytree(paths[name], adapters / name)
    shutil.copytree(paths["a"], adapters / "base")  # takes the base's name: not served, logged once
    (adapters / "notes").mkdir()  # no adapter in it: logged once
    for proc, port, log in _running_server(tmp_path / "serve.log", "--adapters", str(adapters), "--max_request_mb",
                                           "1"):
        yield proc, port, log, adapters


def _post(port, body, headers=None, raw=None):
    """(status, parsed JSON answer) of one POST to /v1/chat/completions."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json",
                                                                       **(headers or {})})
    r = conn.getresponse()
    status, text = r.status, r.read()
    conn.close()
    return status, json.loads(text)


def _rss_mb(pid) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _bomb_url(side: int) -> str:
    """A PNG of side x side black pixels: a few hundred KB on disk, side² pixels decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_hostile_requests_are_refused_alone_in_the_openai_error_form(world, strict_server):
    proc, port, log, _ = strict_server
    _, _, items, alone = world
    ask = {"model": "a", "messages": _question(items[0]), "max_tokens": NEW_TOKENS}
    image = _question(items[0])[0]["content"][0]
    cases = [  # (changes to a good request, status, words in the message)
        ({"max_tokens": 1.7}, 400, "max_tokens: an integer"),
        ({"n": True}, 400, "n: an integer"),
        ({"stream": "no"}, 400, "stream: true or false"),
        ({"model": ["a"]}, 400, "model: a string"),
        ({"temperature": float("nan")}, 400, "temperature: a number"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}, 400,
         "parts are"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image]},
                       {"role": "user", "content": "and?"}]}, 400, "image in an assistant turn"),
        ({"messages": [{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}]}, 400,
         "image in the system message"),
        ({"model": "../a"}, 404, "does not exist"),
        ({"logit_bias": {"x": 1}}, 400, "not a token id"),
        ({"logit_bias": {"2": 101}}, 400, "from -100 to 100"),
    ]
    for change, status, words in cases:
        got, answer = _post(port, {**ask, **change})
        assert got == status and words in answer["error"]["message"], (change, got, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    got, answer = _post(port, None, raw=b'{"model": "a", "messages": [')
    assert got == 400 and answer["error"]["message"] == "the request body is not JSON"

    # a 50 MB body is refused from its Content-Length, before it is sent
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(50 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over 1,048,576 bytes" in json.loads(r.read())["error"]["message"]
    conn.close()
    # ... and a body without a length is cut off once it has passed the limit
    got, answer = _post(port, None, raw=b" " * (2 * 2**20))
    assert got == 413, answer

    # a decompression bomb: a 400 read from the header, the server's memory about where it was
    before = _rss_mb(proc.pid)
    bomb = _bomb_url(10_000)
    assert len(bomb) < 2**20
    got, answer = _post(port, {**ask, "messages": _question(items[0], bomb)})
    assert got == 400 and answer["error"]["code"] == "image_too_large", answer
    assert "10000 x 10000" in answer["error"]["message"]
    assert _rss_mb(proc.pid) - before < 200

    # an unknown path is an OpenAI error too
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/nothing")
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["code"] == "not_found"
    conn.close()

    # a tiny temperature batched with others: every one answered
    jobs = [{**ask, "temperature": 1e-300}, *[{**ask, "model": m} for m in ("a", "b", "base")]]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: _post(port, b), jobs))
    assert [g[0] for g in got] == [200] * 4, got
    assert [g[1]["choices"][0]["message"]["content"] for g in got] == [alone[m][0] for m in ("a", "a", "b", "base")]
    assert "failed" not in log.read_text()


@pytest.mark.slow
def test_adapters_on_disk_are_the_adapters_served(world, strict_server):
    import shutil

    from openai import NotFoundError, OpenAI

    proc, port, log, adapters = strict_server
    _, paths, items, alone = world
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def ask(name):
        r = client.chat.completions.create(model=name, messages=_question(items[1]), max_tokens=NEW_TOKENS)
        return r.choices[0].message.content

    assert {m.id for m in client.models.list().data} == {"base", "a", "b"}
    assert ask("a") == alone["a"][1]
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # a rewritten in place: c's weights now
        (adapters / "a" / f).write_bytes((paths["c"] / f).read_bytes())
    assert ask("a") == alone["c"][1]
    shutil.rmtree(adapters / "b")
    with pytest.raises(NotFoundError):
        ask("b")
    assert {m.id for m in client.models.list().data} == {"base", "a"}
    text = log.read_text()
    assert "adapter a loaded again: its files changed" in text
    assert "adapter b is no longer served: its folder is gone" in text
    assert text.count("adapter folder 'base' is not served: it takes the base's model name") == 1
    assert text.count("adapter folder 'notes' is not served: no adapter_config.json") == 1


@pytest.mark.slow
def test_a_client_that_drops_its_stream_frees_the_batch(world, strict_server):
    proc, port, log, _ = strict_server
    _, _, items, alone = world
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "a", "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 900,
        "logit_bias": {"2": -100}, "stream": True}), headers={"Content-Type": "application/json"})  # 2: EOS
    r = conn.getresponse()
    assert r.status == 200
    events = 0
    while events < 4:  # the role, then three pieces of the answer: its row is decoding
        events += r.fp.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    start = time.monotonic()
    got, answer = _post(port, {"model": "b", "messages": _question(items[0]), "max_tokens": NEW_TOKENS})
    assert got == 200 and answer["choices"][0]["message"]["content"] == alone["b"][0]
    assert time.monotonic() - start < 5
    for _ in range(50):
        if "a client went after" in log.read_text():
            break
        time.sleep(0.1)
    went = log.read_text().split("a client went after ")[1]
    assert int(went.split()[0]) < 900, went[:80]

    # a client waiting for a whole answer that goes is heard of too
    import socket

    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
                       "logit_bias": {"2": -100}}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)
    for _ in range(50):
        if log.read_text().count("a client went after ") == 2:
            break
        time.sleep(0.1)
    went = log.read_text().split("a client went after ")[2]
    assert int(went.split()[0]) < 900, went[:80]


def test_adapters_may_name_one_adapter_folder_and_an_empty_folder_is_told(world, tmp_path, caplog):
    """The first hour (issue 35): `--adapters out/default/adapter` (the main job's adapter itself) used to serve only
    the base, silently; a folder with nothing servable was not mentioned either."""
    import logging

    from pipeline import defaults
    from pipeline.serving.app import AdapterFolder
    from pipeline.serving.bank import AdapterBank
    from pipeline.serving.requests import RequestError

    _, paths, _, _ = world
    one = tmp_path / "adapter"
    shutil.copytree(paths["a"], one)
    bank = AdapterBank(defaults.load_base("tiny"))
    with caplog.at_level(logging.INFO, logger="m2pt.serve"):
        folder = AdapterFolder(bank, one)
        folder.refresh()
        folder.describe()
    assert sorted(bank.adapters) == ["adapter", "base"]
    assert f"model adapter: the adapter in {one}" in caplog.text
    assert folder.adapter("adapter").source == str(one)
    with pytest.raises(RequestError) as e:
        folder.adapter("a")  # no sub-folders are looked for inside one adapter
    assert e.value.status == 404
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m2pt.serve"):
        folder = AdapterFolder(AdapterBank(defaults.load_base("tiny")), empty)
        folder.refresh()
        folder.describe()
    assert f"--adapters {empty} holds no M2PT adapter" in caplog.text


def _lmms_eval_payload(model, question, image_path, max_new_tokens):
    """A request as lmms-eval's `openai_compatible` model builds it (lmms_eval/models/simple/openai_compatible.py):
    the image opened, converted to RGB and re-encoded as PNG into a data: URL placed after the text, max_tokens from
    the task's generation_kwargs (1024 when it gives none), temperature 0."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(image_path).convert("RGB").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode("utf-8")
    return {"model": model, "max_tokens": max_new_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}]}


@pytest.mark.slow
def test_requests_shaped_as_the_evaluation_kits_send_them_get_evaluates_answers(world, tmp_path):
    """The bridge to lmms-eval and VLMEvalKit (docs/evaluation_kits.md): lmms-eval's requests, sent concurrently with
    AsyncOpenAI as it sends them, get the answers `pipeline.evaluate` generates; VLMEvalKit's (a JPEG data URL with
    `detail`, n=1, its own POST) are answered, and its default max_tokens 2048 is refused with the flag to raise."""

    root, _, items, alone = world
    server = _running_server(tmp_path / "serve.log", "--adapters", str(root), "--api_key", "sesame")
    proc, port, log = next(server)
    try:
        _ask_as_the_kits_do(port, items, alone)
    finally:
        server.close()


def _ask_as_the_kits_do(port, items, alone):
    import asyncio

    import requests
    from openai import AsyncOpenAI

    async def ask_all():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
        jobs = [client.chat.completions.create(**_lmms_eval_payload(name, it["question"], it["image"], NEW_TOKENS))
                for name in ("base", "a", "b") for it in items]
        return [r.choices[0].message.content for r in await asyncio.gather(*jobs)]

    answers = asyncio.run(ask_all())
    assert answers == alone["base"] + alone["a"] + alone["b"]
    assert len(set(answers)) > 3  # the adapters answer differently: a test that cannot pass by accident

    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(items[0]["image"]).convert("RGB").save(buf, format="JPEG")
    content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
        buf.getvalue()).decode(), "detail": "low"}}, {"type": "text", "text": items[0]["question"]}]
    for max_tokens, status in ((NEW_TOKENS, 200), (2048, 400)):
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                          headers={"Content-Type": "application/json", "Authorization": "Bearer sesame"},
                          data=json.dumps({"model": "a", "messages": [{"role": "user", "content": content}], "n": 1,
                                           "temperature": 0, "max_tokens": max_tokens}))
        assert r.status_code == status, r.text
        if status == 200:
            assert r.json()["choices"][0]["message"]["content"]
    assert r.json()["error"]["param"] == "max_tokens" and "1024" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------ continuous batching (issue 34)
def _in_waves(batcher, waves, every=3):
    """Submit `waves` of rows: the first at once, each next one when row 0 has received `every` more tokens. Returns
    {row number: (tokens, how it ended, tokens row 0 had received by then)}."""
    import asyncio

    async def run():
        counts, ended, tasks = {}, {}, []
        progress = asyncio.Condition()

        async def read(k, out):
            tokens = []
            while True:
                kind, value = await out.get()
                if kind != "token":
                    ended[k] = (tokens, kind, counts.get(0, 0))
                    return
                tokens.append(value)
                counts[k] = len(tokens)
                async with progress:
                    progress.notify_all()

        for w, rows in enumerate(waves):
            async with progress:
                await progress.wait_for(lambda need=w * every: counts.get(0, 0) >= need)
            for r in rows:
                tasks.append(asyncio.create_task(read(len(tasks), batcher.submit(r))))
        await asyncio.gather(*tasks)
        return ended

    return asyncio.run(run())


def _image_row(bank, items, name, k, max_new=NEW_TOKENS, **kw):
    from pipeline.evaluation.generate import _load_image
    from pipeline.serving import mixed

    adapter = bank.get(name)
    return mixed.Row(adapter, mixed.encode(bank, adapter, "<image>\n" + items[k]["question"]),
                     _load_image(items[k]["image"], bank.base.image_processor), max_new, **kw)


def test_rows_that_join_a_running_batch_get_the_answer_of_their_adapter_alone(world):
    """Continuous batching: rows of every adapter join a running batch in three waves while others leave it, and
    each streamed answer (and its whole text) is the one its adapter gives alone."""
    from pipeline.serving import mixed
    from pipeline.serving.batcher import Batcher

    _, paths, items, alone = world
    bank = _bank(paths)
    eos = {bank.base.tokenizer.eos_token_id: -100.0}
    anchor = _image_row(bank, items, "c", 0, max_new=40, logit_bias=eos)  # long enough for every wave to join
    anchor_alone = mixed.answers(bank, [_image_row(bank, items, "c", 0, max_new=40, logit_bias=eos)])[0]
    names = ["base", *ADAPTERS]
    asked = [(names[k % len(names)], k % len(items)) for k in range(12)]
    waves = [[anchor] + [_image_row(bank, items, n, k) for n, k in asked[:3]],
             [_image_row(bank, items, n, k) for n, k in asked[3:7]],
             [_image_row(bank, items, n, k) for n, k in asked[7:]]]
    batcher = Batcher(bank, window_ms=0, max_batch_size=16)
    try:
        got = _in_waves(batcher, waves)
    finally:
        batcher.stop()
    assert batcher.batches == 1 and batcher.sizes == [13]  # every wave joined the one running batch
    tok = bank.base.tokenizer
    text = {k: tok.decode(t, skip_special_tokens=True).strip() for k, (t, _, _) in got.items()}
    assert text[0] == anchor_alone and len(got[0][0]) == 40
    assert [text[k + 1] for k in range(12)] == [alone[n][k] for n, k in asked]
    assert {got[k][2] for k in range(5, 13)} != {0}  # the later waves were asked while the anchor decoded
    assert all(kind == "end" for _, kind, _ in got.values())


@pytest.mark.parametrize("continuous", [True, False])
def test_a_short_request_sent_during_a_long_batch_ends_before_it(world, continuous):
    """A 2-token request sent while a 200-token one decodes is answered after about its own 2 steps; without
    continuous batching it waits for the whole long answer (which shows the test can tell them apart)."""
    from pipeline.serving.batcher import Batcher

    _, paths, items, alone = world
    bank = _bank(paths)
    eos = {bank.base.tokenizer.eos_token_id: -100.0}
    long = _image_row(bank, items, "a", 0, max_new=200, logit_bias=eos)
    short = _image_row(bank, items, "b", 1, max_new=2)
    batcher = Batcher(bank, window_ms=0, max_batch_size=16, continuous=continuous)
    try:
        got = _in_waves(batcher, [[long], [short]], every=5)
    finally:
        batcher.stop()
    long_tokens_when_short_ended = got[1][2]
    assert len(got[0][0]) == 200 and len(got[1][0]) == 2
    if continuous:
        assert 5 <= long_tokens_when_short_ended <= 5 + 4, got[1][2]  # joined at the next step, 2 steps to go
        assert batcher.batches == 1
    else:
        assert long_tokens_when_short_ended == 200 and batcher.batches == 2


def test_an_adapter_loads_while_a_continuous_batch_runs(world, tmp_path):
    """A continuous batch can run for as long as requests come: the bank's lock is taken per decode step, so an
    adapter being loaded gets in between two steps instead of waiting for the batch to end."""
    import asyncio
    import threading

    from pipeline.serving import mixed
    from pipeline.serving.batcher import Batcher

    _, paths, _, _ = world
    bank = _bank({"a": paths["a"]})
    a = bank.get("a")
    long = mixed.Row(a, mixed.encode(bank, a, "hello"), None, 400,
                     logit_bias={bank.base.tokenizer.eos_token_id: -100.0})
    batcher = Batcher(bank, window_ms=0, max_batch_size=16)
    loaded_at: list[int] = []

    seen = {"tokens": 0}  # read by the loader when it is done: how far the batch had got by then

    async def run():
        out, loader = batcher.submit(long), None
        while (await out.get())[0] == "token":
            seen["tokens"] += 1
            if seen["tokens"] == 5:
                loader = threading.Thread(target=lambda: (bank.add("b", paths["b"]), loaded_at.append(seen["tokens"])))
                loader.start()
        loader.join()
        return seen["tokens"]

    try:
        assert asyncio.run(run()) == 400
    finally:
        batcher.stop()
    assert loaded_at and loaded_at[0] < 400, loaded_at  # loaded while the batch still decoded
