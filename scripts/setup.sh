#!/usr/bin/env bash
# Create (or refresh) the project virtual environment at .venv from requirements.txt. Idempotent.
# torch==2.13.0 is pinned in requirements.txt: on the project's CPU machines it is a local CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU cluster, install your CUDA build of torch 2.13.0 into the venv
# first; pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtual environment .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Said before the quiet installs: a first setup takes a few minutes and would otherwise print nothing.
  echo "setup: installing requirements.txt into .venv (a few minutes the first time; torch $(grep -m1 '^torch==' requirements.txt | cut -d= -f3))" >&2
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
  echo "setup: .venv is ready" >&2
fi
