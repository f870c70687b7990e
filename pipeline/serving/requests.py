"""An OpenAI chat-completions request turned into a decoding row, with a clear 4xx for every mistake in it.

Messages: an optional system message first (it replaces the training template's system line), then user and
assistant turns alternating, ending with a user turn. A user message's content is a string or a list of parts:
`{"type": "text", "text": ...}` and at most one image in the whole conversation, in a user turn (the template has no
place for one anywhere else), `{"type": "image_url", "image_url": {"url": ...}}`, where the url is a
`data:image/...;base64,` URL or, under `--image_root` only, a local path (`file://` or plain). The image goes where
LLaVA puts it: at the start of its turn. Its size is read from the file's header and checked against the server's
pixel limit before it is decoded (a 316 KB PNG can hold a 10000 × 10000 image).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.chat import IMAGE, SYSTEM


class RequestError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and code, and the message the client sees."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def number(body: dict, key: str, default, low: float, high: float) -> float:
    """`body[key]` as a float in [low, high] (JSON numbers only: `true` is not 1), or `default` when absent."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"{key}: a number from {low} to {high}, got {value!r}", param=key)
    return float(value)


def integer(body: dict, key: str, default, low: int, high: int) -> int:
    """`body[key]` as an int in [low, high] (`1.7` and `true` are not integers), or `default` when absent."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"{key}: an integer from {low} to {high}, got {value!r}", param=key)
    return value


def boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{key}: true or false, got {value!r}", param=key)
    return value


def logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: {"token id": bias from -100 to 100} (-100 bans a token, 100 forces it)."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 300:
        raise RequestError(400, "logit_bias: an object of at most 300 token ids to biases", param="logit_bias")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise RequestError(400, f"logit_bias: {key!r} is not a token id below {vocab_size}", param="logit_bias")
        if not isinstance(bias, int | float) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise RequestError(400, f"logit_bias[{key!r}]: a number from -100 to 100, got {bias!r}",
                               param="logit_bias")
        out[int(key)] = float(bias)
    return out


@dataclass
class Conversation:
    system: str
    history: list[dict]  # earlier turns, {"from": "human"|"gpt", "value": ...}
    question: str  # the last user turn's text, with <image> in front if the image is there
    image: object | None  # a PIL image


def _parts(content, k: int) -> tuple[str, list[str]]:
    """(text, image urls) of one message's content."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, f"messages[{k}].content: a string or a list of parts", param="messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(_url(part), str):
            urls.append(_url(part))
        else:
            raise RequestError(400, f"messages[{k}].content: parts are {{'type': 'text'}} or {{'type': "
                                    "'image_url'}}", param="messages")
    return "\n".join(texts), urls


def _url(part: dict):
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def _turns(messages) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """(system text, [(role, text, image urls)]) with the roles checked."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: a non-empty list", param="messages")
    system = SYSTEM
    if isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        system, urls = _parts(messages[0].get("content", ""), 0)
        if urls:
            raise RequestError(400, "messages[0]: an image in the system message; images go in a user turn",
                               param="messages")
        messages = messages[1:]
    turns = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise RequestError(400, f"messages: after the optional system message, user and assistant turns "
                                    f"alternate and the last is the user's (message {k} is {role!r}, expected "
                                    f"{want!r})", param="messages")
        text, urls = _parts(m.get("content", ""), k)
        if urls and role != "user":
            raise RequestError(400, f"messages[{k}]: an image in an assistant turn; images go in a user turn",
                               param="messages")
        if IMAGE in text:
            raise RequestError(400, f"messages[{k}]: the text holds the {IMAGE} placeholder; send the image as an "
                                    "image_url part", param="messages")
        turns.append((role, text, urls))
    if len(turns) % 2 == 0:
        raise RequestError(400, "messages: the last message must be the user's", param="messages")
    return system, turns


def parse_messages(messages, image_root: Path | None, max_pixels: int | None = None) -> Conversation:
    """The conversation of a request's `messages`; images are read from under `image_root` only and refused over
    `max_pixels` (None: PIL's own decompression-bomb limit)."""
    system, turns = _turns(messages)
    urls = [(k, u) for k, (_, _, us) in enumerate(turns) for u in us]
    if len(urls) > 1:
        raise RequestError(400, f"{len(urls)} images in the conversation: this model takes one", param="messages")
    image = load_image(urls[0][1], image_root, max_pixels) if urls else None
    values = [(IMAGE + "\n" + text) if urls and k == urls[0][0] else text for k, (_, text, _) in enumerate(turns)]
    history = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values[:-1])]
    return Conversation(system, history, values[-1], image)


def load_image(url: str, image_root: Path | None, max_pixels: int | None = None):
    """A PIL image from a data: URL or a local path under `image_root`, at most `max_pixels` large;
    RequestError(400) otherwise."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise RequestError(400, "image_url: a data: URL must be base64-encoded", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image_url: the data: URL is not valid base64", param="messages") from None
        source = io.BytesIO(data)
    elif url.startswith(("http://", "https://")):
        raise RequestError(400, "image_url: this server fetches nothing from the network; send the image as a "
                                "data: URL", param="messages")
    else:
        source = _local(url.removeprefix("file://"), image_root)
    try:
        with Image.open(source) as im:  # reads the header only
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise RequestError(400, f"image_url: the image is {width} x {height} = {width * height:,} pixels; "
                                        f"this server takes at most {max_pixels:,} (--max_image_pixels)",
                                   code="image_too_large", param="messages")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"image_url: not a readable image ({e})", param="messages") from None


def _local(path: str, image_root: Path | None) -> Path:
    if image_root is None:
        raise RequestError(400, "image_url: local paths are served only under --image_root; send the image as a "
                                "data: URL", param="messages")
    p = (image_root / path).resolve()
    if not p.is_relative_to(image_root.resolve()):
        raise RequestError(403, f"image_url: {path} is outside --image_root", code="forbidden_path",
                           param="messages")
    if not p.is_file():
        raise RequestError(400, f"image_url: {path}: no such file under --image_root", param="messages")
    return p
