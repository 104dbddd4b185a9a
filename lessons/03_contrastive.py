"""Lesson 3: contrastive pretraining: the similarity matrix before and after a few steps.

What it teaches
- Before Flamingo is trained, its vision encoder is pretrained as one tower of a CLIP/ALIGN-style dual
  encoder (paper App. B.1.3): images and captions are embedded into one space, mean-pooled and
  L2-normalised, so S[i, j] = cos(image i, text j).
- The two-term InfoNCE loss pulls the diagonal (matching pairs) up and every other entry down, in both
  directions (image -> text over a row, text -> image over a column), with a trainable inverse
  temperature and label smoothing 0.1:
      L = 1/2 [ CE(softmax_j(tau S[i, j]), i) + CE(softmax_i(tau S[i, j]), j) ]
- Training uses AdamW and adaptive gradient clipping (AGC, agc.py), which NFNets need in place of
  batch norm's implicit step-size control: a unit's gradient is clipped when it is large next to its
  weight, ||G_i|| / ||W_i|| > lambda.

This lesson trains on ONE batch of 8 pairs for 30 steps: the diagonal takes over, which is the whole
mechanism. Generalising to held-out images takes the real run: `python -m miniflamingo pretrain-vision`.

Paper: App. B.1.3 (contrastive pretraining of the NFNet); NFNet paper sec. 4.1 (AGC).
Run: python lessons/03_contrastive.py  (saves runs/lessons/03_similarity.png)
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _plots import pyplot  # lessons/_plots.py: matplotlib if installed

import miniflamingo as mf
from miniflamingo.agc import adaptive_grad_clip
from miniflamingo.contrastive import ContrastiveConfig, ContrastiveModel, contrastive_loss
from miniflamingo.world import World

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
B, STEPS = 8, 30

# ----------------------------------------------------------------------------- 1. a batch of world pairs

# Single-object images with distinct captions, so each caption has exactly one matching image.
pairs, seen = [], set()
for p in World(seed=0).image_text_pairs(200):
    if len(p["attrs"]["objects"]) == 1 and p["caption"] not in seen and len(pairs) < B:
        seen.add(p["caption"])
        pairs.append(p)
captions = [p["caption"] for p in pairs]
for i, c in enumerate(captions):
    print(f"pair {i}: {c}")

tok = mf.Tokenizer.default()
vision_cfg = mf.FlamingoConfig.preset("tiny").vision  # the encoder Flamingo will freeze
model = ContrastiveModel(vision_cfg, ContrastiveConfig(vocab_size=tok.n_vocab))
images = torch.as_tensor(np.stack([p["image"] for p in pairs]))  # uint8 (B, H, W, 3)
images = images.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
rows = [tok.encode_ordinary(c) for c in captions]  # raw data text: no special tokens
ids = torch.full((B, max(map(len, rows))), tok.eot_id)  # (B, L), padded with <|endoftext|>
mask = torch.zeros(ids.shape, dtype=torch.bool)  # (B, L), True = real token (the text tower's mean-pool)
for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True


def similarity() -> torch.Tensor:
    """S (B, B): cosine similarity of image i (row) and caption j (column)."""
    model.eval()
    with torch.no_grad():
        return model.embed_images(images) @ model.embed_texts(ids, mask).T


def show(S: torch.Tensor, title: str) -> None:
    print(f"\n{title}: S[i, j] = cos(image i, text j), diagonal = matching pairs")
    print("      " + " ".join(f"{j:6d}" for j in range(B)))
    for i, row in enumerate(S.tolist()):
        print(f"{i:5d} " + " ".join(f"{v:+6.2f}" for v in row))


# ----------------------------------------------------------------------------- 2. before training

before = similarity()
show(before, "before training")
with torch.no_grad():
    loss0 = model(images, ids, mask).item()
print(f"loss {loss0:.3f}  (a model that knows nothing: log B = {math.log(B):.3f})")

# The loss is just cross-entropy over the rows and the columns of tau * S (paper App. B.1.3):
tau = model.inv_temp().detach()
i2t = F.cross_entropy(tau * before, torch.arange(B), label_smoothing=0.1)  # rows: image -> text
t2i = F.cross_entropy(tau * before.T, torch.arange(B), label_smoothing=0.1)  # columns: text -> image
by_hand = 0.5 * (i2t + t2i)
with torch.no_grad():
    img_emb, txt_emb = model.embed_images(images), model.embed_texts(ids, mask)  # (B, Dj) each, unit norm
assert torch.allclose(by_hand, contrastive_loss(img_emb, txt_emb, tau), atol=1e-5)
print(f"two-term InfoNCE by hand from S: {by_hand:.3f} (inverse temperature tau = {tau:.1f})")

# ----------------------------------------------------------------------------- 3. a few steps

opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.0)
print()
for step in range(STEPS):
    model.train()
    loss = model(images, ids, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    n_clipped = adaptive_grad_clip(model.clipped_parameters(), clip=0.1)  # unit-wise, encoders only
    opt.step()
    if step % 5 == 0 or step == STEPS - 1:
        print(f"step {step:2d} | loss {loss.item():.3f} | tau {model.inv_temp().item():5.2f} | "
              f"AGC clipped {n_clipped} units")

after = similarity()
show(after, f"after {STEPS} steps")
with torch.no_grad():
    loss1 = model(images, ids, mask).item()
# With label smoothing 0.1 even a perfect model keeps the entropy of the smoothed target.
floor = -(0.9 + 0.1 / B) * math.log(0.9 + 0.1 / B) - (B - 1) * (0.1 / B) * math.log(0.1 / B)
print(f"loss {loss1:.3f} (label smoothing's floor {floor:.3f})")
diag, off = after.diagonal(), after.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
print(f"diagonal mean {diag.mean():+.2f}, largest off-diagonal {off.max():+.2f}")

assert loss0 > 0.9 * math.log(B) and loss1 < floor + 0.25, (loss0, loss1)
assert torch.equal(after.argmax(1), torch.arange(B)), "image -> text: every image finds its caption"
assert torch.equal(after.argmax(0), torch.arange(B)), "text -> image: every caption finds its image"

# ----------------------------------------------------------------------------- 4. the picture

out = Path(__file__).resolve().parent.parent / "runs" / "lessons" / "03_similarity.png"
plt = pyplot(out)
if plt is not None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    lim = float(max(before.abs().max(), after.abs().max()))
    for ax, S, title in ((axes[0], before, "before"), (axes[1], after, f"after {STEPS} steps")):
        im = ax.imshow(S, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"cos(image i, text j), {title}")
        ax.set_xlabel("text j")
        ax.set_ylabel("image i")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(out, dpi=100)
    print(f"saved {out}")
print("\nOK: InfoNCE pulled the matching pairs onto the diagonal, in both directions.")
