"""The OpenAI-compatible HTTP app: `GET /v1/models` and `POST /v1/chat/completions` (whole or streamed as server-sent
events, as the OpenAI API streams), over an adapter bank and its batcher.

Adapters are the sub-folders of `--adapters`, and what is on disk is what is served: a request naming an adapter
looks at its folder first (two `stat` calls), so an adapter copied there while the server runs is served from its
next request on, one whose files were rewritten is loaded again before it answers, and one whose folder is gone is
dropped (404). An adapter that does not fit the base is reported (400, with the reason) to every request that names
it, and the others keep being served; a sub-folder that cannot be served at all is logged once with the reason.

Every answer that is not a completion, whatever went wrong, is an error object in the OpenAI form.
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
from starlette.exceptions import HTTPException

from pipeline.evaluation.generate import _load_image
from pipeline.serving.bank import AdapterBank
from pipeline.serving.batcher import Batcher
from pipeline.serving.mixed import Row, encode, max_prompt_tokens
from pipeline.serving.requests import RequestError, boolean, integer, logit_bias, number, parse_messages

log = logging.getLogger("m2pt.serve")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _signature(folder: Path) -> tuple | None:
    """What changes when an adapter's files are rewritten; None when the folder holds no adapter config."""
    if not (folder / ADAPTER_FILES[0]).is_file():
        return None
    stats = [(folder / f).stat() for f in ADAPTER_FILES if (folder / f).exists()]
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)


class AdapterFolder:
    """The `--adapters` folder, kept as it is on disk: one adapter per sub-folder, named after it, or, when the folder
    is itself an adapter (a training run's OUTPUT/adapter), that one adapter under the folder's name."""

    def __init__(self, bank: AdapterBank, root: Path | None, name: str | None = None):
        self.bank, self.root = bank, root
        # the model name of a single adapter: its folder's, or the repo id a Hub snapshot folder was given as
        self.single_name = name or (root.name if root is not None else None)
        self.loaded: dict[str, tuple] = {}  # name -> the signature of the files it was loaded from
        self.failed: dict[str, tuple[tuple, str]] = {}  # name -> (signature, why it was refused)
        self.noted: dict[str, str] = {}  # name -> why it is not served, as last logged
        self.lock = threading.Lock()  # requests are parsed in worker threads: one look at the folder at a time

    def refresh(self) -> None:
        """Look at every sub-folder (for `/v1/models`)."""
        if self.root is None:
            return
        with self.lock:
            try:
                subs = self._folders()
            except OSError as e:
                self._note("", f"the --adapters folder {self.root} cannot be read ({e}); its adapters are not served")
                subs = {}
            for name in [n for n in self.loaded if n not in subs]:
                self._drop(name, "its folder is gone")
            for name in sorted(subs):
                self._sync(name, subs[name])

    @property
    def single(self) -> bool:
        """The folder is one adapter itself, not a folder of them."""
        return (self.root / ADAPTER_FILES[0]).is_file()

    def _folders(self) -> dict[str, Path]:
        if self.single:
            return {self.single_name: self.root}
        return {p.name: p for p in self.root.iterdir() if p.is_dir()}

    def _folder_of(self, name: str) -> Path | None:
        """Where adapter `name` would be (None: nowhere it could be)."""
        if self.single:
            return self.root if name == self.single_name else None
        return self.root / name if _plain_name(name) else None

    def describe(self) -> None:
        """Log once at start-up what is served from the folder under which name, and warn when nothing is."""
        if self.root is None:
            return
        for name in sorted(self.loaded):
            log.info("model %s: the adapter in %s", name, self._folder_of(name))
        if not self.loaded and not self.failed:
            log.warning("--adapters %s holds no M2PT adapter (%s in it or in a sub-folder of it): only the base is "
                        "served until one is added", self.root, ADAPTER_FILES[0])

    def _note(self, name: str, why: str) -> None:
        if self.noted.get(name) != why:
            log.warning("%s", why if not name else f"adapter folder {name!r} is not served: {why}")
            self.noted[name] = why

    def _drop(self, name: str, why: str) -> None:
        self.bank.remove(name)
        self.loaded.pop(name, None)
        log.warning("adapter %s is no longer served: %s", name, why)

    def _sync(self, name: str, folder: Path) -> None:
        """Make the bank hold what `folder` holds now: load it, load it again, or drop it."""
        if name == self.bank.base_id:
            self._note(name, f"it takes the base's model name {name!r} (rename the folder or give --base_id)")
            return
        try:
            sig = _signature(folder)
        except OSError as e:
            sig, why = None, f"its files cannot be read ({e})"
        else:
            why = f"no {ADAPTER_FILES[0]} in it"
        if sig is None:
            if name in self.loaded:
                self._drop(name, why)
            self._note(name, why)
            return
        if self.loaded.get(name) == sig or self.failed.get(name, (None,))[0] == sig:
            return
        try:
            self.bank.add(name, folder)
        except (ValueError, FileNotFoundError, OSError) as e:
            log.warning("adapter %s refused: %s", name, e)
            self.failed[name] = (sig, str(e))
            if name in self.loaded:
                self._drop(name, "its files changed into ones that cannot be served")
            return
        if name in self.loaded:
            log.info("adapter %s loaded again: its files changed", name)
        self.loaded[name] = sig
        self.failed.pop(name, None)
        self.noted.pop(name, None)

    def adapter(self, name):
        """The adapter a request names, as its folder holds it now; RequestError when there is none."""
        if not isinstance(name, str):
            raise RequestError(400, f"model: a string (GET /v1/models lists them), got {name!r}", param="model")
        folder = self._folder_of(name) if name != self.bank.base_id and self.root is not None else None
        if folder is not None:
            with self.lock:
                if folder.is_dir():
                    self._sync(name, folder)
                else:  # gone: a 404 now, whether it was served or refused
                    self.failed.pop(name, None)
                    if name in self.loaded:
                        self._drop(name, "its folder is gone")
        found = self.bank.get(name)
        if found is None and name in self.failed:
            raise RequestError(400, f"model {name!r} does not fit the base: {self.failed[name][1]}",
                               code="adapter_does_not_fit", param="model")
        if found is None:
            raise RequestError(404, f"The model {name!r} does not exist (GET /v1/models lists them)",
                               code="model_not_found", param="model")
        return found


def _plain_name(name: str) -> bool:
    """A name that can only be a direct sub-folder of --adapters (no path, no `..`)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def build_row(folder: AdapterFolder, body: dict, cfg) -> Row:
    """The decoding row of one request body (RequestError for anything wrong in it), every value checked before the
    row can join a batch."""
    adapter = folder.adapter(body.get("model"))
    if integer(body, "n", 1, 1, 1) != 1:
        raise RequestError(400, "n: only 1 answer per request", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = integer(body, key, cfg.max_new_tokens, 1, cfg.max_tokens_limit)
    temperature = number(body, "temperature", cfg.temperature, 0.0, 2.0)
    seed = integer(body, "seed", None, 0, 2**63 - 1)
    boolean(body, "stream", False)
    bias = logit_bias(body, folder.bank.model.config.text_config.vocab_size)
    conv = parse_messages(body.get("messages"), cfg.image_root, cfg.max_image_pixels)
    bank = folder.bank
    ids = encode(bank, adapter, conv.question, conv.history, conv.system)
    limit = max_prompt_tokens(bank, adapter, max_new)
    if len(ids) > limit:
        raise RequestError(400, f"the prompt is {len(ids)} tokens (image included); {adapter.name} takes at most "
                                f"{limit} with max_tokens={max_new}", code="context_length_exceeded",
                           param="messages")
    pixels = _load_image(conv.image, bank.base.image_processor)  # None without an image
    return Row(adapter, ids, pixels, max_new, temperature, seed, logit_bias=bias)


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refused (413) as soon as it is known to be over `limit` bytes: from its
    Content-Length before a byte of it is read, else while it streams in."""
    size = request.headers.get("content-length", "")
    too_big = RequestError(413, f"the request body is over {limit:,} bytes (--max_request_mb)",
                           code="request_too_large")
    if size.isdigit() and int(size) > limit:
        raise too_big
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:  # UnicodeDecodeError included
        raise RequestError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


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


async def _stream(out, text: TextStream, row: Row, rid: str, model: str, created: int):
    try:
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
    finally:  # also when the client went: Starlette cancels the stream, and the row leaves its batch
        row.cancelled = True


async def _watch(request: Request, row: Row) -> None:
    """Cancel `row` once its client has gone (a whole answer's client is only heard from when it is sent)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    row.cancelled = True


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


class ApiKey:
    """Every request needs `Authorization: Bearer KEY`. A plain ASGI middleware, not `@app.middleware`: Starlette's
    BaseHTTPMiddleware can swallow the disconnect of a client that goes right after its stream starts, and then the
    row would generate on for nobody."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            e = RequestError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key")
            await JSONResponse(e.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def adapters_root(given) -> tuple[Path | None, str | None]:
    """(folder, model name) of --adapters: a folder as it is; a Hub repo id (core/hub.py) as its snapshot in the
    Hugging Face cache, served under the repo id. A UsageError when it is neither."""
    from pipeline.core.hub import is_repo_id, resolve
    from pipeline.errors import UsageError

    if given is None or Path(given).is_dir():
        return given and Path(given), None
    if not is_repo_id(str(given)):
        raise UsageError(f"--adapters {given}: no such folder")
    try:
        return resolve(given), str(given)
    except FileNotFoundError as e:
        raise UsageError(f"--adapters {e}") from None


def create_app(bank: AdapterBank, batcher: Batcher, cfg, adapters: tuple[Path | None, str | None] = (None, None)):
    """The server. `adapters`: --adapters as `adapters_root` resolved it (once: a repo id is a Hub lookup)."""
    folder = AdapterFolder(bank, *adapters)
    folder.refresh()
    folder.describe()
    app = FastAPI(title="M2PT adapters", docs_url=None, redoc_url=None)
    app.state.folder, app.state.batcher = folder, batcher
    limit = int(cfg.max_request_mb * 2**20)

    @app.exception_handler(RequestError)
    async def refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown paths and methods
    async def http_error(request, e: HTTPException):
        return JSONResponse(RequestError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                         else "invalid_request").body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("request failed")
        return JSONResponse(RequestError(500, f"the server failed on this request ({type(e).__name__}: {e}); "
                                              "its log has the details", code="internal_error").body(),
                            status_code=500)

    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)

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
        body = await read_json(request, limit)
        # Off the event loop: reading an image, tokenising and loading a new adapter take a while.
        row = await asyncio.to_thread(build_row, folder, body, cfg)
        out = batcher.submit(row)
        rid, created, text = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), TextStream(bank.base.tokenizer)
        if body.get("stream"):
            return StreamingResponse(_stream(out, text, row, rid, row.adapter.name, created),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_watch(request, row))
        try:
            return await _whole(out, text, row, rid, row.adapter.name, created)
        finally:
            watcher.cancel()

    return app
