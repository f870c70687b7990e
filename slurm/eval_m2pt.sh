#!/usr/bin/env bash
# Zero-shot evaluation of one or more adapters (and the un-tuned base) on every GPU of the allocation, any number of
# nodes: one rank per GPU, each answering its share of every task's questions (pipeline/evaluation/parallel.py).
#
#   sbatch -N 2 --gpus-per-node 8 --ntasks-per-node 8 --export=ALL,MODEL=/models/llava-1.5-7b-hf,\
#   ADAPTERS="runs/a/adapter runs/b/adapter",DATA_ROOT=/data/eval,OUTPUT_DIR=eval_out slurm/eval_m2pt.sh
#
# Sizing: keep --ntasks-per-node equal to --gpus-per-node. Time scales with questions / ranks: the eight tasks are
# about 62k questions per row; slurm/README.md has figures to size --time from. A job that reaches its time limit is
# requeued (same job id, same OUTPUT_DIR) and continues: every rank appends each batch's answers to its own file,
# and a re-run generates only what no file holds yet, whatever the rank count was before.
#
# Environment knobs: MODEL (or MODEL_LLM + MODEL_VISION + MM_PROJECTOR), ADAPTERS (space-separated), WITH_BASE
# (1: add the base row; default 1), TASKS (default all eight; "" for the embedded demo's), DATA_ROOT, OUTPUT_DIR (default eval_out/<job id>; keep
# it fixed when you resubmit), EVAL_ARGS (extra flags, e.g. "--batch_size 16 --judge_model
# /models/vicuna-13b-v1.5"), MASTER_ADDR / MASTER_PORT (default: first node, 20000 + job id mod 20000), PYTHON,
# M2PT_HOME. Layouts: pipeline/evaluation/datasets.py.
#
#SBATCH --job-name=m2pt-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8        # ranks per node: one per GPU (keep equal to --gpus-per-node)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120        # 2 min before the limit, signal this batch shell: it requeues the job
#SBATCH --requeue
#SBATCH --open-mode=append         # requeued runs append to the same log
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu           # site specific
##SBATCH --account=myproject
set -uo pipefail
M2PT_HOME=${M2PT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$M2PT_HOME" || { echo "M2PT_HOME=$M2PT_HOME: no such directory" >&2; exit 2; }
PYTHON=${PYTHON:-$M2PT_HOME/.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-eval_out/$SLURM_JOB_ID}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Each srun task takes its rank from SLURM_PROCID (pipeline/training/dist.py); a RANK / WORLD_SIZE exported from the
# submitting shell would make every task "rank 0 of 1".
unset RANK WORLD_SIZE LOCAL_RANK
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

args=(--output_dir "$OUTPUT_DIR")
TASKS=${TASKS-mme,pope,textvqa,vsr,snli_ve,cifar10,cifar100,mnist}  # TASKS="": the embedded demo's held-out tasks
[ -n "$TASKS" ] && args+=(--tasks "$TASKS")
[ -n "${DATA_ROOT:-}" ] && args+=(--data_root "$DATA_ROOT")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${MODEL_LLM:-}" ] && args+=(--model_llm "$MODEL_LLM" --model_vision "$MODEL_VISION" --mm_projector "$MM_PROJECTOR")
# shellcheck disable=SC2206
[ -n "${ADAPTERS:-}" ] && args+=(--adapter $ADAPTERS)
[ "${WITH_BASE:-1}" = 1 ] && args+=(--with_base)
# shellcheck disable=SC2206
args+=(${EVAL_ARGS:-})

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} rank(s), output $OUTPUT_DIR"
srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" -m pipeline.evaluate "${args[@]}" &
srun_pid=$!

# At the time limit (--signal=B:USR1) or on `scancel --signal=USR1 --batch`: requeue. Slurm then stops this run
# (the answers of finished batches are on disk) and starts the job again, which continues where it stopped.
requeue() {
  echo "[$(date -Is)] got USR1: requeueing job $SLURM_JOB_ID (the evaluation continues from its stored answers)"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1
while :; do
  wait "$srun_pid"
  rc=$?
  [ "$rc" -le 128 ] && break
  kill -0 "$srun_pid" 2>/dev/null || { wait "$srun_pid"; rc=$?; break; }
done
echo "[$(date -Is)] evaluation exit status $rc"
exit "$rc"
