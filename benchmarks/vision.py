"""Benchmark the vision encoder (issue 4): images/s of the tiny NFNet's forward pass, and the time of one
contrastive training step (both towers forward and backward, AGC, AdamW), on CPU.

    python benchmarks/vision.py                   # tiny preset, batch 128, 1 thread
    python benchmarks/vision.py --threads 2 --repeats 9

Time: median over --repeats after --warmup untimed calls; the step uses a caption length of 24 tokens
(the world's "full" captions run 8 to 46). Inputs are random: speed does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import miniflamingo as mf  # noqa: E402
from miniflamingo.agc import adaptive_grad_clip  # noqa: E402
from miniflamingo.contrastive import ContrastiveConfig, ContrastiveModel  # noqa: E402
from miniflamingo.pretrain_vision import make_optimizer  # noqa: E402


def median_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vcfg = mf.FlamingoConfig.preset(args.preset).vision
    model = ContrastiveModel(vcfg, ContrastiveConfig())
    B, size = args.batch_size, vcfg.image_size
    images = torch.rand(B, 3, size, size)
    ids = torch.randint(0, model.cfg.vocab_size - 3, (B, args.text_len))
    mask = torch.ones(B, args.text_len, dtype=torch.bool)
    opt = make_optimizer(model, 1e-3, 0.05)

    model.vision.eval()

    @torch.no_grad()
    def forward():
        model.vision(images)

    def train_step():
        loss = model(images, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        adaptive_grad_clip(model.clipped_parameters(), 0.1)
        opt.step()

    t_fwd = median_time(forward, args.repeats, args.warmup)
    model.train()
    t_step = median_time(train_step, args.repeats, args.warmup)
    n_params = sum(p.numel() for p in model.vision.parameters())
    print(f"preset {args.preset}: vision encoder {n_params / 1e6:.3f}M parameters, {size}x{size} images, "
          f"S = {vcfg.grid_size**2}, Dv = {vcfg.d_out}; batch {B}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"  encoder forward (no grad):      {t_fwd * 1e3:8.1f} ms/batch  {B / t_fwd:8.0f} images/s")
    print(f"  contrastive training step:      {t_step * 1e3:8.1f} ms/step   {B / t_step:8.0f} pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
