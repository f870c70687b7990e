"""pipeline.demo.compare: the whole grid in one command, resumable, with its report and plots."""

import json

import pytest


@pytest.mark.slow
def test_compare_writes_report_json_and_plots_and_a_rerun_recomputes_nothing(shards, tmp_path, capsys):
    from pipeline.demo.compare.app import main

    argv = ["--methods", "projector,text", "--seeds", "1", "--lrs", "3e-3", "--max_steps", "2",
            "--ablation_lengths", "0,5", "--jobs", "2", "--data", str(shards / "sample"),
            "--output", str(tmp_path / "out"), "--report", str(tmp_path / "docs" / "results.md")]
    assert main(argv) == 0
    assert (tmp_path / "out" / "shards" / "manifest.json").is_file()  # built once, before the cells, from --data
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert json.loads((tmp_path / "docs" / "results.json").read_text()) == res
    methods = res["summary"]["methods"]
    assert set(methods) == {"projector", "text"} and methods["text"]["lr"] == 0.003
    for m in methods.values():
        assert set(m["scores"]) == {"sample_mnist", "sample_pope", "sample_bigger", "sample_shape", "sample_train_val"}
        assert all(0 <= s["mean"] <= 100 and s["std"] == 0.0 for s in m["scores"].values())
        assert m["trainable"]["parameters"] > 0
    assert set(res["ablation"]["heldout_mean"]) == set(res["ablation"]["val"]) == {"pv0-pt0", "pv0-pt5", "pv5-pt0",
                                                                                   "pv5-pt5"}
    # M²PT is not in the grid, so the ablation runs at its default grid's middle lr, 3e-3: its pv = pt = 0 cell is the
    # projector run of the grid and is not trained again.
    assert res["ablation"]["reused"] == {"pv0-pt0": "projector/lr0.003/seed0"}
    assert res["ablation"]["val"]["pv0-pt0"] == methods["projector"]["scores"]["sample_train_val"]["mean"]
    (first,) = res["summary"]["invocations"]
    assert first["cells_run"] == 6 and first["jobs"] == 2
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "| majority answer |" in md and "| un-tuned base |" in md and "| text | 0.003 |" in md
    assert "- text: 0.003: " in md  # validation accuracy of every lr of the grid
    abl = res["ablation"]
    assert (f"| 5 | {abl['heldout_mean']['pv5-pt0']:.1f} / {abl['val']['pv5-pt0']:.1f} | "
            f"{abl['heldout_mean']['pv5-pt5']:.1f} / {abl['val']['pv5-pt5']:.1f} |") in md
    pngs = sorted(p.name for p in (tmp_path / "docs" / "results").glob("*.png"))
    assert pngs == ["ablation.png", "methods.png"]
    assert all((tmp_path / "docs" / "results" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)

    cells = sorted((tmp_path / "out" / "cells").rglob("cell.json"))
    assert len(cells) == 1 + 2 + 3  # base, two methods x one lr x one seed, the 2 x 2 ablation less pv0-pt0
    stamps = [c.stat().st_mtime_ns for c in cells]
    assert main(argv) == 0  # everything finished: nothing is trained or evaluated again
    assert [c.stat().st_mtime_ns for c in cells] == stamps
    # ... and the report keeps the wall time of the invocation that ran the cells, not this one's.
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["invocations"] == [first]
    md = (tmp_path / "docs" / "results.md").read_text()
    assert f"6 cell(s) ran 2 at a time in {first['wall_seconds']:,} s wall)" in md
    (logged,) = [json.loads(x) for x in (tmp_path / "out" / "invocations.jsonl").read_text().splitlines()]
    assert len(logged["cells"]) == 6 and logged["command"] == first["command"]
    # A report of a subset that runs one more cell logs that cell; the full report, whose cells it did not make,
    # does not count it (it rewrote results.json, which is why the history is kept apart from it).
    subset = [*argv[:argv.index("--report")], "--report", str(tmp_path / "subset.md"),
              "--methods", "text", "--seeds", "2", "--ablation_lengths="]
    assert main(subset) == 0
    runs = json.loads((tmp_path / "subset.json").read_text())["summary"]["invocations"]
    assert [r["cells_run"] for r in runs] == [2, 1]  # base and text seed 0 by the first run, seed 1 by this one
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["invocations"] == [first]
    assert len((tmp_path / "out" / "invocations.jsonl").read_text().splitlines()) == 2
    # A moved output folder keeps its cells: the shard path in their flags is where the folder was.
    import shutil

    shutil.move(tmp_path / "out", tmp_path / "moved")
    moved = [*argv[:argv.index("--output") + 1], str(tmp_path / "moved"), *argv[argv.index("--output") + 2:]]
    assert main(moved) == 0
    assert len((tmp_path / "moved" / "invocations.jsonl").read_text().splitlines()) == 2  # nothing ran
    shutil.move(tmp_path / "moved", tmp_path / "out")
    # A finished cell of other settings, or of another base, is never reused.
    assert main([*argv, "--max_steps", "3"]) == 1
    rec = json.loads(cells[0].read_text())
    cells[0].write_text(json.dumps(dict(rec, base_sha256="0" * 64)))
    assert main(argv) == 1
    # ... nor one recorded without the data's sha256 (an older version's cell): refused, naming why.
    cells[0].write_text(json.dumps({k: v for k, v in rec.items() if k != "data_sha256"}))
    capsys.readouterr()
    assert main(argv) == 1
    assert "recorded without the sample data's sha256" in capsys.readouterr().err
    cells[0].write_text(json.dumps(rec))
    # ... nor one of other sample data: the same records with one image redrawn.
    data = shutil.copytree(shards / "sample", tmp_path / "sample")
    image = next((data / "images").rglob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")
    other = [*argv[:argv.index("--data") + 1], str(data), *argv[argv.index("--data") + 2:]]
    capsys.readouterr()
    assert main(other) == 1
    assert "finished on sample data with sha256" in capsys.readouterr().err
    # ... nor one whose predictions were cut, emptied or edited since it was scored: one error naming the cell.
    pred = next((tmp_path / "out" / "cells" / "text" / "lr0.003" / "seed0").rglob("predictions.jsonl"))
    kept = pred.read_text()
    for damaged in (kept[: len(kept) // 2], "", kept.replace('"prediction": "', '"prediction": "x', 1)):
        pred.write_text(damaged)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {pred}:") and "cut, emptied or edited since it was scored" in err, err
    pred.write_text(kept)
    assert main(argv) == 0


def test_a_run_stopped_by_a_signal_is_not_scored_as_a_finished_cell(tmp_path):
    # The trainer exits 0 after a stop signal too (checkpoint saved, resumable); only run_state.json tells them apart.
    from pipeline.demo.compare import CellError, check_finished

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CellError, match="no readable run_state.json"):
        check_finished(run)
    (run / "run_state.json").write_text(json.dumps({"state": "stopped", "step": 37, "total_steps": 1200}))
    with pytest.raises(CellError, match=r"'stopped' at step 37 of 1200 .*run the comparison again to resume"):
        check_finished(run)
    (run / "run_state.json").write_text(json.dumps({"state": "finished", "step": 1200, "total_steps": 1200}))
    check_finished(run)  # no error


def test_the_verdict_counts_the_question_draw_and_claims_nothing_from_one_seed():
    from pipeline.demo.compare import HELDOUT, _difference, verdict

    # 200 questions: the method is right on 50-155 (106), the majority answer on 0-99 (100): +3 points, but on 106
    # questions they disagree. Paired SE = sqrt((106/200 * 100^2 - 3^2) / 200) = 5.14 (+ seeds' 0.5^2 / 3).
    method = {f"q{i}": float(50 <= i < 156) for i in range(200)}
    majority = {f"q{i}": float(i < 100) for i in range(200)}
    d = _difference(method, majority, 0.5 ** 2 / 3)
    assert d["diff"] == pytest.approx(3.0) and d["se"] == pytest.approx((5291 / 200 + 0.25 / 3) ** 0.5)
    # The same +3 where the two disagree only on 6 questions (the method right on all six) is beyond 2 SE.
    assert _difference({**majority, **{f"q{i}": 1.0 for i in range(100, 106)}}, majority, 0.0)["se"] < 1.5

    def summary(seeds):
        row = {"vs_majority": {t: d for t in HELDOUT}, "vs_base": {t: d for t in HELDOUT},
               "scores": {t: {"mean": 53.0, "std": 0.5} for t in HELDOUT}}
        return {"seeds": seeds, "majority": {t: 50.0 for t in HELDOUT}, "methods": {"m2pt": row}}

    one = verdict(summary(1))
    assert len(one) == 1 and "no claim" in one[0] and "above the majority" not in one[0]
    # Three seeds 0.5 apart: the seeds alone (SE 0.29) would call +3 a win; with the question draw it is not.
    three = verdict(summary(3))
    assert sum("no method is above the majority answer by more than 2 SE." in line for line in three) == len(HELDOUT)
    assert "beyond" not in three[-1] and three[-1].count("+3.0 ± 5.2") == len(HELDOUT)


def test_a_finished_cell_without_its_predictions_is_a_clear_error(tmp_path):
    from pipeline.demo.compare import CellError, predictions_file

    (tmp_path / "cell" / "eval").mkdir(parents=True)
    with pytest.raises(CellError, match=r"0 predictions.jsonl under its eval/.*delete .*cell.json"):
        predictions_file(tmp_path / "cell")
    (tmp_path / "cell" / "eval" / "run").mkdir()
    (tmp_path / "cell" / "eval" / "run" / "predictions.jsonl").write_text("")
    assert predictions_file(tmp_path / "cell") == tmp_path / "cell" / "eval" / "run" / "predictions.jsonl"


def test_methods_with_visual_prompts_choose_lr_and_visual_token_mode_on_validation(tmp_path, monkeypatch):
    # The grid's plumbing, on made-up cell records (the cells themselves are run by the test above): names, flags,
    # the choice on validation, the ablation at the chosen setting, the report's lr column.
    from argparse import Namespace

    from pipeline.demo import compare
    from pipeline.demo.compare import app, stats

    args = Namespace(methods=["m2pt", "text"], seeds=2, first_seed=0, lrs={"*": (1e-3, 3e-3)},
                     visual_token_modes=["official", "clean"], max_steps=5, batch_size=4, output=tmp_path,
                     ablation_lengths=[0, 10])
    cells = compare.plan_cells(args)
    m2pt = [f"m2pt/{mode}lr{lr}/seed{s}" for mode in ("", "clean/") for lr in ("0.001", "0.003") for s in (0, 1)]
    assert sorted(cells) == sorted(["base", *m2pt, *[f"text/lr{lr}/seed{s}" for lr in ("0.001", "0.003")
                                                     for s in (0, 1)]])
    # clean adds the trainer flag; official is the trainer's default, which adds neither a folder nor a flag
    assert cells["m2pt/clean/lr0.003/seed1"] == [*cells["m2pt/lr0.003/seed1"], "--visual_token_mode", "clean"]
    assert [n for n, f in cells.items() if f and "--visual_token_mode" in f] == [n for n in m2pt if "clean" in n]

    val = {"m2pt/lr0.001": 70.0, "m2pt/lr0.003": 74.0, "m2pt/clean/lr0.001": 75.0, "m2pt/clean/lr0.003": 71.0,
           "text/lr0.001": 79.0, "text/lr0.003": 78.0}

    def record(v):
        return {"scores": {**{t: 50.0 for t in compare.HELDOUT}, compare.VAL: v}, "seconds": 1.0,
                "trainable": {"parameters": 10, "share": 0.01}, "majority": {}}

    res = {n: record(val[n.rsplit("/", 1)[0]] + int(n[-1])) for n in cells if n != "base"}
    res["base"] = dict(record(55.0), majority={t: 10.0 for t in (*compare.HELDOUT, compare.VAL)})
    q = {t: {"q1": 1.0, "q2": 0.0} for t in compare.HELDOUT}
    monkeypatch.setattr(stats, "_base_and_majority", lambda cell, records: (q, q))
    monkeypatch.setattr(stats, "_records", lambda cell: [  # every cell: q1 right, q2 wrong, per task (= q)
        {"task": t, "qid": qid, "target": "a", "prediction": p, "correct": p == "a"}
        for t in compare.HELDOUT for qid, p in (("q1", "a"), ("q2", "b"))])
    monkeypatch.setattr(stats, "answer_sources", lambda seeds, targets: {
        t: {"off_task": 1.0, "top_wrong": "x", "top_wrong_share": 2.0} for t in compare.HELDOUT})
    s = compare.summarise(args, res)
    assert (s["methods"]["m2pt"]["visual_token_mode"], s["methods"]["m2pt"]["lr"]) == ("clean", 1e-3)
    assert s["methods"]["m2pt"]["scores"][compare.VAL]["mean"] == 75.5
    assert (s["methods"]["text"]["visual_token_mode"], s["methods"]["text"]["lr"]) == (None, 1e-3)
    assert len(s["methods"]["m2pt"]["val_by_setting"]) == 4

    asked = {}
    monkeypatch.setattr(stats, "run_cells", lambda todo, *a: asked.update(todo) or {n: record(60.0) for n in todo})
    args.data, args.jobs = tmp_path, 1
    abl = compare.ablation(args, s, res, {})
    assert abl["reused"] == {"pv10-pt10": "m2pt/clean/lr0.001/seed0", "pv0-pt10": "text/lr0.001/seed0"}
    assert sorted(asked) == ["ablation/clean/lr0.001/pv10-pt0", "ablation/lr0.001/pv0-pt0"]  # no visual run here
    assert asked["ablation/clean/lr0.001/pv10-pt0"][-2:] == ["--visual_token_mode", "clean"]
    assert "--visual_token_mode" not in asked["ablation/lr0.001/pv0-pt0"]  # pv = 0: no prompt outputs to hand on

    s.update(cell_seconds=1, invocations=[{"cells_run": 3, "wall_seconds": None, "jobs": None}])
    md = compare.markdown(s, abl, [str(tmp_path / "a.png"), str(tmp_path / "b.png")], tmp_path / "r.md", "cmd")
    assert "| m2pt | 0.001 (clean) |" in md and "| text | 0.001 |" in md
    assert md.count("Base: the embedded") == 1
    assert "summed over cells; 3 cell(s) from runs that were not logged); the learning rate of each method was chosen" \
        in md
    assert "mean over seeds; the best was chosen:" in md
    assert '| m2pt | 1.0 ("x" 2.0) | 1.0 ("x" 2.0) |' in md.split("## What the held-out answers are")[1]
    one = {**s, "methods": {m: {**r, "val_by_setting": r["val_by_setting"][:1]} for m, r in s["methods"].items()}}
    given = compare.markdown(one, None, [str(tmp_path / "a.png")], tmp_path / "r.md", "cmd")  # settings given
    assert "nothing was chosen" in given and "chosen:" not in given and "also chose" not in given
    assert "- m2pt: 0.001 (clean): 75.5, 0.003 (clean): 71.5, 0.001 (official): 70.5, 0.003 (official): 74.5" in md
    assert app.main(["--visual_token_modes", "official,offical"]) == 2  # a typo is refused before any work


def test_chosen_settings_rerun_on_fresh_seeds_with_an_lr_per_method(tmp_path):
    # A replication: each method at its own given lr, on seeds no earlier choice saw; the cells get names of their
    # own, so the grid's cells are neither reused nor clash.
    from argparse import Namespace

    from pipeline.core.methods import METHODS
    from pipeline.demo import compare
    from pipeline.demo.compare import app

    lrs = compare.parse_lrs("m2pt=1e-3, visual=3e-3,lora=1e-3", METHODS)
    assert lrs == {"m2pt": (1e-3,), "visual": (3e-3,), "lora": (1e-3,)}
    args = Namespace(methods=["m2pt", "visual", "lora", "text"], seeds=2, first_seed=6, lrs=lrs,
                     visual_token_modes=["clean"], max_steps=5, batch_size=4, output=tmp_path)
    cells = compare.plan_cells(args)
    assert sorted(cells) == sorted(["base", "m2pt/clean/lr0.001/seed6", "m2pt/clean/lr0.001/seed7",
                                    "visual/clean/lr0.003/seed6", "visual/clean/lr0.003/seed7",
                                    "lora/lr0.001/seed6", "lora/lr0.001/seed7",
                                    *[f"text/lr{lr}/seed{s}" for lr in ("0.001", "0.003", "0.007") for s in (6, 7)]])
    assert cells["lora/lr0.001/seed7"][:6] == ["--method", "lora", "--learning_rate", "0.001", "--seed", "7"]
    assert compare.parse_lrs("1e-3,3e-3", METHODS) == {"*": (1e-3, 3e-3)}
    assert compare.parse_lrs("m2pt=1e-3,m2pt=3e-3", METHODS) == {"m2pt": (1e-3, 3e-3)}
    for bad, why in (("m2p=1e-3", "unknown method 'm2p'"), ("m2pt=fast", "'fast' is not a learning rate"),
                     ("1e-3,lora=1e-4", "not both"), ("m2pt=-1", "> 0")):
        with pytest.raises(ValueError, match=why):
            compare.parse_lrs(bad, METHODS)
    assert app.main(["--lrs", "m2pt=fast"]) == 2  # refused before any work, not a traceback
    assert app.main(["--first_seed", "-1"]) == 2


def test_the_report_counts_the_runs_that_made_its_cells_from_the_log(tmp_path):
    from pipeline.demo import compare

    assert compare.read_invocations(tmp_path) == []
    compare.log_invocation(tmp_path, {"wall_seconds": 30, "jobs": 2, "command": "c", "cells": ["a", "b"]})
    compare.log_invocation(tmp_path, {"wall_seconds": 9, "jobs": 2, "command": "d", "cells": ["b", "z"]})
    log = compare.read_invocations(tmp_path)
    assert [e["wall_seconds"] for e in log] == [30, 9]
    # b was re-run by the last invocation: it counts there; "old" was made by no logged run (one entry, no wall time)
    assert compare.report_invocations(log, {"a", "b", "old"}) == [
        {"cells_run": 1, "wall_seconds": None, "jobs": None},
        {"wall_seconds": 30, "jobs": 2, "command": "c", "cells_run": 1},
        {"wall_seconds": 9, "jobs": 2, "command": "d", "cells_run": 1}]
    assert [e["command"] for e in compare.report_invocations(log, {"a", "z"})] == ["c", "d"]
    assert compare.report_invocations([], {"x"}) == [{"cells_run": 1, "wall_seconds": None, "jobs": None}]


def test_what_the_held_out_answers_are_counts_answers_to_another_question(tmp_path):
    from pipeline.demo import compare

    def cell(name, rows):
        (tmp_path / name / "eval" / "run").mkdir(parents=True)
        (tmp_path / name / "eval" / "run" / "predictions.jsonl").write_text("".join(
            json.dumps({"task": t, "qid": f"q{i}", "target": tg, "prediction": p, "correct": p == tg}) + "\n"
            for i, (t, tg, p) in enumerate(rows)))
        return tmp_path / name

    others = [(t, "a", "a") for t in compare.HELDOUT if t != "sample_mnist"]
    base = cell("base", [(compare.VAL, "map", "map"), ("sample_mnist", "3", "5"), ("sample_mnist", "5", "5"),
                         ("sample_mnist", "7", "7"), ("sample_mnist", "7", "9"), *others])
    # the digits' answers are the targets 3, 5, 7: "map" is off the task, and so is "9" (no question's answer here);
    # "Map." is normalised to "map"
    tuned = cell("tuned", [("sample_mnist", "3", "Map."), ("sample_mnist", "5", "3"), ("sample_mnist", "7", "map"),
                           ("sample_mnist", "7", "7"), *others])
    targets = compare.answer_sets(compare._records(base))
    got = compare.answer_sources([compare._records(tuned)], targets)["sample_mnist"]
    assert got == {"off_task": 50.0, "top_wrong": "map", "top_wrong_share": 50.0}
    assert compare.answer_sources([compare._records(base)], targets)["sample_mnist"] == {
        "off_task": 25.0, "top_wrong": "5", "top_wrong_share": 25.0}
