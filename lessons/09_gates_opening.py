"""Lesson 9: training the tiny Flamingo and watching the gates open.

What it teaches
- Flamingo training (paper 2.4) updates only what the paper adds: the Perceiver Resampler, the GATED
  XATTN-DENSE layers and the embeddings of <image> and <|endofchunk|>. The vision encoder and the LM stay
  frozen, bit for bit.
- At step 0 every gate is 0, tanh(0) = 0, and the model IS its LM (lesson 7). Training moves the gates
  away from 0 (either sign: only |tanh| matters for how much each layer adds, Fig. 4), and the loss on
  held-out image-text pairs falls below the frozen LM's loss on the same text: the images now help.
- The test that the images (not just more text statistics) help: the same held-out captions with each
  image swapped for another pair's image. The trained model is worse there than with the right image.
- The gates stay small (here |tanh| < 0.2, in the demo run about 0.06): the weights behind a gate grow
  instead, so a small gate can carry a large signal. A gate is a dial for how far the model strays from
  its LM, and training turns it only as far as the images pay for. Here the layer before the second LM
  block opens most; the one reading the raw token embeddings barely moves.

Setup, stated plainly. The frozen LM is the tiny preset's GPT pretrained here for a few seconds on the
captions' TEXT alone (no pixels): it knows how captions read, not what a given picture shows. The frozen
vision encoder is the tiny NFNet with random weights. A random NFNet's features are small (std ~0.1; the
demo's contrastively pretrained encoder gives ~3), and the resampler adds unit-scale temporal embeddings
to them before its LayerNorm, which would drown them: we scale the frozen features to std 3, a fixed map
that stands in for pretraining. Data: the world's single-object image-text pairs (several caption
templates), held-out pairs from the "val" split.

Paper: section 2.2 and Fig. 4 (tanh gating), 2.4 (training on the mixture, only new parts trained),
App. B.1.2 (optimisation).
Run: python lessons/09_gates_opening.py  (saves runs/lessons/09_gates.png); --quick: fewer steps (the test)
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _plots import pyplot  # lessons/_plots.py: matplotlib if installed

import miniflamingo as mf
from miniflamingo.data import DocumentDataset, MixtureSampler, Source, collate
from miniflamingo.flamingo import Flamingo
from miniflamingo.lm import GPT
from miniflamingo.trainutil import configure_optimizer, get_lr
from miniflamingo.world import World

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--quick", action="store_true", help="half the steps (about 15 s), for the test")
args = ap.parse_args()
LM_STEPS, STEPS, EVERY = (100, 150, 25) if args.quick else (150, 300, 25)
N_PAIRS = 1600 if args.quick else 2400  # about a quarter have a single object
BATCH, LR = 64, 3e-3  # 32 is too noisy: the attention gates then often stay shut within 300 steps

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
t_start = time.perf_counter()
tok = mf.Tokenizer.default()
cfg = mf.FlamingoConfig.preset("tiny")
world = World(seed=0)

# ----------------------------------------------------------------------------- 1. data and the frozen parts

train_pairs = [p for p in world.image_text_pairs(N_PAIRS) if len(p["attrs"]["objects"]) == 1]
val_pairs = [p for p in world.image_text_pairs(400, split="val") if len(p["attrs"]["objects"]) == 1]
print(f"{len(train_pairs)} training pairs, {len(val_pairs)} held-out pairs, e.g.:")
for p in train_pairs[:3]:
    print(f"  <image>{p['caption']}<|endofchunk|>")
train_text = DocumentDataset.from_pairs(train_pairs, tok)
val_text = DocumentDataset.from_pairs(val_pairs, tok)

# The frozen LM: a few seconds of next-token training on the pair rows WITHOUT their media.
lm = GPT(cfg.lm)
opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.0)
text_only = MixtureSampler([Source("captions", train_text, 1.0, BATCH, seq_len=64, max_media=1)], seed=1)
for step in range(LM_STEPS):
    b = text_only.batch(step)[0]
    _, loss = lm(b.input_ids, targets=b.targets)  # the <image> token is just a token here
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(f"\nLM pretrained on caption text alone: {LM_STEPS} steps, loss {loss.item():.3f}")

model = Flamingo(cfg)  # its vision encoder keeps its random init
model.load_pretrained(lm_state=lm.state_dict())  # the LM goes in frozen, as in stage 3 of the real run
x = torch.as_tensor(np.stack([p["image"] for p in train_pairs[:64]])).permute(0, 3, 1, 2) / 255
with torch.no_grad():
    scale = 3.0 / model.vision(x).std().item()  # fixed from now on: part of the frozen encoder


def frozen_features(pixels: torch.Tensor) -> torch.Tensor:
    return model.vision(pixels) * scale  # (N, S, Dv)


# paper 2.4 / train.py: the encoder is frozen, so its features are computed once and cached
train_data = train_text.with_features(frozen_features)
val_data = val_text.with_features(frozen_features)
rng = np.random.default_rng(0)
rows = [val_data.row(i, rng) for i in range(len(val_data))]
val_x, val_feats, val_y = collate(rows, tok)  # (B, L), features (B, T=1, F=1, S, Dv), (B, L)
other_feats = val_feats.roll(1, dims=0)  # each caption with the next pair's image
frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision.", "lm."))}
n = model.param_counts()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"Flamingo: {n['total'] / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained (resampler "
      f"{n['resampler'] / 1e6:.2f}M, {len(model.xattn)} xattn layers {n['xattn'] / 1e6:.2f}M, 2 token rows)")


@torch.no_grad()
def held_out_loss(feats: torch.Tensor) -> float:
    return model(val_x, vision_features=feats, targets=val_y)[1].item()


def tanh_gates() -> list[float]:
    """[attn_0, ffw_0, attn_1, ffw_1, ...]: how much of each layer's output is added (Fig. 4)."""
    return [math.tanh(g.item()) for layer in model.xattn for g in (layer.attn_gate, layer.ff_gate)]


# ----------------------------------------------------------------------------- 2. step 0: exactly the LM

with torch.no_grad():
    lm_logits, lm_loss = model.lm(val_x, targets=val_y)  # the frozen LM alone: text only
    step0_logits = model(val_x, vision_features=val_feats)[0]
diff = (step0_logits - lm_logits).abs().max().item()
print(f"\nstep 0: gates {tanh_gates()}, max |logits_flamingo - logits_lm| = {diff}")
assert all(g == 0.0 for g in tanh_gates()) and diff == 0.0, "closed gates: Flamingo is its LM exactly"
print(f"frozen LM's loss on the held-out captions (no image): {lm_loss.item():.3f}")

# ----------------------------------------------------------------------------- 3. train, watch the gates

sampler = MixtureSampler([Source("image_text", train_data, 1.0, BATCH, seq_len=64, max_media=1)], seed=0)
opt = configure_optimizer(model, LR, weight_decay=0.1,  # paper B.1.2: no decay on the resampler
                          no_decay=("resampler", "latents", "time_embeddings", "special_embeddings"))
header = " | ".join(f"L{i} attn   L{i} ffw " for i in range(len(model.xattn)))
print(f"\nheld-out loss with the right image / with another pair's image; tanh(gate) per xattn layer\n"
      f" step | right  other | {header}")
history = []  # (step, loss right, loss other, gates)


def record(step: int) -> None:
    history.append((step, held_out_loss(val_feats), held_out_loss(other_feats), tanh_gates()))
    s, right, other, gates = history[-1]
    print(f" {s:4d} | {right:.3f}  {other:.3f} | " + " | ".join(
        f"{gates[j]:+.4f}  {gates[j + 1]:+.4f}" for j in range(0, len(gates), 2)))


record(0)
model.train()
for step in range(STEPS):
    for group in opt.param_groups:
        group["lr"] = get_lr(step, LR, warmup=20, total=STEPS, schedule="constant")  # paper B.1.2
    b = sampler.batch(step)[0]
    _, loss = model(b.input_ids, vision_features=b.media, targets=b.targets, media_frames=b.frames)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    if (step + 1) % EVERY == 0:
        record(step + 1)
model.eval()

_, right, other, gates = history[-1]
print(f"\nafter {STEPS} steps: held-out loss {right:.3f} with the right image, {other:.3f} with another "
      f"pair's, {lm_loss.item():.3f} for the frozen LM; largest |tanh(gate)| {max(map(abs, gates)):.3f}")
assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items()), "vision and LM stay frozen"
assert max(map(abs, gates)) > 0.01, "training moved the gates away from 0"
# Quick mode trains half as long: it asserts the weaker claim "below the LM" with no margin.
margin = 0.0 if args.quick else 0.05
assert right < lm_loss.item() - margin, "the images help: below the frozen LM's loss on the same captions"
assert right < other - 0.1, "it is THIS image that helps: another pair's image does clearly worse"

# ----------------------------------------------------------------------------- 4. the picture

out = Path(__file__).resolve().parent.parent / "runs" / "lessons" / "09_gates.png"
plt = pyplot(out)
if plt is not None:
    steps = [h[0] for h in history]
    fig, (ax_g, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for j in range(2 * len(model.xattn)):
        ax_g.plot(steps, [h[3][j] for h in history], ("-", "--")[j % 2],
                  label=f"layer {j // 2} {('attn', 'ffw')[j % 2]}")
    ax_g.axhline(0, color="grey", lw=0.5)
    ax_g.set(title="tanh(gate) per xattn layer", xlabel="step")
    ax_g.legend()
    ax_l.plot(steps, [h[1] for h in history], label="Flamingo, right image")
    ax_l.plot(steps, [h[2] for h in history], label="Flamingo, another pair's image")
    ax_l.axhline(lm_loss.item(), color="grey", ls=":", label="frozen LM (no image)")
    ax_l.set(title="held-out image-text loss", xlabel="step")
    ax_l.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")
print(f"\nOK: the gates opened from exactly 0 and the images now help "
      f"({time.perf_counter() - t_start:.0f} s).")
