"""Lesson 2: the NFNet without normalisation: signal propagation through depth.

What it teaches
- Flamingo's vision encoder is an NFNet (paper App. B.1.3; Brock et al. 2021): a ResNet with NO batch
  norm. Without normalisation, a residual stream x + f(x) doubles its variance at every block when f
  keeps unit scale, so activations explode exponentially with depth (the "naive" curve below).
- NFNets keep the variance known analytically instead:
    * scaled weight standardisation (WSConv2d) makes each conv map unit variance to unit variance;
    * GELU is multiplied by gamma ~ 1.7 so it keeps unit variance too;
    * each block computes x + alpha * f(beta * act(x)), beta = 1 / expected_std(x): the branch sees a
      unit-variance input and adds alpha^2 = 0.04 of variance, so Var grows LINEARLY within a stage
      (1 + k * alpha^2 after k blocks) and a transition block resets it to ~1.
- At init each block's learnable skip_gain is 0: the block is the identity. We set it to 1 here to
  watch what the branches would do.

Paper: Flamingo App. B.1.3 (NFNet-F6 vision encoder); NFNet paper sec. 3-4 (Brock et al. 2021).
Run: python lessons/02_nfnet_signal_propagation.py  (saves runs/lessons/02_signal_propagation.png)
"""

from pathlib import Path

import torch
import torch.nn as nn
from _plots import pyplot  # lessons/_plots.py: matplotlib if installed

from miniflamingo.config import VisionConfig
from miniflamingo.vision import VisionEncoder, WSConv2d, scaled_gelu

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)

# ----------------------------------------------------------------------------- 1. the two ingredients

x = torch.randn(16, 64, 16, 16)  # unit-Gaussian activations: (N, C, h, w)
ws, plain = WSConv2d(64, 64, 3), nn.Conv2d(64, 64, 3, padding=1)
with torch.no_grad():
    var_ws, var_plain = ws(scaled_gelu(x)).var().item(), plain(scaled_gelu(x)).var().item()
print(f"Var(x) = {x.var():.3f}")
print(f"Var(WSConv(gamma * gelu(x))) = {var_ws:.3f}   <- scaled WS + gamma keep unit variance")
print(f"Var(Conv2d(gamma * gelu(x))) = {var_plain:.3f}   <- PyTorch's default init does not")
assert 0.8 < var_ws < 1.25, var_ws

# ------------------------------------------------------------------------ 2. a deep encoder, stage by stage

# Four stages of depths (2, 4, 8, 4): 18 blocks. Stride 1 everywhere for this demo: average-pooling
# white noise divides its variance by 4, an artefact of the noise input, not of the network.
cfg = VisionConfig(image_size=64, stem_widths=(8, 16, 16, 32), widths=(32, 64, 96, 128), depths=(2, 4, 8, 4),
                   strides=(1, 1, 1, 1), group_width=16, final_width=128)
enc = VisionEncoder(cfg)
h = torch.randn(8, cfg.stem_widths[-1], 8, 8)  # unit-variance input to the first block (N, C, h, w)

with torch.no_grad():
    h0 = enc.blocks[0](h)
    assert torch.equal(enc.blocks[1](h0), h0)  # skip_gain = 0 at init: a non-transition block is the identity
    for b in enc.blocks:
        b.skip_gain.fill_(1.0)  # open every branch (training would learn it)


def variances(blocks, h):
    """Average channel variance of the residual stream after each block (the NFNet paper's SPP plot)."""
    out = []
    with torch.no_grad():
        for b in blocks:
            h = b(h)
            out.append(h.var(dim=(0, 2, 3)).mean().item())  # per-channel variance, averaged
    return out


# The analytic expectation the encoder itself uses to set each block's beta (vision.py).
expected, e = [], 1.0
for depth in cfg.depths:
    for i in range(depth):
        e = (1.0 if i == 0 else e) + cfg.alpha**2  # transition blocks restart from ~1
        expected.append(e)

nf = variances(enc.blocks, h)
for b in enc.blocks:  # the same weights as a naive unnormalised ResNet: x + f(x)
    b.alpha, b.beta = 1.0, 1.0
naive = variances(enc.blocks, h)

stage = [s for s, d in enumerate(cfg.depths) for _ in range(d)]
print(f"\n{'block':>5} {'stage':>5} {'expected':>9} {'NFNet':>8} {'naive x+f(x)':>13}")
for i, (s, ex, v, n) in enumerate(zip(stage, expected, nf, naive)):
    print(f"{i:5d} {s:5d} {ex:9.3f} {v:8.3f} {n:13.3g}")

ratios = [v / ex for v, ex in zip(nf, expected)]
print(f"\nNFNet measured / expected: min {min(ratios):.2f}, max {max(ratios):.2f}")
print(f"naive: x{(naive[-1] / naive[0]) ** (1 / (len(naive) - 1)):.2f} per block, "
      f"{naive[-1]:.3g} after {len(naive)} blocks")
assert all(0.8 < r < 1.25 for r in ratios), ratios  # the analytic variance holds through depth
assert max(nf) < 1.5  # bounded, with no normalisation layer anywhere
assert naive[-1] / naive[0] > 1.5 ** (len(naive) - 1)  # exponential blow-up without alpha/beta

# ----------------------------------------------------------------------------- 3. the picture

out = Path(__file__).resolve().parent.parent / "runs" / "lessons" / "02_signal_propagation.png"
plt = pyplot(out)
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(naive, "o-", label="naive x + f(x)")
    ax.semilogy(nf, "o-", label="NFNet (measured)")
    ax.semilogy(expected, "k--", label="NFNet (analytic)")
    ax.set_xlabel("residual block")
    ax.set_ylabel("average channel variance")
    ax.set_title("Signal propagation without normalisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")
print("\nOK: the NFNet's variance follows 1 + k * alpha^2 and resets each stage; the naive net explodes.")
