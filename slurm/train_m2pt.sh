#!/usr/bin/env bash
# M²PT training on N nodes x G GPUs under Slurm. Submit from the repository root:
#
#   sbatch slurm/train_m2pt.sh                                           # the defaults below
#   sbatch -N 4 --gpus-per-node 8 --ntasks-per-node 8 -p gpu -A myproj --time 48:00:00 \
#          --export=ALL,TRAIN_SHARDS=/data/vflan_shards,MODEL=/models/llava-1.5-7b-hf,OUTPUT_DIR=runs/m2pt \
#          slurm/train_m2pt.sh
#
# Every knob is an #SBATCH default (override on the sbatch command line) or an environment variable (override
# with --export or by exporting it before sbatch). Nothing in this file needs editing for a new site; see
# slurm/README.md.
#
# ---------------------------------------------------------------------------------------------- resources
#SBATCH --job-name=m2pt
#SBATCH --nodes=2                  # nodes
#SBATCH --ntasks-per-node=8        # ranks per node: one per GPU (keep equal to --gpus-per-node)
#SBATCH --gpus-per-node=8          # GPUs per node (CPU-only clusters: --gpus-per-node=0)
#SBATCH --cpus-per-task=8          # CPU cores per rank: data-loader workers + the rank itself
#SBATCH --time=24:00:00            # wall-clock limit of one run (must exceed the 600 s signal grace below)
#SBATCH --signal=B:USR1@600        # 10 min before the limit, signal this batch shell ("B:"), which forwards it
#SBATCH --requeue                  # allow `scontrol requeue`: the next run resumes from the last checkpoint
#SBATCH --open-mode=append         # requeued runs append to the same log
#SBATCH --output=%x-%j.out         # log: <job-name>-<job-id>.out in the submit directory
##SBATCH --partition=gpu           # site specific: uncomment, or pass -p / -A on the sbatch line
##SBATCH --account=myproject
#
# ----------------------------------------------------------------------------------- environment knobs
#   M2PT_HOME      repository root (default: the submit directory)
#   PYTHON         interpreter with the project installed (default: $M2PT_HOME/.venv/bin/python)
#   TRAIN_SHARDS   shard folder / pattern (default: the embedded sample set)
#   MODEL          HF llava folder (default: the embedded tiny model); or MODEL_LLM + MODEL_VISION + MM_PROJECTOR
#   OUTPUT_DIR     checkpoints, logs and adapter (default: runs/<job-name>-<job-id>; keep it fixed across requeues)
#   DS_CONFIG      DeepSpeed config (default: CONFIG's, else the trainer's: ds_configs/zero2.json)
#   CONFIG         a --config file of trainer flags (YAML/JSON; every run writes its own as OUTPUT/train_config.yaml);
#                  the variables here and TRAIN_ARGS override it
#   TRAIN_ARGS     extra trainer flags, e.g. "--bf16 --per_device_train_batch_size 8 --num_train_epochs 3"
#   MASTER_ADDR    rendezvous host (default: the first node of the allocation)
#   MASTER_PORT    rendezvous port (default: 20000 + job id mod 20000, so concurrent jobs do not collide)
#   NCCL knobs     export them before sbatch if your site needs them, e.g. NCCL_SOCKET_IFNAME=ib0,
#                  NCCL_IB_HCA=mlx5, NCCL_DEBUG=WARN. On CPU-only nodes gloo is used: GLOO_SOCKET_IFNAME=eth0.
#
# Exit status: 0 = finished, or stopped at the time limit and requeued (the next run resumes);
#              anything else = the trainer failed (no requeue: read the log).
set -uo pipefail

M2PT_HOME=${M2PT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$M2PT_HOME" || { echo "M2PT_HOME=$M2PT_HOME: no such directory" >&2; exit 2; }
PYTHON=${PYTHON:-$M2PT_HOME/.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-m2pt}-${SLURM_JOB_ID}}

# Rendezvous from the allocation. A port derived from the job id lets several jobs share a head node.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Each srun task takes its rank from SLURM_PROCID (pipeline/training/dist.py); a RANK / WORLD_SIZE exported from the
# submitting shell (sbatch --export=ALL) would make every task "rank 0 of 1".
unset RANK WORLD_SIZE LOCAL_RANK
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The accelerator is chosen at run time by DeepSpeed (CUDA with NCCL on GPU nodes, CPU with gloo elsewhere), so
# this exact file also runs on the CPU-only test cluster in tests/training/test_slurm.py.

args=()
[ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
[ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed "$DS_CONFIG")
args+=(--output_dir "$OUTPUT_DIR" --resume auto)
[ -n "${TRAIN_SHARDS:-}" ] && args+=(--train_shards "$TRAIN_SHARDS")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${MODEL_LLM:-}" ] && args+=(--model_llm "$MODEL_LLM" --model_vision "$MODEL_VISION" --mm_projector "$MM_PROJECTOR")
# shellcheck disable=SC2206  # TRAIN_ARGS is a flag list, split on purpose
args+=(${TRAIN_ARGS:-})

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s) x" \
     "${SLURM_NTASKS_PER_NODE:-?} rank(s), head $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"

# Why srun starts the ranks itself (one task per GPU) instead of one torchrun / `deepspeed --no_ssh` per node:
# srun *is* a per-node launcher (slurmstepd spawns the node's ranks), and it is the only one that does all three
# things this script relies on: it forwards USR1/TERM to every rank on every node (torchrun turns a forwarded
# signal into a shutdown with a kill timeout and a non-zero exit; `deepspeed` does not forward USR1),
# --kill-on-bad-exit=1 ends every rank as soon as one fails (no rank left hanging in a collective), and the
# ranks read RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (pipeline/training/dist.py).
srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" pipeline/train.py "${args[@]}" &
srun_pid=$!

# --signal=B:USR1 reaches only this shell: forward it. The trainer sets a flag, all ranks agree at the next step
# boundary, write a complete checkpoint and exit 0. A handler must not do more than forward (bash runs it
# between commands; `wait` returns early with status > 128 when it does, hence the loop).
forward() { echo "[$(date -Is)] got $1: forwarding to the ranks"; kill -s "$1" "$srun_pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while :; do
  wait "$srun_pid"
  rc=$?
  [ "$rc" -le 128 ] && break                                      # srun's own exit status
  kill -0 "$srun_pid" 2>/dev/null || { wait "$srun_pid"; rc=$?; break; }  # it ended as the trap ran
done

state=$(cat "$OUTPUT_DIR/run_state.json" 2>/dev/null || echo '{}')
echo "[$(date -Is)] trainer exit status $rc, state $state"
if [ "$rc" -eq 0 ] && [[ "$state" == *'"stopped"'* ]]; then
  echo "[$(date -Is)] unfinished: requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
