"""The code's shape: the library (pipeline/) never imports the data_prep apps, so the two packages have no
import cycle; the apps reach the library through typed functions."""

import ast
import subprocess
import sys

from helpers import ENV, REPO


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module or "")
    return out


def test_pipeline_never_imports_data_prep():
    offenders = {f.name: sorted(m for m in _imports(f) if m.split(".")[0] == "data_prep")
                 for f in (REPO / "pipeline").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
    uses = set().union(*(_imports(f) for f in (REPO / "data_prep").glob("*.py")))
    assert {"pipeline.data.shards", "pipeline.demo.sample_data"} <= uses  # the apps call the library, not the reverse


def test_importing_the_apps_loads_no_data_prep_module():
    code = ("import sys, pipeline.train, pipeline.evaluate, pipeline.data.shards, pipeline.demo.sample_data; "
            "print(sorted(m for m in sys.modules if m.startswith('data_prep')))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
