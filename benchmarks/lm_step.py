"""The LM stage's training step: its time, where the time goes, and how fast its matmuls run against
this machine's matmul peak (issue 6: is the demo's LM stage slow for want of a faster kernel?).

    python benchmarks/lm_step.py                      # tiny preset, the demo's batch (32 x 128), 1 thread
    python benchmarks/lm_step.py --threads 2 --steps 20

The step is pretrain_lm's: a batch of the world's LM documents with their image slots
(lm_corpus.get_batch and forward), backward, gradient clip 1.0, AdamW. The demo runs it on one thread
beside the vision stage, so one thread is the default here.
- Step time: median of --steps timed steps after 3 warm-up ones.
- Where it goes: self CPU time by op over 3 profiled steps (torch.profiler), summed into matmuls
  (aten::mm, addmm, bmm), attention (the SDPA kernels), the loss's log-softmax, and the rest.
- Matmul FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one step, the
  mm / addmm / bmm ops only (2 FLOPs per multiply-add, forward and backward). Their rate is those FLOPs
  over the matmuls' profiled time per step.
- Peak: a 2048^3 fp32 matmul on the same threads, median of 5 before and 5 after the steps
  (train_throughput.matmul_peak). The ratio compares like with like: same machine, threads and dtype.
Timings on a shared machine are noisy: compare the ratio, not the milliseconds, across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import matmul_peak  # noqa: E402

from miniflamingo import lm_corpus  # noqa: E402
from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.lm import GPT  # noqa: E402
from miniflamingo.tokenizer import Tokenizer  # noqa: E402
from miniflamingo.trainutil import configure_optimizer  # noqa: E402
from miniflamingo.world import default_world  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
GROUPS = {"matmul": MATMUL_OPS,
          "attention": ("scaled_dot_product", "flash_attention"),
          "log-softmax": ("log_softmax",)}


def group_of(op: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in op for k in keys)), "other")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per step (pretrain-lm's default)")
    ap.add_argument("--seq-len", type=int, default=128, help="window length (pretrain-lm's on the world)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's LM stage: 1)")
    ap.add_argument("--docs", type=int, default=400, help="world documents to draw batches from")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = FlamingoConfig.preset(args.preset).lm
    if args.seq_len > cfg.context_length:
        raise SystemExit(f"lm_step: --seq-len {args.seq_len} exceeds lm.context_length={cfg.context_length}")
    tok = Tokenizer.default()
    corpus = lm_corpus.encode_documents(default_world().lm_corpus(args.docs, seed=0), tok)
    model = GPT(cfg)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batch = lm_corpus.get_batch(corpus, args.batch_size, args.seq_len, gen)  # one batch: data is not timed

    def step():
        x, y, slots = batch
        _, loss = lm_corpus.forward(model, corpus, x, slots, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    peaks, n = matmul_peak(torch.device("cpu"), torch.float32)
    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peaks += matmul_peak(torch.device("cpu"), torch.float32)[0]
    step_s, peak = statistics.median(times), statistics.median(peaks)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = sum(c for op, c in counter.get_flop_counts()["Global"].items()
                if str(op).split(".")[-1] in {"mm", "addmm", "bmm"})

    from torch.profiler import ProfilerActivity, profile

    profiled = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            step()
    by_group: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        by_group[group_of(e.key)] += e.self_cpu_time_total / 1e6 / profiled  # seconds per step
    total = sum(by_group.values())

    tokens = args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, {args.threads} thread(s), preset {args.preset} LM "
          f"({cfg.n_layer} x {cfg.d_model}, vocab {cfg.vocab_size}), "
          f"batch {args.batch_size} x {args.seq_len}")
    print(f"step: median {1e3 * step_s:.0f} ms of {args.steps} ({tokens / step_s / 1e3:.1f}k tokens/s)")
    print(f"profiled ({profiled} steps, self CPU time per step, {1e3 * total:.0f} ms in all):")
    for g in (*GROUPS, "other"):
        print(f"  {g:<12} {1e3 * by_group[g]:6.0f} ms  {100 * by_group[g] / total:4.0f}%")
    rate = flops / by_group["matmul"] if by_group["matmul"] else float("nan")
    print(f"matmuls: {flops / 1e9:.1f} GFLOP per step (counted) in {1e3 * by_group['matmul']:.0f} ms: "
          f"{rate / 1e9:.1f} GFLOP/s")
    print(f"peak ({n}^3 fp32 matmul, median of {len(peaks)}): {peak / 1e9:.1f} GFLOP/s "
          f"(range {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    print(f"the step's matmuls run at {100 * rate / peak:.0f}% of the peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
