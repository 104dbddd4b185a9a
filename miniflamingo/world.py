"""The synthetic visual world (DESIGN.md 5): scenes, image/video-text pairs, splits, and the CLI.

Notable features
- Deterministic from a seed, item by item: item i of (split, stream, seed) has its own random
  generator, so any item can be regenerated alone and the splits never share a generator.
- Scenes are sampled as JSON-able attrs first and rendered second (world_render.py), so the LM's
  text corpus (world_docs.py) reuses the very same documents without drawing a pixel.
- Held out for evaluation only: the "val" and "test" image streams, HELDOUT_COMBOS (colour, shape)
  pairs never rendered in "train", and NOVEL_SHAPES never drawn in any training stage.
- `python -m miniflamingo world --out DIR` writes PNGs and the JSONL indexes of DESIGN.md 5.

Shapes: image uint8 (H, W, 3); video uint8 (F, H, W, 3), F = World.video_frames.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from miniflamingo import world_docs
from miniflamingo import world_text as wt
from miniflamingo.world_render import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BLOB_SHAPES,
    COLOURS,
    HELDOUT_COMBOS,
    NOVEL_SHAPES,
    SHAPES,
    SIZES,
    render_scene,
    render_video,
    video_strip,
)
from miniflamingo.world_text import CAPTION_TEMPLATES, EVAL_CAPTION_TEMPLATE, POSITIONS

__all__ = ["World", "default_world", "main", "SHAPES", "NOVEL_SHAPES", "BLOB_SHAPES", "COLOURS", "SIZES",
           "POSITIONS", "HELDOUT_COMBOS", "SPLITS", "CAPTION_TEMPLATES", "EVAL_CAPTION_TEMPLATE"]

SPLITS = {"train": 0, "val": 1, "test": 2}
STREAMS = {name: i for i, name in enumerate([  # one random stream per kind of item: never shared
    "pairs", "videos", "documents", "vision", "lm", "binding", "novel_binding", "ambiguous", "vqa",
    "captions", "video_qa", "heldout_combos", "size_twins"])}  # new streams go last


class World:
    """World(seed=0, image_size=64, video_frames=6). Every public method is a pure function of
    (world seed, arguments): the same call gives identical pixels and texts."""

    def __init__(self, seed: int = 0, image_size: int = 64, video_frames: int = 6):
        if seed < 0 or image_size < 16 or not 2 <= video_frames <= 16:
            raise ValueError(
                f"World needs seed >= 0, image_size >= 16, 2 <= video_frames <= 16; got "
                f"seed={seed}, image_size={image_size}, video_frames={video_frames}"
            )
        self.seed, self.image_size, self.video_frames = seed, image_size, video_frames

    def rng(self, split: str, stream: str, *ints: int) -> np.random.Generator:
        """The generator of one item: disjoint across (world seed, split, stream, ints)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if any(i < 0 for i in ints):
            raise ValueError(f"seeds and indices must be >= 0, got {ints}")
        return np.random.default_rng([self.seed, SPLITS[split], STREAMS[stream], *ints])

    # ------------------------------------------------------------------------- scene sampling (attrs only)

    def colour_for(self, rng, split: str, shape: str, exclude: tuple = ()) -> str:
        """A random colour for `shape`, never a held-out combination in "train"."""
        banned = set(exclude) | ({c for c, s in HELDOUT_COMBOS if s == shape} if split == "train" else set())
        choices = [c for c in COLOURS if c not in banned]
        return choices[int(rng.integers(len(choices)))]

    def obj(self, rng, split: str, shape: str, cell: int, colour: str | None = None,
            size: str | None = None) -> dict:
        """One object in grid cell `cell` (0-8, reading order), slightly jittered in place and hue."""
        colour = colour or self.colour_for(rng, split, shape)
        if split == "train" and (colour, shape) in HELDOUT_COMBOS:
            raise ValueError(f"({colour}, {shape}) is a held-out combination: never rendered in train")
        u = rng.random(6).tolist()  # one draw for all the small choices: numpy is slow on tiny arrays
        size = size or ("small", "large")[int(u[0] * 2)]
        row, col = divmod(cell, 3)
        rgb = [min(255, max(0, c + int(v * 25) - 12)) for c, v in zip(COLOURS[colour], u[3:])]  # hue jitter
        return {"shape": shape, "colour": colour, "size": size, "position": POSITIONS[cell],
                "center": [(col + 0.5 + 0.09 * (u[1] - 0.5)) / 3, (row + 0.5 + 0.09 * (u[2] - 0.5)) / 3],
                "radius": SIZES[size], "rgb": rgb}

    def background(self, rng) -> dict:
        names = list(BACKGROUND_COLOURS)
        u = rng.random(8).tolist()
        a = int(u[0] * len(names))
        b = (a + 1 + int(u[1] * (len(names) - 1))) % len(names)  # a second, different colour
        rgb = [min(255, max(0, c + int(v * 17) - 8)) for c, v in zip(BACKGROUND_COLOURS[names[a]], u[2:5])]
        return {"kind": BACKGROUND_KINDS[int(u[5] * len(BACKGROUND_KINDS))], "name": names[a], "rgb": rgb,
                "rgb2": list(BACKGROUND_COLOURS[names[b]]), "angle": 360 * u[6], "seed": int(u[7] * 2**31)}

    def scene(self, rng, split: str, n_objects: int | None = None, shapes=SHAPES, shape: str | None = None,
              colour: str | None = None) -> dict:
        """1-4 objects in distinct grid cells, listed in reading order. `shape`/`colour` fix that
        attribute for every object (the latent-attribute documents need it)."""
        n = n_objects or int(rng.integers(1, 5))
        objs = []
        for cell in sorted(rng.permutation(9)[:n].tolist()):
            s = shape or shapes[int(rng.integers(len(shapes)))]
            objs.append(self.obj(rng, split, s, cell, colour=colour))
        return {"objects": objs, "background": self.background(rng)}

    def video_scene(self, rng, split: str, shapes=SHAPES) -> dict:
        """One object moves, changes colour, grows or shrinks; maybe one other object stays still."""
        kind = ("move", "colour", "grows", "shrinks")[int(rng.integers(4))]
        shape = shapes[int(rng.integers(len(shapes)))]
        event = {"object": 0, "kind": kind}
        if kind == "move":
            event["direction"] = direction = wt.DIRECTIONS[int(rng.integers(4))]
            lane = int(rng.integers(3))  # the row (left/right) or column (up/down) it travels along
            start = {"left": 3 * lane + 2, "right": 3 * lane, "up": 6 + lane, "down": lane}[direction]
            across = (lambda c: c // 3) if direction in ("left", "right") else (lambda c: c % 3)
            free = [c for c in range(9) if across(c) != lane]  # a still object stays out of the way
        else:
            start = int(rng.integers(9))
            free = [c for c in range(9) if c != start]
        size = {"grows": "small", "shrinks": "large"}.get(kind)
        main = self.obj(rng, split, shape, start, size=size)
        if kind == "colour":
            event["from"] = main["colour"]
            event["to"] = self.colour_for(rng, split, shape, exclude=(main["colour"],))
        objs = [main]
        if rng.random() < 0.5:
            others = [s for s in shapes if s != shape]  # so "the red circle" names one object
            other = others[int(rng.integers(len(others)))]
            objs.append(self.obj(rng, split, other, free[int(rng.integers(len(free)))]))
        bg = self.background(rng)
        return {"objects": objs, "event": event, "background": bg, "frames": self.video_frames}

    def frames(self, attrs: dict) -> list[dict]:
        """Per-frame scene attrs of a video: linear motion / growth, a colour switch halfway."""
        ev, F = attrs["event"], attrs["frames"]
        out = []
        for f in range(F):
            t = f / (F - 1)
            main = dict(attrs["objects"][ev["object"]])
            if ev["kind"] == "move":
                moves = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (x or y, sign)
                axis, sign = moves[ev["direction"]]
                center = list(main["center"])
                center[axis] = 0.5 + sign * (t - 0.5) * 0.6  # from 0.2 to 0.8 of the image, or back
                main["center"] = center
            elif ev["kind"] == "colour" and f >= F // 2:
                main["rgb"] = list(COLOURS[ev["to"]])
            elif ev["kind"] in ("grows", "shrinks"):
                a, b = SIZES["small"], SIZES["large"]
                main["radius"] = a + (b - a) * (t if ev["kind"] == "grows" else 1 - t)
            objs = list(attrs["objects"])
            objs[ev["object"]] = main
            out.append({"objects": objs, "background": attrs["background"]})
        return out

    def render(self, attrs: dict) -> np.ndarray:
        """attrs -> uint8 (H, W, 3) for an image, (F, H, W, 3) for a video (attrs with an "event")."""
        if "event" in attrs:
            return render_video(self.frames(attrs), self.image_size)  # (F, H, W, 3)
        return render_scene(attrs, self.image_size)

    # ------------------------------------------------------------------------- training data
    # Each dataset has a per-item method (random access, endless streams) and a list method.

    def image_text_pair(self, i: int, split: str = "train", seed: int = 0) -> dict:
        """{"image" (H, W, 3), "caption", "attrs"}; the caption template varies from pair to pair."""
        rng = self.rng(split, "pairs", seed, i)
        attrs = self.scene(rng, split)
        attrs["template"] = list(CAPTION_TEMPLATES)[int(rng.integers(len(CAPTION_TEMPLATES)))]
        return {"image": self.render(attrs), "caption": wt.caption(attrs, attrs["template"]), "attrs": attrs}

    def video_text_pair(self, i: int, split: str = "train", seed: int = 0) -> dict:
        """{"video" (F, H, W, 3), "caption", "attrs"}: "a red circle moves left" and the like."""
        attrs = self.video_scene(self.rng(split, "videos", seed, i), split)
        return {"video": self.render(attrs), "caption": wt.video_caption(attrs, ("event", "full")[i % 2]),
                "attrs": attrs}

    def vision_pair(self, i: int, split: str = "train", seed: int = 0, p_blob: float = 0.5) -> dict:
        """Like image_text_pair (template "full"), but a share p_blob of the objects are blob shapes:
        far more shape variety for the contrastive encoder (issue 3, finding 2). Never NOVEL_SHAPES."""
        rng = self.rng(split, "vision", seed, i)
        attrs = self.scene(rng, split)
        for k, o in enumerate(attrs["objects"]):
            if rng.random() < p_blob:
                attrs["objects"][k] = {**o, "shape": BLOB_SHAPES[int(rng.integers(len(BLOB_SHAPES)))]}
        return {"image": self.render(attrs), "caption": wt.caption(attrs, "full"), "attrs": attrs}

    def document(self, i: int, split: str = "train", seed: int = 0, families=None,
                 blob_binding: float = 0.0) -> dict:
        """An interleaved document {"texts", "images", "task", "latent", "media_attrs"}: aligned lists,
        one non-None per index, each media followed by its text, 3-8 media. `families`: a dict of
        weights or a list of names from world_docs.FAMILIES (default: all, weighted); `blob_binding`: the
        share of binding documents over blob shapes (world_docs.document_chunks)."""
        rng = self.rng(split, "documents", seed, i)
        task, latent, chunks = world_docs.document_chunks(self, rng, split, families, blob_binding)
        texts, images, media_attrs = [], [], []
        for attrs, text in chunks:
            texts += [None, text]
            images += [self.render(attrs), None]
            media_attrs += [attrs, None]
        return {"texts": texts, "images": images, "task": task, "latent": latent, "media_attrs": media_attrs}

    def lm_document(self, i: int, seed: int = 0, families=None) -> str:
        """A text document for LM pretraining (world_docs.lm_document; families: world_docs.LM_FAMILIES).
        Drawn from "train" only: no novel shape, no held-out combination."""
        return world_docs.lm_document(self, self.rng("train", "lm", seed, i), families)

    def image_text_pairs(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        return [self.image_text_pair(i, split, seed) for i in range(n)]

    def video_text_pairs(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        return [self.video_text_pair(i, split, seed) for i in range(n)]

    def vision_pairs(self, n: int, split: str = "train", seed: int = 0, p_blob: float = 0.5) -> list[dict]:
        return [self.vision_pair(i, split, seed, p_blob) for i in range(n)]

    def size_twin(self, pair: dict, i: int, split: str = "train", seed: int = 0) -> dict:
        """The same scene with one object's size flipped, captioned "full": a pair that only the size
        word tells apart from `pair` (the contrastive stage's hard negatives for size)."""
        rng = self.rng(split, "size_twins", seed, i)
        objs = [dict(o) for o in pair["attrs"]["objects"]]
        k = int(rng.integers(len(objs)))
        objs[k]["size"] = "large" if objs[k]["size"] == "small" else "small"
        objs[k]["radius"] = SIZES[objs[k]["size"]]
        attrs = {**pair["attrs"], "objects": objs}
        return {"image": self.render(attrs), "caption": wt.caption(attrs, "full"), "attrs": attrs}

    def documents(self, n: int, split: str = "train", seed: int = 0, families=None,
                  blob_binding: float = 0.0) -> list[dict]:
        return [self.document(i, split, seed, families, blob_binding) for i in range(n)]

    def lm_corpus(self, n_docs: int, seed: int = 0, families=None) -> list[str]:
        return [self.lm_document(i, seed, families) for i in range(n_docs)]

    # ------------------------------------------------------------------------- evaluation (held out)
    # The episodes mirror the training documents, so they live beside them in world_docs.py.

    def binding_episode(self, n_way: int, k_shot: int, novel: bool = False, split: str = "test",
                        seed: int = 0) -> dict:
        return world_docs.binding_episode(self, n_way, k_shot, novel, split, seed)

    def ambiguous_episode(self, k_shot: int, split: str = "test", seed: int = 0) -> dict:
        return world_docs.ambiguous_episode(self, k_shot, split, seed)

    def vqa_set(self, n: int, split: str = "test", seed: int = 0) -> list[dict]:
        return world_docs.vqa_set(self, n, split, seed)

    def caption_set(self, n: int, split: str = "test", seed: int = 0,
                    template: str = EVAL_CAPTION_TEMPLATE) -> list[dict]:
        return world_docs.caption_set(self, n, split, seed, template)

    def video_qa_set(self, n: int, split: str = "test", seed: int = 0) -> list[dict]:
        return world_docs.video_qa_set(self, n, split, seed)

    def heldout_combo_set(self, n: int, split: str = "test", seed: int = 0) -> list[dict]:
        return world_docs.heldout_combo_set(self, n, split, seed)


@functools.lru_cache(maxsize=1)
def default_world() -> World:
    """The world everything uses by default: World(seed=0, image_size=64). Generated on use, no disk cache."""
    return World()


# ----------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    """`python -m miniflamingo world --out DIR [--n N] [--seed S] [--split train]` writes, under DIR:
    captions.jsonl        {"image": relpath, "caption": str}   image-text pairs (images/)
    vision_captions.jsonl {"image": relpath, "caption": str}   the same with blob shapes (vision/)
    videos.jsonl          {"video": relpath, "frames": F, "caption": str}   (videos/)
    documents.jsonl       {"texts": [str|null], "images": [relpath|null], "task": str}   (documents/)
    lm_corpus.jsonl       {"text": str}   the LM's text corpus (always from "train")
    world.json            seed, split, sizes, shape lists, held-out combinations
    A video is ONE PNG: its F square frames side by side, (H, F*W, 3); in documents.jsonl a video is
    the PNG that is F times wider than tall (world_render.strip_to_video reads it back)."""
    ap = argparse.ArgumentParser(prog="python -m miniflamingo world", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--n", type=int, default=200, help="pairs, vision pairs, videos and documents (each)")
    ap.add_argument("--lm-docs", type=int, default=None, help="LM corpus documents (default 10 * n)")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed")
    ap.add_argument("--split", default="train", choices=list(SPLITS))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=6, help="frames per video")
    args = ap.parse_args(argv)
    world, root, n, split = World(args.seed, args.image_size, args.frames), Path(args.out), args.n, args.split
    n_lm = 10 * n if args.lm_docs is None else args.lm_docs
    root.mkdir(parents=True, exist_ok=True)
    frames = 0

    def save(img: np.ndarray, rel: str) -> str:
        nonlocal frames
        frames += len(img) if img.ndim == 4 else 1
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(video_strip(img) if img.ndim == 4 else img).save(root / rel, compress_level=1)
        return rel

    def caption_row(item: dict, folder: str, i: int) -> dict:
        return {"image": save(item["image"], f"{folder}/{i:06d}.png"), "caption": item["caption"]}

    def video_row(i: int) -> dict:
        v = world.video_text_pair(i, split)
        path = save(v["video"], f"videos/{i:06d}.png")
        return {"video": path, "frames": args.frames, "caption": v["caption"]}

    def document_row(i: int) -> dict:
        d = world.document(i, split)
        paths = [m if m is None else save(m, f"documents/{i:06d}_{j}.png") for j, m in enumerate(d["images"])]
        return {"texts": d["texts"], "images": paths, "task": d["task"]}

    t0 = time.perf_counter()
    writers = {  # file: (rows, row i); items are made, saved and written one at a time
        "captions": (n, lambda i: caption_row(world.image_text_pair(i, split), "images", i)),
        "vision_captions": (n, lambda i: caption_row(world.vision_pair(i, split), "vision", i)),
        "videos": (n, video_row),
        "documents": (n, document_row),
        "lm_corpus": (n_lm, lambda i: {"text": world.lm_document(i)}),
    }
    for name, (count, row) in writers.items():
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(count):
                f.write(json.dumps(row(i)) + "\n")
    meta = {"seed": args.seed, "split": split, "image_size": args.image_size, "frames": args.frames,
            "shapes": SHAPES, "novel_shapes": NOVEL_SHAPES, "colours": list(COLOURS), "sizes": list(SIZES),
            "positions": POSITIONS, "heldout_combos": HELDOUT_COMBOS,
            "counts": {"pairs": n, "videos": n, "documents": n, "lm_docs": n_lm, "frames_rendered": frames}}
    (root / "world.json").write_text(json.dumps(meta, indent=1))
    dt = time.perf_counter() - t0
    print(f"wrote {n} pairs, {n} vision pairs, {n} videos, {n} documents and {n_lm} LM documents to {root} "
          f"in {dt:.1f}s: {frames} frames, {frames / dt:.0f} frames/s with PNG writing")
    return 0
