"""Trained artifacts on the Hugging Face Hub, through huggingface_hub itself: a repo id (`user/name`, or
`user/name@revision`) is read through the Hugging Face cache (`snapshot_download`: downloaded once, then read from the
cache; with HF_HUB_OFFLINE=1 only the cache is looked at), and a folder is pushed with `upload_folder`.

Every place that reads an artifact (evaluate, chat, serve, `load_artifact`, `load_adapter`) goes through `resolve`, so
a repo id works wherever a folder does. A local path always wins: a repo id is only looked up when no such path exists.
Pushing is checked before any work (`check_can_push`: a token, the Hub reachable, who we are), because a training run
must not find out after hours that its adapter cannot be uploaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import UsageError, first_line

# `user/name`, optionally `@revision`: the Hub's own form of a model repo id (no third path part, no leading dot)
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def is_repo_id(text: str) -> bool:
    """`text` has a Hub repo id's form and names no local path."""
    return bool(text) and REPO_ID.fullmatch(str(text)) is not None and not Path(text).exists()


def resolve(path_or_repo) -> Path:
    """The local folder of an artifact: a path as it is, a Hub repo id as its snapshot in the Hugging Face cache.
    A FileNotFoundError naming both readings when the text is neither."""
    text = str(path_or_repo)
    if not is_repo_id(text):
        return Path(path_or_repo)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = REPO_ID.fullmatch(text)
    try:
        return Path(snapshot_download(m["repo"], revision=m["revision"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(f"{text}: no such folder, and as a Hub repo id it could not be read ({first_line(e)}); "
                                "with HF_HUB_OFFLINE=1 only repos already in the Hugging Face cache are found") \
            from None


def check_can_push(repo: str, ask_hub: bool = True) -> str | None:
    """Before any work: `repo` is a repo id, a token is there and (`ask_hub`) the Hub answers with who it belongs to.
    Returns the user name (None without `ask_hub`); a UsageError saying what is missing otherwise. A training run
    asks the Hub from rank 0 only, the rank that uploads: hundreds of ranks calling whoami at once would meet the
    Hub's rate limit, and one refused rank stops them all."""
    from huggingface_hub import HfApi, constants, get_token

    if REPO_ID.fullmatch(repo or "") is None or "@" in repo:
        raise UsageError(f"--push_to_hub {repo!r}: not a Hub repo id (user/name)")
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"cannot push to {repo}: HF_HUB_OFFLINE is set (unset it, or push later with "
                         f"`python -m pipeline.push FOLDER {repo}`)")
    token = get_token()
    if token is None:
        raise UsageError(f"cannot push to {repo}: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")
    if not ask_hub:
        return None
    try:
        return HfApi().whoami(token=token)["name"]
    except Exception as e:  # noqa: BLE001 - network, proxy and auth failures all end here, told in one line
        raise UsageError(f"cannot push to {repo}: the Hub did not accept the token or cannot be reached "
                         f"({type(e).__name__}: {first_line(e)})") from None


class PushError(RuntimeError):
    """An upload that failed after the checks passed (the network went, the repo refused it)."""


def push(folder: Path, repo: str, *, private: bool = False, message: str | None = None) -> str:
    """Create `repo` if needed and upload `folder` into it as one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo,
                                 commit_message=message or f"Upload {Path(folder).name} from the M2PT pipeline")
    except Exception as e:  # noqa: BLE001 - whatever huggingface_hub raised, told with the command to retry
        raise PushError(f"uploading {folder} to {repo} failed ({type(e).__name__}: {e}); the folder is intact: retry "
                        f"with `python -m pipeline.push {folder} {repo}`") from None
    return info.commit_url
