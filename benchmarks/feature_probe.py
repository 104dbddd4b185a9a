"""What a frozen vision encoder's features tell apart: shape and colour read by probes (issue 7's limits).

    python benchmarks/feature_probe.py runs/demo_seed0/vision.pt runs/demo_seed1/vision.pt ...

The vision stage's own zero-shot accuracy goes through its text tower and prompts ("a red circle"), so
it mixes the two towers; Flamingo sees only the image tower's features. This reads those features
(pooled over the grid, standardised) on one-object images of the named shapes: a linear probe (least
squares, one-vs-rest, fitted on val-split images) and a 1-nearest-neighbour by cosine (what a similarity
without training tells apart, like a few-shot match), each scored on test-split images, with the most
common 1-NN confusions. Images are the same for every checkpoint, so the rows compare encoders.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo.pretrain_vision import images_to_tensor  # noqa: E402
from miniflamingo.vision import VisionEncoder, load_pretrained  # noqa: E402
from miniflamingo.world import World  # noqa: E402


def one_object_images(world: World, split: str, n_pairs: int, seed: int):
    """The one-object images among n_pairs image-text pairs: (uint8 (N, 3, H, W), shapes, colours)."""
    objs, images = [], []
    for p in world.image_text_pairs(n_pairs, split=split, seed=seed):
        if len(p["attrs"]["objects"]) == 1:
            objs.append(p["attrs"]["objects"][0])
            images.append(p["image"])
    return images_to_tensor(images), [o["shape"] for o in objs], [o["colour"] for o in objs]


@torch.no_grad()
def pooled(encoder: VisionEncoder, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([encoder(images[i:i + batch]).mean(1) for i in range(0, len(images), batch)])


def probes(train_x, train_y: list[str], test_x, test_y: list[str]) -> tuple[float, float, list]:
    """(linear probe accuracy, 1-NN accuracy, the 1-NN's most common (true, predicted) confusions)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    classes = sorted(set(train_y))
    targets = torch.tensor([[float(y == c) for c in classes] for y in train_y], dtype=a.dtype)
    ones = torch.ones(len(a), 1, dtype=a.dtype)
    w = torch.linalg.lstsq(torch.cat([a, ones], 1), targets, driver="gelsd").solution
    pred = (torch.cat([b, torch.ones(len(b), 1, dtype=b.dtype)], 1) @ w).argmax(1).tolist()
    linear = sum(classes[p] == y for p, y in zip(pred, test_y)) / len(test_y)
    nearest = (F.normalize(b, dim=1) @ F.normalize(a, dim=1).T).argmax(1).tolist()
    nn_acc = sum(train_y[i] == y for i, y in zip(nearest, test_y)) / len(test_y)
    confusions = collections.Counter((y, train_y[i]) for i, y in zip(nearest, test_y) if train_y[i] != y)
    return linear, nn_acc, confusions.most_common(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="vision.pt files (the vision stage's, or a run's)")
    ap.add_argument("--train-pairs", type=int, default=6000,
                    help="val-split pairs drawn (about a quarter hold one object)")
    ap.add_argument("--test-pairs", type=int, default=3000, help="test-split pairs drawn")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoders = {}
    for path in args.checkpoints:
        if not Path(path).is_file():
            raise SystemExit(f"feature_probe: {path} not found")
        encoders[path] = load_pretrained(path)  # each checkpoint read once, in eval mode
    sizes = {enc.cfg.image_size for enc in encoders.values()}
    if len(sizes) != 1:
        raise SystemExit(f"feature_probe: the checkpoints take different image sizes {sorted(sizes)}")
    world = World(seed=0, image_size=sizes.pop())
    train = one_object_images(world, "val", args.train_pairs, seed=5)
    test = one_object_images(world, "test", args.test_pairs, seed=6)
    print(f"{len(train[1])} probe-training and {len(test[1])} test images, one object each")
    print(f"{'checkpoint':<40} {'shape lin':>9} {'1-NN':>6} {'colour lin':>10} {'1-NN':>6}  "
          "1-NN shape confusions")
    for path, encoder in encoders.items():
        a, b = pooled(encoder, train[0]), pooled(encoder, test[0])
        s_lin, s_nn, conf = probes(a, train[1], b, test[1])
        c_lin, c_nn, _ = probes(a, train[2], b, test[2])
        conf_text = ", ".join(f"{t}->{p} {n}" for (t, p), n in conf)
        print(f"{path:<40} {s_lin:9.3f} {s_nn:6.3f} {c_lin:10.3f} {c_nn:6.3f}  {conf_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
