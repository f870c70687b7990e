#!/usr/bin/env bash
# Create (or refresh) the project virtual environment at .venv from requirements.txt. Idempotent.
# torch==2.13.0 is pinned in requirements.txt: on the project's CPU machines it is a local CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU cluster, install your CUDA build of torch 2.13.0 into the venv
# first; pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
