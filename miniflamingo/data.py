"""The interleaved data pipeline: aligned documents -> token ids with `<image>` -> padded batches.

Notable features
- One path for every dataset (paper App. A.3): an interleaved document, an image-text pair and a
  video-text pair are all aligned lists {texts, images}; a pair is just the document [media, caption].
- Row layout: `<image>` where each media sits, `<|endofchunk|>` (EOC) before every `<image>` that does
  not open the row and at the end (paper A.3.1), so EOC ends each media's text. A pair becomes
  `<image>{caption}<|endofchunk|>`. Data text goes through `encode_ordinary`: a literal "<image>" typed
  in a caption stays text; only this module puts special ids in.
- p_next image-placement augmentation (paper A.3.2): each run of text between two media attends to the
  media after it with probability p_next, else to the one before it. A run with no media on its chosen
  side keeps its place: text before the first media then sees no media (phi = 0), text after the last
  media sees the last one. So p_next = 0 keeps the document's order,
  `T0 EOC <image>1 T1 EOC <image>2 T2 EOC`, and p_next = 1 gives `<image>1 T0 EOC <image>2 T1 T2 EOC`.
- Random `seq_len`-token subsequences keeping the first `max_media` media (paper: 256 tokens, 5 media):
  the row is cut just before the (max_media+1)-th `<image>`, so every `<image>` in a row has its media
  and a media never appears without its `<image>`.
- Targets are next tokens, -100 where no loss applies: padding, `<image>` as a target (which image
  comes next is not the model's to predict), and every position before the row's first `<image>`
  (phi = 0). Our xattn layers are the identity there (flamingo.py), so those predictions are exactly the
  frozen LM's: their loss has no gradient and would only dilute the mean and make the loss read higher.
  A row without any `<image>` therefore has no target at all.
- A mixture sampler gives one batch per dataset per step with its weight lambda_m (paper 2.4: 1.0 / 0.2
  / 0.2 / 0.03, gradients accumulated over all datasets); batch `step` is a pure function of
  (seed, step, rank), so a resumed run sees the same data; ranks read disjoint shards.
- Media may be pixels (uint8 images (H, W, 3) or videos (F, H, W, 3)) or features from the frozen
  vision encoder (float (F, S, Dv)), cached once with `DocumentDataset.with_features` since the
  encoder does not change during Flamingo training.

Shapes: B batch, T media slots per row, F frames, S grid cells, L text length, Dv feature width.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message names the file and line (or the document) it comes from."""


# ----------------------------------------------------------------------------- media


def media_to_tensor(m) -> torch.Tensor:
    """uint8 image (H, W, 3) -> (1, 3, H, W) float in [0, 1]; uint8 video (F, H, W, 3) -> (F, 3, H, W);
    a float tensor (F, S, Dv) of pre-encoded features passes through."""
    if isinstance(m, torch.Tensor) and m.is_floating_point():
        if m.dim() != 3:
            raise ValueError(f"expected pre-encoded media features (F, S, Dv), got {tuple(m.shape)}")
        return m
    x = torch.as_tensor(np.asarray(m))
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 image (H, W, 3) or video (F, H, W, 3), "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.dim() == 3:
        x = x[None]  # an image is a one-frame video: (1, H, W, 3)
    return x.permute(0, 3, 1, 2).float().div_(255)  # (F, 3, H, W)


# ----------------------------------------------------------------------------- documents -> tokens


def check_document(texts, images, where: str) -> None:
    """OBELICS/MMC4-style aligned lists: same length, exactly one of texts[i], images[i] set."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise DataError(f"{where}: expected lists 'texts' and 'images', got {type(texts).__name__} and "
                        f"{type(images).__name__}")
    if len(texts) != len(images):
        raise DataError(f"{where}: 'texts' has {len(texts)} entries but 'images' has {len(images)}")
    if not texts:
        raise DataError(f"{where}: empty document")
    for i, (t, m) in enumerate(zip(texts, images)):
        if (t is None) == (m is None):
            state = "both" if t is not None else "neither"
            raise DataError(f"{where}: at position {i} {state} of texts[{i}] and images[{i}] are set "
                            f"(exactly one must be)")
        if t is not None and not isinstance(t, str):
            raise DataError(f"{where}: texts[{i}] must be a string or null, got {type(t).__name__}")


def check_trainable(texts, images, where: str) -> None:
    """A training document read from a file needs an image and some text (readers.read_interleaved
    checks it; DocumentDataset takes any document, as its property tests do). Both kinds are valid
    OBELICS, but tokens before a row's first <image> carry no loss (phi = 0, paper 2.3): a document
    without an image, or without any text, would be drawn and trained on for nothing (and one without
    a single token breaks a batch later, far from its file)."""
    if all(m is None for m in images):
        raise DataError(f"{where}: no image: a text-only document gives Flamingo nothing to learn (no "
                        f"loss before a row's first <image>)")
    if not any(t.strip() for t in texts if t is not None):
        raise DataError(f"{where}: no text: a document of images only gives Flamingo nothing to learn")


def place_images(texts: list[list[int] | None], media: list, special, p_next: float = 0.0,
                 rng: np.random.Generator | None = None, sep: list[int] = ()) -> tuple[list[int], list]:
    """Aligned lists of already-encoded texts and media -> (ids, media in `<image>` order).

    Consecutive text entries form one run, joined by `sep`. Each run goes to the media after it with
    probability p_next, else to the media before it (paper A.3.2); see the module docstring for runs
    that have no media on their chosen side.
    """
    if 0.0 < p_next < 1.0 and rng is None:
        raise ValueError("place_images: 0 < p_next < 1 needs an rng")
    runs: list[list[int]] = [[]]  # runs[k]: text between media k-1 and k (runs[0] before the first)
    out_media = []
    for t, m in zip(texts, media):
        if m is not None:
            out_media.append(m)
            runs.append([])
        else:
            runs[-1] += (list(sep) if runs[-1] else []) + t
    K = len(out_media)
    lead: list[int] = []
    chunks: list[list[int]] = [[] for _ in range(K)]  # chunks[k]: text attending to media k
    for k, run in enumerate(runs):
        if not run:
            continue
        nxt = p_next >= 1.0 or (p_next > 0.0 and rng.random() < p_next)
        if k == 0 and (not nxt or K == 0):
            lead = run  # before the first media: sees no media
            continue
        target = k if (nxt and k < K) else k - 1  # 0-based media index; the last run can only look back
        chunks[target] += (list(sep) if chunks[target] else []) + run
    ids = list(lead)
    for chunk in chunks:
        if ids:
            ids.append(special.eoc_id)  # paper A.3.1: EOC before each image ...
        ids += [special.image_id] + chunk
    if ids:
        ids.append(special.eoc_id)  # ... and at the end of the document
    return ids, out_media


def document_to_tokens(texts: list[str | None], images: list, tok, p_next: float = 0.0,
                       rng: np.random.Generator | None = None,
                       where: str = "document") -> tuple[list[int], list]:
    """An aligned document {texts, images} -> (ids, media); see place_images for p_next."""
    check_document(texts, images, where)
    encoded = [tok.encode_ordinary(t) if t is not None else None for t in texts]
    return place_images(encoded, images, tok, p_next, rng, sep=tok.encode_ordinary("\n"))


def pairs_to_tokens(captions: list[str], media: list, tok) -> tuple[list[int], list]:
    """Image- or video-text pairs -> `<image>{caption}<|endofchunk|>` for each pair, in one row
    (one pair per row is the paper's ALIGN/LTIP/VTP setting)."""
    if len(captions) != len(media):
        raise ValueError(f"pairs_to_tokens: {len(captions)} captions but {len(media)} media")
    ids: list[int] = []
    for caption, _ in zip(captions, media):
        ids += [tok.image_id] + tok.encode_ordinary(caption) + [tok.eoc_id]
    return ids, list(media)


# ----------------------------------------------------------------------------- subsequences


def sample_subsequence(ids: list[int], media: list, seq_len: int, max_media: int,
                       rng: np.random.Generator, image_id: int) -> tuple[list[int], list]:
    """A random window of seq_len + 1 tokens (seq_len inputs, each with its next token) keeping at most
    max_media media (paper A.3: 256 tokens, the first 5 images)."""
    if seq_len < 1 or max_media < 1:
        raise ValueError(f"need seq_len >= 1 and max_media >= 1, got {seq_len} and {max_media}")
    n = len(ids)
    start = int(rng.integers(0, n - seq_len)) if n > seq_len + 1 else 0
    end = min(n, start + seq_len + 1)
    image_pos = [i for i, t in enumerate(ids) if t == image_id]
    first = sum(p < start for p in image_pos)  # media whose <image> lies before the window
    inside = [p for p in image_pos if start <= p < end - 1]  # <image> as an input token
    if len(inside) > max_media:
        end = inside[max_media]  # cut before the first <image> over the limit; an EOC precedes it
        inside = inside[:max_media]
    return ids[start:end], media[first:first + len(inside)]


# ----------------------------------------------------------------------------- collate


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor to `device` without making the host wait. On a GPU a plain `.to("cuda")` of
    ordinary (pageable) host memory copies and then waits until the GPU has finished everything queued
    before it, so the host could not assemble the next batch while the GPU trained on this one (issue 6:
    the H200's step waited at each batch's copies). From pinned memory the copy is queued like a kernel;
    the pinned buffer is not reused before the copy has run (torch's caching host allocator sees to it)."""
    device = torch.device(device)
    # Under torch.compile a plain move: its traced tensors cannot be pinned (pretrain-lm --compile traces
    # the ALiBi slopes' move), and the compiled graph places its inputs itself.
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Which rows share a packed row: first fit, longest row first, each packed row holding at most
    `capacity` tokens. -> bins of row indices, each in its rows' original order."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:  # fits nowhere yet: a new packed row
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in bins]


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """segments (B, L) of a packed batch (collate's pack) -> (B, L) bool, True where a segment begins
    (position 0, and wherever the row index changes; padding's -1 is a segment of its own). The model
    restarts what a token inherits from the positions before it there: smeared keys, phi."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def collate(rows: list[tuple[list[int], list]], special, seq_len: int | None = None,
            max_media: int | None = None, return_frames: bool = False, pack: bool = False):
    """Rows (ids, media) -> input_ids (B, L) long, media (B, T, F, 3, H, W) float32 in [0, 1] (or
    features (B, T, F, S, Dv)), targets (B, L) long; with return_frames=True also frames (B, T) long.

    Inputs are ids[:-1], targets ids[1:], -100 on padding, on `<image>` as a target and before the
    first `<image>` (phi = 0). L = seq_len, or the longest row; padding is eot_id. T = max_media, or
    the most media in a row (packed: in a packed row); slot j of row i holds the media of its (j+1)-th
    `<image>`; empty slots are zeros. F = the most frames in the batch; a media with fewer frames is
    padded with zero frames, and frames[i, j] counts the real ones (0 for an empty slot), for the
    resampler to skip the padding: an image in a batch with a video must stay an image, not become a
    still video. media (and frames) are None when no row has media.
    `special` is anything with .image_id and .eot_id: a Tokenizer or a FlamingoConfig.

    pack=True (training): several short rows share one row of L positions (`pack_rows`), their media
    slots one after the other, and a fifth tensor comes back, segments (B', L) long: the index of the
    row each position came from, -1 on padding. The model keeps rows apart by it (`Flamingo.forward`:
    attention within a segment, its smeared keys and phi restarting there), so loss and gradients are
    the unpacked batch's, to rounding. Why: documents are padded to the longest of their batch, and in
    the world's interleaved batches of 16, 62% of the positions were padding (issue 6).
    Returns (input_ids, media, targets, frames, segments).
    """
    B = len(rows)
    L = seq_len or max(len(ids) - 1 for ids, _ in rows)
    T = max_media if max_media is not None else max(len(m) for _, m in rows)
    tensors = [[media_to_tensor(m) for m in ms] for _, ms in rows]  # bad media fail first, as they did
    # The whole batch at once in numpy: a few array ops instead of a handful of small torch ops per row
    # (on a GPU the host assembled a batch of 512 rows more slowly than the GPU trained on it, issue 6).
    lengths = np.array([len(ids) - 1 for ids, _ in rows], dtype=np.int64)  # input tokens per row
    bad_length = (lengths < 1) | (lengths > L)
    ids = np.full((B, L + 1), special.eot_id, dtype=np.int64)  # row i: its n + 1 ids, then padding
    for i, (row_ids, _) in enumerate(rows):
        if not bad_length[i]:
            ids[i, :len(row_ids)] = row_ids
    x, nxt = ids[:, :-1], ids[:, 1:]
    real = np.arange(L) < lengths[:, None]  # (B, L): input positions that are not padding
    is_image = (x == special.image_id) & real
    n_images, n_media = is_image.sum(1), np.array([len(m) for _, m in rows], dtype=np.int64)
    bad_media = ~bad_length & ((n_images != n_media) | (n_media > T))
    bad = np.flatnonzero(bad_length | bad_media)
    if bad.size:  # the first bad row, named as a row-by-row check would
        i = int(bad[0])
        if bad_length[i]:
            raise ValueError(f"row {i} has {lengths[i]} input tokens; expected 1..{L} (seq_len / context "
                             f"length)")
        raise ValueError(f"row {i} has {n_images[i]} <image> tokens and {n_media[i]} media for {T} slots; "
                         f"each <image> needs exactly one media and a slot")
    no_loss = (nxt == special.image_id) | (is_image.cumsum(1) == 0) | ~real  # phi(t) = 0, or padding
    x, y = np.where(real, x, special.eot_id), np.where(no_loss, -100, nxt)
    slot_of = [[i * T + j for j in range(n)] for i, n in enumerate(n_media)]  # row i's media -> B*T row
    segments = None
    if pack:  # each bin's rows side by side in one row, each row's media after the earlier rows' media
        bins = pack_rows(lengths.tolist(), L)
        T = max(int(n_media[b].sum()) for b in bins)
        B, px, py = len(bins), np.full((len(bins), L), special.eot_id), np.full((len(bins), L), -100)
        segments = np.full((B, L), -1, dtype=np.int64)
        for p, b in enumerate(bins):
            start, first_slot = 0, 0
            for i in b:
                n = lengths[i]
                px[p, start:start + n], py[p, start:start + n] = x[i, :n], y[i, :n]
                segments[p, start:start + n] = i
                slot_of[i] = [p * T + first_slot + j for j in range(n_media[i])]
                start, first_slot = start + n, first_slot + n_media[i]
        x, y, segments = px, py, torch.from_numpy(segments)
    input_ids, targets = torch.from_numpy(x), torch.from_numpy(y)
    shapes = {tuple(t.shape[1:]) for ts in tensors for t in ts}
    media, frames = None, None
    if len(shapes) > 1:
        raise ValueError(f"media in one batch must share their per-frame shape, got {sorted(shapes)}")
    if shapes:
        F, shape = max(t.shape[0] for ts in tensors for t in ts), shapes.pop()
        flat = [(slot_of[i][j], t) for i, ts in enumerate(tensors) for j, t in enumerate(ts)]  # (slot, media)
        # Features cached on a GPU stay there: copying them into a host batch would cost one transfer per
        # media and then one more of the whole, mostly zero-padded, batch. One index_copy per frame count,
        # not one copy per media: on a GPU thousands of tiny copies a step cost more than the copying.
        device = flat[0][1].device
        media = torch.zeros(B * T, F, *shape, device=device)  # (B*T, F, 3, H, W) or (B*T, F, S, Dv)
        frames = torch.zeros(B * T, dtype=torch.long)  # real frames per slot
        by_count: dict[int, list] = {}  # real frames -> [(B*T row, media)]
        for r, t in flat:
            by_count.setdefault(t.shape[0], []).append((r, t))
        for n, items in by_count.items():
            rows = [r for r, _ in items]
            media[:, :n].index_copy_(0, to_device(torch.tensor(rows), device),
                                     torch.stack([t for _, t in items]))  # frames past n stay 0: padding
            frames[rows] = n
        media, frames = media.view(B, T, F, *shape), frames.view(B, T)  # (B, T, F, ...), (B, T)
    if pack:
        return input_ids, media, targets, frames, segments
    return (input_ids, media, targets, frames) if return_frames else (input_ids, media, targets)


# ----------------------------------------------------------------------------- datasets


class DocumentDataset:
    """Documents tokenized once (text entries encoded, media kept as given); `row` assembles one
    training row with fresh randomness (placement, window) each time it is drawn."""

    def __init__(self, texts: list[list[list[int] | None]], media: list[list], special, sep: list[int]):
        self.texts, self.media, self.special, self.sep = texts, media, special, list(sep)

    @classmethod
    def from_documents(cls, documents: list[dict], tok) -> DocumentDataset:
        """[{"texts": [str|None, ...], "images": [media|None, ...]}, ...], as World.documents and
        read_interleaved give them."""
        texts, media = [], []
        for d, doc in enumerate(documents):
            check_document(doc["texts"], doc["images"], where=f"document {d}")
            texts.append([tok.encode_ordinary(t) if t is not None else None for t in doc["texts"]])
            media.append(list(doc["images"]))
        return cls(texts, media, tok, tok.encode_ordinary("\n"))

    @classmethod
    def from_pairs(cls, pairs: list[dict], tok) -> DocumentDataset:
        """[{"image" or "video": media, "caption": str}, ...] -> one row each,
        `<image>{caption}<|endofchunk|>`."""
        docs = []
        for p, pair in enumerate(pairs):
            m = pair["image"] if pair.get("image") is not None else pair.get("video")
            if m is None or not isinstance(pair.get("caption"), str):
                raise DataError(f"pair {p}: expected keys 'image' or 'video', and 'caption' (str)")
            docs.append({"texts": [None, pair["caption"]], "images": [m, None]})
        return cls.from_documents(docs, tok)

    def __len__(self) -> int:
        return len(self.texts)

    def row(self, i: int, rng: np.random.Generator, seq_len: int = 256, max_media: int = 5,
            p_next: float = 0.0) -> tuple[list[int], list]:
        ids, media = place_images(self.texts[i], self.media[i], self.special, p_next, rng, self.sep)
        return sample_subsequence(ids, media, seq_len, max_media, rng, self.special.image_id)

    @torch.no_grad()
    def with_features(self, encoder, batch_size: int = 256, workers: int = 1) -> DocumentDataset:
        """The same documents with every media replaced by its frozen-encoder features (F, S, Dv), so
        training skips the vision encoder. All media must share one (H, W). workers: Python threads
        encoding batches side by side; each batch's result does not depend on how many there are (the
        batches are the same), so with torch on one thread the features are bit-identical to workers=1's
        (torch's ops release the GIL: 1.8-1.9x faster on 2 cores for the tiny encoder, one thread each)."""
        flat = [(d, i, m) for d, ms in enumerate(self.media) for i, m in enumerate(ms) if m is not None]
        media = [list(ms) for ms in self.media]
        # frames go to the encoder's device, and the features stay there (a GPU's: see collate)
        device = next(encoder.parameters()).device if isinstance(encoder, torch.nn.Module) else "cpu"

        def encode(k: int):
            frames = [media_to_tensor(m) for _, _, m in flat[k:k + batch_size]]  # each (F, 3, H, W)
            feats = encoder(torch.cat(frames).to(device))  # (sum of F, S, Dv): frames one by one
            return feats.split([t.shape[0] for t in frames])

        starts = range(0, len(flat), batch_size)
        if workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(encode, starts))  # in order, whichever thread finished first
        else:
            parts = [encode(k) for k in starts]
        for k, feats in zip(starts, parts):
            for (d, i, _), f in zip(flat[k:k + batch_size], feats):
                media[d][i] = f  # (F, S, Dv)
        return DocumentDataset(self.texts, media, self.special, self.sep)


# ----------------------------------------------------------------------------- the mixture


@dataclass
class Source:
    """One dataset of the mixture, with its loss weight lambda_m (paper 2.4) and row settings."""

    name: str
    data: DocumentDataset
    weight: float
    batch_size: int
    seq_len: int = 256  # paper A.3: 256-token subsequences
    max_media: int = 5  # paper A.3: the first 5 images
    # paper A.3.2: 0.5 for web pages (M3W), whose text may describe the image before or after it. Keep 0
    # for data whose text always follows its image, like the synthetic world: there 0.5 would pair half
    # the captions with the wrong image. Pairs are unaffected by it.
    p_next: float = 0.0
    # Pack short rows together (collate's pack): the same loss and gradients, to rounding, from fewer
    # positions. The model must keep rows apart (only-immediate-media cross-attention: Flamingo.forward).
    pack: bool = False


class MixtureBatch(NamedTuple):
    name: str
    weight: float  # lambda_m: the training loop adds weight * loss for this batch
    input_ids: torch.Tensor  # (B, L); packed (Source.pack): fewer rows, B' <= B
    media: torch.Tensor | None  # (B, T, F, 3, H, W) or features (B, T, F, S, Dv)
    targets: torch.Tensor  # (B, L)
    frames: torch.Tensor | None = None  # (B, T) real frames per media slot, for the resampler to skip padding
    segments: torch.Tensor | None = None  # (B, L) the row of each position when packed, -1 on padding


class MixtureSampler:
    """One batch per dataset per step (paper 2.4: accumulate gradients over all datasets; round-robin
    was worse). Batch `step` depends only on (seed, step, rank): each epoch is a seeded permutation,
    rank r takes its positions r, r + world_size, ... (disjoint shards of equal size)."""

    def __init__(self, sources: list[Source], seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        for s in sources:
            if len(s.data) < world_size:
                raise ValueError(f"source {s.name!r} has {len(s.data)} items, fewer than {world_size} ranks")
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def indices(self, m: int, step: int) -> list[int]:
        """The items of source m that this rank reads at `step`."""
        src = self.sources[m]
        shard = len(src.data) // self.world_size  # per rank per epoch; the remainder rotates with the perm
        out = []
        for pos in range(step * src.batch_size, (step + 1) * src.batch_size):
            epoch, offset = divmod(pos, shard)
            if (m, epoch) not in self._perms:
                self._perms = {k: v for k, v in self._perms.items() if k[0] != m}  # keep one epoch per source
                rng = np.random.default_rng([self.seed, m, epoch])
                self._perms[m, epoch] = rng.permutation(len(src.data))
            out.append(int(self._perms[m, epoch][self.rank + offset * self.world_size]))
        return out

    def batch(self, step: int) -> list[MixtureBatch]:
        out = []
        for m, src in enumerate(self.sources):
            rng = np.random.default_rng([self.seed, m, step, self.rank, 1])
            rows = [src.data.row(i, rng, src.seq_len, src.max_media, src.p_next)
                    for i in self.indices(m, step)]
            batch = collate(rows, src.data.special, return_frames=True, pack=src.pack)
            out.append(MixtureBatch(src.name, src.weight, *batch))  # segments only when packed
        return out

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1
