#!/usr/bin/env bash
# The GPU checks of issue 6, as one script for a short lease of a GPU machine (see README, "Results so far").
# In order of what matters most, each under its own time limit, each skipped when the budget (BUDGET
# seconds, default 540) has no room left for it:
#  1. MFU of the Flamingo step at the small preset in bf16, batch 512, waiting for the device once a step as
#     train.py does (--overlap), with a device-time profile of one step by kernel class and the lines
#     where the host waited for the GPU (--sync-debug);
#  2. the same step with rows padded as before session 20 (--no-pack): packing (train.py's default since) was
#     measured on a CPU only, and on a GPU its per-row ALiBi masks (B', nh, L, L) cost memory traffic;
#  3. each attention call of that step timed with every SDPA kernel (benchmarks/short_attention.py), then
#     the whole demo pipeline in its quick form on the GPU (SKIP_DEMO=1 skips the demo);
#  4. the same step with each block compiled (--compile regions), profiled;
#  5. the eager step with flash attention left out: it runs only the short-key attentions of the resampler
#     and the grouped cross-attention (the LM's ALiBi bias rules it out there), and the third lease saw its
#     backward take 2.9 ms a call, 40 ms of a 301-ms step;
#  6. the eager step at batch 1024.
# Logs go to ${OUT:-runs/gpu_check}. A dry run on a CPU: PRESET=tiny BATCH=4 BUDGET=900 bash benchmarks/gpu_check.sh
set -u
out=${OUT:-runs/gpu_check}; mkdir -p "$out"
preset=${PRESET:-small}; batch=${BATCH:-512}
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
export PYTHONUNBUFFERED=1
room() {  # seconds needed: is there room before the deadline?
  if (( $(date +%s) + $1 > deadline )); then echo "-- skipped $2: $(( deadline - $(date +%s) )) s left"; return 1; fi
}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") \
  | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"
bench() {  # name, time limit, arguments
  local name=$1 limit=$2; shift 2
  room "$limit" "$name" || return 0
  local t0; t0=$(date +%s)
  TORCH_LOGS=recompiles timeout "$limit" python3 benchmarks/train_throughput.py --preset "$preset" --threads 0 \
    --batch-size "$batch" "$@" > "$out/$name.txt" 2>&1
  echo "-- $name (rc $?, $(( $(date +%s) - t0 )) s)"
  grep -E "^(== |params|step |tokens/s|one step|by class|host waits|torch\.|.*Recompil)" "$out/$name.txt" | cut -c1-400
}
bench eager_overlap 110 --steps 6 --warmup 2 --overlap --profile --sync-debug
bench eager_padded 80 --steps 6 --warmup 2 --overlap --no-pack
# Each attention call of that step, forward + backward, with every SDPA kernel and as explicit matmuls.
if room 90 "short_attention"; then
  t0=$(date +%s)
  timeout 90 python3 benchmarks/short_attention.py --preset "$preset" --batch-size "$batch" --threads 0 \
    > "$out/short_attention.txt" 2>&1
  echo "-- short_attention (rc $?, $(( $(date +%s) - t0 )) s)"; cut -c1-220 "$out/short_attention.txt"
fi

if [ -z "${SKIP_DEMO:-}" ] && room 150 "demo --quick"; then
  t0=$(date +%s)
  timeout 150 python3 -m miniflamingo demo --quick --run "$out/demo_quick" > "$out/demo_quick.txt" 2>&1
  echo "-- demo --quick (rc $?, $(( $(date +%s) - t0 )) s)"; tail -n 30 "$out/demo_quick.txt"
fi
rm -rf "$out"/demo_quick  # checkpoints: only the logs come back
# No torchrun check: on one GPU torchrun runs one process, world size 1, which trains without a process
# group (plain `train`); DDP, FSDP and nccl need two GPUs. The 2-process gloo tests cover them on a CPU.

# A cold machine compiled the blocks for more than 120 s (second lease, 2026-11-27): room for it.
bench regions_overlap 220 --steps 6 --warmup 3 --overlap --compile regions --profile
bench eager_no_flash 90 --steps 6 --warmup 2 --overlap --profile --sdpa efficient_attention,math
batch=$(( 2 * batch )); bench eager_overlap_2x 120 --steps 4 --warmup 2 --overlap
echo "-- done, $(( deadline - $(date +%s) )) s of the budget left"
