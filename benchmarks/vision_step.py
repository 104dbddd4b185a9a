"""The vision stage's step, before and after its two speed-ups, timed side by side in one process.

    python benchmarks/vision_step.py [--batch-size 128] [--threads 1] [--pairs 10]

1. The image tower (forward + backward, and forward alone as when encoding Flamingo's data) with
   contiguous (NCHW) against channels-last (NHWC, VisionEncoder's default) weights and activations:
   oneDNN's CPU convolutions prefer channels-last.
2. The text tower (forward + backward) on a batch of the world's captions, packed (the real tokens
   only, TextEncoder's way) against the padded work (every caption padded to the batch's longest, run as
   real tokens: the same matmuls the padded tower ran, and a little more than its attention).
3. The two towers and the loss together, before against after: the step's forward and backward.

Each pair of timings alternates so that machine noise hits both alike; the script prints medians and
the median of per-pair ratios, and checks that the two layouts compute the same features.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.contrastive import ContrastiveConfig, ContrastiveModel  # noqa: E402
from miniflamingo.pretrain_vision import encode_texts, images_to_tensor  # noqa: E402
from miniflamingo.tokenizer import Tokenizer  # noqa: E402
from miniflamingo.vision import VisionEncoder  # noqa: E402
from miniflamingo.world import World  # noqa: E402


def as_layout(module, fmt: torch.memory_format):
    """A copy of module whose VisionEncoder uses memory format fmt."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, VisionEncoder):
            m.memory_format = fmt
    return module.to(memory_format=fmt)


def compare(name: str, before, after, pairs: int) -> None:
    """Time before() and after() alternately: two warm-up pairs, then `pairs` timed ones."""
    times = {"before": [], "after": []}
    for i in range(pairs + 2):
        for key, fn in (("before", before), ("after", after)):
            t = time.perf_counter()
            fn()
            if i >= 2:
                times[key].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["before"], times["after"]))
    print(f"{name:44s} {1e3 * statistics.median(times['before']):7.1f} ms -> "
          f"{1e3 * statistics.median(times['after']):7.1f} ms   {ratio:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=10, help="timed (before, after) pairs per row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vision_cfg = FlamingoConfig.preset("tiny").vision
    tok = Tokenizer.default()
    cfg = ContrastiveConfig(vocab_size=tok.n_vocab)
    world = World(seed=0, image_size=vision_cfg.image_size)
    pairs = world.vision_pairs(args.batch_size, split="train", seed=0)
    images = images_to_tensor([p["image"] for p in pairs]).float() / 255
    ids, mask = encode_texts(tok, [p["caption"] for p in pairs], cfg.max_len)
    L = int(mask.sum(1).max())
    ids, mask = ids[:, :L], mask[:, :L]
    full = torch.ones_like(mask)  # the padded work: every position run as a real token
    print(f"tiny vision stage, batch {args.batch_size}, {args.threads} thread(s); captions "
          f"{mask.sum(1).float().mean():.1f} tokens on average, padded to {L}")

    model = ContrastiveModel(vision_cfg, cfg)
    old = as_layout(model, torch.contiguous_format)
    new = as_layout(model, torch.channels_last)

    def image_step(m):
        m.zero_grad(set_to_none=True)
        m.embed_images(images).sum().backward()

    def image_forward(m):
        with torch.no_grad():
            m.vision(images)

    def text_step(m, text_mask):
        m.zero_grad(set_to_none=True)
        m.embed_texts(ids, text_mask).sum().backward()

    def whole(m, text_mask):
        m.zero_grad(set_to_none=True)
        m(images, ids, text_mask).backward()

    compare("image tower fwd+bwd: contiguous -> ch.-last", lambda: image_step(old), lambda: image_step(new),
            args.pairs)
    compare("image tower forward: contiguous -> ch.-last", lambda: image_forward(old),
            lambda: image_forward(new), args.pairs)
    compare("text tower fwd+bwd: padded -> packed", lambda: text_step(new, full),
            lambda: text_step(new, mask), args.pairs)
    compare("step fwd+bwd: both before -> both after", lambda: whole(old, full), lambda: whole(new, mask),
            args.pairs)

    with torch.no_grad():
        a, b = old.vision(images), new.vision(images)
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"the two layouts' features differ by {err:.1e} (relative max)")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
