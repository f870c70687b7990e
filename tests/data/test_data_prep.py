"""Shard builder: round trip, every rejection reason, invariant, determinism across workers, resume after a kill."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.build_shards import main as build_main
from pipeline.demo.sample_data import build as make_sample

REPO = Path(__file__).resolve().parents[2]


def _conv(q="<image>\nWhat is it?", a="a thing"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _png_header_only(w, h) -> bytes:
    """A PNG whose header claims w x h (a decompression bomb's shape) without the pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _img(path: Path, colour, fmt="PNG", size=(40, 30)):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:, : size[0] // 2] = colour
    Image.fromarray(arr).save(path, format=fmt)
    return arr


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    good = {}
    good["good-png"] = _img(root / "img" / "a.png", (200, 10, 10))
    good["good-gif"] = _img(root / "img" / "b.gif", (10, 200, 10), fmt="GIF")  # re-encoded to PNG
    jpg = root / "img" / "c.jpg"
    _img(jpg, (10, 10, 200), fmt="JPEG")
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "PNG")
    (root / "img" / "trunc.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    outside = tmp_path / "outside.png"
    _img(outside, (1, 2, 3))
    (root / "img" / "link.png").symlink_to(outside)
    recs = [
        {"id": "good-png", "image": "img/a.png", "conversations": _conv(), "task_name": "t1"},
        {"id": "good-gif", "image": "img/b.gif", "conversations": _conv()},
        {"id": "good-jpg", "image": "img/c.jpg", "conversations": _conv(q="Describe. <image>")},
        {"id": "good/text only.1", "conversations": _conv(q="What is one plus one?", a="2")},
        {"id": "corrupt", "image": "img/corrupt.jpg", "conversations": _conv()},
        {"id": "trunc", "image": "img/trunc.png", "conversations": _conv()},
        {"id": "empty", "image": "img/empty.png", "conversations": _conv()},
        {"id": "missing", "image": "img/nope.png", "conversations": _conv()},
        {"id": "dotdot", "image": "../outside.png", "conversations": _conv()},
        {"id": "absolute", "image": str(outside), "conversations": _conv()},
        {"id": "symlink", "image": "img/link.png", "conversations": _conv()},
        {"id": "bomb", "image": "img/bomb.png", "conversations": _conv()},
        {"id": "malformed", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "hi"}]},
        {"id": "noimgtok", "image": "img/a.png", "conversations": _conv(q="What is it?")},
        {"id": "twoimgtok", "image": "img/a.png", "conversations": _conv(q="<image> and <image>")},
        {"id": "emptyans", "image": "img/a.png", "conversations": _conv(a="  ")},
        {"id": "good-png", "image": "img/a.png", "conversations": _conv()},  # duplicate id
        {"id": "toolong", "image": "img/a.png", "conversations": _conv(a="word " * 3000)},
        "not a record",
    ]
    expected = {
        "corrupt": "undecodable_image", "trunc": "undecodable_image", "empty": "undecodable_image",
        "missing": "missing_image", "dotdot": "path_outside_root", "absolute": "path_outside_root",
        "symlink": "path_outside_root", "bomb": "image_too_large", "malformed": "bad_conversation",
        "noimgtok": "missing_image_token", "twoimgtok": "extra_image_token", "emptyans": "empty_answer",
        "toolong": "too_long",
    }
    (tmp_path / "in.json").write_text(json.dumps(recs[:10]))
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in recs[10:]) + "\n{broken json\n")
    return tmp_path, root, good, jpg, expected


def _read_back(out: Path):
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))


def test_bad_inputs_rejected_with_reasons_and_good_ones_round_trip(corpus, capsys):
    tmp, root, good, jpg, expected = corpus
    out = tmp / "out"
    rc = build_main(["--input", str(tmp / "in.json"), str(tmp / "in.jsonl"), "--image_root", str(root),
                     "--output", str(out), "--workers", "1", "--model_max_length", "512", "--quiet",
                     "--samples_per_shard", "2"])
    assert rc == 0
    assert "read 20, written 4 in 2 shard(s), rejected 16" in capsys.readouterr().out
    rej = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r["reason"] for r in rej if r["id"] not in ("good-png", None)}
    assert by_id == expected
    assert [r["reason"] for r in rej if r["id"] == "good-png"] == ["duplicate_id"]
    assert sorted(r["reason"] for r in rej if r["id"] is None) == ["bad_json", "bad_record"]
    for r in rej:
        assert r["file"].endswith(("in.json", "in.jsonl")) and isinstance(r["index"], int) and r["detail"]
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    assert t["read"] == t["written"] + t["rejected"] == 20
    assert sum(t["rejected_by_reason"].values()) == 16
    assert [s["samples"] for s in m["shards"]] == [2, 2]

    samples = {json.loads(s["json"])["id"]: s for s in _read_back(out)}
    assert set(samples) == {"good-png", "good-gif", "good-jpg", "good/text only.1"}
    assert samples["good/text only.1"]["__key__"].startswith("good_text_only_1_")  # sanitised + hashed
    # pixels identical: PNG stored as-is, GIF re-encoded losslessly, JPEG bytes stored untouched
    for name in ("good-png", "good-gif"):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[name]["png"])).convert("RGB")), good[name])
    assert samples["good-jpg"]["jpg"] == jpg.read_bytes()
    meta = json.loads(samples["good-png"]["json"])
    assert meta["conversations"] == _conv() and (meta["width"], meta["height"]) == (40, 30)
    assert meta["task_name"] == "t1" and meta["source"].endswith("in.json:0")


def test_record_id_is_one_definition():
    from pipeline.data.shards import record_id

    assert record_id({"id": 3}) == "3" and record_id({"id": "a.b"}) == "a.b"
    assert record_id({"id": True}) is None and record_id({"id": ""}) is None and record_id({}) is None
    assert record_id("not a record") is None and record_id({"id": [1]}) is None


def test_nothing_written_or_unreadable_input_exit_codes(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "conversations": []}]))
    assert build_main(["--input", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o1"), "--quiet"]) == 1
    (tmp_path / "notjson.json").write_text("{oops")
    assert build_main(["--input", str(tmp_path / "notjson.json"), "--output", str(tmp_path / "o2"), "--quiet"]) == 2
    assert build_main(["--input", str(tmp_path / "absent.json"), "--output", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "absent.json: no such file" in capsys.readouterr().err


def test_hf_datasets_folder_input(tmp_path):
    import datasets

    recs = [{"id": f"r{i}", "conversations": _conv(q=f"What is {i}?", a=str(i))} for i in range(5)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert build_main(["--input", str(tmp_path / "ds"), "--output", str(out), "--quiet", "--workers", "1"]) == 0
    assert sorted(json.loads(s["json"])["id"] for s in _read_back(out)) == [f"r{i}" for i in range(5)]


def _bench_hf_memory():
    """benchmarks/bench_hf_memory.py: the one definition of the generated image data set and of the measurement."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import bench_hf_memory
    finally:
        sys.path.pop(0)
    return bench_hf_memory


def test_an_hf_image_column_keeps_its_encoded_bytes_from_a_folder_or_parquet_files(tmp_path):
    """Before: every record and its image were held in a list (peak RSS about 3.2x the image bytes) and JPEGs came out
    re-encoded as PNG (0 of 120 byte-identical); a folder of parquet files was not accepted."""
    ds, encoded = _bench_hf_memory().image_dataset(12, size=32, seed=0)
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.select(range(6)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    ds.select(range(6, 12)).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))
    for name in ("saved", "pq"):
        out = tmp_path / f"out-{name}"
        assert build_main(["--input", str(tmp_path / name), "--output", str(out), "--quiet", "--workers", "2"]) == 0
        samples = {json.loads(s["json"])["id"]: s for s in _read_back(out)}
        assert len(samples) == 12
        for rid, data in encoded.items():
            ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
            assert samples[rid][ext] == data, (name, rid)  # stored byte for byte, JPEGs as JPEG


@pytest.mark.slow
def test_building_from_an_hf_dataset_takes_memory_that_does_not_grow_with_it(tmp_path):
    """A build from 200 and from 1,600 records of ~23 KB images (5 vs 38 MB of data): the process's own peak of
    anonymous memory stays the same; only the memory-mapped Arrow file's pages (page cache, reclaimable) scale with
    the data. Before: every record was held with its bytes (peak RSS about 3.2x the image bytes).
    Why /proc/self/status and not ru_maxrss: a child's ru_maxrss keeps the parent's size from before the exec."""
    bench, mem = _bench_hf_memory(), {}
    for n in (200, 1600):
        bench.image_dataset(n, size=128)[0].save_to_disk(str(tmp_path / f"ds{n}"))
        hwm, anon = bench.measure(tmp_path / f"ds{n}", tmp_path / f"o{n}")
        mem[n] = {"peak_mb": hwm, "anon_mb": anon}
    assert mem[1600]["anon_mb"] - mem[200]["anon_mb"] < 20, mem  # 8x the records, 33 MB more data
    assert mem[1600]["peak_mb"] - mem[200]["peak_mb"] < 50, mem  # at most the mapped file's growth


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    make_sample(d, per_task=60, text_only=10, heldout_per_task=5, seed=0)
    return d


def _hashes(out: Path):
    return {s["name"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]}


def test_same_shards_for_1_and_2_workers(sample, tmp_path):
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        assert build_main(["--input", str(sample / "train.json"), "--image_root", str(sample), "--output", str(out),
                           "--workers", str(w), "--shuffle", "--seed", "3", "--samples_per_shard", "40",
                           "--quiet"]) == 0
        outs.append(_hashes(out))
    assert outs[0] == outs[1] and len(outs[0]) == 13  # 490 records / 40


@pytest.mark.slow
def test_resume_after_kill_midway(sample, tmp_path):
    ref = tmp_path / "ref"
    args = ["--input", str(sample / "train.json"), "--image_root", str(sample), "--samples_per_shard", "10",
            "--workers", "1", "--quiet"]
    assert build_main(args + ["--output", str(ref)]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.build_shards", *args, "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prog = out / ".progress.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(prog.read_text())["shards"]) >= 5:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    done = json.loads(prog.read_text())
    for t in out.glob("*.tar"):  # whatever is visible under a final name is a complete tar
        with tarfile.open(t) as tf:
            assert len(tf.getmembers()) == 2 * 10
    assert build_main(args + ["--output", str(out)]) == 0
    assert _hashes(out) == _hashes(ref)
    assert len(done["shards"]) < len(_hashes(ref))
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["read"] == m["totals"]["written"] + m["totals"]["rejected"] == 490
    assert not list(out.glob("*.tmp")) and not prog.exists()


def test_round_trip_through_training_reader(sample, tmp_path):
    """Shards -> pipeline.data.stream stream -> identical ids and exactly the expected batches."""
    from pipeline.core.chat import VicunaTemplate
    from pipeline.data.stream import Preprocess, ShardStream, resolve_shards
    from pipeline.demo.tiny import build_tiny

    out = tmp_path / "s"
    build_main(["--input", str(sample / "train.json"), "--image_root", str(sample), "--output", str(out),
                "--samples_per_shard", "100", "--workers", "1", "--quiet"])
    found = resolve_shards(str(out))
    shards, total = found.paths, found.total
    assert total == 490 and len(shards) == 5 and sum(found.counts.values()) == 490
    base = build_tiny()
    pre = Preprocess(VicunaTemplate(base.tokenizer, base.model.config.image_token_id, 16), base.image_processor, 512)
    seen = []
    for rank in (0, 1):
        it = iter(ShardStream(shards, rank=rank, world=2, seed=0, batch_size=5, preprocess=pre, pad_id=3))
        for _ in range(49):  # 245 samples each; shards split 3/2 so rank 1 wraps into its next epoch
            b = next(it)
            assert b["input_ids"].shape[0] == 5
            seen += [(rank, b["cursor"][1], i) for i in b["ids"]]
    first_epoch = {i for r, e, i in seen if e == 0}
    assert len(first_epoch) == len([x for x in seen if x[1] == 0])  # no duplicates within an epoch
    records = json.loads((sample / "train.json").read_text())
    assert first_epoch <= {r["id"] for r in records}


def test_overwrite_removes_the_previous_builds_tars_whatever_their_prefix(sample, tmp_path):
    """Before: `--overwrite --prefix other` left the old shard-*.tar beside the new build, so a *.tar glob mixed two
    builds. Now the old manifest's tars go; a file the tool never wrote stays."""
    out = tmp_path / "s"
    common = ["--input", str(sample / "train.json"), "--image_root", str(sample), "--output", str(out),
              "--workers", "1", "--quiet"]
    assert build_main([*common, "--samples_per_shard", "100"]) == 0
    old = sorted(p.name for p in out.glob("*.tar"))
    assert len(old) == 5 and all(n.startswith("shard-") for n in old)
    (out / "mine.tar").write_bytes(b"not ours")
    assert build_main([*common, "--samples_per_shard", "200", "--prefix", "other", "--overwrite"]) == 0
    new = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("*.tar")) == sorted([s["name"] for s in new["shards"]] + ["mine.tar"])
    assert all(s["name"].startswith("other-") for s in new["shards"]) and new["totals"]["written"] == 490


def test_old_kebab_case_flags_still_work_with_a_warning(tmp_path, capsys):
    recs = [{"id": f"t{i}", "conversations": _conv("What is two plus two?", "four")} for i in range(3)]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    assert build_main(["--input", str(tmp_path / "r.json"), "--output", str(tmp_path / "s"), "--workers", "1",
                       "--samples-per-shard", "2", "--max-length", "512", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: --samples-per-shard is deprecated; use --samples_per_shard" in err
    assert "warning: --max-length is deprecated; use --model_max_length" in err
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert len(man["shards"]) == 2 and man["args"]["model_max_length"] == 512


def _init_then_wait(ready):
    from pipeline.data.shards import _init_worker
    from pipeline.demo.tiny import tiny_text_side

    _init_worker(None, 1000, tiny_text_side(), 16, 512, True)
    ready.set()
    time.sleep(60)


def test_pool_workers_die_of_sigterm_whatever_handler_the_caller_installed():
    """The trainer builds the sample shards after installing its stop handlers (SIGTERM -> a flag). Forked pool
    workers inherited them, so Pool.terminate() (SIGTERM) could wait forever for workers that never died - it
    hung a CI run. A worker must die of SIGTERM whatever its parent does with it."""
    import multiprocessing as mp
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        p = ctx.Process(target=_init_then_wait, args=(ready,))
        p.start()
        assert ready.wait(60)
        p.terminate()
        p.join(10)
        alive = p.is_alive()
        if alive:
            p.kill()
            p.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not alive and p.exitcode == -signal.SIGTERM
