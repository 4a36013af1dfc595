#!/usr/bin/env bash
# The speed benchmarks on a GPU, as one prepared run of at most 8 minutes on one GPU (the two
# benchmarks run under timeouts of 270 s and 210 s):
# a random-weight model of Qwen2-VL-2B's real shapes (`vlmtune model tiny --size 2b`, no download),
# then the DPO benchmark (2b-448: 448 px images, 8 pairs per step) and the GRPO benchmark
# (2b-g16: 8 prompts x G 16, 40 new tokens), TRL 1.16 beside ours, bf16 autocast, sdpa attention
# (transformers' default), one run per path. The tables go to stdout and to $OUT (default gpu-tables/).
#
#   bash benchmarks/gpu.sh              # from the repository root, with vlmtune and TRL installed
#
# Where no CUDA device is seen it says so and exits 0: nothing is run.
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-gpu-tables}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device seen: the GPU benchmarks are skipped"
  exit 0
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -m vlmtune --version | tee -a "$OUT/device.txt"
# Each benchmark builds its own copy of the 2B model (~9 GB in fp32) in a temporary folder, inside its timeout.
timeout 270 "$PY" benchmarks/dpo_speed.py --device cuda --precision bf16 --configs 2b-448 --repeats 1 | tee "$OUT/dpo.txt"
timeout 210 "$PY" benchmarks/grpo_speed.py --device cuda --precision bf16 --configs 2b-g16 --repeats 1 | tee "$OUT/grpo.txt"
