"""Pixels of the synthetic world: shapes, colours, backgrounds, rendered with pillow.

Notable features
- Every shape is a mask drawn at 4x resolution inside its own bounding box and box-filtered down,
  so small (about 6 px radius) shapes stay smooth and tell apart at 64x64.
- Named training SHAPES, NOVEL_SHAPES (never used in any training stage) and 48 procedural "blob"
  shapes (seeded star-convex polygons) that only widen the vision encoder's pretraining.
- `render_scene(attrs, size)` is a pure function of a JSON-able attrs dict: the scene samplers in
  world.py decide everything (jitter, background noise seed), this module only draws it.

Shapes: an image is uint8 (H, W, 3); a video is uint8 (F, H, W, 3).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: cheap anti-aliasing

COLOURS = {  # saturated object colours; backgrounds below stay pale so every colour reads clearly
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (235, 200, 0),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "pink": (250, 110, 190),
    "brown": (120, 70, 20),
}

BACKGROUND_COLOURS = {
    "white": (245, 245, 245),
    "light gray": (210, 210, 210),
    "cream": (245, 235, 205),
    "pale blue": (210, 228, 245),
    "pale green": (215, 240, 215),
    "pale pink": (245, 222, 228),
}
BACKGROUND_KINDS = ("plain", "gradient", "noise")

SIZES = {"small": 0.10, "large": 0.15}  # radius as a fraction of the image side


# ----------------------------------------------------------------------------- shape outlines
# Each shape is a list of (op, geometry) in unit coordinates (radius 1, y down): op "poly" fills a
# polygon, "ellipse" a disc of the given radius and offset, and fill 0 cuts a hole (ring, moon).


def _regular(n: int, r: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    angles = [math.radians(start + 360 * i / n) for i in range(n)]
    return [(r * math.cos(a), r * math.sin(a)) for a in angles]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    outer = _regular(points)
    inner_pts = _regular(points, inner, start=-90.0 + 180.0 / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _heart() -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(x / 17, (y + 2) / 17))


_W = 0.34  # half-width of the cross's arms
OUTLINES: dict[str, list[tuple[str, object, int]]] = {
    # training shapes
    "circle": [("ellipse", (0.0, 0.0, 1.0), 255)],
    "square": [("poly", [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], 255)],
    "triangle": [("poly", [(x, y + 0.18) for x, y in _regular(3, 1.1)], 255)],
    "star": [("poly", _star(), 255)],
    "cross": [
        (
            "poly",
            [
                (-_W, -1),
                (_W, -1),
                (_W, -_W),
                (1, -_W),
                (1, _W),
                (_W, _W),
                (_W, 1),
                (-_W, 1),
                (-_W, _W),
                (-1, _W),
                (-1, -_W),
                (-_W, -_W),
            ],
            255,
        )
    ],
    "diamond": [("poly", [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], 255)],
    "ring": [("ellipse", (0.0, 0.0, 1.0), 255), ("ellipse", (0.0, 0.0, 0.52), 0)],
    "rectangle": [("poly", [(-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5)], 255)],
    # novel shapes: never drawn in any training split
    "heart": [("poly", _heart(), 255)],
    "arrow": [
        ("poly", [(-1, -0.28), (0.1, -0.28), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.28), (-1, 0.28)], 255)
    ],
    "moon": [("ellipse", (0.0, 0.0, 1.0), 255), ("ellipse", (0.5, -0.2, 0.85), 0)],
    "hourglass": [("poly", [(-0.8, -1), (0.8, -1), (0.1, 0), (0.8, 1), (-0.8, 1), (-0.1, 0)], 255)],
    "house": [("poly", [(-0.8, 1), (0.8, 1), (0.8, -0.1), (0, -1), (-0.8, -0.1)], 255)],
    "bolt": [
        (
            "poly",
            [(0.25, -1), (-0.6, 0.15), (-0.05, 0.15), (-0.3, 1), (0.6, -0.2), (0.05, -0.2), (0.4, -1)],
            255,
        )
    ],
}


def blob_outline(seed: int) -> list[tuple[float, float]]:
    """A random star-convex polygon. Even seeds: smooth, radius(theta) = 1 + random harmonics with
    one dominant (2 lobes: elongated, 3-6: flower-like); odd seeds: angular, 4-9 vertices at random
    radii. So blobs differ in far more ways than the named shapes do."""
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        r = np.ones(48)
        for k in range(1, 6):
            r += rng.uniform(0, 0.4 / k**0.7) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        r += rng.uniform(0.15, 0.45) * np.cos(rng.integers(2, 7) * theta + rng.uniform(0, 2 * math.pi))
    else:
        n = int(rng.integers(4, 10))
        theta = np.sort(rng.uniform(0, 2 * math.pi / n, n) + np.arange(n) * 2 * math.pi / n)
        r = rng.uniform(0.45, 1.0, n)
    r = np.clip(r / r.max(), 0.35, 1.0)
    return list(zip(r * np.cos(theta), r * np.sin(theta)))


BLOB_SEED = 20220429  # fixed: the blobs are part of the world's definition, like the named shapes
BLOB_SHAPES = tuple(f"blob{i}" for i in range(48))  # generic ids: vision_pairs, and `train --blob-binding`
for _i, _name in enumerate(BLOB_SHAPES):
    OUTLINES[_name] = [("poly", blob_outline(BLOB_SEED + _i), 255)]

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "rectangle")
NOVEL_SHAPES = ("heart", "arrow", "moon", "hourglass", "house", "bolt")  # never in any training stage
# One held-out colour per shape (a Latin square, so each colour is held out once): never rendered in
# "train", so "val"/"test" can ask about combinations Flamingo never saw (issue 3, held-out splits).
HELDOUT_COMBOS = tuple(zip(COLOURS, ("star", "triangle", "ring", "square", "cross", "circle", "diamond",
                                      "rectangle")))
assert sorted(s for _, s in HELDOUT_COMBOS) == sorted(SHAPES), "HELDOUT_COMBOS: one colour per shape"
assert set(SHAPES) | set(NOVEL_SHAPES) | set(BLOB_SHAPES) == set(OUTLINES), "every outline needs a name list"


# ----------------------------------------------------------------------------- drawing


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of one shape in [0, 1], as (mask (h, w), x0, y0) of its pixel bbox."""
    if shape not in OUTLINES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES + NOVEL_SHAPES} and blob0..blob47")
    x0, y0 = max(0, math.floor(cx - r - 1)), max(0, math.floor(cy - r - 1))
    x1, y1 = min(size, math.ceil(cx + r + 1)), min(size, math.ceil(cy + r + 1))
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = (cx - x0) * s, (cy - y0) * s  # the shape's center in the supersampled box
    rs = r * s
    for op, geom, fill in OUTLINES[shape]:
        if op == "poly":
            draw.polygon([(ox + x * rs, oy + y * rs) for x, y in geom], fill=fill)
        else:
            ex, ey, er = geom
            box = [ox + (ex - er) * rs, oy + (ey - er) * rs, ox + (ex + er) * rs, oy + (ey + er) * rs]
            draw.ellipse(box, fill=fill)
    small = canvas.reduce(s)  # box filter: mean coverage of each pixel's s x s samples
    return np.asarray(small, dtype=np.float32) / 255.0, x0, y0


def render_background(bg: dict, size: int) -> np.ndarray:
    """bg = {"kind": plain|gradient|noise, "rgb": [r, g, b], "rgb2": [...], "angle": deg, "seed": int}."""
    base = np.array(bg["rgb"], dtype=np.float32)
    if bg["kind"] == "plain":
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif bg["kind"] == "gradient":
        a = math.radians(bg["angle"])
        u = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        t = (math.cos(a) * u[None, :] + math.sin(a) * u[:, None]) / 1.42 + 0.5  # (H, W) in [0, 1]
        img = base * (1 - t[..., None]) + np.array(bg["rgb2"], dtype=np.float32) * t[..., None]
    elif bg["kind"] == "noise":
        img = base + 8 * np.random.default_rng(bg["seed"]).standard_normal((size, size, 3), dtype=np.float32)
    else:
        raise ValueError(f"background kind must be one of {BACKGROUND_KINDS}, got {bg['kind']!r}")
    return img


def render_scene(attrs: dict, size: int = 64) -> np.ndarray:
    """Draw attrs = {"objects": [{"shape", "rgb", "center": [x, y] in [0, 1], "radius": fraction}],
    "background": {...}} into a uint8 (H, W, 3) image."""
    img = render_background(attrs["background"], size)  # (H, W, 3) float
    for obj in attrs["objects"]:
        cx, cy = obj["center"][0] * size, obj["center"][1] * size
        m, x0, y0 = shape_mask(obj["shape"], cx, cy, obj["radius"] * size, size)
        h, w = m.shape
        m = m[..., None]  # (h, w, 1): alpha-blend the object's colour by its coverage
        rgb = np.array(obj["rgb"], np.float32)
        img[y0 : y0 + h, x0 : x0 + w] = img[y0 : y0 + h, x0 : x0 + w] * (1 - m) + rgb * m
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_video(frames: list[dict], size: int = 64) -> np.ndarray:
    """One attrs dict per frame -> uint8 (F, H, W, 3)."""
    return np.stack([render_scene(a, size) for a in frames])


def video_strip(video: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) -> (H, F*W, 3): frames side by side, how videos are stored as one PNG."""
    F, H, W, C = video.shape
    return video.transpose(1, 0, 2, 3).reshape(H, F * W, C)  # (H, F*W, 3)


def strip_to_video(strip: np.ndarray) -> np.ndarray:
    """(H, F*W, 3) with square frames -> (F, H, W, 3); the inverse of video_strip."""
    H, FW, C = strip.shape
    if FW % H:
        raise ValueError(f"expected a strip of square frames (H, F*H, 3), got {strip.shape}")
    return strip.reshape(H, FW // H, H, C).transpose(1, 0, 2, 3)  # (F, H, W, 3)
