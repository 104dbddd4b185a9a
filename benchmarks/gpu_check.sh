#!/usr/bin/env bash
# The GPU checks of issue 6, as one script for a short lease of a GPU machine (see README, "Results so far"):
# MFU of the Flamingo step at the small preset in bf16 at batch 512: eager, eager with the host queueing
# ahead (--overlap) and with each block compiled (--compile regions), with device-time profiles of one
# step; then the whole demo pipeline in its quick form on the GPU. About 8 minutes on a machine that has
# not compiled before.
# Logs go to ${OUT:-runs/gpu_check}.
set -u
out=${OUT:-runs/gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
bench() {  # name, timeout, arguments
  local name=$1 limit=$2; shift 2
  TORCH_LOGS=recompiles timeout "$limit" python3 benchmarks/train_throughput.py --preset small --threads 0 "$@" \
    > "$out/$name.txt" 2>&1
  echo "-- $name (rc $?)"; grep -E "^(== |params|step |tokens/s|device time)" "$out/$name.txt"
}
bench eager_b512 100 --batch-size 512 --steps 6 --warmup 2 --profile
# The same, waiting for the device once a step as train.py does (no device reads inside its loop).
bench overlap_b512 100 --batch-size 512 --steps 6 --warmup 2 --overlap
# A cold machine compiled the blocks for more than 120 s (second lease, 2026-11-27): room for it.
bench regions_b512 220 --batch-size 512 --steps 6 --warmup 3 --compile regions --profile
timeout 100 python3 -m miniflamingo demo --quick --run "$out/demo_quick" > "$out/demo_quick.txt" 2>&1
echo "-- demo --quick (rc $?)"; tail -n 25 "$out/demo_quick.txt"
rm -rf "$out/demo_quick"
