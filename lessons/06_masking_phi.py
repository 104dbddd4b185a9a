"""Lesson 6: the masking rule phi(t), as a token-by-media matrix for a three-image example.

What it teaches
- phi(t) = the number of `<image>` tokens at positions <= t (paper 2.3). Text token t cross-attends
  ONLY to media phi(t): the most recent image, the `<image>` token itself included. Tokens before the
  first image (phi = 0) get exactly zero from the cross-attention: no media, no softmax over nothing.
- We print the rule as a matrix, then MEASURE the matrix from the layer: perturb media j and see which
  tokens' outputs move. They must be the same matrix.
- The paper's ablation (Table 10) lets token t attend to all media 1..phi(t); it was worse.
- Earlier images are not lost: they reach token t through the LM's self-attention, so in the whole
  model every token after image j depends on image j.

Paper: section 2.3 (multi-visual input support: per-image/video attention masking), Fig. 7, Table 10.
Run: python lessons/06_masking_phi.py
"""

import dataclasses

import torch

import miniflamingo as mf
from miniflamingo.flamingo import Flamingo
from miniflamingo.xattn import MaskedCrossAttention, compute_phi

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
tok = mf.Tokenizer.default()
cfg = mf.FlamingoConfig.preset("tiny")

text = ("three shapes:<image>a red circle<|endofchunk|><image>two blue squares<|endofchunk|>"
        "<image>a star<|endofchunk|>")
ids = torch.tensor([tok.encode(text)])  # (B=1, L)
L, T = ids.shape[1], 3
phi = compute_phi(ids, tok.image_id)  # (1, L)

# The rule, written the slow way: count the <image> tokens up to and including t.
rule_phi = [sum(i == tok.image_id for i in ids[0, :t + 1].tolist()) for t in range(L)]
assert phi[0].tolist() == rule_phi
rule = torch.tensor([[p == j + 1 for j in range(T)] for p in rule_phi])  # (L, T): token t sees media j
rule_all = torch.tensor([[0 < j + 1 <= p for j in range(T)] for p in rule_phi])  # ablation: media 1..phi(t)


def measured_matrix(layer_out, media: torch.Tensor) -> torch.Tensor:
    """(L, T) bool: True where perturbing media j changes the output at token t."""
    with torch.no_grad():
        base = layer_out(media)
        cols = []
        for j in range(T):
            other = media.clone()
            other[:, j] = torch.randn_like(other[:, j])  # replace media j only
            cols.append((layer_out(other) - base).abs().amax(-1)[0] > 0)  # (L,)
    return torch.stack(cols, dim=1)


# The cross-attention layer alone, on random text states x (B, L, D) and media latents (B, T, R, Dr).
x = torch.randn(1, L, cfg.lm.d_model)
media = torch.randn(1, T, cfg.resampler.num_latents, cfg.resampler.d_model)
xattn = MaskedCrossAttention(cfg.xattn, cfg.lm.d_model, cfg.resampler.d_model)
ablation_cfg = dataclasses.replace(cfg.xattn, only_immediate_media=False)
xattn_all = MaskedCrossAttention(ablation_cfg, cfg.lm.d_model, cfg.resampler.d_model)
xattn_all.load_state_dict(xattn.state_dict())  # same weights, other mask
seen = measured_matrix(lambda m: xattn(x, m, phi), media)
seen_all = measured_matrix(lambda m: xattn_all(x, m, phi), media)

# The whole model with its gates opened: self-attention carries earlier images forward.
model = Flamingo(cfg).eval()
with torch.no_grad():
    for layer in model.xattn:
        layer.attn_gate.fill_(1.0)
        layer.ff_gate.fill_(1.0)
seen_model = measured_matrix(lambda m: model(ids, media_latents=m)[0], media)


def marks(row) -> str:
    return " ".join("X" if v else "." for v in row.tolist())


print("token t cross-attends to media phi(t) only.  X = the output at t moves when media j changes\n")
print(f"{'t':>3} {'token':18} {'phi':>3} | {'rule':5} | {'xattn':5} | {'1..phi':6} | {'whole model':11}")
print(f"{'':3} {'':18} {'':3} | 1 2 3 | 1 2 3 | 1 2 3  | 1 2 3")
for t in range(L):
    piece = repr(tok.decode([ids[0, t].item()]))[:18]
    print(f"{t:3d} {piece:18} {rule_phi[t]:3d} | {marks(rule[t])} | {marks(seen[t])} | "
          f"{marks(seen_all[t])}  | {marks(seen_model[t])}")

assert torch.equal(seen, rule), "the layer's measured mask must equal the rule phi(t)"
assert torch.equal(seen_all, rule_all), "the ablation attends to media 1..phi(t)"
assert torch.equal(seen_model, rule_all), "in the whole model, earlier images arrive through self-attention"
with torch.no_grad():
    out = xattn(x, media, phi)  # (1, L, D)
no_media = phi[0] == 0
print(f"\ntokens with phi = 0 (before any <image>): max |xattn output| = {out[0, no_media].abs().max()}")
assert torch.equal(out[0, no_media], torch.zeros_like(out[0, no_media]))
print("OK: the measured token-by-media matrix is exactly phi(t); earlier media reach t only through the LM.")
