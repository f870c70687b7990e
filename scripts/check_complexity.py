"""The lint gate's size rule: no function in pipeline/ or data_prep/ over 80 lines or over cyclomatic complexity
15, as radon counts it (ruff's C901 counts differently, so it alone is no gate).

    .venv/bin/python scripts/check_complexity.py [FOLDER ...]      # exit 1 and one line per offender

Why these limits: a function a reader can hold in one screen and test by its branches. Split a long function
into named steps rather than raising a limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from radon.complexity import cc_visit

MAX_LINES, MAX_COMPLEXITY = 80, 15
DEFAULT_FOLDERS = ("pipeline", "data_prep")


def offenders(folders=DEFAULT_FOLDERS, root: Path = Path(".")) -> list[str]:
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for block in cc_visit(path.read_text()):
                if not hasattr(block, "endline") or block.letter == "C":  # classes: their methods count one by one
                    continue
                lines = block.endline - block.lineno + 1
                if lines > MAX_LINES or block.complexity > MAX_COMPLEXITY:
                    out.append(f"{path}:{block.lineno}: {block.fullname}: {lines} lines, complexity "
                               f"{block.complexity} (limits: {MAX_LINES} lines, complexity {MAX_COMPLEXITY})")
    return out


def main(argv=None) -> int:
    found = offenders(argv or DEFAULT_FOLDERS)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
