"""Lesson 7: tanh gating: the untrained Flamingo is exactly its language model.

What it teaches
- Each GATED XATTN-DENSE layer adds its output through a gate (paper 2.2, Fig. 4):
      y = y + tanh(attn_gate) * XAttn(LN(y), media[phi])
      y = y + tanh(ff_gate)   * FFW(LN(y))
  Both gates start at 0 and tanh(0) = 0, so at initialisation every layer is the identity and the
  Flamingo model computes EXACTLY the frozen LM's logits: bit for bit, not approximately.
- Opening one gate changes the logits of the tokens that have an image (phi > 0), and only those.
- At the first step only the gates (and the new tokens' embeddings) get a gradient: d/da tanh(a) y = y
  at a = 0, while every weight behind a closed gate is multiplied by tanh(0) = 0. Training opens the
  gates first, then learns what flows through them, and the LM is never disrupted at the start.
- The paper's "no tanh gating" ablation (Table 3) starts from a model that is NOT its LM.

Paper: section 2.2 and Fig. 4 (tanh gating), App. A.1.2, Table 3 ablation.
Run: python lessons/07_tanh_gating.py
"""

import dataclasses

import numpy as np
import torch

import miniflamingo as mf
from miniflamingo.flamingo import Flamingo
from miniflamingo.world import World
from miniflamingo.xattn import compute_phi

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
tok = mf.Tokenizer.default()
cfg = mf.FlamingoConfig.preset("tiny")
model = Flamingo(cfg)

# Two world images with the caption template of the paper, after some text with no image yet.
pairs = World(seed=0).image_text_pairs(2)
prompt = "two images:" + "".join(f"<image>{p['caption']}<|endofchunk|>" for p in pairs)
ids = torch.tensor([tok.encode(prompt)])  # (B=1, L)
pixels = torch.as_tensor(np.stack([p["image"] for p in pairs]))  # uint8 (T, H, W, 3)
pixels = pixels.permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W) in [0, 1]
media = pixels[None, :, None]  # (B=1, T=2, F=1, 3, H, W)
phi = compute_phi(ids, tok.image_id)[0]  # (L,)
print(f"{ids.shape[1]} tokens, {int(phi.max())} images; tokens with phi = 0: {int((phi == 0).sum())}")

n = model.param_counts()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"parameters: {n['total'] / 1e6:.2f}M, of which trainable {trainable / 1e6:.2f}M "
      f"(resampler, {len(model.xattn)} xattn layers, 2 token embeddings); vision and LM frozen")

# ------------------------------------------------------------------------- 1. gates at zero: exactly the LM

with torch.no_grad():
    lm_logits = model.lm(ids)[0]  # (1, L, V): the frozen LM alone, text only
    flamingo_logits = model(ids, media)[0]  # the whole model, images included
print("\n(tanh(attn_gate), tanh(ff_gate)) per layer:",
      [(g.attn_gate.tanh().item(), g.ff_gate.tanh().item()) for g in model.xattn])
diff = (flamingo_logits - lm_logits).abs().max().item()
print(f"gates closed: max |logits_flamingo - logits_lm| = {diff}")
assert diff == 0.0, "with tanh(0) = 0 every xattn layer is the identity"

# ----------------------------------------------------------------------------- 2. open one gate

with torch.no_grad():
    model.xattn[0].attn_gate.fill_(0.5)
    opened = model(ids, media)[0]
per_token = (opened - lm_logits).abs().amax(-1)[0]  # (L,)
print(f"\nattn_gate of layer 0 set to 0.5 (tanh = {np.tanh(0.5):.3f}): max |change| per token")
print("  phi:    " + " ".join(f"{p:4d}" for p in phi.tolist()[:16]) + " ...")
print("  change: " + " ".join(f"{d:4.2f}" for d in per_token.tolist()[:16]) + " ...")
assert per_token[phi == 0].max() == 0 and per_token[phi > 0].min() > 0

# ------------------------------------------------------------------------- 3. who gets a gradient at step 0

with torch.no_grad():
    model.xattn[0].attn_gate.fill_(0.0)
targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # next tokens
_, loss = model(ids, media, targets)
loss.backward()


def grad_norm(params) -> float:
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


layer = model.xattn[0]
rows = {
    "xattn attn_gate (all layers)": [g.attn_gate for g in model.xattn],
    "xattn ff_gate (all layers)": [g.ff_gate for g in model.xattn],
    "xattn attention, FFW weights": [p for g in model.xattn for m in (g.attn, g.ffw) for p in m.parameters()],
    "Perceiver Resampler": list(model.resampler.parameters()),
    "<image>, <|endofchunk|> embeddings": [model.special_embeddings],
    "vision encoder (frozen)": list(model.vision.parameters()),
    "LM (frozen)": list(model.lm.parameters()),
}
print(f"\nfirst backward pass, loss {loss.item():.3f}: gradient norm per part")
for name, params in rows.items():
    print(f"  {name:36} {grad_norm(params):.2e}")
assert grad_norm(rows["xattn attn_gate (all layers)"]) > 0
assert grad_norm(rows["xattn ff_gate (all layers)"]) > 0
assert grad_norm(rows["xattn attention, FFW weights"]) == 0 and grad_norm(rows["Perceiver Resampler"]) == 0
assert all(p.grad is None for p in rows["LM (frozen)"] + rows["vision encoder (frozen)"])

# ----------------------------------------------------------------------------- 4. the ablation: no gating

torch.manual_seed(0)
ungated = Flamingo(dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, gated=False))).eval()
ungated.lm.load_state_dict(model.lm.state_dict())
with torch.no_grad():
    d_ungated = (ungated(ids, media)[0] - lm_logits).abs().max().item()
print(f"\nno tanh gating (Table 3 ablation), untrained: max |logits - logits_lm| = {d_ungated:.2f}")
assert d_ungated > 0.1
print("\nOK: closed gates make Flamingo its LM exactly; an open gate changes only the tokens with an image.")
