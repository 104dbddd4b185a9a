"""Contrastive pretraining: the two-term InfoNCE loss against a slow reference and its invariances, AGC,
the text encoder, batching with hard negatives, checkpoints and resume, and the command end to end.
Images come from a small coloured-shapes generator defined here, independent of the world module."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import miniflamingo.contrastive as C
import miniflamingo.pretrain_vision as P
from miniflamingo.agc import adaptive_grad_clip
from miniflamingo.config import FlamingoConfig, VisionConfig
from miniflamingo.tokenizer import Tokenizer
from miniflamingo.vision import VisionEncoder, load_pretrained

TINY = FlamingoConfig.preset("tiny").vision
SMALL_VISION = VisionConfig(image_size=32, stem_widths=(8, 8, 16, 16), widths=(16, 32, 32, 32),
                            depths=(1, 1, 1, 1), strides=(1, 2, 2, 1), group_width=8, final_width=32)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220), "yellow": (235, 200, 0)}
SHAPES = ("circle", "square", "triangle")


def shape_pairs(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """One coloured shape on a pale background, captioned "a red circle"; attrs like the world's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = []
    for _ in range(n):
        colour, shape = list(COLOURS)[rng.integers(4)], SHAPES[rng.integers(3)]
        r = rng.uniform(0.2, 0.3) * size
        cx, cy = rng.uniform(r, size - r, 2)
        dx, dy = xx - cx, yy - cy
        mask = {"circle": dx**2 + dy**2 <= r**2, "square": (abs(dx) <= 0.8 * r) & (abs(dy) <= 0.8 * r),
                "triangle": (dy <= 0.8 * r) & (dy >= -r + 2 * abs(dx))}[shape]
        img = np.full((size, size, 3), rng.integers(200, 250), dtype=np.uint8)
        img[mask] = COLOURS[colour]
        out.append({"image": img, "caption": f"a {colour} {shape}",
                    "attrs": {"objects": [{"shape": shape, "colour": colour}]}})
    return out


def reference_loss(img, txt, inv_temp, ls, positives=None):
    """Slow, loop-by-loop two-term InfoNCE with label smoothing (smoothing mass spread over all B)."""
    B = img.shape[0]
    pos = torch.eye(B, dtype=torch.bool) if positives is None else positives
    total = 0.0
    for direction in range(2):
        for i in range(B):
            # direction 0: image i against every text j; direction 1: text i against every image j
            logits = [inv_temp * float(img[i] @ txt[j] if direction == 0 else img[j] @ txt[i])
                      for j in range(B)]
            lse = math.log(sum(math.exp(v) for v in logits))
            row = [pos[i, j] if direction == 0 else pos[j, i] for j in range(B)]
            n_pos = sum(bool(r) for r in row)
            for j in range(B):
                target = (1 - ls) * (float(row[j]) / n_pos) + ls / B
                total -= target * (logits[j] - lse)
    return total / (2 * B)


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


# ----------------------------------------------------------------------------- the loss


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 6), seed=st.integers(0, 10_000), ls=st.sampled_from([0.0, 0.1]),
       with_pos=st.booleans())
def test_loss_matches_slow_reference(B, seed, ls, with_pos):
    torch.manual_seed(seed)
    img, txt = unit(B, 5), unit(B, 5)
    pos = None
    if with_pos:  # a symmetric "same caption" relation, like the training loop builds
        labels = torch.randint(0, 3, (B,))
        pos = labels[:, None] == labels[None, :]
    got = C.contrastive_loss(img, txt, 7.0, ls, pos).item()
    assert abs(got - reference_loss(img, txt, 7.0, ls, pos)) < 1e-9


@settings(max_examples=25, deadline=None)
@given(B=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_loss_symmetric_and_permutation_invariant(B, seed):
    torch.manual_seed(seed)
    img, txt = unit(B, 4), unit(B, 4)
    loss = C.contrastive_loss(img, txt, 5.0, 0.1)
    torch.testing.assert_close(C.contrastive_loss(txt, img, 5.0, 0.1), loss)  # swap the two towers
    perm = torch.randperm(B)
    torch.testing.assert_close(C.contrastive_loss(img[perm], txt[perm], 5.0, 0.1), loss)


@pytest.mark.parametrize("B", [1, 2, 7, 64])
def test_loss_is_log_batch_when_all_similarities_equal(B):
    v = unit(1, 8).expand(B, 8)
    assert abs(C.contrastive_loss(v, v, 10.0, 0.0).item() - math.log(B)) < 1e-9
    assert abs(C.contrastive_loss(v, v, 10.0, 0.1).item() - math.log(B)) < 1e-9  # any target: uniform logits


def test_positives_default_is_the_diagonal():
    img, txt = unit(5, 4), unit(5, 4)
    torch.testing.assert_close(C.contrastive_loss(img, txt, 3.0, 0.1, torch.eye(5, dtype=torch.bool)),
                               C.contrastive_loss(img, txt, 3.0, 0.1))


@pytest.mark.parametrize("seed", range(5))
def test_gradient_pulls_matched_pairs_together(seed):
    torch.manual_seed(seed)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)

    def sims():
        return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T  # (B, B)

    before = sims().detach()
    C.contrastive_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1), 5.0, 0.1).backward()
    with torch.no_grad():  # one small SGD step
        x -= 0.05 * x.grad
        y -= 0.05 * y.grad
    after = sims().detach()
    assert (after.diagonal() > before.diagonal()).all(), after.diagonal() - before.diagonal()
    off = ~torch.eye(8, dtype=torch.bool)
    assert after[off].mean() < before[off].mean()


def test_loss_bad_shapes():
    with pytest.raises(ValueError, match=r"expected img and txt embeddings \(B, Dj\)"):
        C.contrastive_loss(unit(3, 4), unit(2, 4), 1.0)


def test_inverse_temperature_is_clamped():
    model = C.ContrastiveModel(SMALL_VISION, C.ContrastiveConfig(d_model=32, d_joint=16))
    with torch.no_grad():
        model.log_inv_temp.fill_(10.0)
    assert model.inv_temp().item() == pytest.approx(100.0)


# ----------------------------------------------------------------------------- AGC


def agc_reference(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float) -> torch.Tensor:
    """Row by row (dim 0 = output units), or the whole tensor for 0-d/1-d."""
    if w.dim() <= 1:
        wn, gn = max(w.norm().item(), eps), g.norm().item()
        return g * (clip * wn / gn) if gn / wn > clip else g.clone()
    out = g.clone()
    for i in range(w.shape[0]):
        wn, gn = max(w[i].norm().item(), eps), g[i].norm().item()
        if gn / wn > clip:
            out[i] = g[i] * (clip * wn / gn)
    return out


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(6, 3, 3, 3), (5, 7), (9,), ()]), seed=st.integers(0, 10_000))
def test_agc_clips_exactly_the_units_over_the_threshold(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if w.dim() >= 2:
        w[0] = 0.0  # a zero-initialised unit: eps, not 0, sets its allowance
    units = shape[:1] if len(shape) >= 2 else ()  # 0-d and 1-d tensors are a single unit
    ratio = torch.rand(units, generator=g, dtype=torch.float64) * 0.04  # around clip = 0.02
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    dims = tuple(range(1, grad.dim())) if grad.dim() >= 2 else None
    unit_norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    ratio = ratio.view(-1, *[1] * (grad.dim() - 1)) if units else ratio
    grad = grad / unit_norm * ratio * w_norm.clamp(min=1e-3)
    p = torch.nn.Parameter(w.clone())
    p.grad = grad.clone()
    n = adaptive_grad_clip([p], clip=0.02, eps=1e-3)
    want = agc_reference(w, grad, 0.02, 1e-3)
    torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0)
    rows = range(shape[0]) if len(shape) >= 2 else [...]
    over = [bool((grad[r].norm() / max(w[r].norm(), 1e-3)) > 0.02) for r in rows]
    assert n == sum(over)
    for r, o in zip(rows, over):
        if not o:
            assert torch.equal(p.grad[r], grad[r])  # untouched units stay bit-identical


def test_agc_skips_parameters_without_grad_and_the_projections():
    model = C.ContrastiveModel(SMALL_VISION, C.ContrastiveConfig(d_model=32, d_joint=16))
    clipped = {id(p) for p in model.clipped_parameters()}
    assert id(model.image_proj.weight) not in clipped and id(model.text_proj.weight) not in clipped
    assert id(model.log_inv_temp) not in clipped
    assert adaptive_grad_clip(model.clipped_parameters()) == 0  # no grads yet


# ----------------------------------------------------------------------------- text encoder and data


def test_text_encoder_ignores_padding():
    cfg = C.ContrastiveConfig(vocab_size=50, d_model=32, n_head=4)
    enc = C.TextEncoder(cfg).eval()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    padded = torch.cat([ids, torch.randint(0, 50, (2, 3))], 1)
    pmask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(enc(padded, pmask), enc(ids, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected ids and mask \(B, L\)"):
        L = cfg.max_len + 1
        enc(torch.zeros(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.bool))


def padded_text_reference(enc: C.TextEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text tower computed the plain way, every row padded to L (what the tower did before it packed
    the real tokens): attention by hand with padding keys at -inf, the mean over real tokens."""
    B, L = ids.shape
    x = enc.wte(ids) + enc.wpe(torch.arange(L))
    for blk in enc.blocks:
        D, nh = x.shape[-1], blk.n_head
        q, k, v = (t.view(B, L, nh, D // nh).transpose(1, 2) for t in blk.qkv(blk.ln1(x)).split(D, dim=2))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // nh)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        x = x + blk.proj(y)
        x = x + blk.mlp(blk.ln2(x))
    x = enc.ln_f(x)
    return torch.stack([x[b, mask[b]].mean(0) for b in range(B)])


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_text_encoder_packs_real_tokens_like_the_padded_reference(lengths, pad, seed):
    """Oracle: the packed tower equals the padded one on ragged batches (values and gradients), padding
    ids do not matter, and a row without real tokens is an error naming it."""
    torch.manual_seed(seed)
    cfg = C.ContrastiveConfig(vocab_size=50, d_model=32, n_head=4, max_len=16)
    enc = C.TextEncoder(cfg)
    L = max(lengths) + pad
    ids = torch.randint(0, 50, (len(lengths), L))
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    got = enc(ids, mask)
    want = padded_text_reference(enc, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g_got = torch.autograd.grad(got.square().sum(), list(enc.parameters()), allow_unused=True)
    g_want = torch.autograd.grad(want.square().sum(), list(enc.parameters()), allow_unused=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    other = torch.where(mask, ids, torch.randint(0, 50, ids.shape))  # change only the padding's ids
    torch.testing.assert_close(enc(other, mask), got)
    with pytest.raises(ValueError, match=r"rows \[0\] of mask"):
        enc(ids, torch.cat([torch.zeros(1, L, dtype=torch.bool), mask[1:]]))


def test_encode_texts_pads_with_eot_and_rejects_long_captions():
    tok = Tokenizer.default()
    ids, mask = P.encode_texts(tok, ["a red circle", "a small blue square at the top left"], 64)
    assert mask[0].sum() == len(tok.encode_ordinary("a red circle"))
    assert (ids[~mask] == tok.eot_id).all()
    with pytest.raises(ValueError, match="longer than max_len=3"):
        P.encode_texts(tok, ["a small blue square at the top left"], 3)


def test_one_word_neighbours():
    caps = ["a red circle", "a blue circle", "a red square", "a big red circle", "a red circle"]
    nb = P.one_word_neighbours(caps)
    assert nb[0] == [1, 2] and nb[4] == [1, 2]  # an identical caption is not a negative
    assert nb[1] == [0, 4] and nb[3] == []  # different length: no neighbour


def test_batch_indices_deterministic_unique_and_grouped():
    caps = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 3
    nb = P.one_word_neighbours(caps)
    a = P.batch_indices(len(caps), 16, seed=1, step=7, neighbours=nb, hard_fraction=0.5, group=4)
    assert torch.equal(a, P.batch_indices(len(caps), 16, seed=1, step=7, neighbours=nb, hard_fraction=0.5,
                                          group=4))
    assert len(a) == 16 and len(set(a.tolist())) == 16
    anchor = a[0].item()
    assert all(j in nb[anchor] for j in a[1:4].tolist())  # the batch opens with an anchor and 3 neighbours
    assert not torch.equal(a, P.batch_indices(len(caps), 16, seed=1, step=8, neighbours=nb))
    plain = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4]  # seed 0, step 3
    assert torch.equal(P.batch_indices(10, 4, 0, 3), plain)  # no neighbours: a plain random batch


def test_captions_folder_errors_name_file_and_line(tmp_path):
    """pretrain-vision --data reads captions as readers.py does (errors name file and line), and checks
    every caption's length, held-out ones too, before a step is trained."""
    Image.fromarray(shape_pairs(1)[0]["image"]).save(tmp_path / "a.png")
    good, bad = '{"image": "a.png", "caption": "a red circle"}', '{"image": "a.png"}'
    (tmp_path / "captions.jsonl").write_text(good + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        P.load_captions_folder(tmp_path, 32)
    (tmp_path / "captions.jsonl").write_text('{"image": "missing.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1: image .*missing.png' not found"):
        P.load_captions_folder(tmp_path, 32)
    with pytest.raises(ValueError, match="nowhere: file not found"):
        P.load_captions_folder(tmp_path / "nowhere", 32)
    for line, message in (('{"image": 5, "caption": "x"}', "expected"),
                          ('{"image": "a.png", "caption": 3}', "expected"),
                          ('{"image": "a.png", "caption": " "}', "empty caption")):
        (tmp_path / "captions.jsonl").write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"captions.jsonl:2: {message}"):
            P.load_captions_folder(tmp_path, 32)
    (tmp_path / "captions.jsonl").write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"captions.jsonl: not UTF-8 text"):
        P.load_captions_folder(tmp_path, 32)
    # JSON allows a raw U+2028 inside a string: not a line break (str.splitlines would split there)
    (tmp_path / "captions.jsonl").write_text(good[:-2] + '\u2028twice"}\n', encoding="utf-8")
    assert P.load_captions_folder(tmp_path, 32)[0]["caption"] == "a red circle\u2028twice"
    # a caption too long for the text tower, on the line the shuffle holds out (so a check of the training
    # pairs alone would miss it): named before any step is trained
    lines = [good] * 10
    held = int(np.random.default_rng(0).permutation(10)[0])  # load_data's shuffle; checked just below
    lines[held] = '{"image": "a.png", "caption": "%s"}' % ("word " * 80)
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    data = P.load_data(argparse.Namespace(data=str(tmp_path)), 32)
    assert [p["where"] for p in data["eval"]] == [f"{tmp_path / 'captions.jsonl'}:{held + 1}"]
    with pytest.raises(SystemExit, match=rf"captions.jsonl:{held + 1}: caption of \d+ tokens"):
        P.main(["--data", str(tmp_path), "--run", str(tmp_path / "run"), "--steps", "1", "--threads", "1"])
    assert not (tmp_path / "run" / "vision.pt").exists()


# ----------------------------------------------------------------------------- the command


def write_folder(path, n: int, size: int = 48):
    path.mkdir()
    lines = []
    for i, p in enumerate(shape_pairs(n, size)):
        Image.fromarray(p["image"]).save(path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": p["caption"]}))
    (path / "captions.jsonl").write_text("\n".join(lines) + "\n")


OVERRIDES = ["--vision.image_size=32", "--vision.stem_widths=8,8,16,16", "--vision.widths=16,32,32,32",
             "--vision.group_width=8", "--vision.final_width=32"]


def test_command_end_to_end_and_resume(tmp_path, monkeypatch):
    write_folder(tmp_path / "data", 40)
    common = ["--data", str(tmp_path / "data"), "--steps", "4", "--batch-size", "8", "--ckpt-every", "2",
              "--log-every", "1", *OVERRIDES]
    assert P.main(["--run", str(tmp_path / "a"), *common]) == 0
    ck = torch.load(tmp_path / "a" / "vision.pt", weights_only=True)
    assert ck["step"] == 4 and "retrieval_r1" in ck["eval"]
    enc = load_pretrained(tmp_path / "a" / "vision.pt")
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 4, 32)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and "eval" in log[-1]
    assert json.loads((tmp_path / "a" / "vision_eval.json").read_text())["step"] == 4

    # an interrupted run (it dies right after its step-2 checkpoint) resumes to the very same weights
    save = P.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(P, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        P.main(["--run", str(tmp_path / "b"), *common])
    monkeypatch.setattr(P, "save_checkpoint", save)
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic: no temp file left behind
    assert P.main(["--run", str(tmp_path / "b"), "--resume", *common]) == 0
    resumed = torch.load(tmp_path / "b" / "vision.pt", weights_only=True)
    for k, v in ck["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    # resuming with another batch size (another data stream) is refused, naming the option
    with pytest.raises(SystemExit, match=r"another --batch-size \(8 != 4\)"):
        P.main(["--run", str(tmp_path / "b"), "--resume", *common, "--batch-size", "4"])
    # a checkpoint from before --data was read as it is now (centre-cropped, the file's first tenth held
    # out) has no data_format among its args: refused, not resumed on other pairs
    old = torch.load(tmp_path / "b" / "vision.pt", weights_only=True)
    del old["args"]["data_format"]
    save(tmp_path / "b" / "vision.pt", old)
    with pytest.raises(SystemExit, match=r"another --data-format \(None != 'readers"):
        P.main(["--run", str(tmp_path / "b"), "--resume", *common])


def test_nan_loss_stops_naming_step_data_and_checkpoint(tmp_path, monkeypatch):
    """A loss that becomes NaN stops the run before its update, naming the step, the data and the last
    good checkpoint; that checkpoint holds finite weights."""
    write_folder(tmp_path / "data", 40)
    real, calls = C.ContrastiveModel.forward, {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        loss = real(self, *a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(C.ContrastiveModel, "forward", poisoned)
    with pytest.raises(SystemExit, match=r"loss is nan at step 3 on a batch of .*captions\.jsonl; last good "
                                         r"checkpoint: .*vision\.pt \(step 2\)"):
        P.main(["--run", str(tmp_path / "a"), "--data", str(tmp_path / "data"), "--steps", "4",
                "--batch-size", "8", "--ckpt-every", "2", *OVERRIDES])
    ck = torch.load(tmp_path / "a" / "vision.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_command_rejects_unknown_arguments(tmp_path):
    with pytest.raises(SystemExit):
        C.main(["--run", str(tmp_path), "--lm.n_layer=3"])


@pytest.mark.slow
def test_training_learns_colour_and_shape():
    """A short run on the coloured-shapes generator: zero-shot colour and shape well above chance."""
    torch.manual_seed(0)
    tok = Tokenizer.default()
    train, held = shape_pairs(2000, seed=1), shape_pairs(200, seed=2)
    cfg = C.ContrastiveConfig(vocab_size=tok.n_vocab, d_model=64, d_joint=32)
    model = C.ContrastiveModel(SMALL_VISION, cfg)
    images = P.images_to_tensor([p["image"] for p in train])
    ids, mask = P.encode_texts(tok, [p["caption"] for p in train], 64)
    args = argparse.Namespace(steps=100, seconds=None, batch_size=32, lr=3e-3, agc=0.1, seed=0, log_every=99,
                              ckpt_every=0, eval_every=0, hard_fraction=0.0, hard_group=4)
    opt = P.make_optimizer(model, args.lr, 0.05)
    P.train(model, opt, images, ids, mask, args, log=lambda rec: None)
    out = P.evaluate(model, tok, held, held, list(COLOURS), list(SHAPES))
    assert out["colour_acc"] > 0.9 and out["shape_acc"] > 0.8, out


def test_vision_encoder_used_by_the_contrastive_model_is_the_flamingo_one():
    model = C.ContrastiveModel(TINY, C.ContrastiveConfig())
    assert isinstance(model.vision, VisionEncoder)
    assert model.embed_images(torch.rand(3, 3, 64, 64)).norm(dim=-1).sub(1).abs().max() < 1e-5


def test_batch_indices_bring_each_random_pick_with_its_size_twin():
    """Partners (size twins) join the random rest of the batch, never the hard groups, which stay exactly
    as without them; the batch keeps its size and holds each index once."""
    n = 200
    nb = [[i ^ 1] for i in range(n)]  # disjoint hard groups of 2: exactly 16 hard indices per batch
    partners = {**{i: n // 2 + i for i in range(n // 2)}, **{n // 2 + i: i for i in range(n // 2)}}
    for step in range(20):
        plain = P.batch_indices(n, 32, 0, step, nb, 0.5, 2).tolist()
        a = P.batch_indices(n, 32, 0, step, nb, 0.5, 2, partners).tolist()
        assert len(a) == 32 and len(set(a)) == 32
        assert a[:17] == plain[:17]  # the hard groups, then the first random pick
        for i in a[16:-1]:
            assert partners[i] in a, (step, i)  # every pick but perhaps the last brought its twin


def test_size_twins_on_the_world_and_errors(tmp_path, capsys):
    """--size-twins adds a twin for that share of the world's pairs (and trains on them); a captions
    folder has no scenes to re-render, and a share outside [0, 1] is refused."""
    argv = ["--run", str(tmp_path / "w"), "--steps", "2", "--batch-size", "16", "--n-train", "40", "--n-eval",
            "16", "--size-twins", "0.5", *OVERRIDES]
    assert P.main(argv) == 0
    assert "data: 60 training pairs" in capsys.readouterr().out
    for extra, message in ((["--data", str(tmp_path)], "a --data folder has none"),
                           (["--size-twins", "1.5"], "a share of the pairs, in [0, 1]; got 1.5")):
        with pytest.raises(SystemExit):
            P.main([*argv, *extra])
        assert message in capsys.readouterr().err


def test_images_to_tensor_is_the_channels_first_stack_and_names_a_bad_image():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
    x = P.images_to_tensor(imgs)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"image 2 is \(7, 5, 3\)"):
        P.images_to_tensor(imgs[:2] + [imgs[2].transpose(1, 0, 2)])
    with pytest.raises(ValueError, match=r"image 1 is \(5, 7, 3\) float"):
        P.images_to_tensor([imgs[0], imgs[1].astype(np.float32)])
    with pytest.raises(ValueError, match="at least one"):
        P.images_to_tensor([])
