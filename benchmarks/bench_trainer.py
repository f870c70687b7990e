"""The whole trainer, as a user runs it, against its benchmarked step and the frozen floor at the real shape.

    .venv/bin/python benchmarks/bench_trainer.py [--rounds 3] [--steps 8] [--threads 2] [--work /tmp/m2pt-bench-trainer]

`benchmarks/bench_step.py` times one engine step on a fixed batch. This runs the whole app (`deepspeed
pipeline/train.py`: the loader's worker process decoding JPEGs, the chat template, collation, metrics, the bar) on
the same model and the same batch shape, so the two can be compared and the difference found:

1. parts (built once into --work): bench_step's `real` model from its seed, saved as LLaVA-v1 parts - an LLM folder
   (Vicuna-7B width, 2 layers, 32,000 vocabulary; the embedded tokenizer, whose ids are a subset), a CLIP-L vision
   folder (2 layers, 224 px) and a stage-1 `mm_projector.bin` (LLaVA-v1's linear projector) - so the weights are
   bench_step's exactly;
2. data (built once): image-instruction records, each a 500x375 JPEG and a conversation that the trainer's template
   turns into exactly bench_step's row - 137 text tokens, 56 of them supervised, plus the image's 266 visual tokens
   (256 patches + 10 visual prompts, the default `official` mode) - sharded by `data_prep.build_shards`;
3. rounds, interleaved (the order alternates): one whole-trainer run of --steps steps (batch 2, --logging_steps 1,
   no checkpoints until the final one), and --steps steps each of bench_step's `trainer` and `floor` variants
   (their worker processes are built once and kept).

The trainer's CPU-seconds are its whole process tree's (launcher, rank, loader worker), read with psutil when the
metrics lines of step 2 and of the last step appear (the file is polled 4 times a second, so as not to take the cores
from the run): the first two steps are warm-up. Reported: medians per variant, ratios to the floor (CPU-seconds,
which load moves less than wall time), the per-round ratios, and the loader worker's CPU-seconds per step.

`--profile`: one whole-trainer run under py-spy (sampling, the run not paused; requirements.txt installs it) and
where the rank's main thread spends each step: forward, backward, optimizer, data, the metrics line, the bar.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_step  # noqa: E402  (the sibling benchmark: its model, batch shape and step variants)

RECORDS, TEXT_TOKENS, SUPERVISED = 64, bench_step.TEXT_TOKENS, bench_step.ANSWER_TOKENS
WORDS = ("cat", "dog", "red", "blue", "the", "a", "big", "small", "is", "on", "in", "of", "and", "it", "to", "one")


def make_parts(work: Path) -> dict[str, Path]:
    """bench_step's `real` model (seed 0) saved as LLaVA-v1 parts; built once."""
    parts = {"llm": work / "llm", "vision": work / "clip", "projector": work / "mm_projector.bin"}
    if parts["projector"].is_file():
        return parts
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.demo.tiny import tiny_tokenizer

    model = bench_step.build("real", "floor", torch.device("cpu"), torch.float32, "sdpa")
    tok = tiny_tokenizer()
    text_cfg = model.config.text_config
    text_cfg.bos_token_id, text_cfg.eos_token_id, text_cfg.pad_token_id = (tok.bos_token_id, tok.eos_token_id,
                                                                           tok.pad_token_id)
    text_cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        lm = LlamaForCausalLM(text_cfg)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    lm.save_pretrained(parts["llm"])
    tok.save_pretrained(parts["llm"])
    model.model.vision_tower.save_pretrained(parts["vision"])
    proj = model.model.multi_modal_projector  # bench_step's v1 Linear
    torch.save({"model.mm_projector.weight": proj.weight.detach().clone(),
                "model.mm_projector.bias": proj.bias.detach().clone()}, parts["projector"])
    return parts


def _fill(count, target: int, start: list[str]) -> list[str]:
    """Words appended to `start` until count(words) == target (every word in WORDS is tried at each position)."""
    words = list(start)
    while count(words) < target:
        for w in WORDS:
            if count(words + [w]) <= target:
                words.append(w)
                break
        else:
            raise RuntimeError(f"no word fits: {count(words)} of {target} tokens")
    return words


def make_data(work: Path, parts: dict[str, Path], visual_tokens: int) -> Path:
    """Records whose encoded rows have exactly bench_step's shape, with JPEG images, sharded by the shard builder."""
    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from pipeline.core.chat import VicunaTemplate

    tok = AutoTokenizer.from_pretrained(str(parts["llm"]))
    template = VicunaTemplate(tok, tok.convert_tokens_to_ids("<image>"), visual_tokens)

    def encode(question: list[str], answer: list[str]):
        return template.encode([{"from": "human", "value": "<image>\n" + " ".join(question)},
                                {"from": "gpt", "value": " ".join(answer)}])

    # One question and answer for every record: a step's cost depends on the lengths, not on which tokens they are
    # (the loss falls fast on such data, which changes no FLOP).
    answer = _fill(lambda a: encode(["what"], a).num_supervised, SUPERVISED, [])
    question = _fill(lambda q: len(encode(q, answer).input_ids) - visual_tokens, TEXT_TOKENS, ["what"])
    enc = encode(question, answer)
    assert (len(enc.input_ids) - visual_tokens, enc.num_supervised) == (TEXT_TOKENS, SUPERVISED)
    (work / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(RECORDS):
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # a blocky picture, JPEG-sized like a photo
        Image.fromarray(small).resize((500, 375)).save(work / "images" / f"{i:04d}.jpg", quality=90)
        records.append({"id": f"bench-{i:04d}", "image": f"{i:04d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + " ".join(question)}, {"from": "gpt", "value": " ".join(answer)}]})
    (work / "records.json").write_text(json.dumps(records))
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", str(work / "records.json"),
                    "--image_root", str(work / "images"), "--output", str(shards), "--image_tokens",
                    str(visual_tokens), "--quiet", "True"], check=True, cwd=REPO)
    return shards


def tree_cpu(proc) -> tuple[float, float]:
    """CPU-seconds of a process and its descendants: (all, the loader workers'). A DataLoader worker is forked by
    the rank, so it is the descendant whose command line is its parent's."""
    import psutil

    total = loader = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            forked = p.cmdline() == p.parent().cmdline()
        except (psutil.NoSuchProcess, AttributeError):
            continue
        total += t.user + t.system
        loader += (t.user + t.system) if forked else 0.0
    return total, loader


def trainer_cmd(parts: dict[str, Path], shards: Path, out: Path, steps: int, threads: int,
                logging_steps: int) -> list[str]:
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", str(REPO / "pipeline" / "train.py"),
            "--model_llm", str(parts["llm"]), "--model_vision", str(parts["vision"]), "--mm_projector",
            str(parts["projector"]), "--train_shards", str(shards), "--per_device_train_batch_size",
            str(bench_step.BATCH), "--max_steps", str(steps), "--logging_steps", str(logging_steps), "--save_steps",
            "0", "--report_to", "none", "--num_threads", str(threads), "--output_dir", str(out)]


def run_trainer(parts: dict[str, Path], shards: Path, out: Path, steps: int, threads: int) -> list[tuple]:
    """One whole-trainer run: (wall, CPU-s of the tree, CPU-s of the loader workers) per step from step 3 on, the
    same mean for each (a step is not timed alone: the metrics file is polled 4 times a second, so as not to take
    the cores from the run, and the marks' lateness cancels out over the run)."""
    import shutil

    import psutil

    shutil.rmtree(out, ignore_errors=True)  # a previous run's metrics.jsonl must not be read as this one's
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(trainer_cmd(parts, shards, out, steps, threads, logging_steps=1), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")))
    ps, metrics, marks = psutil.Process(proc.pid), out / "metrics.jsonl", []
    while proc.poll() is None and (not marks or marks[-1][0] < steps):
        done = metrics.read_text().count('"loss"') if metrics.is_file() else 0
        if done >= 2 and done > (marks[-1][0] if marks else 0):  # the first two steps are warm-up
            marks.append((done, time.perf_counter(), *tree_cpu(ps)))
        time.sleep(0.25)
    if proc.wait() != 0:
        raise RuntimeError(f"the trainer failed (rc {proc.returncode}); see {out.with_suffix('.log')}")
    first, last = marks[0], marks[-1]
    n = last[0] - first[0]
    if n < 1:
        raise RuntimeError(f"too few steps timed ({[m[0] for m in marks]}): raise --steps")
    return [tuple((b - a) / n for a, b in zip(first[1:], last[1:]))] * n


# Where a run's main thread is, by the first project or library call under the loop (py-spy's raw stacks).
PHASES = {"token_loss": "forward (core/step.token_loss)", "vision_keepalive": "forward (core/step.token_loss)",
          "DeepSpeedEngine.backward": "backward (engine.backward: autograd + ZeRO-2 gradient reduction)",
          "DeepSpeedEngine.step": "optimizer (engine.step: clipping, AdamW, ZeRO-2 copy-back)",
          "all_reduce": "the step's token count (all-reduce)", "_BaseDataLoaderIter.__next__": "data (next batch)",
          "log_window": "metrics line (--logging_steps)", "tqdm.update": "progress bar", "any_rank": "stop check",
          "StopFlag.poll": "stop check", "TrainingProgress.consumed": "bookkeeping", "batch_flops": "bookkeeping",
          "train_step.<locals>.<genexpr>": "the step's token count (all-reduce)",
          "Checkpointer.save": "checkpoint"}
WRAPPERS = ("instrument_w_nvtx.<locals>.wrapped_fn", "Module._wrapped_call_impl", "Module._call_impl",
            "train_loop.<locals>.<listcomp>", "timed_op.<locals>.log_wrapper", "train_step")


def phases(raw: Path, rate: int) -> dict:
    """py-spy raw stacks -> seconds per phase inside train_loop, for the rank's main thread (idle samples included:
    waiting for a batch is part of a step's wall time). Start-up is not reported: py-spy holds each new process
    (the loader's worker) while it attaches, a minute here, so only the loop's figures are the run's own."""
    inside = {}
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        t = next((k for k, f in enumerate(frames) if f.startswith("thread (")), None)
        if t is None or "--local_rank=" not in frames[t - 1] or "MainThread" not in frames[t]:
            continue
        names = [f.split(" (")[0] for f in frames[t + 1:]]
        if "train_loop" not in names:
            continue
        under = [x for x in names[names.index("train_loop") + 1:] if x not in WRAPPERS]
        key = PHASES.get(under[0], f"other ({under[0]})") if under else "train_loop itself"
        inside[key] = inside.get(key, 0.0) + int(n) / rate
    return inside


def profile(parts: dict[str, Path], shards: Path, work: Path, steps: int, threads: int, rate: int = 50) -> str:
    """One whole-trainer run under py-spy (sampling, the run not paused): where each step's wall time goes."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = work / "profile.txt"
    shutil.rmtree(work / "profile", ignore_errors=True)
    cmd = [spy, "record", "--subprocesses", "--idle", "--threads", "--nonblocking", "--rate", str(rate),
           "--format", "raw", "-o", str(raw), "--", *trainer_cmd(parts, shards, work / "profile", steps, threads,
                                                                 logging_steps=10)]
    with open(work / "profile.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")))
    inside = phases(raw, rate)
    total = sum(inside.values())
    lines = [f"`benchmarks/bench_trainer.py --profile --steps {steps} --threads {threads}`: the rank's main thread in "
             f"the training loop, {steps} steps ({total:.1f} s, {total / steps:.2f} s/step; py-spy at {rate} Hz), on "
             f"{bench_step.machine()}", "", "| phase | s/step | share of the loop |", "|---|---|---|"]
    lines += [f"| {k} | {v / steps:.3f} | {100 * v / total:.1f} % |"
              for k, v in sorted(inside.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def start_step_workers(variants: list[str], threads: int) -> dict:
    import multiprocessing as mp

    ctx, conns = mp.get_context("spawn"), {}
    for v in variants:  # one at a time, as bench_step does (peak memory)
        parent, child = ctx.Pipe()
        ctx.Process(target=bench_step.worker, args=("real", v, threads, "cpu", child), daemon=True).start()
        child.close()
        conns[v] = parent
        parent.recv()
        print(f"{v}: built and warmed up", file=sys.stderr)
    return conns


def step_times(conn, steps: int) -> list[tuple]:
    out = []
    for _ in range(steps):
        conn.send("step")
        wall, cpu, _parts = conn.recv()
        out.append((wall, cpu, 0.0))
    return out


def table(times: dict, rounds: list[dict], args, load: tuple) -> str:
    med = {v: [statistics.median(t[i] for t in ts) for i in range(3)] for v, ts in times.items()}
    floor = med["floor"][1]
    lines = [f"`benchmarks/bench_trainer.py --rounds {args.rounds} --steps {args.steps} --threads {args.threads}` on "
             f"{bench_step.machine()}; 1-min load {load[0]:.2f} before, {load[1]:.2f} after", "",
             "| variant | steps | wall s/step (median) | CPU-s/step (median) | vs floor (CPU-s) | loader workers' "
             "CPU-s/step | per-round CPU-s ratio to the floor |", "|---|---|---|---|---|---|---|"]
    for v, (wall, cpu, loader) in med.items():
        cpu_med = [statistics.median(t[1] for t in r[v]) / statistics.median(t[1] for t in r["floor"]) for r in rounds]
        per_round = ", ".join(f"{x:.3f}" for x in cpu_med)
        lines.append(f"| {v} | {len(times[v])} | {wall:.3f} | {cpu:.3f} | {cpu / floor:.3f}x | {loader:.3f} | "
                     f"{per_round} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one trainer run per round)")
    ap.add_argument("--steps", type=int, default=8, help="steps per trainer run (the first two are warm-up) and "
                                                         "per step variant in each round")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the rank and of each step variant")
    ap.add_argument("--work", type=Path, default=Path("/tmp/m2pt-bench-trainer"),
                    help="folder for the parts, the data and the runs (kept: a second run reuses the parts)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one trainer run of --steps steps under py-spy, and where its steps' time goes")
    ap.add_argument("--append", default=None, help="also append the markdown table to this file")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = make_parts(args.work)
    shards = make_data(args.work, parts, visual_tokens=266)
    if args.profile:
        return report(profile(parts, shards, args.work, args.steps, args.threads), args.append)
    conns = start_step_workers(["trainer", "floor"], args.threads)
    load0 = os.getloadavg()
    times, rounds = {"whole trainer": [], "trainer": [], "floor": []}, []
    for r in range(args.rounds):
        this = {}
        order = ["whole trainer", "trainer", "floor"]
        for v in (order if r % 2 == 0 else order[::-1]):
            this[v] = (run_trainer(parts, shards, args.work / f"run{r}", args.steps, args.threads)
                       if v == "whole trainer" else step_times(conns[v], args.steps))
            times[v] += this[v]
        rounds.append(this)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {statistics.median(t[1] for t in this[v]):.2f} cpu-s" for v in order), file=sys.stderr)
    for c in conns.values():
        c.send("stop")
        c.recv()
    return report(table(times, rounds, args, (load0[0], os.getloadavg()[0])), args.append)


def report(text: str, append: str | None) -> int:
    print(text)
    if append:
        with open(append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
