"""Loader time per batch as a fraction of a tiny-preset Flamingo training step (target: under 10%).

One step = one batch from each dataset of the mixture (interleaved documents, image-text pairs,
video-text pairs, paper 2.4), forward + backward of the tiny Flamingo on each, and an AdamW update.
The loader's part is `MixtureSampler.batch(step)`: place images (p_next), cut a window, collate. Two
settings: pixels (the frozen vision encoder runs inside the step), and cached features (the encoder
ran once ahead of training, `DocumentDataset.with_features`, so neither loader nor step pays for it).

    python benchmarks/loader.py                  # 2 threads, batch 8 per dataset, 10 timed steps
    python benchmarks/loader.py --batch-size 16 --steps 20
"""

import argparse
import statistics
import time

import torch

import miniflamingo as mf
from miniflamingo.data import DocumentDataset, MixtureSampler, Source
from miniflamingo.flamingo import Flamingo
from miniflamingo.tokenizer import Tokenizer
from miniflamingo.world import World


def median_ms(fn, steps: int) -> float:
    times = []
    for step in range(steps + 1):  # the first run warms up and is not counted
        t = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8, help="rows per dataset per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p-next", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg, tok, world = mf.FlamingoConfig.preset("tiny"), Tokenizer.default(), World(seed=0, image_size=64)
    t = time.perf_counter()
    datasets = {
        "interleaved": (DocumentDataset.from_documents(world.documents(100), tok), 1.0),
        "image_text": (DocumentDataset.from_pairs(world.image_text_pairs(100), tok), 0.2),
        "video_text": (DocumentDataset.from_pairs(world.video_text_pairs(50), tok), 0.03),
    }
    print(f"world data and tokenization, once: {time.perf_counter() - t:.2f} s")
    model = Flamingo(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    t = time.perf_counter()
    cached = {name: (data.with_features(model.vision), w) for name, (data, w) in datasets.items()}
    print(f"encoding every media once with the frozen encoder: {time.perf_counter() - t:.2f} s")

    def sampler(ds):
        return MixtureSampler([Source(name, data, w, args.batch_size, seq_len=cfg.lm.context_length,
                                      max_media=cfg.max_media, p_next=args.p_next if name == "interleaved"
                                      else 0.0, pack=True)  # packed, as train.py does
                               for name, (data, w) in ds.items()], seed=0)

    print(f"tiny preset, {args.threads} threads, batch {args.batch_size} per dataset x 3 datasets, "
          f"median of {args.steps} steps")
    print(f"{'media':<16}{'loader ms':>10}{'step ms':>10}{'loader / step':>15}")
    for label, ds, key in [("pixels", datasets, "media"), ("cached features", cached, "vision_features")]:
        s = sampler(ds)
        batches = [s.batch(step) for step in range(args.steps + 1)]

        def train_step(step, batches=batches, key=key):
            opt.zero_grad(set_to_none=True)
            for b in batches[step]:
                _, loss = model(b.input_ids, targets=b.targets, segments=b.segments, **{key: b.media})
                (b.weight * loss).backward()  # paper 2.4: accumulate lambda_m * NLL_m over datasets
            opt.step()

        loader = median_ms(s.batch, args.steps)
        step = median_ms(train_step, args.steps)
        print(f"{label:<16}{loader:>10.1f}{step:>10.1f}{100 * loader / step:>14.1f}%")


if __name__ == "__main__":
    main()
