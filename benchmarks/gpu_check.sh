#!/usr/bin/env bash
# The GPU checks of issue 6, as one script for a short lease of a GPU machine (see README, Performance):
# MFU of the Flamingo step at the small preset in bf16 over batch sizes, eager and compiled, then the
# whole demo pipeline in its quick form on the GPU. Logs go to ${OUT:-runs/gpu_check}.
set -u
out=${OUT:-runs/gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
for b in 16 64 256; do
  timeout $((b < 256 ? 90 : 120)) python3 benchmarks/train_throughput.py --preset small --batch-size "$b" --steps 8 --warmup 2 \
    --threads 0 2>&1 | tee "$out/small_b$b.txt"
done
timeout 150 python3 benchmarks/train_throughput.py --preset small --batch-size 256 --steps 8 --warmup 3 \
  --threads 0 --compile 2>&1 | tail -n 6 | tee "$out/small_b256_compiled.txt"
timeout 100 python3 -m miniflamingo demo --quick --run "$out/demo_quick" 2>&1 | tail -n 40 | tee "$out/demo_quick.txt"
rm -rf "$out/demo_quick"
