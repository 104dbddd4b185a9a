"""fp32 vs bf16 autocast: time of one GPT training step (forward, backward, AdamW) at several widths.

    python benchmarks/lm_autocast.py                 # tiny preset's LM and a 4-layer width-256 GPT
    python benchmarks/lm_autocast.py --widths 64 128 256 512 --steps 12 --threads 1

bf16 autocast is a measured choice, not a default: on a CPU it pays off only once the matmuls are
big enough to outweigh the casts around them. The two precisions run in alternation, step by step,
so a noisy shared machine slows both alike; we report medians and their ratio (> 1: bf16 is faster).
pretrain_lm's `--dtype auto` uses the rule these numbers justify (see pretrain_lm.auto_dtype).
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch

from miniflamingo.config import FlamingoConfig
from miniflamingo.lm import GPT
from miniflamingo.trainutil import configure_optimizer


def step_time(gpt, opt, x, y, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss = gpt(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait for them before reading the clock
    return time.perf_counter() - t0


def bench(cfg, batch: int, seq: int, steps: int, device: torch.device, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    models = {p: GPT(cfg).to(device) for p in ("fp32", "bf16")}
    opts = {p: configure_optimizer(m, lr=1e-4, weight_decay=0.1) for p, m in models.items()}
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    times = {"fp32": [], "bf16": []}
    for i in range(warmup + steps):
        for p in ("fp32", "bf16"):  # alternate, so load from other processes hits both alike
            t = step_time(models[p], opts[p], x, y, bf16=p == "bf16")
            if i >= warmup:
                times[p].append(t)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return dict(n_layer=cfg.n_layer, d_model=cfg.d_model, batch=batch, seq=seq, fp32_s=round(fp32, 4),
                bf16_s=round(bf16, 4), speedup=round(fp32 / bf16, 2),
                tokens_per_s_fp32=round(batch * seq / fp32), tokens_per_s_bf16=round(batch * seq / bf16))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="*", default=[256],
                    help="extra widths (4 layers, head size 64) besides the tiny preset's LM")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per precision (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tiny = FlamingoConfig.preset("tiny").lm
    cfgs = [("tiny", tiny)] + [
        (f"w{w}", dataclasses.replace(tiny, n_layer=4, d_model=w, n_head=max(1, w // 64)))
        for w in args.widths
    ]
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x seq {args.seq}, median of {args.steps} steps")
    print(f"{'model':<6} {'layers':>6} {'width':>6} {'fp32 s/step':>12} {'bf16 s/step':>12} {'speedup':>8}")
    for name, cfg in cfgs:
        r = bench(cfg, args.batch, args.seq, args.steps, torch.device(args.device))
        print(f"{name:<6} {r['n_layer']:>6} {r['d_model']:>6} {r['fp32_s']:>12.4f} {r['bf16_s']:>12.4f} "
              f"{r['speedup']:>7.2f}x")
        print(json.dumps({"model": name, **r}))


if __name__ == "__main__":
    main()
