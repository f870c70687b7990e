#!/usr/bin/env bash
# Zero-shot evaluation of one or more adapters (and the un-tuned base) on one GPU:
#
#   sbatch --export=ALL,MODEL=/models/llava-1.5-7b-hf,ADAPTERS="runs/a/adapter runs/b/adapter",\
#   DATA_ROOT=/data/eval,OUTPUT_DIR=eval_out slurm/eval_m2pt.sh
#
# Environment knobs: MODEL (or MODEL_LLM + MODEL_VISION + MM_PROJECTOR), ADAPTERS (space-separated), WITH_BASE
# (1: add the base row; default 1), TASKS (default all eight), DATA_ROOT, OUTPUT_DIR, EVAL_ARGS (extra flags, e.g.
# "--temperature 0.2 --judge_model /models/vicuna-13b-v1.5"), PYTHON, M2PT_HOME. Layouts: pipeline/evaluation/datasets.py.
#
#SBATCH --job-name=m2pt-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu           # site specific
##SBATCH --account=myproject
set -euo pipefail
M2PT_HOME=${M2PT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$M2PT_HOME"
PYTHON=${PYTHON:-$M2PT_HOME/.venv/bin/python}
args=(--tasks "${TASKS:-mme,pope,textvqa,vsr,snli_ve,cifar10,cifar100,mnist}" --output_dir "${OUTPUT_DIR:-eval_out/$SLURM_JOB_ID}")
[ -n "${DATA_ROOT:-}" ] && args+=(--data_root "$DATA_ROOT")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${MODEL_LLM:-}" ] && args+=(--model_llm "$MODEL_LLM" --model_vision "$MODEL_VISION" --mm_projector "$MM_PROJECTOR")
# shellcheck disable=SC2206
[ -n "${ADAPTERS:-}" ] && args+=(--adapter $ADAPTERS)
[ "${WITH_BASE:-1}" = 1 ] && args+=(--with_base)
# shellcheck disable=SC2206
args+=(${EVAL_ARGS:-})
exec srun "$PYTHON" -m pipeline.evaluate "${args[@]}"
