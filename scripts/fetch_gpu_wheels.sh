#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels scripts/gpu_check.sh installs on the lent GPU machine, which has
# no network: its image has Python 3.12, torch 2.11 (CUDA) and transformers 5.17, but not this project's other
# pins (KINDS.md of the device tool lists what it has). Writes .whl/ (ignored by git; about 20 MB); the device
# call carries it: run(command="bash scripts/gpu_check.sh", carry=[".whl"]).
# DeepSpeed ships only a source archive: its wheel is built here, pure Python (its ops compile on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
pin() { grep -E "^$1==" requirements.txt | head -1; }
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# Pure-Python or manylinux wheels the image lacks (or has at another version than the pins).
for req in "$(pin transformers)" "$(pin tokenizers)" "$(pin webdataset)" "$(pin braceexpand)" "$(pin peft)" \
           hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
  .venv/bin/python -m pip download -q --no-deps "${PLAT[@]}" -d .whl "$req"
done
tmp=$(mktemp -d)
.venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$(pin deepspeed)"
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
ls -la .whl && du -sh .whl
