"""Masked gated cross-attention: phi, the grouped attention against a slow per-token reference, exact
zeros where phi = 0, locality of each media's influence (issue 5, property 3), gates, and shapes at the
paper's widths."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import miniflamingo as mf
from miniflamingo import xattn
from miniflamingo.xattn import (
    GatedXAttnDense,
    attend_all_previous_media,
    attend_own_media,
    attend_own_media_masked,
    compute_phi,
)

D, D_MEDIA = 16, 12


def layer(only_immediate_media=True, gated=True, open_gates=True) -> GatedXAttnDense:
    cfg = mf.XAttnConfig(n_head=2, d_head=8, only_immediate_media=only_immediate_media, gated=gated)
    m = GatedXAttnDense(cfg, d_model=D, d_media=D_MEDIA)
    if open_gates:
        with torch.no_grad():
            m.attn_gate.fill_(0.7)
            m.ff_gate.fill_(-0.4)
    return m


def reference_attention(q, k, v, phi, only_immediate_media):
    """One token, one head at a time: softmax over the keys of the media the token may see, else zero."""
    B, L, nh, hs = q.shape
    R = k.shape[3]
    out = torch.zeros(B, L, nh, hs)
    for b in range(B):
        for t in range(L):
            j = int(phi[b, t])
            if j == 0:
                continue
            slots = [j - 1] if only_immediate_media else list(range(j))
            for h in range(nh):
                keys = torch.cat([k[b, s, h] for s in slots])  # (len(slots) * R, hs)
                vals = torch.cat([v[b, s, h] for s in slots])
                assert keys.shape[0] == len(slots) * R
                w = torch.softmax(keys @ q[b, t, h] / math.sqrt(hs), dim=0)
                out[b, t, h] = w @ vals
    return out.view(B, L, nh * hs)


@st.composite
def phis(draw, monotone=True):
    """phi (B, L) and T: monotone rows come from <image> positions; others are arbitrary slot indices."""
    B, L, T = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 5))
    rows = []
    for _ in range(B):
        if monotone:
            n = draw(st.integers(0, min(T, L)))
            pos = sorted(draw(st.lists(st.integers(0, L - 1), min_size=n, max_size=n, unique=True)))
            ids = torch.zeros(L, dtype=torch.long)
            ids[pos] = 1
            rows.append(compute_phi(ids[None], image_id=1)[0])
        else:
            rows.append(torch.tensor(draw(st.lists(st.integers(0, T), min_size=L, max_size=L))))
    return torch.stack(rows), T


def test_phi_counts_images_up_to_and_including_t():
    img = 9
    ids = torch.tensor([[3, img, 4, 5, img, 6], [img, img, 1, 2, 3, 4]])
    assert compute_phi(ids, img).tolist() == [[0, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2]]
    # padding never counts, even when the pad id happens to be <image>
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    assert compute_phi(ids, img, mask).tolist()[1] == [0, 1, 1, 1, 1, 1]


def test_no_media_gives_exact_zeros_on_every_path():
    """A row batch with no media (T = 0): every token gets exactly zero, whichever attention path runs."""
    q, k, v, phi = torch.randn(2, 5, 2, 4), torch.randn(2, 0, 2, 3, 4), torch.randn(2, 0, 2, 3, 4), \
        torch.zeros(2, 5, dtype=torch.long)
    for attend in (attend_own_media, attend_own_media_masked, attend_all_previous_media):
        out = attend(q, k, v, phi)
        assert out.shape == (2, 5, 8) and torch.all(out == 0), attend.__name__


@settings(max_examples=25, deadline=None, derandomize=True)
@given(phi_T=st.one_of(phis(monotone=True), phis(monotone=False)), R=st.integers(1, 3))
def test_grouped_attention_and_its_gradients_match_per_token_reference(phi_T, R):
    phi, T = phi_T
    B, L = phi.shape
    q, k, v = torch.randn(B, L, 2, 4), torch.randn(B, T, 2, R, 4), torch.randn(B, T, 2, R, 4)
    w = torch.randn(B, L, 8)  # a random readout, so every output element gets its own gradient
    for attend, immediate in ((attend_own_media, True), (attend_own_media_masked, True),
                              (attend_all_previous_media, False)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, phi)
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*ref_leaves, phi, immediate)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.all(out[phi == 0] == 0), "tokens without media must get exactly zero"
        # the backward too: the grouped version moves rows by index_copy / index_select (see xattn.py)
        grads = torch.autograd.grad((out * w).sum(), leaves)
        ref_grads = (torch.autograd.grad((ref * w).sum(), ref_leaves, allow_unused=True)
                     if ref.requires_grad else [None] * 3)  # no token sees a media: all gradients zero
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(phi_T=phis())
def test_layer_runs_the_masked_attention_for_few_keys_with_the_same_numbers(phi_T):
    """MaskedCrossAttention swaps the grouped attention for one masked call when a row has at most
    MASKED_MAX_KEYS keys (issue 6): same outputs, same gradients, on either side of the threshold."""
    phi, T = phi_T
    B, L = phi.shape
    m = layer()
    x, media = torch.randn(B, L, D), torch.randn(B, T, 3, D_MEDIA)
    called = []
    runs = {}
    for limit in (0, T * 3):  # 0: always grouped; T * R: masked
        with pytest.MonkeyPatch.context() as mp:  # hypothesis reruns the body: no function-scoped fixture
            mp.setattr(xattn, "MASKED_MAX_KEYS", limit)
            mp.setattr(xattn, "attend_own_media_masked",
                       lambda *a, limit=limit: called.append(limit) or attend_own_media_masked(*a))
            m.zero_grad(set_to_none=True)
            out = m(x, media, phi)
            out.square().sum().backward()
        runs[limit] = (out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert called == [T * 3], "the masked attention runs exactly when the keys fit under the limit"
    (out0, g0), (out1, g1) = runs[0], runs[T * 3]
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(phi_T=phis(), only_immediate_media=st.booleans(), data=st.data())
def test_media_j_changes_only_the_tokens_that_see_it(phi_T, only_immediate_media, data):
    """Issue 5 property 3: changing media j changes the layer's output only where phi = j (or phi >= j
    when attending to all previous media), and does change it there."""
    phi, T = phi_T
    B, L = phi.shape
    j = data.draw(st.integers(1, T))
    m = layer(only_immediate_media)
    x, media = torch.randn(B, L, D), torch.randn(B, T, 3, D_MEDIA)
    other = media.clone()
    other[:, j - 1] = torch.randn(B, 3, D_MEDIA)
    diff = (m(x, media, phi) - m(x, other, phi)).abs().amax(dim=-1)  # (B, L)
    sees_j = phi == j if only_immediate_media else phi >= j
    assert torch.all(diff[~sees_j] == 0)
    assert torch.all(diff[sees_j] > 1e-4)


def test_layer_is_identity_without_media_and_with_closed_gates():
    x, media = torch.randn(2, 6, D), torch.randn(2, 2, 3, D_MEDIA)
    phi = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1]])
    for immediate in (True, False):
        out = layer(immediate)(x, media, phi)
        assert torch.equal(out[phi == 0], x[phi == 0]), "no media: no attention and no dense FFW either"
        assert (out[phi > 0] - x[phi > 0]).abs().max() > 1e-3
        assert torch.equal(layer(immediate, open_gates=False)(x, media, phi), x), "tanh(0) = 0 at init"


def test_gates_train_and_can_be_switched_off():
    x, media, phi = torch.randn(1, 4, D), torch.randn(1, 1, 3, D_MEDIA), torch.tensor([[0, 1, 1, 1]])
    m = layer(open_gates=False)
    assert isinstance(m.attn_gate, torch.nn.Parameter) and m.attn_gate.requires_grad
    m(x, media, phi).square().sum().backward()
    assert m.attn_gate.grad.abs() > 0 and m.ff_gate.grad.abs() > 0
    # the no-gating ablation (paper Table 3): gates fixed and unused, xattn added at full strength
    m = layer(gated=False, open_gates=False)
    assert not m.attn_gate.requires_grad and not m.ff_gate.requires_grad
    assert (m(x, media, phi) - x)[0, 1:].abs().max() > 1e-3


def test_bad_input_is_named():
    m, x, media = layer(), torch.randn(1, 3, D), torch.randn(1, 2, 3, D_MEDIA)
    with pytest.raises(ValueError, match="media slot 3"):
        m(x, media, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"phi \(B, L\)"):
        m(x, media, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"media \(B, T, R, Dr\)"):
        m(x, media[0], torch.tensor([[1, 2, 2]]))


def test_preset_layer_shapes(preset_cfg, big_preset):
    """`pytest --preset flamingo-80b`: one layer at the paper's widths on the meta device."""
    cfg = preset_cfg
    device = torch.device("meta") if big_preset else torch.device("cpu")
    with device:
        m = GatedXAttnDense(cfg.xattn, cfg.lm.d_model, cfg.resampler.d_model)
        x = torch.randn(2, 9, cfg.lm.d_model)
        media = torch.randn(2, cfg.max_media, cfg.resampler.num_latents, cfg.resampler.d_model)
        phi = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3, 3], [1] * 9])
        assert m(x, media, phi).shape == x.shape
    inner = cfg.xattn.n_head * cfg.xattn.d_head
    assert m.attn.to_kv.weight.shape == (2 * inner, cfg.resampler.d_model)
