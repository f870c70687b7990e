"""The code's shape: the library never imports the data_prep apps; the embedded demo sits behind a boundary that only
the entry points' defaults cross; module-level imports form no cycle; every --no_X flag says what it does; and the
lint gate's size rule catches a function over its limits."""

import ast
import subprocess
import sys

import pytest
from helpers import ENV, REPO

PIPELINE = sorted((REPO / "pipeline").rglob("*.py"))
DEMO = REPO / "pipeline" / "demo"
# The entry points (and their shims) and the one module that hands them the demo's defaults.
MAY_IMPORT_DEMO = {"pipeline/defaults.py", "pipeline/train.py", "pipeline/compare.py", "pipeline/pretrain_base.py"}


def _module(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, module_level_only=False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_layout_is_searched_in_every_subpackage():
    subpackages = {p.parent.name for p in PIPELINE if p.parent != REPO / "pipeline"}
    assert {"core", "data", "training", "evaluation", "demo", "compare"} <= subpackages  # rglob, not glob


def test_pipeline_never_imports_data_prep():
    offenders = {str(f.relative_to(REPO)): sorted(m for m in _imports(f) if m.split(".")[0] == "data_prep")
                 for f in PIPELINE}
    assert {k: v for k, v in offenders.items() if v} == {}
    uses = set().union(*(_imports(f) for f in (REPO / "data_prep").glob("*.py")))
    assert {"pipeline.data.shards", "pipeline.demo.sample_data"} <= uses  # the apps call the library, not the reverse


def test_only_the_entry_points_defaults_import_the_demo():
    importers = {str(f.relative_to(REPO)) for f in PIPELINE
                 if DEMO not in f.parents and any(m.startswith("pipeline.demo") for m in _imports(f))}
    assert importers <= MAY_IMPORT_DEMO, importers - MAY_IMPORT_DEMO
    # ... and only inside the functions that serve a default: never when the module is imported
    at_import = {f for f in importers if any(m.startswith("pipeline.demo")
                                             for m in _imports(REPO / f, module_level_only=True))}
    assert at_import == set()


def test_no_generic_module_names_a_demo_task_or_the_tiny_model():
    names = ("sample_pope", "sample_mnist", "sample_train_val", "tiny_base", "build_tiny", "sample_shards")
    found = {str(f.relative_to(REPO)): [n for n in names if n in f.read_text()] for f in PIPELINE
             if DEMO not in f.parents and str(f.relative_to(REPO)) not in MAY_IMPORT_DEMO}
    assert {k: v for k, v in found.items() if v} == {}


def _import_graph(module_level_only: bool) -> dict:
    graph = {_module(f): {m for m in _imports(f, module_level_only) if m.startswith("pipeline")} for f in PIPELINE}
    for mod in graph:  # `from pipeline.x import name` names a module or a module's attribute: keep the modules
        graph[mod] = {m for m in graph[mod] if m in graph} | {m.rsplit(".", 1)[0] for m in graph[mod]
                                                              if m not in graph and m.rsplit(".", 1)[0] in graph}
        graph[mod].discard(mod)
    return graph


def _cycles(graph: dict) -> list:
    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    # a package's __init__ may import its own submodules (re-exports); everything else must point one way
    return [c for m in graph if (c := cycle_from(m)) and not all(x.startswith(c[0]) for x in c)]


def test_module_level_imports_form_no_cycle():
    assert _cycles(_import_graph(module_level_only=True)) == []


def test_imports_inside_functions_form_no_cycle_either():
    """A function-level import hides a circle from Python, not from the reader: defaults -> the demo -> the
    evaluation library -> defaults was one."""
    graph = _import_graph(module_level_only=False)
    assert _cycles(graph) == []
    graph["pipeline.defaults"].add("pipeline.evaluation.runner")  # the circle that was: the check must see it
    assert _cycles(graph) != []


def test_the_training_recipe_stays_readable_in_one_sitting():
    """pipeline/train.py is the recipe (torchtune's shape): what it calls lives in pipeline/training/."""
    assert len((REPO / "pipeline" / "train.py").read_text().splitlines()) <= 450


ENTRY_POINTS = {"pipeline.train", "pipeline.evaluate", "pipeline.chat", "pipeline.serve", "pipeline.compare",
                "pipeline.pretrain_base"}


def test_no_module_imports_an_entry_point_at_any_depth():
    """The apps share libraries (pipeline/evaluation/runner.py, pipeline/source.py), never each other: imports inside
    functions count too (chat and serve used to borrow evaluate's private helpers there)."""
    found = {_module(f): sorted(m for m in _imports(f) if m in ENTRY_POINTS or m.rsplit(".", 1)[0] in ENTRY_POINTS)
             for f in PIPELINE}
    assert {k: v for k, v in found.items() if v} == {}


def test_a_run_on_your_own_model_loads_neither_the_demo_nor_data_prep():
    code = ("import sys, pipeline.train, pipeline.evaluate, pipeline.data.shards, pipeline.data.stream, "
            "pipeline.core.models, pipeline.training.checkpoint, pipeline.evaluation.scoring; "
            "print(sorted(m for m in sys.modules if m.startswith(('data_prep', 'pipeline.demo'))))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def test_the_public_api_is_exported_lazily():
    code = ("import sys, pipeline; heavy = 'torch' in sys.modules; "
            "from pipeline import M2PTConfig, attach_m2pt, save_adapter, load_adapter, load_base, num_visual_tokens; "
            "print(heavy, M2PTConfig.__module__, load_base.__module__)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "pipeline.core.m2pt", "pipeline.defaults"]


def _parsers():
    from data_prep import build_shards, make_sample
    from pipeline import chat, evaluate, serve
    from pipeline.demo import pretrain_base
    from pipeline.demo.compare import app
    from pipeline.training.config import build_parser as build_train_parser

    yield "train", build_train_parser()
    yield "evaluate", _capture_parser(evaluate.parse_args)
    yield "chat", _capture_parser(chat.parse_args)
    yield "serve", _capture_parser(serve.parse_args)
    yield "build_shards", _capture_parser(build_shards.main)
    yield "make_sample", _capture_parser(make_sample.main)
    yield "compare", app.build_parser()
    yield "pretrain_base", pretrain_base.build_parser()


def _capture_parser(entry):
    """The ArgumentParser an app builds, caught at parse time (`--help` would exit)."""
    import argparse

    caught = []
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            entry([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0]


def test_every_no_flag_says_what_giving_it_does():
    seen = 0
    for app, parser in _parsers():
        for action in parser._actions:
            for flag in (s for s in action.option_strings if s.startswith("--no_")):
                seen += 1
                help_text = (action.help or "").lower()
                assert help_text.startswith(("do not", "don't", "skip", "keep", "leave", "no ")), (app, flag, help_text)
                assert "(default: true)" not in parser.format_help().lower(), app
    assert seen >= 3  # train: --no_tune_projector, --no_final_eval; evaluate: --no_majority_baseline


def test_the_size_gate_fails_on_a_function_over_its_limits(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_complexity import offenders
    finally:
        sys.path.pop(0)
    (tmp_path / "pkg").mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(85))
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(16))
    (tmp_path / "pkg" / "m.py").write_text(f"def small(x):\n    return x\n\n\ndef long(x):\n{long_body}\n\n\n"
                                           f"def branchy(x):\n{branches}\n")
    found = offenders(["pkg"], root=tmp_path)
    assert [line.split(": ")[1] for line in found] == ["long", "branchy"]
    assert "86 lines" in found[0] and "complexity 17" in found[1]
    assert offenders(root=REPO) == []  # and the repository itself passes


def test_the_method_registry_and_the_evaluation_library_load_no_torch_when_imported():
    """--help, the flag checks and the artifact checks read them before any model loads; torch takes seconds to
    import (the registry's type annotations once pulled it into every app's start-up)."""
    code = ("import sys, pipeline.core.methods, pipeline.evaluation.runner, pipeline.demo.compare.cells; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
