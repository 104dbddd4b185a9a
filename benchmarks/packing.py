"""Flamingo's training step on the demo's own data, rows padded against rows packed (issue 6).

    python benchmarks/packing.py                 # 2 threads (the demo's Flamingo stage), 20 steps each
    python benchmarks/packing.py --threads 1 --steps 30

Notable features
- The demo's training data: `train.render_data` with the demo's command line (its document families,
  blob binding, 3000 documents, 2000 pairs, 600 videos), encoded by a random tiny vision encoder (speed
  does not depend on the weights; the row lengths and media counts are the world's).
- The demo's step: one batch from each source (16 documents, 16 pairs, 8 videos), lambda-weighted
  backward (one batch per source, so each source's mean loss times its lambda, as train.py's weighting
  comes to on one process), clip, AdamW.
- Three ways, alternating step by step in one process (the shared machine's speed drifts): rows padded to
  the longest of their batch (as before session 20); packed (`data.collate(pack=True)`, train.py's
  default) with the masked cross-attention up to 128 keys (`xattn.MASKED_MAX_KEYS` before); packed with
  today's threshold. Medians of the steps, and the median of the per-step ratios to the padded step.
- Also the positions each way runs per step, and the share of them that is padding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo import train, xattn  # noqa: E402
from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.data import MixtureSampler  # noqa: E402
from miniflamingo.demo import FULL  # noqa: E402
from miniflamingo.flamingo import Flamingo  # noqa: E402
from miniflamingo.tokenizer import Tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each way (after one warm-up each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_argv = ["--run", "unused", *FULL["train"]]  # the demo's data options
    targs, overrides = train.parse_args(train_argv)
    cfg = FlamingoConfig.preset(targs.preset).override(overrides)
    torch.manual_seed(0)
    model = Flamingo(cfg)
    t0 = time.perf_counter()
    data = train.world_data(model.vision, cfg.vision.image_size, Tokenizer.default(), targs)
    print(f"the demo's data rendered and encoded in {time.perf_counter() - t0:.0f} s; {args.threads} threads")
    sources = train.world_sources(data, cfg, targs, train.parse_weights(targs.weights))
    sampler = MixtureSampler(sources, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(i: int, pack: bool) -> tuple[float, int, int]:
        for src in sampler.sources:
            src.pack = pack
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        positions = real = 0
        for b in sampler.batch(i):
            _, loss = model(b.input_ids, vision_features=b.media, targets=b.targets, media_frames=b.frames,
                            segments=b.segments, return_logits=False, media_checked=True)
            (b.weight * loss).backward()
            positions += b.input_ids.numel()
            if b.segments is not None:
                real += int((b.segments >= 0).sum())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        return time.perf_counter() - t, positions, real

    ways = {"padded": (False, 128), "packed, masked up to 128 keys": (True, 128),
            f"packed, masked up to {xattn.MASKED_MAX_KEYS} keys": (True, xattn.MASKED_MAX_KEYS)}
    saved = xattn.MASKED_MAX_KEYS
    times = {w: [] for w in ways}
    positions, real = {w: [] for w in ways}, []
    try:
        for i in range(args.steps + 1):
            for w, (pack, keys) in ways.items():
                xattn.MASKED_MAX_KEYS = keys
                dt, n, r = step(i, pack)
                if i:  # step 0 warms up
                    times[w].append(dt)
                    positions[w].append(n)
                    if pack:
                        real.append(r)
    finally:
        xattn.MASKED_MAX_KEYS = saved
    n_real = statistics.mean(real)
    base = times["padded"]
    for w in ways:
        ratio = statistics.median(a / b for a, b in zip(base, times[w]))
        n = statistics.mean(positions[w])
        print(f"{w:34s} step {1e3 * statistics.median(times[w]):6.1f} ms (median of {args.steps}), "
              f"padded / this {ratio:.2f}x; {n:.0f} positions a step, {100 * (1 - n_real / n):.0f}% padding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
