"""Readers for real data on local disk, feeding the same pipeline as the synthetic world.

Notable features
- A captions folder: `captions.jsonl` with one `{"image": relpath, "caption": str}` per line, paths
  relative to the JSONL file (ALIGN/LTIP-like image-text pairs).
- OBELICS/MMC4-style interleaved documents: one `{"texts": [str|null, ...], "images": [relpath|null,
  ...]}` per line, aligned lists with exactly one of texts[i], images[i] set at each position.
- Images are letterboxed to the model's square size: resized so the long side fits, aspect ratio kept,
  the rest padded with black. Returned as uint8 (H, W, 3), the world's format.
- Bad input fails with the file and line named: a missing or unreadable image, a malformed JSON line, a
  wrong field, lists of different lengths, a position with both or neither entry set. With
  skip_bad=True the item is skipped instead, and the returned `Report` counts and lists every skip (a
  summary is printed). Nothing is dropped silently; blank lines are not items and are ignored.
- `python -m miniflamingo data --captions DIR --interleaved FILE [--skip-bad]` checks a data set and
  shows one tokenized row.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from miniflamingo.data import DataError, check_document, check_trainable


@dataclass
class Report:
    """What a reader read and what it skipped (file:line and why)."""

    path: str
    read: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: {self.read} read, {len(self.skipped)} skipped"]
        return "\n".join(lines + [f"  skipped {s}" for s in self.skipped])


def letterbox(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size, 3): fit the long side, keep the aspect ratio, pad with black."""
    img = img.convert("RGB")  # grayscale, palette and RGBA images become RGB
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return np.array(canvas)  # (H, W, 3), a writable copy


def load_image(path: Path, size: int, where: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{where}: image {str(path)!r} {'is not a file' if path.exists() else 'not found'}")
    try:
        with Image.open(path) as img:
            return letterbox(img, size)
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"{where}: cannot read image {str(path)!r}: {e}") from None


def read_jsonl(path: Path, parse, skip_bad: bool, quiet: bool = False) -> tuple[list, Report]:
    """Parse each non-blank line with parse(obj, where); skip or raise on DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    items, report = [], Report(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # newlines only, as iterating the file would
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON line ({e})") from None
            items.append(parse(obj, where))
            report.read += 1
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped.append(str(e))
    if report.skipped and not quiet:  # quiet: the caller reports (train: on rank 0 only)
        print(report.summary())
    return items, report


def captions_jsonl(path: str | Path) -> Path:
    """A captions folder's captions.jsonl, or the path itself when it is the file (DESIGN.md 5)."""
    path = Path(path)
    return path / "captions.jsonl" if path.is_dir() else path


def read_captions(path: str | Path, image_size: int, skip_bad: bool = False,
                  quiet: bool = False) -> tuple[list[dict], Report]:
    """A folder with captions.jsonl (or the JSONL file itself) -> ([{"image", "caption", "where"}, ...],
    report); "where" is the item's file:line."""
    jsonl = captions_jsonl(path)

    def parse(obj, where):
        if not (isinstance(obj, dict) and isinstance(obj.get("image"), str)
                and isinstance(obj.get("caption"), str)):
            raise DataError(f'{where}: expected {{"image": relpath, "caption": str}}, got {str(obj)[:80]}')
        if not obj["caption"].strip():  # would teach the model to end the text right after an image
            raise DataError(f"{where}: empty caption")
        image = load_image(jsonl.parent / obj["image"], image_size, where)
        return {"image": image, "caption": obj["caption"], "where": where}  # where: for later checks

    return read_jsonl(jsonl, parse, skip_bad, quiet)


def read_interleaved(path: str | Path, image_size: int, skip_bad: bool = False,
                     quiet: bool = False) -> tuple[list[dict], Report]:
    """OBELICS/MMC4-style JSONL -> ([{"texts": [str|None], "images": [uint8 (H, W, 3)|None]}, ...], report).
    Image paths are relative to the JSONL file."""
    path = Path(path)

    def parse(obj, where):
        if not isinstance(obj, dict) or "texts" not in obj or "images" not in obj:
            raise DataError(f'{where}: expected {{"texts": [...], "images": [...]}}, got {str(obj)[:80]}')
        texts, images = obj["texts"], obj["images"]
        check_document(texts, images, where)
        check_trainable(texts, images, where)
        for i, m in enumerate(images):
            if m is not None and not isinstance(m, str):
                raise DataError(f"{where}: images[{i}] must be a relative path or null, "
                                f"got {type(m).__name__}")
        loaded = [load_image(path.parent / m, image_size, f"{where}: images[{i}]") if m is not None else None
                  for i, m in enumerate(images)]
        return {"texts": texts, "images": loaded}

    return read_jsonl(path, parse, skip_bad, quiet)


def main(argv: list[str] | None = None) -> int:
    """Read local data, print what was read and skipped, and show one tokenized row."""
    from miniflamingo.data import DocumentDataset
    from miniflamingo.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(prog="python -m miniflamingo data", description=main.__doc__)
    ap.add_argument("--captions", help="folder with captions.jsonl (or the file)")
    ap.add_argument("--interleaved", help="OBELICS/MMC4-style JSONL of aligned texts/images")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--skip-bad", action="store_true", help="skip bad items (counted and reported)")
    ap.add_argument("--p-next", type=float, default=0.0, help="image-placement augmentation (paper A.3.2)")
    args = ap.parse_args(argv)
    if args.captions is None and args.interleaved is None:
        ap.error("nothing to check: give --captions DIR and/or --interleaved FILE")
    tok = Tokenizer.default()
    rng = np.random.default_rng(0)
    for what, reader, build in [("captions", read_captions, DocumentDataset.from_pairs),
                                ("interleaved", read_interleaved, DocumentDataset.from_documents)]:
        path = getattr(args, what)
        if path is None:
            continue
        try:
            items, report = reader(path, args.image_size, skip_bad=args.skip_bad)
        except DataError as e:
            print(f"data: {e}", file=sys.stderr)
            return 1
        if not report.skipped:  # the reader already printed it
            print(report.summary())
        if items:
            ids, media = build(items, tok).row(0, rng, p_next=args.p_next)
            print(f"  first row: {len(ids)} tokens, {len(media)} media\n  {tok.decode(ids)!r}")
    return 0
