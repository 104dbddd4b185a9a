"""The LM head at every position vs only where there is a target: Flamingo forward + backward time.

    python benchmarks/head_at_targets.py                  # tiny preset, 64 rows x 123 tokens, 1 thread
    python benchmarks/head_at_targets.py --rows 16 --threads 2

Training needs no logits, only the loss, so train.py calls the model with return_logits=False: the LM
head (D -> V) and its log-softmax run at the positions with a target only (43% of a tiny interleaved
batch's positions). The two settings run in alternation, step by step, so a noisy shared machine slows
both alike; we report medians and their ratio (> 1: targets-only is faster). Random weights and text:
the time does not depend on their values. tests/test_flamingo.py checks that the loss and gradients agree.

Shapes: B rows, L text length, T media slots, S grid cells, Dv feature width.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.flamingo import Flamingo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, default=64, help="B, interleaved rows per batch")
    ap.add_argument("--length", type=int, default=123, help="L, tokens per row")
    ap.add_argument("--target-share", type=float, default=0.43, help="positions with a target")
    ap.add_argument("--repeats", type=int, default=16, help="timed pairs (the first 2 are warmup)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = FlamingoConfig.preset(args.preset)
    model = Flamingo(cfg)
    B, L, T, S = args.rows, args.length, cfg.max_media, cfg.vision.grid_size ** 2
    ids = torch.randint(0, cfg.eot_id, (B, L))  # (B, L)
    ids[:, :: max(1, L // T)] = cfg.image_id  # up to T images per row
    n_images = int((ids == cfg.image_id).sum(1).max())
    targets = torch.randint(0, cfg.eot_id, (B, L))
    targets[torch.rand(B, L) >= args.target_share] = -100
    feats = torch.randn(B, n_images, 1, S, cfg.vision.d_out)  # (B, T, F=1, S, Dv)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for return_logits in (True, False):
            t0 = time.perf_counter()
            _, loss = model(ids, vision_features=feats, targets=targets, return_logits=return_logits)
            loss.backward()
            times[return_logits].append(time.perf_counter() - t0)
    every, only = (statistics.median(times[k][2:]) for k in (True, False))
    print(f"{args.preset}, {B} x {L} tokens, {100 * (targets != -100).float().mean():.0f}% with a target, "
          f"{args.threads} thread(s): forward + backward {1e3 * every:.0f} ms with the head at every "
          f"position, {1e3 * only:.0f} ms at the targets only: {every / only:.2f}x")


if __name__ == "__main__":
    main()
