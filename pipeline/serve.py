"""Serve the base and many M²PT adapters behind one OpenAI-compatible endpoint, rows of different adapters batched
together.

    python -m pipeline.serve --model /models/llava-1.5-7b-hf --adapters runs/adapters --image_root /data/images
    python -m pipeline.serve --adapters out/default/adapter     # the main job's adapter on the demo base,
                                                                # as model "adapter", on 127.0.0.1:8000

Every sub-folder of --adapters holding an M²PT adapter is a model, named after the folder (`/v1/models` lists
them with the base as their parent); a folder added while the server runs is served from the next request that
names it. --adapters may also be one adapter folder itself (a run's OUTPUT/adapter): it is served under its folder's
name. The log says which model comes from which folder, and warns when --adapters holds no adapter. Then, with the
official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="my-adapter", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What colour is the bigger object?"}]}])

Requests that arrive within --batch_window_ms of each other are decoded in one batch (up to --max_batch_size),
whatever adapters they name, and requests arriving while it decodes join it between two steps (continuous batching;
each row is answered when it ends): each adapter's textual prompts are a key/value prefix computed once when it
loads, its visual prompts and projector encode its rows' images (pipeline/serving/). Greedy answers (temperature 0, the
default here) are those `pipeline.evaluate` generates. A request's values, image size (--max_image_pixels) and
body size (--max_request_mb) are checked before it joins a batch; a client that goes takes its row out of the batch.
SIGTERM (or Ctrl-C) stops accepting requests, finishes the ones in flight and exits 0. LoRA adapters and fully
fine-tuned models are not batched this way: serve a merged model with --model.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.source import ModelSource, Runtime, resolve_device, resolve_dtype

log = logging.getLogger("m2pt.serve")


@dataclass
class ServeConfig(Runtime, ModelSource):
    """The base, the adapters, and how requests are batched and answered (every field is a flag)."""

    adapters: Path | None = field(default=None, metadata={"type": Path, "help": (
        "folder of M2PT adapters, one sub-folder each (the model name is the sub-folder's name), or one adapter "
        "folder (served under its own name, e.g. out/default/adapter as 'adapter'), or a Hub repo id (user/name, "
        "served under that name; read through the Hugging Face cache); looked at again when a request names an "
        "unknown model")})
    base_id: str = field(default="base", metadata={"help": "the model name of the base without an adapter"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0: any free port; the log says which)"})
    api_key: str | None = field(default=None, metadata={"help": (
        "if set, every request needs 'Authorization: Bearer KEY' (default: the M2PT_API_KEY environment variable, "
        "else none)")})
    image_root: Path | None = field(default=None, metadata={"type": Path, "help": (
        "local image paths in requests are served from under this folder only (default: data: URLs only)")})
    batch_window_ms: float = field(default=20.0, metadata={"help": (
        "how long the first request of a batch waits for others to join it")})
    max_batch_size: int = field(default=16, metadata={"help": "rows decoded together at most"})
    mix_adapters: bool = field(default=True, metadata={
        "help": "Decode the requests of different adapters in one batch.",
        "no_help": "Keep each batch to one adapter's requests (what serving without mixing does; for comparison)."})
    continuous_batching: bool = field(default=True, metadata={
        "help": "Let requests join a running batch between its decode steps, and answer each row when it ends.",
        "no_help": "Keep each batch to the rows it started with, until its last row ends; requests arriving "
                   "meanwhile wait for the next batch (a joiner's whole prefill runs between two decode steps: on a "
                   "CPU at real widths, under steady load with long answers, static batches keep the tail lower; "
                   "docs/serving.md)."})
    max_new_tokens: int = field(default=256, metadata={"help": "answer length when a request gives no max_tokens"})
    max_tokens_limit: int = field(default=1024, metadata={"help": "the largest max_tokens a request may ask for"})
    max_request_mb: float = field(default=32.0, metadata={"help": (
        "the largest request body in MiB (an image travels base64-encoded, a third larger than its file); a larger "
        "one is refused (413) before it is read")})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": (
        "the largest image a request may send, in pixels (width x height, read from the file's header before it is "
        "decoded; the model sees it resized to the vision tower's input anyway)")})
    temperature: float = field(default=0.0, metadata={"help": (
        "when a request gives none (0: greedy, the answers `pipeline.evaluate` gives; the OpenAI API's default is 1)")})
    log_level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error"), "help": (
        "server log level")})


def parse_args(argv=None):
    from pipeline.cli import config_parser

    return config_parser(ServeConfig, __doc__).parse_args(argv)


def check(cfg: ServeConfig) -> tuple[Path | None, str | None]:
    """Mistakes found before the model loads: a UsageError each. Returns --adapters resolved (`adapters_root`)."""
    from pipeline.errors import UsageError
    from pipeline.serving.app import adapters_root

    adapters = adapters_root(cfg.adapters)  # a missing folder, or a repo id not in the Hugging Face cache offline
    if cfg.image_root is not None and not cfg.image_root.is_dir():
        raise UsageError(f"--image_root {cfg.image_root}: no such folder")
    if cfg.max_batch_size < 1 or cfg.batch_window_ms < 0 or cfg.max_new_tokens < 1:
        raise UsageError("--max_batch_size and --max_new_tokens must be >= 1, --batch_window_ms >= 0")
    if cfg.max_request_mb <= 0 or cfg.max_image_pixels < 1:
        raise UsageError("--max_request_mb must be > 0 and --max_image_pixels >= 1")
    if cfg.max_new_tokens > cfg.max_tokens_limit:
        raise UsageError(f"--max_new_tokens {cfg.max_new_tokens} is over --max_tokens_limit {cfg.max_tokens_limit}")
    return adapters


def load_bank(cfg: ServeConfig):
    import torch

    from pipeline.serving.bank import AdapterBank

    device = resolve_device(cfg.device)
    base = cfg.load_base(dtype=getattr(torch, resolve_dtype(cfg.dtype, device)))
    return AdapterBank(base, device, cfg.base_id)


def serve(cfg: ServeConfig, adapters: tuple[Path | None, str | None]) -> int:
    import os

    import uvicorn

    from pipeline.serving.app import create_app
    from pipeline.serving.batcher import Batcher

    cfg.api_key = cfg.api_key or os.environ.get("M2PT_API_KEY") or None
    bank = load_bank(cfg)
    batcher = Batcher(bank, cfg.batch_window_ms, cfg.max_batch_size, cfg.mix_adapters, cfg.continuous_batching)
    app = create_app(bank, batcher, cfg, adapters)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    host, port = sock.getsockname()[:2]
    # Printed whatever the log level: with --port 0 it is the only place the port is told.
    print(f"serving {cfg.model} on http://{host}:{port}/v1 ({len(bank.adapters)} model(s): "
          f"{', '.join(bank.adapters)})", file=sys.stderr, flush=True)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal under the handler that was
    # there before it started; a no-op one makes a drained shutdown exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_keep_alive=5))
    server.run(sockets=[sock])
    batcher.stop()
    log.info("stopped after %d batch(es)", batcher.batches)
    return 0


def main(argv=None) -> int:
    from pipeline.errors import UsageError

    args = parse_args(argv)
    cfg = ServeConfig(**vars(args))
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(cfg, check(cfg))
    except (UsageError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
