"""The OpenAI-compatible HTTP app: `GET /v1/models` and `POST /v1/chat/completions` (whole or streamed as server-sent
events, as the OpenAI API streams), over an adapter bank and its batcher.

Adapters are the sub-folders of `--adapters`; the folder is looked at again whenever a request names a model the
server does not know and whenever the models are listed, so an adapter copied there while the server runs is
served from its next request on. An adapter that does not fit the base is reported (400, with the reason) to every
request that names it, and the others keep being served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations from here
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline.evaluation.generate import _load_image
from pipeline.serving.bank import AdapterBank
from pipeline.serving.batcher import Batcher
from pipeline.serving.mixed import Row, encode, max_prompt_tokens
from pipeline.serving.requests import RequestError, parse_messages

log = logging.getLogger("m2pt.serve")


class AdapterFolder:
    """The `--adapters` folder: one adapter per sub-folder, named after it."""

    def __init__(self, bank: AdapterBank, root: Path | None):
        self.bank, self.root = bank, root
        self.failed: dict[str, tuple[float, str]] = {}  # name -> (config mtime, why it was refused)
        self.lock = threading.Lock()  # requests are parsed in worker threads: one scan at a time

    def refresh(self) -> None:
        if self.root is None:
            return
        with self.lock:
            self._scan()

    def _scan(self) -> None:
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            cfg = sub / "adapter_config.json"
            name = sub.name
            if self.bank.get(name) is not None or not cfg.is_file():
                continue
            mtime = cfg.stat().st_mtime
            if name in self.failed and self.failed[name][0] == mtime:
                continue
            try:
                self.bank.add(name, sub)
                self.failed.pop(name, None)
            except (ValueError, FileNotFoundError, OSError) as e:
                log.warning("adapter %s refused: %s", name, e)
                self.failed[name] = (mtime, str(e))

    def adapter(self, name):
        found = self.bank.get(name) if isinstance(name, str) else None
        if found is None:
            self.refresh()
            found = self.bank.get(name) if isinstance(name, str) else None
        if found is None and name in self.failed:
            raise RequestError(400, f"model {name!r} does not fit the base: {self.failed[name][1]}",
                               code="adapter_does_not_fit", param="model")
        if found is None:
            raise RequestError(404, f"The model {name!r} does not exist (GET /v1/models lists them)",
                               code="model_not_found", param="model")
        return found


def _number(body: dict, key: str, default, kind, low, high):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"{key}: a number from {low} to {high}, got {value!r}", param=key)
    return kind(value)


def build_row(folder: AdapterFolder, body: dict, cfg) -> Row:
    """The decoding row of one request body (RequestError for anything wrong in it)."""
    adapter = folder.adapter(body.get("model"))
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n: only 1 answer per request", param="n")
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _number({"max_tokens": max_new}, "max_tokens", cfg.max_new_tokens, int, 1, cfg.max_tokens_limit)
    temperature = _number(body, "temperature", cfg.temperature, float, 0.0, 2.0)
    seed = _number(body, "seed", None, int, 0, 2**63 - 1)
    conv = parse_messages(body.get("messages"), cfg.image_root)
    bank = folder.bank
    ids = encode(bank, adapter, conv.question, conv.history, conv.system)
    limit = max_prompt_tokens(bank, adapter, max_new)
    if len(ids) > limit:
        raise RequestError(400, f"the prompt is {len(ids)} tokens (image included); {adapter.name} takes at most "
                                f"{limit} with max_tokens={max_new}", code="context_length_exceeded",
                           param="messages")
    pixels = _load_image(conv.image, bank.base.image_processor)  # None without an image
    return Row(adapter, ids, pixels, max_new, temperature, seed)


class TextStream:
    """Token ids in, text deltas out: a delta is released once it does not end in a partial character; the answer's
    leading spaces are dropped, as `pipeline.evaluation.generate` strips them."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def final(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True).strip()


def _chunk(rid: str, model: str, created: int, delta: dict, finish=None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


async def _stream(out, text: TextStream, rid: str, model: str, created: int):
    yield _chunk(rid, model, created, {"role": "assistant", "content": ""})
    while True:
        kind, value = await out.get()
        if kind == "token":
            delta = text.add(value)
            if delta:
                yield _chunk(rid, model, created, {"content": delta})
        elif kind == "error":
            yield f"data: {json.dumps(RequestError(500, value, code='generation_failed').body())}\n\n"
            return
        else:
            yield _chunk(rid, model, created, {}, finish=value)
            yield "data: [DONE]\n\n"
            return


async def _whole(out, text: TextStream, row: Row, rid: str, model: str, created: int) -> dict:
    while True:
        kind, value = await out.get()
        if kind == "token":
            text.add(value)
        elif kind == "error":
            raise RequestError(500, value, code="generation_failed")
        else:
            break
    completion = len(text.ids)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.final()},
                         "finish_reason": value}],
            "usage": {"prompt_tokens": len(row.ids), "completion_tokens": completion,
                      "total_tokens": len(row.ids) + completion}}


def create_app(bank: AdapterBank, batcher: Batcher, cfg):
    folder = AdapterFolder(bank, cfg.adapters)
    folder.refresh()
    app = FastAPI(title="M2PT adapters", docs_url=None, redoc_url=None)
    app.state.folder, app.state.batcher = folder, batcher

    @app.exception_handler(RequestError)
    async def refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            e = RequestError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key")
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        await asyncio.to_thread(folder.refresh)
        made = int(time.time())
        data = [{"id": a.name, "object": "model", "created": made, "owned_by": "m2pt",
                 "parent": None if a.cfg is None else bank.base_id, "root": a.source}
                for a in bank.adapters.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        # Off the event loop: reading an image, tokenising and loading a new adapter take a while.
        row = await asyncio.to_thread(build_row, folder, body, cfg)
        out = batcher.submit(row)
        rid, created, text = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), TextStream(bank.base.tokenizer)
        if body.get("stream"):
            return StreamingResponse(_stream(out, text, rid, row.adapter.name, created),
                                     media_type="text/event-stream")
        return await _whole(out, text, row, rid, row.adapter.name, created)

    return app
