"""The rows of an evaluation, settled before any model loads: a distinct name for each artifact, and each artifact's
files and recorded base checked, so that nothing fails or mixes up after hours of generation.

Row names come from the artifact paths with as many parent folders as it takes to tell them apart
(`runs/a/adapter` -> `a`; `col/a/run/adapter` beside `col/b/run/adapter` -> `a/run`, `b/run`), or from --names.
`base` (the un-tuned model) and `majority answer` are never an artifact's name; two rows never share a name or a
predictions folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pipeline.errors import UsageError

BASE_ROW = "base"
RESERVED = (BASE_ROW, "majority answer")


def _parts(adapter: str) -> list[str]:
    """The path's folders, innermost last, without the `adapter` and `checkpoints` folders a run writes."""
    parts = [p for p in Path(adapter).absolute().parts if p not in ("/", "", ".")]
    if parts and parts[-1] == "adapter":
        parts = parts[:-1]
    return [p for p in parts if p != "checkpoints"] or [str(adapter)]


def _first_depth(adapter: str) -> int:
    """`runs/x/checkpoints/step-00000100/adapter` starts as `x/step-00000100`; anything else as its last folder."""
    return 2 if "checkpoints" in Path(adapter).parts else 1


def row_names(adapters: list[str], names: list[str] | None = None) -> list[str]:
    """One distinct table row name per artifact (see the module docstring); a UsageError when that is impossible
    (the same artifact twice, or --names that collide or are reserved)."""
    if names is not None:
        if len(names) != len(adapters):
            raise UsageError(f"--names: {len(names)} name(s) for {len(adapters)} --adapter(s)")
        return _checked(names, "--names")
    dup = {a for a in adapters if adapters.count(a) > 1}
    if dup:
        raise UsageError(f"--adapter {sorted(dup)[0]} given twice")
    return _checked(_names_from_paths(adapters), "the artifact paths")


def _names_from_paths(adapters: list[str]) -> list[str]:
    """Each path's last folder(s), one more parent for every name that clashes or is reserved, until none does."""
    depth = [_first_depth(a) for a in adapters]
    while True:
        current = ["/".join(_parts(a)[-d:]) for a, d in zip(adapters, depth)]
        clash = [i for i, n in enumerate(current) if current.count(n) > 1 or n in RESERVED]
        if not clash:
            return current
        grow = [i for i in clash if depth[i] < len(_parts(adapters[i]))]
        if not grow:
            raise UsageError(f"--adapter: cannot name the rows of {[adapters[i] for i in clash]} apart; give "
                             "--names")
        for i in grow:
            depth[i] += 1


def _checked(names: list[str], source: str) -> list[str]:
    folders = [folder_name(n) for n in names]
    bad = [n for n in names if n in RESERVED or not n.strip()]
    if bad:
        raise UsageError(f"{source}: {bad[0]!r} is reserved for the un-tuned base or the majority answer row")
    if len(set(folders)) != len(folders):
        raise UsageError(f"{source}: two rows would share a name or a predictions folder: {names}")
    return names


def folder_name(row: str) -> str:
    """The predictions folder of a row under --output_dir."""
    return row.replace("/", "__")


# ------------------------------------------------------------------------------------------- artifact files
def check_safetensors(path: Path) -> None:
    """A safetensors file must hold its header and every tensor it lists (a truncated or empty file is an error
    naming the file, not a SafetensorError traceback after other rows were evaluated)."""
    if not path.is_file():
        raise UsageError(f"{path}: missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{path}: {size} bytes, not a safetensors file (truncated or empty)")
        n = struct.unpack("<Q", head)[0]
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: unreadable safetensors header (truncated or not a safetensors file)")
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
    if size != 8 + n + end:
        raise UsageError(f"{path}: {size} bytes, but its header lists {8 + n + end} (truncated or altered)")


def same_base(recorded: str, given: str) -> bool:
    """Names of one base: equal, or the same folder names (a model moved to another cluster's disk)."""
    if recorded == given:
        return True

    def folders(name: str) -> list[str]:
        return [Path(p.strip()).name for p in name.removeprefix("llava-v1 parts:").split(" + ")]

    embedded = ("tiny", "tiny-random")
    return recorded not in embedded and given not in embedded and folders(recorded) == folders(given)
