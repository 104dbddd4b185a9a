"""Does captioning gain from shots? Per-query CIDEr-D at each shot count, paired against 0 shots (issue 7).

    python benchmarks/caption_shots.py --run runs/demo --queries 200 --shots 0,1,2,4 [--rices]

The demo's table scores 40 captions per cell, too few to tell a rise of a few percent from noise: one
query's CIDEr-D ranges from 0 to 10. Here every shot count captions the same queries, so the change from
0 shots is read per query (paired), with its standard error, and bootstrap errors for each mean.

Also counted, per cell: the captions equal to a reference, attribute words (colours, shapes, sizes) the
caption has that the true one lacks ("wrong"), and whether the caption names as many objects as the image
holds. Zero-shot prompts carry two text-only examples (paper App. A.2), as in `eval`.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo import evaluate as ev  # noqa: E402
from miniflamingo.metrics import cider_d  # noqa: E402
from miniflamingo.world import World  # noqa: E402
from miniflamingo.world_render import COLOURS, SHAPES  # noqa: E402

ATTRIBUTE_WORDS = frozenset(COLOURS) | frozenset(SHAPES) | {"small", "large"}


def attribute_words(caption: str) -> collections.Counter:
    return collections.Counter(w for w in caption.replace(",", " ").split() if w in ATTRIBUTE_WORDS)


def paired_change(base: list[float], other: list[float]) -> tuple[float, float]:
    """Mean of other - base over the same queries, and its standard error."""
    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    if len(d) < 2:
        raise ValueError(f"need at least 2 paired queries, got {len(d)}")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def bootstrap_se(values: list[float], n: int = 1000, seed: int = 0) -> float:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return float(np.std([v[rng.integers(0, len(v), len(v))].mean() for _ in range(n)]))


def caption_cells(model, tok, world, n_queries: int, shots: list[int], rices: bool = False, seed: int = 0
                  ) -> tuple[list[dict], dict]:
    """(queries, {k: (CIDEr-D, blind, predictions, per-query CIDEr-D)}): the eval's captioning queries,
    support pool and prompts (`evaluate.open_cell` with the suite's random key), on n_queries images."""
    queries, pool, features = ev.encoded_open_items(model, world, "captioning", n_queries, 64, seed, rices)
    cells = {}
    for k in shots:
        with torch.no_grad():
            value, blind, preds = ev.open_cell(model, tok, ev.TASKS["captioning"], queries, pool, k,
                                               ev.cell_key("captioning", seed), features if k > 0 else None)
        if value is not None:
            scores = cider_d(dict(enumerate(preds)), {i: q["references"] for i, q in enumerate(queries)})[1]
            cells[k] = (value, blind, preds, [scores[i] for i in range(len(queries))])
    return queries, cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder holding flamingo.pt")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--shots", default="0,4", help="shot counts; 0 (two text-only examples) is the base")
    ap.add_argument("--rices", action="store_true", help="support by similarity of frozen vision features")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shots = sorted({0, *(int(s) for s in args.shots.split(","))})
    torch.set_num_threads(1)  # the eval's ops are small (see `eval --threads`)
    model, cfg = ev.load_run(args.run)
    tok = ev.run_tokenizer(args.run, cfg)
    world = World(seed=0, image_size=cfg.vision.image_size)
    queries, cells = caption_cells(model, tok, world, args.queries, shots, args.rices, args.seed)
    print(f"{args.run}: {args.queries} captions per cell, support {'RICES' if args.rices else 'random'}")
    print(f"{'shots':>5} {'CIDEr-D':>8} {'+-':>5} {'vs 0 shots':>14} {'blind':>6} {'exact':>6} "
          f"{'wrong words':>11} {'n objects ok':>12}")
    for k in shots:
        if k not in cells:
            print(f"{k:>5}  prompts longer than the LM's context: skipped")
            continue
        value, blind, preds, per_query = cells[k]
        change = "" if k == 0 else "{:+.1f}+-{:.1f}".format(*(100 * x for x in paired_change(cells[0][3],
                                                                                          per_query)))
        wrong = sum(sum((attribute_words(p) - attribute_words(q["answer"])).values())
                    for p, q in zip(preds, queries))
        exact = np.mean([p in q["references"] for p, q in zip(preds, queries)])
        # the eval's template names each object's position once: " at the top left", " at the centre"
        count_ok = np.mean([p.count(" at the ") == q["answer"].count(" at the ")
                            for p, q in zip(preds, queries)])
        print(f"{k:>5} {100 * value:8.1f} {100 * bootstrap_se(per_query):5.1f} {change:>14} "
              f"{100 * blind:6.1f} {exact:6.3f} {wrong:11d} {count_ok:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
