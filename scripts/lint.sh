#!/usr/bin/env bash
# The lint gate (.ci/run runs it before the tests): ruff with the rules in pyproject.toml, and no function in
# pipeline/ or data_prep/ over 80 lines or cyclomatic complexity 15 as radon counts it (scripts/check_complexity.py).
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
.venv/bin/ruff check . || rc=1
.venv/bin/python scripts/check_complexity.py || rc=1
[ "$rc" -eq 0 ] && echo "lint: ruff and the size limits pass"
exit "$rc"
