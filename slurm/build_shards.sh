#!/usr/bin/env bash
# Build WebDataset shards on one node with many worker processes:
#
#   sbatch --export=ALL,INPUT="/data/vflan/annotation_191-task_1k.json",IMAGE_ROOT=/data/vflan/images,\
#   OUTPUT=/data/vflan_shards slurm/build_shards.sh
#
# Why one task with --workers instead of a job array over record ranges: the builder's output must not depend on
# how the work is split (same shards, same order, same sha256 for the same input and seed) and an interrupted
# build must resume where it stopped. Both hold for one process pool (ordered results, atomic shard publish), and
# a job array would need a separate merge step that renumbers shards and re-derives the global duplicate-id and
# shuffle order. Throughput is bounded by image decoding: one 32-64-core node validates Vision-Flan's ~190k
# records in minutes (see docs/benchmarks.md for per-worker rates), far less than the training it feeds.
# If the node is preempted, resubmit the same command: completed shards are kept.
#
#SBATCH --job-name=m2pt-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32         # = --workers
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
##SBATCH --partition=cpu           # site specific
##SBATCH --account=myproject
#
# Environment knobs: INPUT (one or more, space-separated), IMAGE_ROOT, OUTPUT (required); MODEL (tokenizer used
# for --model_max_length, default the tiny model), MAX_LENGTH (2048), SAMPLES_PER_SHARD (1000), EXTRA_ARGS, PYTHON,
# M2PT_HOME.
set -euo pipefail
M2PT_HOME=${M2PT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$M2PT_HOME"
PYTHON=${PYTHON:-$M2PT_HOME/.venv/bin/python}
: "${INPUT:?set INPUT}" "${OUTPUT:?set OUTPUT}"
args=(--output "$OUTPUT" --workers "${SLURM_CPUS_PER_TASK:-8}" --samples_per_shard "${SAMPLES_PER_SHARD:-1000}"
      --model_max_length "${MAX_LENGTH:-2048}" --shuffle)
[ -n "${IMAGE_ROOT:-}" ] && args+=(--image_root "$IMAGE_ROOT")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
# shellcheck disable=SC2206
args+=(${EXTRA_ARGS:-})
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=1 "$PYTHON" -m data_prep.build_shards --input $INPUT "${args[@]}"
