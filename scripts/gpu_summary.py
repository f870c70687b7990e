"""Collect what scripts/gpu_check.sh left in its folder into summary.json and summary.md (for docs/benchmarks.md).

    python scripts/gpu_summary.py OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def read(folder: Path, name: str, default=""):
    p = folder / name
    if not p.is_file():
        return default
    return json.loads(p.read_text()) if name.endswith(".json") else p.read_text()


def summary(folder: Path) -> dict:
    tests = read(folder, "pytest.log")
    closing = [ln for ln in tests.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return {"versions": read(folder, "versions.txt").strip().splitlines(),
            "tests": closing[-1] if closing else "no pytest summary line (see pytest.log)",
            "findings": read(folder, "findings.json", {}), "timing": read(folder, "timing.json", {}),
            "bench_7b": read(folder, "bench_7b.md").strip(),
            "serve_7b": read(folder, "serve_7b.md").strip(),
            "eval_batch": read(folder, "eval_batch.txt").strip() or "(no batch 1 vs 16 comparison: see eval_b*.log)"}


def markdown(s: dict) -> str:
    lines = ["## GPU check (`scripts/gpu_check.sh`)", "", *[f"- {v}" for v in s["versions"]], "",
             f"CUDA-marked tests: {s['tests']}", ""]
    for key, value in s["findings"].items():
        lines.append(f"- {key}: `{json.dumps(value)}`")
    lines += ["", s["bench_7b"] or "(no 7B benchmark table: see bench.log)", "",
              f"Evaluation, greedy, bf16, batch 1 vs 16: `{s['eval_batch']}`", "",
              s["serve_7b"] or "(no 7B serving table: see serve.log)", "",
              f"Timing: {json.dumps(s['timing'])}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    s = summary(folder)
    (folder / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (folder / "summary.md").write_text(markdown(s))
    print(markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
