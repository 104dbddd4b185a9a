"""Perceiver Resampler: an independent slow reference, shapes for any F and S, invariance to permuting a
frame's grid cells, temporal embeddings (interpolated past max_frames), padded frames masked out (a media's
latents do not depend on the other media of the batch), and the paper's parameter count."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import miniflamingo as mf
from miniflamingo.resampler import PerceiverResampler, squared_relu

CFG = mf.ResamplerConfig(n_layer=2, n_head=2, d_head=8, d_model=16, num_latents=3, max_frames=4)
D_MEDIA = 12


def reference(m: PerceiverResampler, x: torch.Tensor) -> torch.Tensor:
    """Paper Fig. 3 written out one media and one head at a time, with explicit softmax."""
    B, T, n_frames, S, _ = x.shape
    cfg, hs = m.cfg, m.cfg.d_head
    out = torch.zeros(B, T, cfg.num_latents, cfg.d_model)

    def ln(t, norm):
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)

    for b in range(B):
        for t in range(T):
            proj = [x[b, t, f] @ m.proj.weight.T + m.proj.bias for f in range(n_frames)]
            feats = torch.cat([p + m.time_embeddings[f] for f, p in enumerate(proj)])  # (F*S, D)
            lat = m.latents
            for layer in m.layers:
                a = layer.attn
                lat_n = ln(lat, a.norm_latents)
                kv_in = torch.cat([ln(feats, a.norm_media), lat_n])
                q, kv = lat_n @ a.to_q.weight.T, kv_in @ a.to_kv.weight.T
                k, v = kv[:, : cfg.n_head * hs], kv[:, cfg.n_head * hs:]
                heads = []
                for h in range(cfg.n_head):
                    sl = slice(h * hs, (h + 1) * hs)
                    w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hs), dim=-1)
                    heads.append(w @ v[:, sl])
                lat = lat + torch.cat(heads, dim=1) @ a.to_out.weight.T
                ffw = layer.ffw
                lat = lat + torch.relu(ln(lat, ffw.norm) @ ffw.fc.weight.T) ** 2 @ ffw.proj.weight.T
            out[b, t] = ln(lat, m.norm)
    return out


@settings(max_examples=10, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), T=st.integers(1, 3), n_frames=st.integers(1, 6), S=st.integers(1, 5))
def test_matches_reference_and_ignores_cell_order(B, T, n_frames, S):
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    x = torch.randn(B, T, n_frames, S, D_MEDIA)
    y = m(x)
    assert y.shape == (B, T, CFG.num_latents, CFG.d_model)
    if n_frames <= CFG.max_frames:  # the reference uses the learned embeddings as they are
        torch.testing.assert_close(y, reference(m, x), atol=1e-5, rtol=1e-5)
    # no spatial position encoding: shuffling each frame's S cells (its own permutation) changes nothing
    perm = torch.stack([torch.randperm(S) for _ in range(B * T * n_frames)]).view(B, T, n_frames, S, 1)
    torch.testing.assert_close(m(x.gather(3, perm.expand_as(x))), y, atol=1e-5, rtol=1e-5)


def test_squared_relu_matches_autograd_of_relu_squared():
    # The hand-written backward against autograd's relu().square(), including inputs at exactly 0, and
    # torch's numerical gradient check in float64.
    x = torch.cat([torch.randn(200, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    ya, yb = squared_relu(a), F.relu(b).square()
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(squared_relu, (torch.randn(30, dtype=torch.float64, requires_grad=True),))


def test_frame_order_matters():
    # Temporal embeddings tell frames apart: swapping two frames of a video changes the latents.
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    x = torch.randn(1, 1, 3, 4, D_MEDIA)
    assert (m(x) - m(x[:, :, [1, 0, 2]])).abs().max() > 1e-3


def test_temporal_embeddings_interpolate_past_max_frames():
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    learned = m.time_embeddings.detach()  # (4, D)
    torch.testing.assert_close(m.frame_embeddings(2), learned[:2])
    e = m.frame_embeddings(7).detach()  # 7 frames over 4 learned: points at 0, 0.5, 1, ..., 3
    assert e.shape == (7, CFG.d_model)
    torch.testing.assert_close(e[0], learned[0])
    torch.testing.assert_close(e[-1], learned[-1])
    torch.testing.assert_close(e[1], (learned[0] + learned[1]) / 2)
    assert m(torch.randn(1, 1, 9, 2, D_MEDIA)).shape == (1, 1, CFG.num_latents, CFG.d_model)


def test_image_padded_beside_a_video_is_the_image_alone():
    # The bug this guards: an image padded to a video's F frames (repeating its frame) was resampled as a
    # still video, so its latents depended on what else was in the batch. Padded frames are now masked.
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    image, video = torch.randn(1, 1, 1, 5, D_MEDIA), torch.randn(1, 1, 6, 5, D_MEDIA)  # F = 1 and F = 6
    padded = torch.cat([image, torch.zeros(1, 1, 5, 5, D_MEDIA)], dim=2)  # (1, 1, 6, S, Dv) zero frames
    both = m(torch.cat([padded, video]), frames=torch.tensor([[1], [6]]))  # (2, 1, R, Dr)
    for got, alone in ((both[0], m(image)[0]), (both[1], m(video)[0])):
        diff = (got - alone).abs().max().item()
        print(f"max |padded batch - alone| = {diff:.1e}")
        torch.testing.assert_close(got, alone, atol=2e-6, rtol=1e-6)  # its message gives the max difference
    assert (m(torch.cat([padded, video]))[0] - m(image)[0]).abs().max() > 1e-3, "without frames it differs"


@settings(max_examples=20, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), T=st.integers(1, 3), n_frames=st.integers(1, 7), S=st.integers(1, 3),
       data=st.data())
def test_padded_frames_change_nothing(B, T, n_frames, S, data):
    # Each media (n real frames, the rest garbage) must give what it gives alone with its n frames, also
    # past max_frames = 4 where the temporal embeddings are interpolated over its own n. An empty slot
    # (n = 0) gives the same latents whatever its contents.
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    counts = data.draw(st.lists(st.integers(0, n_frames), min_size=B * T, max_size=B * T))
    frames = torch.tensor(counts).view(B, T)
    x = torch.randn(B, T, n_frames, S, D_MEDIA) * 3  # padding frames are random, not zeros: never read
    y = m(x, frames)
    empty = m(torch.randn(1, 1, 1, S, D_MEDIA), torch.zeros(1, 1, dtype=torch.long))[0, 0]
    for b in range(B):
        for t in range(T):
            n = int(frames[b, t])
            alone = m(x[b:b + 1, t:t + 1, :n])[0, 0] if n else empty
            torch.testing.assert_close(y[b, t], alone, atol=2e-6, rtol=1e-6)
    if n_frames <= CFG.max_frames:  # against the slow reference too, one media at a time
        for b, t in ((b, t) for b in range(B) for t in range(T) if frames[b, t] > 0):
            ref = reference(m, x[b:b + 1, t:t + 1, : int(frames[b, t])])[0, 0]
            torch.testing.assert_close(y[b, t], ref, atol=1e-5, rtol=1e-5)
    full = torch.full((B, T), n_frames)
    torch.testing.assert_close(m(x, full), m(x), atol=2e-6, rtol=1e-6)  # frames=None: all real


def test_no_projection_when_widths_match():
    m = PerceiverResampler(CFG, d_media=CFG.d_model)
    assert isinstance(m.proj, torch.nn.Identity)
    assert m(torch.randn(2, 1, 1, 3, CFG.d_model)).shape == (2, 1, CFG.num_latents, CFG.d_model)


def test_bad_input_names_the_layout():
    m = PerceiverResampler(CFG, d_media=D_MEDIA)
    with pytest.raises(ValueError, match=r"\(B, T, F, S, Dv=12\)"):
        m(torch.randn(2, 3, D_MEDIA))
    with pytest.raises(ValueError, match="Dv=12"):
        m(torch.randn(1, 1, 1, 3, D_MEDIA + 1))
    with pytest.raises(ValueError, match=r"frames \(B=1, T=1\) long"):
        m(torch.randn(1, 1, 2, 3, D_MEDIA), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[0, F=2\]"):
        m(torch.randn(1, 1, 2, 3, D_MEDIA), torch.tensor([[3]]))
    with pytest.raises(ValueError, match=r"frames \(B=1, T=1\) long, got torch.float32"):
        m(torch.randn(1, 1, 2, 3, D_MEDIA), torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match=r"frames \(B=1, T=1\) long"):  # on the meta device too
        m(torch.randn(1, 1, 2, 3, D_MEDIA, device="meta"), torch.tensor([2], device="meta"))


def test_paper_resampler_has_194m_parameters():
    # paper Table 5: 194M. NFNet-F6 gives Dv = 3072; width 1536, 16 heads of 128, FFW 4x, 6 layers.
    cfg = mf.FlamingoConfig.preset("flamingo-3b")
    with torch.device("meta"):
        m = PerceiverResampler(cfg.resampler, d_media=cfg.vision.d_out)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 194e6) / 194e6 < 0.005, n


def test_preset_shapes(preset_cfg, big_preset):
    """`pytest --preset flamingo-80b` runs this at the paper's widths, on the meta device."""
    cfg = preset_cfg
    device = torch.device("meta") if big_preset else torch.device("cpu")
    with device:
        m = PerceiverResampler(cfg.resampler, d_media=cfg.vision.d_out)
        S = cfg.vision.grid_size**2
        x = torch.randn(2, 3, 2, S, cfg.vision.d_out)
        y = m(x)
        video = m(torch.randn(1, 1, cfg.resampler.max_frames + 3, S, cfg.vision.d_out))
    assert y.shape == (2, 3, cfg.resampler.num_latents, cfg.resampler.d_model)
    assert video.shape == (1, 1, cfg.resampler.num_latents, cfg.resampler.d_model)


def test_mlp_resampler_ablation_same_tokens_no_attention_padding_ignored():
    """Table 3 (vi) stand-in (lesson 13): same (B, T, R, Dr) out, no attention, padded frames ignored,
    and a Flamingo built with resampler.kind = "mlp" uses it."""
    from miniflamingo.resampler import MLPResampler

    cfg = mf.FlamingoConfig.preset("tiny").override(["--resampler.kind=mlp"])
    flamingo = mf.Flamingo(cfg)
    m = flamingo.resampler
    assert isinstance(m, MLPResampler) and not any("attn" in n for n, _ in m.named_parameters())
    S, Dv = cfg.vision.grid_size ** 2, cfg.vision.d_out
    x = torch.randn(2, 3, 4, S, Dv)  # (B, T, F, S, Dv)
    frames = torch.tensor([[1, 4, 0], [2, 3, 1]])
    out = m(x, frames)
    assert out.shape == (2, 3, cfg.resampler.num_latents, cfg.resampler.d_model)
    padded = x.clone()
    padded[0, 0, 1:], padded[1, 0, 2:] = 7.0, -3.0  # frames past each media's count
    torch.testing.assert_close(m(padded, frames), out)
    torch.testing.assert_close(m(x), m(x, torch.full((2, 3), 4)))  # None = all frames real
    assert not torch.allclose(m(x[:, :, [1, 0, 2, 3]])[0, 1], m(x)[0, 1])  # frame order matters (time)
    with pytest.raises(ValueError, match="S=16"):
        m(torch.randn(1, 1, 1, S + 1, Dv))
    with pytest.raises(AssertionError, match="resampler.kind"):
        mf.FlamingoConfig.preset("tiny").override(["--resampler.kind=conv"])
