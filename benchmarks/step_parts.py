"""Two parts of the tiny preset's training step, each against the way it was written before (issue 6).

    python benchmarks/step_parts.py             # batch 64 x 123 tokens, 1 thread: the step's shapes

Notable features
- Squared ReLU (the FFW of every trained layer, paper App. A.1.4): autograd's `relu(x).square()` against
  `resampler.squared_relu`, a hand-written backward (2 * relu(x) * grad), forward + backward over the
  (B, L, 4 * D) hidden layer.
- The grouped cross-attention's key/value gather (`xattn.attend_own_media`): rows of k, v picked with
  index_select in (nh, R) order against (R, nh) order, then SDPA, forward + backward. SDPA's CPU kernel
  returns the keys' gradient in (R, nh) memory order; in (nh, R) order index_select's backward
  (index_add) reads it strided.
- Medians of alternating repeats in one process (the shared machine's speed drifts), and their ratio.

Shapes: B batch, L text length, D LM width, T media, N chunks (2T), nh heads, R latents, hs head size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo.resampler import squared_relu  # noqa: E402


def alternate(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn repeats times after one warm-up round."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def squared_relu_parts(B: int, L: int, hidden: int) -> dict:
    x = torch.randn(B, L, hidden, requires_grad=True)
    g = torch.randn(B, L, hidden)

    def autograd():
        F.relu(x).square().backward(g)

    def hand_written():
        squared_relu(x).backward(g)

    return {"autograd relu().square()": autograd, "squared_relu": hand_written}


def gather_parts(B: int, T: int, nh: int, R: int, hs: int, C: int) -> dict:
    N = 2 * T
    kv = torch.randn(B, T, R, 2, nh, hs, requires_grad=True)  # to_kv's output, as xattn views it
    q = torch.randn(B * N, nh, C, hs)
    media = (torch.randint(0, T, (B, N)) + torch.arange(B)[:, None] * T).view(-1)  # (B*N,) rows of k, v
    g = torch.randn(B * N, nh, C, hs)

    def heads_first():  # before: (B*T, nh, R, hs) rows
        k, v = kv.permute(3, 0, 1, 4, 2, 5)  # (B, T, nh, R, hs) each
        k = k.reshape(B * T, nh, R, hs).index_select(0, media)
        v = v.reshape(B * T, nh, R, hs).index_select(0, media)
        F.scaled_dot_product_attention(q, k, v).backward(g)

    def latents_first():  # now: (B*T, R, nh, hs) rows, transposed after the gather
        k, v = kv.permute(3, 0, 1, 4, 2, 5)
        k = k.transpose(2, 3).reshape(B * T, R, nh, hs).index_select(0, media).transpose(1, 2)
        v = v.transpose(2, 3).reshape(B * T, R, nh, hs).index_select(0, media).transpose(1, 2)
        F.scaled_dot_product_attention(q, k, v).backward(g)

    return {"gather (nh, R) order": heads_first, "gather (R, nh) order": latents_first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--length", type=int, default=123, help="text length L (the step's interleaved rows)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, L = args.batch_size, args.length
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tiny preset shapes, B={B}, L={L}")
    for title, fns in (("squared ReLU, (B, L, 512) fwd + bwd", squared_relu_parts(B, L, 512)),
                       ("xattn key/value gather + SDPA, 8 media, 4 heads x 8 latents x 32, chunks of 16, "
                        "fwd + bwd", gather_parts(B, 8, 4, 8, 32, 16))):
        med = alternate(fns, args.repeats)
        (old, t_old), (new, t_new) = med.items()
        print(f"{title}: {old} {1e3 * t_old:.2f} ms, {new} {1e3 * t_new:.2f} ms, "
              f"{t_old / t_new:.2f}x (medians of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
