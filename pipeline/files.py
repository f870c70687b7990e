"""Small file and image helpers shared by the trainer, the evaluator and the shard builder - one definition each.

* atomic writes: write beside the target, then os.replace, so a reader (or a resumed run) sees the old file or the
  new one, never half of one;
* sha256 of a file, streamed;
* image bytes / paths -> an RGB PIL image, and a Hugging Face `Image` feature value -> its encoded bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def umask_modes(folder) -> None:
    """Give every file under `folder` the mode a plain open() would (0666 less the umask). Why: safetensors writes
    its files 0600 whatever the umask, so on a shared cluster a teammate could not read an adapter."""
    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def replace_dir(tmp, final) -> None:
    """Put the finished folder `tmp` at `final`: a reader sees the old folder or the new one, never a half-written
    one (the old one is renamed aside, then removed)."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_rgb(image):
    """Encoded image bytes, or a path -> a decoded RGB PIL image (raises PIL's errors on a corrupt image)."""
    from PIL import Image

    src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    return Image.open(src).convert("RGB")


def hf_image_bytes(value) -> bytes | None:
    """Encoded bytes of a Hugging Face `datasets` Image value ({"bytes", "path"} or raw bytes); a decoded PIL image
    is re-encoded as PNG. None for anything else."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "save"):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None
