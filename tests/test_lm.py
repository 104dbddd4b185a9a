"""The small GPT: an independent slow reference, causality, cache vs no cache, padding, hooks, loss, init,
and a tiny model that learns to copy in context (the skill few-shot binding rests on)."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import miniflamingo as mf
from miniflamingo.config import LMConfig
from miniflamingo.lm import GPT, alibi_slopes

V = 37


def tiny_cfg(pos="alibi", **kw) -> LMConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, vocab_size=V, context_length=24, pos=pos)
    return LMConfig(**{**base, **kw})


def tiny_gpt(pos="alibi", **kw) -> GPT:
    """pos "alibi", "rope", or either with "+smear": smeared keys, their weights drawn away from init."""
    torch.manual_seed(0)
    smear = pos.endswith("+smear")
    gpt = GPT(tiny_cfg(pos.removesuffix("+smear"), smear_keys=smear, **kw)).eval()
    if smear:
        with torch.no_grad():
            assert gpt.blocks[0].attn.smear is None, "the first layer keeps plain keys"
            for blk in gpt.blocks[1:]:
                blk.attn.smear.normal_(0, 2)  # each head its own mix of k_j and k_{j-1}
    return gpt


POS = ["alibi", "rope", "alibi+smear", "rope+smear"]


def close(actual, expected, what, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: max diff {(actual - expected).abs().max().item():.3g}\n{m}",
    )


# ----------------------------------------------------------------------------- independent reference


def reference_forward(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same network written out naively: explicit score matrices, per-position rotation by complex
    numbers, ALiBi as a (nh, L, L) bias built with loops. Shares only the weights with GPT."""
    cfg = gpt.cfg
    B, L = idx.shape
    nh, hs = cfg.n_head, cfg.d_head
    x = gpt.wte.weight[idx]
    for layer, blk in enumerate(gpt.blocks):
        h = F.layer_norm(x, (cfg.d_model,), blk.ln_1.weight, blk.ln_1.bias)
        qkv = h @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias
        q, k, v = (t.reshape(B, L, nh, hs).permute(0, 2, 1, 3) for t in qkv.chunk(3, dim=-1))
        if cfg.pos == "rope":
            theta = torch.tensor([10000 ** (-2 * i / hs) for i in range(hs // 2)])
            rot = torch.polar(torch.ones(L, hs // 2), torch.arange(L)[:, None] * theta)  # e^(i pos theta)

            def rotate(t, rot=rot):
                z = torch.complex(t[..., : hs // 2], t[..., hs // 2:]) * rot
                return torch.cat([z.real, z.imag], dim=-1)

            q, k = rotate(q), rotate(k)
        if cfg.smear_keys and layer > 0:  # Olsson et al.: s_h k_j + (1 - s_h) k_{j-1}, none before j = 0
            s = torch.sigmoid(blk.attn.smear)
            k = torch.stack([s[hd] * k[:, hd, j] + (1 - s[hd]) * (k[:, hd, j - 1] if j else 0)
                             for hd in range(nh) for j in range(L)], dim=1).view(B, nh, L, hs)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
        bias = torch.zeros(nh, L, L)
        for hd, m in enumerate(alibi_slopes(nh) if cfg.pos == "alibi" else [0.0] * nh):
            for i in range(L):
                for j in range(L):
                    bias[hd, i, j] = -m * (i - j) if j <= i else float("-inf")
        att = (scores + bias).softmax(-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, L, cfg.d_model)
        x = x + y @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
        h = F.layer_norm(x, (cfg.d_model,), blk.ln_2.weight, blk.ln_2.bias)
        h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
        x = x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    x = F.layer_norm(x, (cfg.d_model,), gpt.ln_f.weight, gpt.ln_f.bias)
    return x @ gpt.lm_head.weight.T


@pytest.mark.parametrize("pos", POS)
def test_matches_reference(pos):
    gpt = tiny_gpt(pos)
    idx = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        close(gpt(idx)[0], reference_forward(gpt, idx), f"GPT vs naive reference ({pos})")


def test_alibi_slopes_match_paper():
    # Press et al. 2022, sec. 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    s = alibi_slopes(12)  # not a power of two: 8 from n=8, then odd ones of n=16
    assert len(s) == 12 and s[:8] == pytest.approx(alibi_slopes(8))
    assert s[8:] == pytest.approx(alibi_slopes(16)[0::2][:4])


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("pos", POS)
@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, 15), new=st.integers(0, V - 1))
def test_causality(pos, t, new):
    gpt = tiny_gpt(pos)
    idx = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(t))
    idx2 = idx.clone()
    idx2[0, t] = new
    with torch.no_grad():
        a, b = gpt(idx)[0], gpt(idx2)[0]
    close(b[:, :t], a[:, :t], f"logits before position {t} after changing token {t}", atol=0, rtol=0)


@pytest.mark.parametrize("pos", POS)
@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 19), max_size=5))
def test_cache_matches_full_forward(pos, cuts):
    """Decoding in chunks (token by token is cuts = 1..19) equals one full forward pass."""
    gpt = tiny_gpt(pos)
    idx = torch.randint(0, V, (2, 20))
    bounds = [0, *sorted(set(cuts)), 20]
    with torch.no_grad():
        full = gpt(idx)[0]
        cache = gpt.new_cache(2)
        parts = [gpt(idx[:, a:b], cache=cache)[0] for a, b in zip(bounds, bounds[1:]) if b > a]
    assert cache.length == 20
    close(torch.cat(parts, dim=1), full, f"cached chunks {bounds} vs full ({pos})")


@pytest.mark.parametrize("pos", POS)
def test_cache_token_by_token_with_left_padding(pos):
    """What Flamingo's generate does: a left-padded prompt, then one token at a time, key_mask throughout."""
    gpt = tiny_gpt(pos)
    a, b = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 8))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])  # row 1: 4 pads + b
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :4] = False
    with torch.no_grad():
        cache = gpt.new_cache(2)
        out = [gpt(padded[:, :6], cache=cache, key_mask=key_mask[:, :6])[0]]
        out += [gpt(padded[:, i:i + 1], cache=cache, key_mask=key_mask[:, :i + 1])[0] for i in range(6, 12)]
        out = torch.cat(out, dim=1)
        assert torch.isfinite(out).all(), "padding queries produced NaN/inf"
        close(out[0:1], gpt(a)[0], f"unpadded row, cached ({pos})")
        close(out[1:2, 4:], gpt(b)[0], f"left-padded row's real tokens, cached ({pos})")


def test_cache_reorder_selects_rows():
    gpt = tiny_gpt()
    idx = torch.randint(0, V, (3, 10))
    index = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = gpt.new_cache(3)
        gpt(idx[:, :7], cache=cache)
        cache.reorder(index)
        out = gpt(idx[index, 7:], cache=cache)[0]
        close(out, gpt(idx[index])[0][:, 7:], "after reorder")


def test_batch_independence():
    gpt = tiny_gpt()
    idx = torch.randint(0, V, (3, 14))
    with torch.no_grad():
        close(gpt(idx)[0][1:2], gpt(idx[1:2])[0], "row 1 in a batch vs alone")


@pytest.mark.parametrize("pos", POS)
@settings(max_examples=10, deadline=None)
@given(n_pad=st.integers(1, 8))
def test_left_padding_with_key_mask(pos, n_pad):
    gpt = tiny_gpt(pos)
    idx = torch.randint(0, V, (1, 10))
    padded = torch.cat([torch.randint(0, V, (1, n_pad)), idx], dim=1)  # pad tokens of any value
    key_mask = torch.ones(1, n_pad + 10, dtype=torch.bool)
    key_mask[0, :n_pad] = False
    with torch.no_grad():
        out = gpt(padded, key_mask=key_mask)[0]
        assert torch.isfinite(out).all(), "fully masked padding rows produced NaN/inf"
        close(out[:, n_pad:], gpt(idx)[0], f"real tokens after {n_pad} pads ({pos})")


def test_before_block_called_in_order_and_identity_is_noop():
    gpt = tiny_gpt(n_layer=3)
    idx = torch.randint(0, V, (2, 9))
    calls = []

    def hook(i, x):
        calls.append((i, tuple(x.shape)))
        return x

    with torch.no_grad():
        close(gpt(idx, before_block=hook)[0], gpt(idx)[0], "identity before_block")
        # before each block, then once after the last (index n_layer: Flamingo's xattn.after_last)
        assert calls == [(0, (2, 9, 32)), (1, (2, 9, 32)), (2, (2, 9, 32)), (3, (2, 9, 32))]
        moved = gpt(idx, before_block=lambda i, x: x + (i == 2))[0]  # the hook's output is used
        assert not torch.allclose(moved, gpt(idx)[0])


def test_inputs_embeds_equals_idx():
    gpt = tiny_gpt()
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        close(gpt(inputs_embeds=gpt.wte(idx))[0], gpt(idx)[0], "inputs_embeds=wte(idx) vs idx")


def test_loss_is_cross_entropy_ignoring_minus_100():
    gpt = tiny_gpt()
    idx = torch.randint(0, V, (2, 9))
    targets = torch.randint(0, V, (2, 9))
    targets[0, :4] = -100
    targets[1, 7] = -100
    logits, loss = gpt(idx, targets)
    keep = targets != -100
    logp = logits.log_softmax(-1)[keep]  # (N, V), written out by hand
    expected = -logp[torch.arange(keep.sum()), targets[keep]].mean()
    close(loss, expected, "loss vs hand-written cross-entropy")
    assert gpt(idx)[1] is None


def test_weight_tying():
    tied, untied = tiny_gpt(), tiny_gpt(tie_weights=False)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 32


def test_init_scales():
    gpt = GPT(LMConfig(n_layer=8, n_head=4, d_model=256, vocab_size=1000, context_length=16))
    assert gpt.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert gpt.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (gpt.blocks[3].attn.c_proj.weight, gpt.blocks[3].mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert gpt.blocks[0].attn.c_attn.bias.abs().max() == 0


# ----------------------------------------------------------------------------- errors and presets


def test_bad_inputs_fail_with_clear_messages():
    gpt = tiny_gpt()
    idx = torch.randint(0, V, (2, 9))
    with pytest.raises(ValueError, match=r"sequence length 25 exceeds lm.context_length=24"):
        gpt(torch.randint(0, V, (1, 25)))
    cache = gpt.new_cache(2)
    gpt(idx, cache=cache)
    with pytest.raises(ValueError, match=r"9 cached \+ 16 new tokens exceeds lm.context_length=24"):
        gpt(torch.randint(0, V, (2, 16)), cache=cache)
    with pytest.raises(ValueError, match=r"expected idx \(B, L\) long, got \(9,\)"):
        gpt(idx[0])
    with pytest.raises(ValueError, match=r"exactly one of idx"):
        gpt(idx, inputs_embeds=gpt.wte(idx))
    with pytest.raises(ValueError, match=r"expected inputs_embeds \(B, L, D=32\), got \(2, 9, 31\)"):
        gpt(inputs_embeds=torch.zeros(2, 9, 31))
    with pytest.raises(ValueError, match=r"expected targets \(B, L\) = \(2, 9\), got \(2, 8\)"):
        gpt(idx, idx[:, :8])
    with pytest.raises(ValueError, match=r"expected key_mask .* = \(2, 9\) bool, got \(2, 8\)"):
        gpt(idx, key_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cache holds batch size 2, input has 1"):
        gpt(idx[:1], cache=gpt.new_cache(2))
    with pytest.raises(ValueError, match=r"max_len=99 exceeds lm.context_length=24"):
        gpt.new_cache(1, max_len=99)


def test_paper_80b_lm_builds_on_meta_fast():
    cfg = mf.FlamingoConfig.preset("flamingo-80b").lm
    t0 = time.process_time()
    with torch.device("meta"):
        gpt = GPT(cfg)
    elapsed = time.process_time() - t0
    assert elapsed < 1.0, f"building the 80B LM on meta took {elapsed:.2f} s of CPU"
    assert gpt.wte.weight.is_meta
    # 80 blocks of 12 D^2 (+ biases, norms), untied 32k embeddings in and out
    D = cfg.d_model
    assert gpt.num_params() == 80 * (12 * D * D + 13 * D) + 2 * 32000 * D + 2 * D


def test_preset_shapes(preset_cfg, big_preset):
    """At any preset (`pytest --preset flamingo-80b`): logits (B, L, V), a scalar loss, cache shapes."""
    cfg = preset_cfg.lm
    device = torch.device("meta") if big_preset else torch.device("cpu")
    with device:
        gpt = GPT(cfg).eval()
        idx = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        logits, loss = gpt(idx, idx)
        assert logits.shape == (2, 8, cfg.vocab_size) and loss.shape == ()
        cache = gpt.new_cache(2, max_len=16)
        step, _ = gpt(idx[:, :5], cache=cache, key_mask=torch.ones(2, 5, dtype=torch.bool, device=device))
        assert step.shape == (2, 5, cfg.vocab_size) and cache.length == 5
        assert cache.k[0].shape == (2, cfg.n_head, 16, cfg.d_head)


# ----------------------------------------------------------------------------- it learns to copy


@pytest.mark.slow
def test_learns_in_context_copying():
    """Rows "a b c d e f g h | a b c d e f g h" of random tokens: the first half is unpredictable
    (loss ~ ln 16), the second half is predictable only by copying from context. A 2-layer ALiBi GPT
    must learn the induction-style copy within a few hundred steps (~4 s on one core)."""
    first, second = train_copy_task()  # one thread, as every test (conftest.py)
    print(f"copy task: first half {first:.2f}, second half {second:.2f}")
    assert first > 2.4, f"first half should stay near ln 16 = 2.77, got {first:.2f}"
    assert second < 0.25 * first, f"second half should be copied from context: {second:.2f} vs {first:.2f}"


def train_copy_task() -> tuple[float, float]:
    torch.manual_seed(0)
    n, vocab = 8, 16
    gpt = GPT(LMConfig(n_layer=2, n_head=4, d_model=64, vocab_size=vocab + 1, context_length=2 * n + 1))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3, weight_decay=0.0)

    def batch(b=32):
        a = torch.randint(0, vocab, (b, n))
        seq = torch.cat([a, torch.full((b, 1), vocab), a], dim=1)  # (b, 2n+1), separator = id vocab
        return seq[:, :-1], seq[:, 1:]

    for _ in range(500):
        x, y = batch()
        _, loss = gpt(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(256)
    with torch.no_grad():
        logits, _ = gpt(x)
    nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)  # (2n,) per position
    return nll[: n - 1].mean().item(), nll[n:].mean().item()  # 1st half random; 2nd copies


# ----------------------------------------------------------------------------- pretrain-lm


@pytest.mark.parametrize("dropout", ["0.0", "0.2"])
def test_pretrain_lm_resumes_to_the_same_weights(tmp_path, capsys, dropout):
    """A run stopped at step 3 and resumed equals an uninterrupted run: batches depend on the step
    alone, and the checkpoint holds the optimizer state and, for dropout's draws, torch's RNG state."""
    from miniflamingo import pretrain_lm
    from miniflamingo.trainutil import load_checkpoint

    words = "red green blue circle square star big small the a is on left right".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    (tmp_path / "corpus.txt").write_text(text)
    common = ["--corpus", str(tmp_path / "corpus.txt"), "--steps", "6", "--batch-size", "4",
              "--seq-len", "16", "--warmup", "2", "--eval-batches", "1", "--dtype", "fp32", "--device", "cpu",
              "--lm.n_layer=1", "--lm.d_model=16", "--lm.n_head=2", "--lm.context_length=32",
              f"--lm.dropout={dropout}"]
    assert pretrain_lm.main([*common, "--run", str(tmp_path / "a")]) == 0
    assert "held-out loss" in capsys.readouterr().out
    pretrain_lm.main([*common, "--run", str(tmp_path / "b"), "--stop-at", "3"])
    assert load_checkpoint(tmp_path / "b" / "lm.pt")["step"] == 3
    pretrain_lm.main([*common, "--run", str(tmp_path / "b")])
    a, b = load_checkpoint(tmp_path / "a" / "lm.pt"), load_checkpoint(tmp_path / "b" / "lm.pt")
    assert a["step"] == b["step"] == 6 and a["config"] == b["config"]
    assert a["config"]["n_layer"] == 1 and set(a) >= {"model", "config", "step", "optimizer"}
    for k in a["model"]:
        close(b["model"][k], a["model"][k], f"resumed vs uninterrupted {k}", atol=0, rtol=0)
    with pytest.raises(SystemExit, match="different LM config"):
        pretrain_lm.main([*common, "--run", str(tmp_path / "a"), "--lm.n_layer=2"])
    # resumed at step 3 and poisoned at once: the NaN loss stops the run before its update, naming the
    # step, the corpus and the checkpoint it resumed from, which keeps its finite weights
    from miniflamingo import lm_corpus

    pretrain_lm.main([*common, "--run", str(tmp_path / "c"), "--stop-at", "3", "--save-every", "100"])
    real = lm_corpus.forward
    bad = lambda *a, **kw: (lambda out: (out[0], out[1] * float("nan")))(real(*a, **kw))  # noqa: E731
    lm_corpus.forward = bad
    try:
        with pytest.raises(SystemExit, match=r"loss is nan at step 4 on a batch of .*corpus\.txt: .*; last "
                                             r"good checkpoint: .*lm\.pt \(step 3\)"):
            pretrain_lm.main([*common, "--run", str(tmp_path / "c")])
    finally:
        lm_corpus.forward = real
    c = load_checkpoint(tmp_path / "c" / "lm.pt")
    assert c["step"] == 3 and all(torch.isfinite(v).all() for v in c["model"].values())


def test_copy_drills_are_periodic_shifted_windows():
    from miniflamingo.lm_corpus import get_batch, text_corpus
    from miniflamingo.pretrain_lm import copy_drills

    gen = torch.Generator().manual_seed(0)
    x, y, slots = get_batch(text_corpus(torch.arange(1000)), 8, 40, gen)
    assert (slots == -1).all(), "plain text has no image slots"
    x, y, slots = copy_drills(x, y, slots, torch.arange(5000, 5100), 0.5, gen)
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets must be the inputs shifted by one"
    assert ((x[:4] >= 5000) & (x[:4] < 5100)).all(), "drill tokens come from the given vocabulary"
    for r in range(4):  # drilled rows repeat one random sequence: x[t] == x[t + period]
        periods = [p for p in range(8, 33) if torch.equal(x[r, p:], x[r, :-p])]
        assert periods, f"row {r} is not periodic: {x[r].tolist()}"
    assert torch.equal(x[4:, 1:] - x[4:, :-1], torch.ones(4, 39, dtype=torch.long)), "other rows untouched"


def test_lm_corpus_slots_are_one_position_per_image():
    """World.lm_corpus text -> ids exactly as Flamingo sees a document (<image>, the text's own tokens,
    <|endofchunk|>), each <image> a slot holding its stand-in's tokens; the slot's vector is
    e(<image>) + sum of the stand-in's embeddings / sqrt(count); predicting an <image> is masked."""
    from miniflamingo import lm_corpus
    from miniflamingo.tokenizer import Tokenizer

    tok = Tokenizer.default()
    doc = " red circle\ndax<|endofchunk|> blue square , red star\nOutput: a blue square<|endofchunk|>"
    c = lm_corpus.encode_documents([doc], tok)
    assert tok.decode(c.ids.tolist()) == ("<|endoftext|><image>dax<|endofchunk|>"
                                          "<image>Output: a blue square<|endofchunk|>")
    assert c.ids.tolist() == ([tok.eot_id, tok.image_id] + tok.encode_ordinary("dax") + [tok.eoc_id]
                              + [tok.image_id] + tok.encode_ordinary("Output: a blue square") + [tok.eoc_id])
    assert (c.slot_of >= 0).sum() == 2 and (c.ids[c.slot_of >= 0] == tok.image_id).all()
    stand_ins = [tok.decode([t for t in row.tolist() if t >= 0]) for row in c.slot_table]
    assert stand_ins == [" red circle", " blue square , red star"]
    with pytest.raises(ValueError, match="stand-in"):
        lm_corpus.encode_documents(["no newline here<|endofchunk|>"], tok)

    lm = GPT(LMConfig(n_layer=1, n_head=2, d_model=16, vocab_size=tok.n_vocab, context_length=64))
    x, slots = c.ids[None], c.slot_of[None]
    emb = lm_corpus.embed(lm, x, slots, c.slot_table)
    e = lm.wte.weight
    for pos in (c.slot_of >= 0).nonzero().flatten().tolist():  # the slow way, one slot at a time
        words = [t for t in c.slot_table[c.slot_of[pos]].tolist() if t >= 0]
        want = e[tok.image_id] + e[words].sum(0) / len(words) ** 0.5
        torch.testing.assert_close(emb[0, pos], want)
    others = c.slot_of < 0
    torch.testing.assert_close(emb[0, others], e[c.ids[others]])

    x, y, s = lm_corpus.get_batch(c, 3, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == s.shape == (3, 8)
    assert ((y == -100) == (x.roll(-1, 1) == tok.image_id))[:, :-1].all()  # exactly the <image> targets
    assert ((s >= 0) == (x == tok.image_id)).all()


def test_binding_probe_runs_and_is_near_chance_untrained():
    """The probe on an untrained LM: a fraction, near chance (1/5) over 40 episodes."""
    from miniflamingo import lm_corpus
    from miniflamingo.tokenizer import Tokenizer
    from miniflamingo.world import default_world

    lm = GPT(mf.FlamingoConfig.preset("tiny").lm)
    acc = lm_corpus.binding_probe(lm, Tokenizer.default(), default_world(), episodes=40)
    assert 0.0 <= acc <= 0.5
