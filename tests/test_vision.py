"""The NFNet vision encoder: weight standardization, signal propagation without normalization layers,
output shapes, and the paper's parameter counts."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from miniflamingo.config import FlamingoConfig, VisionConfig
from miniflamingo.vision import GELU_GAMMA, VisionEncoder, WSConv2d

TINY = FlamingoConfig.preset("tiny").vision


def test_scaled_gelu_keeps_unit_variance():
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    var = (F.gelu(z) * GELU_GAMMA).var().item()
    assert abs(var - 1.0) < 0.01, var


def test_weight_standardization_per_output_channel():
    conv = WSConv2d(6, 10, 3, groups=2)  # fan-in = 3 * 3 * 3 = 27
    with torch.no_grad():
        conv.weight.mul_(5).add_(torch.randn(10, 1, 1, 1))  # arbitrary scale and per-channel offset
        conv.gain.copy_(torch.rand(10, 1, 1, 1) + 0.5)
    w = conv.standardized_weight().double()
    fan_in = 27
    mean = w.mean(dim=(1, 2, 3))
    var = w.var(dim=(1, 2, 3), unbiased=False)
    gain = conv.gain.view(-1).double()
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-6, rtol=0)
    # var(W_hat) = gain**2 / fan_in, i.e. unit variance after the fan-in scaling
    torch.testing.assert_close(var * fan_in / gain**2, torch.ones_like(var), atol=1e-4, rtol=0)


def test_weight_standardization_constant_filter_is_finite():
    conv = WSConv2d(2, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(0.7)  # zero variance: eps keeps the scale finite
    assert torch.isfinite(conv.standardized_weight()).all()


def test_ws_conv_preserves_unit_variance():
    conv = WSConv2d(64, 64, 3)
    x = torch.randn(8, 64, 16, 16)
    var = conv(x)[:, :, 1:-1, 1:-1].var().item()  # interior: no zero padding
    assert 0.8 < var < 1.2, var


@pytest.mark.parametrize("cfg,hw", [(TINY, 16), (VisionConfig.nfnet("f0"), 8)], ids=["tiny", "f0"])
def test_signal_propagation_through_depth(cfg, hw):
    """NFNet sec. 3: fed a stream of the analytically expected variance 1 / beta**2, every residual branch
    returns ~unit variance, so a non-transition block adds alpha**2 to the stream's variance; no
    normalization layer anywhere, yet nothing explodes or vanishes with depth."""
    enc = VisionEncoder(cfg).eval()
    expected_var = 1.0
    with torch.no_grad():
        for i, block in enumerate(enc.blocks):
            assert abs(1.0 / block.beta**2 - expected_var) < 1e-6, f"block {i}: beta does not track it"
            x = torch.randn(4, block.conv0.in_channels, hw, hw) * expected_var**0.5
            branch, short = block.branch_and_shortcut(x)
            assert 0.6 < branch.var().item() < 1.4, f"block {i}: branch variance {branch.var().item():.3f}"
            block.skip_gain.fill_(1.0)
            out_var = block(x).var().item()
            if not block.transition:
                want = expected_var + cfg.alpha**2 * branch.var().item()
                assert abs(out_var / want - 1) < 0.1, f"block {i}: {out_var:.3f} vs analytic {want:.3f}"
                expected_var += cfg.alpha**2
            else:
                expected_var = 1.0 + cfg.alpha**2  # a transition resets the stream (normalised shortcut)
            assert out_var < 2.0, f"block {i}: output variance {out_var:.3f}"


@pytest.mark.parametrize("cfg,hw", [(TINY, 64), (VisionConfig.nfnet("f0"), 64)], ids=["tiny", "f0"])
def test_activations_stay_finite_and_order_one_at_init(cfg, hw):
    enc = VisionEncoder(cfg)
    for block in enc.blocks:  # trained-like skip gains: every branch contributes
        block.skip_gain.data.fill_(1.0)
    with torch.no_grad():
        y = enc(torch.rand(4, 3, hw, hw))
    assert torch.isfinite(y).all()
    assert 1e-3 < y.var().item() < 10, y.var().item()


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), n=st.integers(1, 3))
def test_any_size_divisible_by_stride(h, w, n):
    enc = VisionEncoder(TINY)
    s = TINY.stride
    y = enc(torch.rand(n, 3, h * s, w * s))
    assert y.shape == (n, h * w, TINY.d_out)


def test_grid_is_row_major_flattening_of_the_feature_map():
    enc = VisionEncoder(TINY)
    x = torch.rand(2, 3, 64, 48)
    fmap = enc.forward_map(x)  # (N, Dv, h, w)
    y = enc(x)
    assert fmap.shape[2:] == (4, 3)
    torch.testing.assert_close(y[:, 1 * 3 + 2], fmap[:, :, 1, 2])


@pytest.mark.parametrize("shape", [(2, 3, 64), (2, 1, 64, 64), (2, 3, 60, 64), (2, 3, 64, 8)])
def test_bad_input_shape_errors(shape):
    with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\)"):
        VisionEncoder(TINY)(torch.rand(*shape))


def test_output_depends_on_the_image_and_not_on_batch_mates():
    enc = VisionEncoder(TINY).eval()
    for block in enc.blocks:
        block.skip_gain.data.fill_(1.0)
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(enc(x)[1:2], enc(x[1:2]), atol=1e-5, rtol=1e-5)  # no batch statistics


def test_nfnet_f6_parameter_count_on_meta():
    # NFNet paper Table 1: F6 has 438.4M parameters with its 1000-way classifier, ~435M without.
    with torch.device("meta"):
        with_head = VisionEncoder(VisionConfig.nfnet("f6", num_classes=1000))
        flamingo = VisionEncoder(FlamingoConfig.preset("flamingo-3b").vision)
    n_head = sum(p.numel() for p in with_head.parameters())
    n = sum(p.numel() for p in flamingo.parameters())
    assert abs(n_head / 438.4e6 - 1) < 0.01, n_head
    assert abs(n / 435e6 - 1) < 0.01, n
    assert n_head - n == 3072 * 1000 + 1000
    assert flamingo.blocks[0].conv1.groups == 1  # bottleneck 256 * 0.5 = 128: one group of width 128
    assert flamingo.blocks[-1].conv1.groups == 6  # 1536 * 0.5 / 128


def test_nfnet_f0_parameter_count():
    with torch.device("meta"):
        enc = VisionEncoder(VisionConfig.nfnet("f0", num_classes=1000))
    n = sum(p.numel() for p in enc.parameters())
    assert abs(n / 71.5e6 - 1) < 0.01, n  # NFNet paper Table 1


def test_stochastic_depth_only_in_training():
    cfg = VisionConfig(**{**TINY.__dict__, "stochdepth_rate": 0.5})
    enc = VisionEncoder(cfg)
    for block in enc.blocks:
        block.skip_gain.data.fill_(1.0)
    x = torch.rand(4, 3, 64, 64)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    torch.manual_seed(1)
    a = enc(x)
    torch.manual_seed(2)
    b = enc(x)
    assert not torch.allclose(a, b)


def test_feature_probe_reads_what_features_separate_and_names_confusions():
    """benchmarks/feature_probe.py's probes: a feature that names the class gives a perfect linear probe
    and 1-NN; when two classes share their features, both probes fall to chance between them and the
    1-NN's confusions name that pair."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "feature_probe", Path(__file__).resolve().parent.parent / "benchmarks" / "feature_probe.py")
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    g = torch.Generator().manual_seed(0)
    names = ["circle", "square", "star"]
    y = [names[i % 3] for i in range(300)]
    onehot = torch.tensor([[float(v == c) for c in names] for v in y])
    x = torch.cat([onehot * 5, torch.randn(300, 5, generator=g) * 0.1], 1)
    linear, nn, conf = fp.probes(x[:200], y[:200], x[200:], y[200:])
    assert linear == 1.0 and nn == 1.0 and conf == []
    merged = x.clone()
    merged[:, 1] = merged[:, 0] + merged[:, 1]  # circle and square now look alike
    merged[:, 0] = 0
    linear, nn, conf = fp.probes(merged[:200], y[:200], merged[200:], y[200:])
    assert 0.55 < linear < 0.9 and 0.55 < nn < 0.9  # stars still right, circle vs square a coin flip
    assert {pair for pair, _ in conf} <= {("circle", "square"), ("square", "circle")} and conf
