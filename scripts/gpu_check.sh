#!/usr/bin/env bash
# The prepared GPU check: what only a GPU shows, in under 8 minutes on one H200 (docs/benchmarks.md, "GPU").
#
#   here, once:   bash scripts/fetch_gpu_wheels.sh          # .whl/ (ignored by git): the pins the GPU image lacks
#   on the GPU:   bash scripts/gpu_check.sh                 # device tool: carry [".whl"], timeout_s 600
#
# 1. installs the carried wheels into /tmp/site (the image has torch with CUDA but no DeepSpeed or WebDataset);
# 2. the CUDA-marked tests (tests/training/test_cuda.py): bf16 training through DeepSpeed on CUDA against the CPU fp32 run,
#    and which SDPA kernel a prompted, padded batch gets;
# 3. benchmarks/bench_step.py --shape 7b: the real trainer's step (CLIP-L/336 + Vicuna-7B shapes, bf16, random
#    weights) against the stock frozen floor, with model TFLOP/s, MFU and peak memory;
# 4. greedy evaluation answers at batch 1 vs 16 in bf16 (how many differ);
# 5. benchmarks/bench_serve_real.py --shape 7b: 16 clients over 1 and 16 M2PT adapters on a random-weight 7B in bf16,
#    mixed batching vs one adapter per batch vs alone (the regime S-LoRA and Punica measure);
# 6. summary.json + summary.md under $OUT (the device tool brings $OUT back; elsewhere out/gpu_check/).
# Every step has its own timeout; they add up to 590 s, under the device tool's 600 s per call (timeout_s 600).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"  # a GPU machine that has the pins already (this repo's .venv on a cluster node)
fi
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export M2PT_GPU_REPORT="$OUT/findings.json" TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
rm -f "$M2PT_GPU_REPORT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, deepspeed, webdataset, sys; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed', \
deepspeed.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
t0=$(date +%s)
timeout 220 $PY -m pytest -q -m cuda -p no:cacheprovider tests/training/test_cuda.py 2>&1 | tee "$OUT/pytest.log"
t1=$(date +%s)
timeout 160 $PY benchmarks/bench_step.py --shape 7b --rounds 3 --variants project,floor --device cuda \
  --append "$OUT/bench_7b.md" 2>&1 | tee "$OUT/bench.log"
t2=$(date +%s)
# 4. Greedy answers at batch 1 vs 16 in bf16 on CUDA (the embedded base, 800 held-out questions): the share that
#    batched kernels' rounding changes (fp32 on CPU: none).
for b in 1 16; do
  timeout 50 $PY -m pipeline.evaluate --device cuda --dtype bfloat16 --batch_size "$b" --no_majority_baseline \
    --output_dir "$OUT/eval_b$b" > "$OUT/eval_b$b.log" 2>&1
done
$PY - "$OUT" <<'PY' | tee "$OUT/eval_batch.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
try:
    a, b = ((out / f"eval_b{n}" / "base" / "predictions.jsonl").read_text().splitlines() for n in (1, 16))
    diff = sum(json.loads(x)["prediction"] != json.loads(y)["prediction"] for x, y in zip(a, b))
    print(json.dumps({"eval_bf16_batch1_vs_16": {"questions": len(a), "differing": diff}}))
except OSError as e:
    print(json.dumps({"eval_bf16_batch1_vs_16": {"error": str(e)}}))
PY
t3=$(date +%s)
timeout 110 $PY benchmarks/bench_serve_real.py --shape 7b --device cuda --adapters 1,16 --mix decode,image \
  --requests 2 --append "$OUT/serve_7b.md" 2>&1 | tee "$OUT/serve.log"
t4=$(date +%s)
echo "{\"tests_seconds\": $((t1 - t0)), \"bench_seconds\": $((t2 - t1)), \"eval_seconds\": $((t3 - t2)), \
\"serve_seconds\": $((t4 - t3))}" > "$OUT/timing.json"
$PY scripts/gpu_summary.py "$OUT"
