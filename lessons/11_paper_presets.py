"""Lesson 11: the paper's presets on the meta device: where the 80 billion parameters are.

What it teaches
- The same code builds Flamingo-3B, -9B and -80B (paper Table 4) under `with torch.device("meta")`:
  every tensor has a shape and no storage, so 80B parameters are counted in well under a second with
  no memory (in bf16 the weights alone would take 160 GB).
- Where the parameters are: the frozen LM holds almost all of them; the trained part (Perceiver
  Resampler + GATED XATTN-DENSE layers) is ~10%; the vision encoder is under 1%.
- Each component's count is a closed formula in its widths, and we check the model against it:
      LM block           12 D^2 + 13 D                (attention 4 D^2, MLP 8 D^2)
      xattn layer        10 D^2 + 2 Dr D + 4 D + 2    (q, out: 2 D^2; k, v from Dr: 2 Dr D; FFW 8 D^2)
- Our counts sit beside the paper's Table 5; where they differ, the arithmetic below shows why.

Paper: Table 4 (dimensions), Table 5 (parameter counts), App. B.1.1.
Run: python lessons/11_paper_presets.py
"""

import time

import torch

import miniflamingo as mf
from miniflamingo.flamingo import Flamingo

B_ = 1e9
PAPER = {  # Table 5, in billions: vision, LM, xattn, resampler, total
    "flamingo-3b": dict(vision=0.435, lm=1.4, xattn=1.2, resampler=0.194, total=3.2),
    "flamingo-9b": dict(vision=0.435, lm=7.1, xattn=1.6, resampler=0.194, total=9.3),
    "flamingo-80b": dict(vision=0.435, lm=70.0, xattn=10.0, resampler=0.194, total=80.0),
}
PARTS = ("vision", "lm", "xattn", "resampler", "total")

counts, cfgs = {}, {}
for name in PAPER:
    cfg = mf.FlamingoConfig.preset(name)
    start = time.process_time()
    with torch.device("meta"):
        model = Flamingo(cfg)  # shapes only: no storage, no initialisation
    seconds = time.process_time() - start
    assert all(p.is_meta for p in model.parameters())
    counts[name], cfgs[name] = model.param_counts(), cfg
    lm, x = cfg.lm, cfg.xattn
    where = "every block" if x.every == 1 else f"every {x.every}th block"
    print(f"{name:13} built on meta in {seconds:.2f} s CPU | LM {lm.n_layer} x {lm.d_model} "
          f"({lm.n_head} heads), xattn before {where}: {cfg.n_xattn} layers")
    assert seconds < 1.0

# ----------------------------------------------------------------------------- 1. beside Table 5

print(f"\n{'billions':13} " + " ".join(f"{p:>15}" for p in PARTS))
print(f"{'':13} " + " ".join(f"{'ours / paper':>15}" for _ in PARTS))
for name, n in counts.items():
    print(f"{name:13} " + " ".join(f"{n[p] / B_:7.3g} /{PAPER[name][p]:6.3g}" for p in PARTS))

# ----------------------------------------------------------------------------- 2. the formulas

for name, n in counts.items():
    cfg = cfgs[name]
    D, V, L, Dr = cfg.lm.d_model, cfg.lm.vocab_size, cfg.lm.n_layer, cfg.resampler.d_model
    assert cfg.xattn.n_head * cfg.xattn.d_head == D  # the xattn width is the LM's
    lm_formula = L * (12 * D**2 + 13 * D) + 2 * V * D + 2 * D  # blocks, untied in/out embeddings, final LN
    xattn_formula = cfg.n_xattn * (10 * D**2 + 2 * Dr * D + 4 * D + 2)
    assert n["lm"] == lm_formula and n["xattn"] == xattn_formula, name
    assert n["total"] == n["vision"] + n["lm"] + n["xattn"] + n["resampler"] + 2 * D  # + <image>, <EOC> rows
    assert abs(n["vision"] - 0.435 * B_) < 0.005 * B_ and abs(n["resampler"] - 0.194 * B_) < 0.001 * B_
print("\nLM and xattn counts equal their closed formulas exactly; vision (NFNet-F6, no classifier) "
      "and resampler match Table 5.")

# ----------------------------------------------------------------------------- 3. where the 80B are

n, D = counts["flamingo-80b"], cfgs["flamingo-80b"].lm.d_model
print("\nflamingo-80b, share of the parameters:")
for p in ("lm", "xattn", "vision", "resampler"):
    print(f"  {p:10} {n[p] / B_:6.2f}B  {100 * n[p] / n['total']:5.1f}%")
trained = n["xattn"] + n["resampler"] + 2 * D
print(f"  trained: resampler + xattn + 2 token rows = {trained / B_:.2f}B "
      f"({100 * trained / n['total']:.1f}%); frozen: {(n['total'] - trained) / B_:.1f}B")
assert n["lm"] / n["total"] > 0.85 and (n["vision"] + n["resampler"]) / n["total"] < 0.01

# ----------------------------------------------------------------------------- 4. the gaps, explained

# LM: Chinchilla/Gopher use Transformer-XL relative positions, which add a D x D position projection to
# every block: 13 D^2 instead of our 12 D^2 (we use ALiBi, which has no parameters).
print("\nthe gaps:")
relpos = {}
for name in PAPER:
    c = cfgs[name].lm
    relpos[name] = counts[name]["lm"] + c.n_layer * c.d_model**2
    print(f"  {name:13} LM + one D x D relative-position projection per block: {relpos[name] / B_:5.2f}B "
          f"(paper {PAPER[name]['lm']}B)")
assert abs(relpos["flamingo-3b"] / B_ - 1.4) < 0.05 and abs(relpos["flamingo-80b"] / B_ - 70) < 0.5
# 9B: Table 4 says 40 layers of 4096, which is 8.3B (9.0B with relative positions); the 7.1B of Table 5 is
# what 32 such layers give (Gopher's 7.1B model has 32 layers). We build Table 4's dimensions.
D9, V9 = cfgs["flamingo-9b"].lm.d_model, cfgs["flamingo-9b"].lm.vocab_size
lm_32 = 32 * (13 * D9**2 + 13 * D9) + 2 * V9 * D9 + 2 * D9
print(f"  flamingo-9b   the same with 32 blocks instead of Table 4's 40: {lm_32 / B_:.2f}B (paper 7.1B)")
assert abs(lm_32 / B_ - 7.1) < 0.2
# xattn: App. B.1.1 gives other counts than Table 5 (1.4B for 3B, 1.8B for 9B); ours agree with one or the
# other. 80B: 12 layers of ours are 8.4B; Table 5's 10B would take 14 of them.
per_layer = {k: counts[k]["xattn"] / cfgs[k].n_xattn for k in PAPER}
print(f"  xattn: 3B {counts['flamingo-3b']['xattn'] / B_:.2f}B (Table 5: 1.2B, App. B.1.1: 1.4B); "
      f"9B {counts['flamingo-9b']['xattn'] / B_:.2f}B (Table 5: 1.6B, App. B.1.1: 1.8B); "
      f"80B {per_layer['flamingo-80b'] / B_:.2f}B x {cfgs['flamingo-80b'].n_xattn} layers "
      f"(Table 5's 10B would be {10 * B_ / per_layer['flamingo-80b']:.1f} layers)")
assert abs(counts["flamingo-9b"]["xattn"] / B_ - 1.8) < 0.05
print("\nOK: the paper's models build instantly on the meta device; ~88% of Flamingo-80B is its frozen LM.")
