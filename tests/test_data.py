"""The data pipeline: media slots match `<image>` tokens, targets, p_next placements against a reference,
windows against a brute-force oracle, determinism, the mixture sampler and its rank shards, the readers
on data_samples/, and every kind of bad input."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from miniflamingo.data import (
    DataError,
    DocumentDataset,
    MixtureSampler,
    Source,
    collate,
    document_to_tokens,
    media_to_tensor,
    pack_rows,
    pairs_to_tokens,
    sample_subsequence,
    to_device,
)
from miniflamingo.readers import letterbox, read_captions, read_interleaved
from miniflamingo.tokenizer import Tokenizer
from miniflamingo.xattn import compute_phi

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
TOK = Tokenizer.default()
IMG, EOC, EOT = TOK.image_id, TOK.eoc_id, TOK.eot_id
SPECIAL = {IMG, EOC, EOT}
FAST = settings(max_examples=30, deadline=None)


def tagged_media(k: int, frames: int = 1) -> np.ndarray:
    """A 2x2 media whose every pixel is k + 1: which media sits in a slot can be read off its values."""
    shape = (2, 2, 3) if frames == 1 else (frames, 2, 2, 3)
    return np.full(shape, k + 1, dtype=np.uint8)


@st.composite
def documents(draw, max_len=10):
    """Aligned lists with short texts (some with a literal "<image>" in them) and tagged media."""
    kinds = draw(st.lists(st.booleans(), min_size=1, max_size=max_len))
    words = st.sampled_from(["a red circle", "dax", "two", "<image> literal", "Q: what? A:", "blue"])
    texts, images, k = [], [], 0
    for is_media in kinds:
        if is_media:
            texts.append(None)
            images.append(tagged_media(k, frames=draw(st.integers(1, 3))))
            k += 1
        else:
            texts.append(draw(words))
            images.append(None)
    return {"texts": texts, "images": images}


def phi(ids: list[int]) -> list[int]:
    """Paper 2.3: phi(t) = number of <image> tokens at positions <= t."""
    return np.cumsum([t == IMG for t in ids]).tolist()


def reference_phi_of_text(texts, images, p_next: int) -> list[tuple[str, int]]:
    """Slow reference for p_next in {0, 1}: each text entry with the 1-based media it must attend to."""
    n_media = sum(m is not None for m in images)
    out, k = [], 0
    for t, m in zip(texts, images):
        if m is not None:
            k += 1
        elif p_next == 0:
            out.append((t, k))  # the media before it; 0 before the first media
        else:
            out.append((t, min(k + 1, n_media)))  # the media after it; the last media if none after
    return out


def text_with_phi(ids: list[int]) -> list[tuple[str, int]]:
    """Decode the text runs of a row, each with the phi of its tokens (checked to be constant)."""
    ph, out, run, run_phi = phi(ids), [], [], None
    for t, p in zip(ids + [EOC], ph + [None]):
        if t in SPECIAL:
            if run:
                out += [(s, run_phi) for s in TOK.decode(run).split("\n")]
            run, run_phi = [], None
        else:
            assert run_phi in (None, p), "phi changed inside a text run"
            run.append(t)
            run_phi = p
    return out


# ----------------------------------------------------------------------------- tokens and placement


def test_layout_of_a_document_and_a_pair():
    texts = ["T0", None, "T1", None, "T2"]
    images = [None, tagged_media(0), None, tagged_media(1), None]
    t0, t1, t2 = (TOK.encode_ordinary(s) for s in ("T0", "T1", "T2"))
    ids, media = document_to_tokens(texts, images, TOK, p_next=0.0)
    assert ids == t0 + [EOC, IMG] + t1 + [EOC, IMG] + t2 + [EOC]
    assert [m[0, 0, 0] for m in media] == [1, 2]
    ids, _ = document_to_tokens(texts, images, TOK, p_next=1.0)
    assert ids == [IMG] + t0 + [EOC, IMG] + t1 + TOK.encode_ordinary("\n") + t2 + [EOC]
    ids, _ = pairs_to_tokens(["a red circle"], [tagged_media(0)], TOK)
    assert ids == TOK.encode("<image>a red circle<|endofchunk|>")
    assert document_to_tokens([None, "a red circle"], [tagged_media(0), None], TOK, p_next=1.0)[0] == ids


def test_literal_image_in_data_stays_text():
    ids, media = document_to_tokens(["see <image> and <|endofchunk|>", None], [None, tagged_media(0)], TOK)
    assert ids.count(IMG) == len(media) == 1 and ids.count(EOC) == 2
    assert TOK.decode(ids).startswith("see <image> and <|endofchunk|><|endofchunk|><image>")


@FAST
@given(doc=documents(), p_next=st.sampled_from([0, 1]))
def test_p_next_zero_and_one_match_reference(doc, p_next):
    ids, media = document_to_tokens(doc["texts"], doc["images"], TOK, p_next=float(p_next))
    assert ids.count(IMG) == len(media) == sum(m is not None for m in doc["images"])
    assert [int(m.flat[0]) for m in media] == list(range(1, len(media) + 1)), "media stay in document order"
    assert text_with_phi(ids) == reference_phi_of_text(doc["texts"], doc["images"], p_next)
    if p_next == 0:  # p_next = 0 is the document's own order
        order = [t if t is not None else "<IMG>" for t in doc["texts"]]
        seen, run = [], []
        for t in ids:
            if t in (IMG, EOC):
                seen += TOK.decode(run).split("\n") if run else []
                seen += ["<IMG>"] if t == IMG else []
                run = []
            else:
                run.append(t)
        assert seen == order


@FAST
@given(doc=documents(), seed=st.integers(0, 2**16))
def test_p_next_half_gives_each_run_its_previous_or_next_media(doc, seed):
    ids, _ = document_to_tokens(doc["texts"], doc["images"], TOK, p_next=0.5, rng=np.random.default_rng(seed))
    prev = reference_phi_of_text(doc["texts"], doc["images"], 0)
    nxt = reference_phi_of_text(doc["texts"], doc["images"], 1)
    got = text_with_phi(ids)
    assert [t for t, _ in got] == [t for t, _ in prev], "placement never reorders text"
    assert all(g[1] in (p[1], n[1]) for g, p, n in zip(got, prev, nxt))


def test_p_next_half_needs_rng_and_uses_both_sides():
    texts, images = ["a", None, "b", None, "c"], [None, tagged_media(0), None, tagged_media(1), None]
    with pytest.raises(ValueError, match="rng"):
        document_to_tokens(texts, images, TOK, p_next=0.5)
    rng = np.random.default_rng(0)
    seen = {tuple(document_to_tokens(texts, images, TOK, 0.5, rng)[0]) for _ in range(40)}
    assert len(seen) == 4  # runs "a" and "b" each choose a side; "c" can only look back


# ----------------------------------------------------------------------------- windows and batches


@FAST
@given(doc=documents(max_len=14), seq_len=st.integers(1, 40), max_media=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_subsequence_against_brute_force(doc, seq_len, max_media, seed):
    ids, media = document_to_tokens(doc["texts"], doc["images"], TOK)
    w, wm = sample_subsequence(ids, media, seq_len, max_media, np.random.default_rng(seed), IMG)
    assert 2 <= len(w) <= seq_len + 1 and w[:-1].count(IMG) == len(wm) <= max_media
    starts = [s for s in range(len(ids)) if ids[s:s + len(w)] == w]
    assert starts, "the window is a contiguous piece of the document"
    ok = [s for s in starts if [id(m) for m in wm] == [id(m) for m in media[ids[:s].count(IMG):][:len(wm)]]]
    assert ok, "each <image> of the window keeps its own media, in order"
    s = ok[0]
    if len(w) < min(len(ids), seq_len + 1):  # shortened: only to stop before media max_media + 1
        assert ids[s + len(w)] == IMG and len(wm) == max_media and w[-1] == EOC


@FAST
@given(docs=st.lists(documents(max_len=14), min_size=1, max_size=4), seq_len=st.integers(4, 40),
       max_media=st.integers(1, 4), p_next=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_batch_slots_match_image_tokens_and_targets(docs, seq_len, max_media, p_next, seed):
    data = DocumentDataset.from_documents(docs, TOK)
    rng = np.random.default_rng(seed)
    rows = [data.row(i, rng, seq_len, max_media, p_next) for i in range(len(data))]
    x, media, y, frames = collate(rows, TOK, return_frames=True)
    x3, media3, y3 = collate(rows, TOK)  # the 3-value form callers already use: the same tensors
    assert torch.equal(x, x3) and torch.equal(y, y3)
    assert media is media3 is None or torch.equal(media, media3)
    B, L = x.shape
    assert y.shape == (B, L) and x.dtype == y.dtype == torch.long
    n_images = (x == IMG).sum(1)
    if media is None:
        assert n_images.sum() == 0 and frames is None
        return
    # frames counts each slot's real frames (0 when empty); every frame past them is zero padding
    expect_frames = [[media_to_tensor(m).shape[0] for m in ms] + [0] * (media.shape[1] - len(ms))
                     for _, ms in rows]
    assert frames.dtype == torch.long and frames.tolist() == expect_frames
    real = torch.arange(media.shape[2]) < frames[..., None]  # (B, T, F)
    assert (media[~real] == 0).all(), "padded frames and empty slots are zeros"
    assert (media[real].flatten(1).amin(-1) > 0).all(), "tagged real frames are never zero"
    assert media.dtype == torch.float32 and media.shape[0] == B and media.shape[3:] == (3, 2, 2)
    filled = media.flatten(2).amax(-1) > 0  # (B, T): tagged media are never all zero
    for i in range(B):
        expect = [j < n_images[i] for j in range(media.shape[1])]
        assert filled[i].tolist() == expect, "slot j holds the (j+1)-th <image>'s media"
        tags = media[i, : n_images[i], 0, 0, 0, 0].mul(255).round().long().tolist()
        assert tags == list(range(tags[0], tags[0] + len(tags))) if tags else True, "consecutive media"
    assert not (y == IMG).any(), "never asked to predict <image>"
    lengths = torch.tensor([len(ids) - 1 for ids, _ in rows])
    pad = torch.arange(L)[None] >= lengths[:, None]
    assert (y[pad] == -100).all() and (x[pad] == EOT).all(), "padding is eot in, -100 out"
    phi = (x == IMG).cumsum(1)  # (B, L), paper 2.3
    assert (y[phi == 0] == -100).all(), "no loss where the frozen LM alone predicts"
    next_token = torch.tensor([ids[1:] + [EOT] * (L - len(ids) + 1) for ids, _ in rows])  # (B, L)
    loss = ~pad & (phi > 0) & (next_token != IMG)
    assert (y[loss] == next_token[loss]).all() and (y[~loss] == -100).all(), "targets are next tokens"


@FAST
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=20), extra=st.integers(0, 10))
def test_pack_rows_places_each_row_once_within_capacity(lengths, extra):
    capacity = max(lengths) + extra
    bins = pack_rows(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths))), "each row exactly once"
    assert all(b == sorted(b) and sum(lengths[i] for i in b) <= capacity for b in bins)
    # first fit: a row opens or joins a later bin only if it fit in no earlier one (bins only fill up)
    totals = [sum(lengths[i] for i in b) for b in bins]
    for j, b in enumerate(bins):
        assert b and all(totals[i] + min(lengths[r] for r in b) > capacity for i in range(j))


@FAST
@given(docs=st.lists(documents(max_len=8), min_size=1, max_size=6), seq_len=st.integers(4, 30),
       max_media=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_packed_batch_holds_each_row_once_with_its_own_media(docs, seq_len, max_media, seed):
    """collate(pack=True) against the padded batch: row i's inputs and targets are segment i's, in one
    piece; the media its k-th <image> reads (phi restarting in each segment) are row i's k-th, frames
    too; padding is segment -1, eot in, -100 out; never more rows, never a longer row."""
    data = DocumentDataset.from_documents(docs, TOK)
    rng = np.random.default_rng(seed)
    rows = [data.row(i, rng, seq_len, max_media, 0.0) for i in range(len(data))]
    x, media, y, frames = collate(rows, TOK, return_frames=True)
    px, pmedia, py, pframes, seg = collate(rows, TOK, return_frames=True, pack=True)
    assert px.shape[1] == x.shape[1] and px.shape[0] <= x.shape[0] and seg.shape == px.shape == py.shape
    assert (px[seg < 0] == EOT).all() and (py[seg < 0] == -100).all()
    phi, pphi = compute_phi(x, IMG), compute_phi(px, IMG, segments=seg)
    for i, (ids, ms) in enumerate(rows):
        n = len(ids) - 1
        p, where = (seg == i).nonzero(as_tuple=True)
        assert len(p) == n and (p == p[0]).all() and (where == where[0] + torch.arange(n)).all()
        p = int(p[0])
        assert torch.equal(px[p, where], x[i, :n]) and torch.equal(py[p, where], y[i, :n])
        own = pphi[p, where]  # phi of row i's positions in the packed row
        before = {int(r) for r in seg[p, :int(where[0])]}  # the rows packed before it
        offset = sum(len(rows[r][1]) for r in before)  # their media slots come first
        assert torch.equal(own, torch.where(phi[i, :n] > 0, phi[i, :n] + offset, 0)), "own media only"
        for k in range(len(ms)):  # the (k+1)-th <image> of row i reads slot (its phi) - 1
            slot = int(own[phi[i, :n] == k + 1][0]) - 1
            assert torch.equal(pmedia[p, slot], media[i, k]) and pframes[p, slot] == frames[i, k]
    if media is not None:
        assert int(pframes.sum()) == int(frames.sum()), "every real frame once, no other"


def test_collate_videos_frames_and_fixed_sizes():
    video = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)  # (F, H, W, 3)
    assert torch.equal(media_to_tensor(video), torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255)
    rows = [pairs_to_tokens(["a video"], [video], TOK), pairs_to_tokens(["an image"], [tagged_media(4)], TOK)]
    x, media, y, frames = collate(rows, TOK, seq_len=16, max_media=3, return_frames=True)
    assert x.shape == y.shape == (2, 16) and media.shape == (2, 3, 3, 3, 2, 2)  # (B, T, F, 3, H, W)
    assert torch.equal(media[0, 0], media_to_tensor(video)) and media[:, 1:].abs().sum() == 0
    # an image in a video batch stays an image: one real frame, then zero frames the resampler skips
    assert (media[1, 0, 0] == 5 / 255).all() and (media[1, 0, 1:] == 0).all()
    assert frames.tolist() == [[3, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="<image> tokens"):
        collate([(rows[0][0], [])], TOK)
    with pytest.raises(ValueError, match="input tokens"):
        collate(rows, TOK, seq_len=3)
    with pytest.raises(ValueError, match="per-frame shape"):
        collate([rows[0], pairs_to_tokens(["big"], [np.zeros((4, 4, 3), np.uint8)], TOK)], TOK)
    with pytest.raises(ValueError, match="row 1 has 1 <image> tokens and 0 media"):  # the first bad row
        collate([rows[1], (rows[0][0], []), (rows[1][0], [])], TOK)
    with pytest.raises(ValueError, match="row 2 has 0 input tokens"):
        collate([rows[1], rows[0], ([EOT], [])], TOK)
    long_row = (list(range(10, 20)), [])  # 9 input tokens
    with pytest.raises(ValueError, match="row 0 has 1 <image> tokens"):  # row by row, whatever the check
        collate([(rows[0][0], []), long_row], TOK, seq_len=8)
    with pytest.raises(ValueError, match="row 0 has 9 input tokens"):
        collate([long_row, (rows[0][0], [])], TOK, seq_len=8)
    with pytest.raises(ValueError, match="expected uint8 image"):  # media are checked before the rows
        collate([long_row, (rows[1][0], [np.zeros((2, 2, 4), np.uint8)])], TOK, seq_len=8)


def test_to_device_copies_from_pinned_memory_without_waiting(monkeypatch):
    """On a GPU a plain .to("cuda") of pageable memory waits for the GPU to finish its queue; to_device
    pins the host tensor and copies non_blocking. There is no GPU here, so a stand-in tensor records the
    calls; on the CPU the tensor itself comes back."""
    t = torch.arange(4)
    assert to_device(t, "cpu") is t

    class HostTensor:
        device = torch.device("cpu")

        def __init__(self):
            self.calls = []

        def pin_memory(self):
            self.calls.append("pin_memory")
            return self

        def to(self, device, non_blocking=False):
            self.calls.append((str(device), non_blocking))
            return "on the GPU"

    h = HostTensor()
    assert to_device(h, "cuda") == "on the GPU" and h.calls == ["pin_memory", ("cuda", True)]
    h = HostTensor()
    h.device = torch.device("meta")  # not a host tensor: a plain move
    assert to_device(h, "cuda") == "on the GPU" and h.calls == [("cuda", False)]
    h = HostTensor()  # under torch.compile, whose traced tensors cannot be pinned: a plain move
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert to_device(h, "cuda") == "on the GPU" and h.calls == [("cuda", False)]


def test_cached_features_equal_encoding_the_batch():
    def encoder(x):  # stand-in frozen encoder: (N, 3, H, W) -> (N, S, Dv), a 2x2 grid of colour means
        return F.avg_pool2d(x, x.shape[-1] // 2).flatten(2).transpose(1, 2)  # (N, S=4, Dv=3)

    rng = np.random.default_rng(0)
    docs = [{"texts": [None, "a", None, "b"],
             "images": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), None,  # an image
                        rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), None]}  # a 2-frame video
            for _ in range(3)]
    data = DocumentDataset.from_documents(docs, TOK)
    cached = data.with_features(encoder, batch_size=2)
    rows = [data.row(i, np.random.default_rng(i)) for i in range(3)]
    rows_f = [cached.row(i, np.random.default_rng(i)) for i in range(3)]
    x, pixels, y = collate(rows, TOK)
    xf, feats, yf = collate(rows_f, TOK)
    assert torch.equal(x, xf) and torch.equal(y, yf)
    B, T, Fr = pixels.shape[:3]
    expect = encoder(pixels.flatten(0, 2)).view(B, T, Fr, 4, 3)  # (B, T, F, S, Dv)
    torch.testing.assert_close(feats, expect)

    # batches encoded by 3 threads side by side, finishing out of order: each media keeps its own features
    import random
    import time

    def slow_encoder(x):
        time.sleep(random.random() * 0.02)
        return encoder(x)

    for batch_size in (1, 2, 4):
        threaded = data.with_features(slow_encoder, batch_size=batch_size, workers=3)
        for ms, ms_t in zip(cached.media, threaded.media):
            for m, m_t in zip(ms, ms_t):
                assert (m is None) == (m_t is None) and (m is None or torch.equal(m, m_t))


# ----------------------------------------------------------------------------- the mixture sampler


def mixture(seed=0, rank=0, world_size=1):
    docs = [{"texts": [f"doc {d}", None, "x"], "images": [None, tagged_media(d), None]} for d in range(23)]
    pairs = [{"image": tagged_media(p), "caption": f"pair {p}"} for p in range(11)]
    videos = [{"video": tagged_media(v, frames=3), "caption": f"video {v}"} for v in range(7)]
    sources = [
        Source("interleaved", DocumentDataset.from_documents(docs, TOK), 1.0, batch_size=4, p_next=0.5),
        Source("image_text", DocumentDataset.from_pairs(pairs, TOK), 0.2, batch_size=3, seq_len=8),
        Source("video_text", DocumentDataset.from_pairs(videos, TOK), 0.03, batch_size=2),
    ]
    return MixtureSampler(sources, seed=seed, rank=rank, world_size=world_size)


def test_mixture_yields_every_dataset_each_step_with_its_weight():
    it = iter(mixture())
    for _ in range(5):
        batches = next(it)
        assert [(b.name, b.weight, b.input_ids.shape[0]) for b in batches] == [
            ("interleaved", 1.0, 4), ("image_text", 0.2, 3), ("video_text", 0.03, 2)]
        assert batches[2].media.shape[2] == 3 and batches[1].media.shape[2] == 1  # F
        assert (batches[2].frames == 3).all() and (batches[1].frames == 1).all()  # one media per pair
        assert batches[1].input_ids.shape[1] <= 8


def test_same_seed_same_batches_and_resume():
    a, b, c = mixture(seed=1), mixture(seed=1), mixture(seed=2)
    for step in (0, 1, 7, 3):  # any order: batch `step` depends only on (seed, step, rank)
        for u, v in zip(a.batch(step), b.batch(step)):
            assert torch.equal(u.input_ids, v.input_ids) and torch.equal(u.targets, v.targets)
            assert torch.equal(u.media, v.media)
    assert any(not torch.equal(u.input_ids, v.input_ids) for u, v in zip(a.batch(0), c.batch(0)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint(world_size):
    ranks = [mixture(rank=r, world_size=world_size) for r in range(world_size)]
    for m, src in enumerate(ranks[0].sources):
        per_epoch = len(src.data) // world_size // src.batch_size  # whole batches inside epoch 0
        for step in range(max(per_epoch, 1)):
            seen = [set(r.indices(m, step)) for r in ranks]
            assert sum(map(len, seen)) == len(set().union(*seen)), f"{src.name} step {step} overlaps"
        epoch0 = [sum((r.indices(m, s) for s in range(per_epoch)), []) for r in ranks]
        flat = sum(epoch0, [])
        assert len(flat) == len(set(flat)), f"{src.name}: an item read twice within an epoch"
    with pytest.raises(ValueError, match="rank"):
        mixture(rank=3, world_size=3)


# ----------------------------------------------------------------------------- readers


def test_readers_round_trip_data_samples():
    pairs, report = read_captions(SAMPLES / "captions", 64)
    lines = (SAMPLES / "captions" / "captions.jsonl").read_text().splitlines()
    assert report.read == len(pairs) == len(lines) >= 4 and not report.skipped
    assert all(p["image"].shape == (64, 64, 3) and p["image"].dtype == np.uint8 for p in pairs)
    cat = next(p["image"] for p in pairs if "cat" in p["caption"])  # 256x170: letterboxed, black bars
    assert cat[0].max() == 0 and cat[-1].max() == 0 and cat[32].max() > 0
    docs, report = read_interleaved(SAMPLES / "interleaved.jsonl", 64)
    assert report.read == len(docs) >= 1
    by_caption = {p["caption"]: p["image"] for p in pairs}
    astronaut = next(v for k, v in by_caption.items() if "astronaut" in k)
    assert any(m is not None and np.array_equal(m, astronaut) for m in docs[0]["images"])
    data = DocumentDataset.from_documents(docs, TOK)
    rows = [data.row(i, np.random.default_rng(0), seq_len=256, max_media=8) for i in range(len(data))]
    x, media, _ = collate(rows, TOK)
    assert ((x == IMG).sum(1) == (media.flatten(2).amax(-1) > 0).sum(1)).all()
    assert "telescope" in TOK.decode(rows[0][0])
    pair_rows = DocumentDataset.from_pairs(pairs, TOK)
    row = pair_rows.row(0, np.random.default_rng(0))[0]
    assert TOK.decode(row) == f"<image>{pairs[0]['caption']}<|endofchunk|>"


def test_letterbox_keeps_aspect_ratio():
    from PIL import Image

    img = Image.new("L", (40, 10), 200)  # grayscale, 4:1
    out = letterbox(img, 16)
    assert out.shape == (16, 16, 3) and (out[6:10] == 200).all()
    assert out[:6].max() == 0 and out[10:].max() == 0, "black bars above and below"


BAD_CAPTIONS = {
    "missing image": ('{"image": "nope.jpg", "caption": "x"}', "not found"),
    "unreadable image": ('{"image": "garbage.jpg", "caption": "x"}', "cannot read image"),
    "malformed line": ('{"image": "ok.png", "caption": ', "malformed JSON"),
    "wrong field": ('{"img": "ok.png", "caption": "x"}', "expected"),
    "empty caption": ('{"image": "ok.png", "caption": "  "}', "empty caption"),
    "image is a folder": ('{"image": ".", "caption": "x"}', "is not a file"),
}
BAD_DOCS = {
    "lengths differ": ('{"texts": ["a", null], "images": [null]}',
                       "'texts' has 2 entries but 'images' has 1"),
    "both set": ('{"texts": ["a"], "images": ["ok.png"]}', "both of texts[0] and images[0]"),
    "neither set": ('{"texts": ["a", null], "images": [null, null]}', "neither of texts[1] and images[1]"),
    "missing image": ('{"texts": [null, "x"], "images": ["nope.png", null]}', "not found"),
    "unreadable image": ('{"texts": [null, "x"], "images": ["garbage.jpg", null]}', "cannot read image"),
    "malformed line": ("[1, 2", "malformed JSON"),
    # valid OBELICS, but no loss could ever come from them (nothing after an <image> to predict)
    "text only": ('{"texts": ["a", "b"], "images": [null, null]}', "no image"),
    "images only": ('{"texts": [null], "images": ["ok.png"]}', "no text"),
    "blank text": ('{"texts": [null, " "], "images": ["ok.png", null]}', "no text"),
}


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg")
    return tmp_path


@pytest.mark.parametrize("reader,good,bad", [
    (read_captions, '{"image": "ok.png", "caption": "red"}', BAD_CAPTIONS),
    (read_interleaved, '{"texts": [null, "red"], "images": ["ok.png", null]}', BAD_DOCS),
])
def test_each_bad_input_names_file_and_line_or_is_skipped_and_counted(folder, capsys, reader, good, bad):
    for name, (line, message) in bad.items():
        path = folder / "data.jsonl"
        path.write_text("\n".join([good, "", good, line, good]) + "\n")  # the bad item is on line 4
        with pytest.raises(DataError, match=re.escape(message)) as err:
            reader(path, 16)
        assert f"{path}:4" in str(err.value), f"{name}: {err.value}"
        items, report = reader(path, 16, skip_bad=True)
        assert len(items) == report.read == 3 and len(report.skipped) == 1, name
        assert f"{path}:4" in report.skipped[0] and message in report.skipped[0]
        printed = capsys.readouterr().out
        assert "3 read, 1 skipped" in printed and f"{path}:4" in printed, name


@pytest.mark.parametrize("reader", [read_captions, read_interleaved])
def test_a_file_that_is_not_utf8_is_named(folder, reader):
    path = folder / "data.jsonl"
    path.write_bytes(b'{"image": "ok.png", "caption": "red"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text")):
        reader(path, 16)


def test_fresh_randomness_each_step():
    words = " ".join(f"w{i}" for i in range(60))
    doc = {"texts": [None, words, None, "end"], "images": [tagged_media(0), None, tagged_media(1), None]}
    data = DocumentDataset.from_documents([doc], TOK)
    sampler = MixtureSampler([Source("one", data, 1.0, batch_size=1, seq_len=8, p_next=0.5)], seed=0)
    windows = {tuple(sampler.batch(step)[0].input_ids[0].tolist()) for step in range(10)}
    assert len(windows) > 3, "window and placement are drawn afresh at each step"


@pytest.mark.slow
def test_world_data_trains_a_tiny_flamingo():
    import miniflamingo as mf
    from miniflamingo.flamingo import Flamingo
    from miniflamingo.world import World

    world, cfg = World(seed=0, image_size=64), mf.FlamingoConfig.preset("tiny")
    sources = [
        Source("interleaved", DocumentDataset.from_documents(world.documents(3), TOK), 1.0, 2,
               seq_len=cfg.lm.context_length, max_media=cfg.max_media),
        Source("video_text", DocumentDataset.from_pairs(world.video_text_pairs(2), TOK), 0.03, 2),
    ]
    model = Flamingo(cfg)
    total = 0.0
    for b in MixtureSampler(sources).batch(0):
        assert b.media.shape[2:] == ((1, 3, 64, 64) if b.name == "interleaved" else (6, 3, 64, 64))
        _, loss = model(b.input_ids, b.media, b.targets)
        total = total + b.weight * loss  # paper 2.4: sum of lambda_m * NLL_m
    total.backward()
    assert torch.isfinite(total) and model.resampler.latents.grad is not None
