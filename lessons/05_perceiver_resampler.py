"""Lesson 5: the Perceiver Resampler: a fixed number of visual tokens for any image or video size.

What it teaches
- The vision encoder gives a grid of S = h * w features per frame, and S grows with the image; a video
  has F frames of them. The Perceiver Resampler (paper 2.1, Fig. 3) turns any F * S features into the
  same R visual tokens: R learned latent queries cross-attend to the features, so the LM's
  cross-attention always sees R tokens per media, whatever the resolution or the video length.
- Its keys and values are concat(features, latents), so the latents also attend to each other.
- Temporal embeddings (one per frame) are added before the frames are flattened into one set; more
  frames than were learned are handled by interpolating them (paper App. B.1.2).
- There is no spatial position encoding (the paper saw no gain), so shuffling the grid cells of a
  frame leaves the output unchanged; reordering frames does change it.

Paper: section 2.1, Fig. 3, App. A.1.1 and B.1.2.
Run: python lessons/05_perceiver_resampler.py  (saves runs/lessons/05_latent_attention.png)
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from _plots import pyplot  # lessons/_plots.py: matplotlib if installed

import miniflamingo as mf
from miniflamingo.resampler import PerceiverResampler
from miniflamingo.vision import VisionEncoder
from miniflamingo.world import World

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
cfg = mf.FlamingoConfig.preset("tiny")
vision = VisionEncoder(cfg.vision).eval()
resampler = PerceiverResampler(cfg.resampler, d_media=cfg.vision.d_out).eval()
R, Dr = cfg.resampler.num_latents, cfg.resampler.d_model
print(f"tiny preset: vision stride {cfg.vision.stride}, Dv = {cfg.vision.d_out}; resampler R = {R} "
      f"latents of width Dr = {Dr}, {cfg.resampler.max_frames} learned temporal embeddings, "
      f"{sum(p.numel() for p in resampler.parameters()) / 1e3:.0f}k parameters")


def features(frames: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) pixels -> (1, 1, F, S, Dv): one media of F frames, each frame encoded on its own."""
    with torch.no_grad():
        return vision(frames)[None, None]


# ----------------------------------------------------------------------------- 1. any size in, R tokens out

world = World(seed=0)
clip = torch.as_tensor(world.video_text_pairs(1)[0]["video"])  # uint8 (F=6, 64, 64, 3)
clip = clip.permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W) in [0, 1]
inputs = {
    "image 64x64": torch.rand(1, 3, 64, 64),
    "image 128x128": torch.rand(1, 3, 128, 128),
    "image 96x160": torch.rand(1, 3, 96, 160),
    "video 6 x 64x64": clip,  # a world video: shapes moving
    "video 15 x 64x64": torch.rand(15, 3, 64, 64),  # more frames than the 8 learned embeddings
}
print(f"\n{'media':18} {'features (B, T, F, S, Dv)':>27} {'keys F*S':>9}   visual tokens (B, T, R, Dr)")
for name, frames in inputs.items():
    x = features(frames)
    with torch.no_grad():
        out = resampler(x)
    print(f"{name:18} {str(tuple(x.shape)):>27} {x.shape[2] * x.shape[3]:9d}   {tuple(out.shape)}")
    assert out.shape == (1, 1, R, Dr)

# ----------------------------------------------------------------------------- 2. no spatial positions

world_image = torch.as_tensor(World(seed=0, image_size=128).image_text_pairs(1)[0]["image"])
image = world_image.permute(2, 0, 1)[None].float() / 255  # (1, 3, 128, 128)
x = features(image)  # (1, 1, 1, S, Dv)
S = x.shape[3]
shuffled = x[:, :, :, torch.randperm(S)]  # the same features at shuffled grid cells
video = features(clip)  # (1, 1, 6, S, Dv)
with torch.no_grad():
    d_cells = (resampler(shuffled) - resampler(x)).abs().max().item()
    d_frames = (resampler(video.flip(2)) - resampler(video)).abs().max().item()
    saved = resampler.time_embeddings.clone()
    resampler.time_embeddings.zero_()  # without temporal embeddings a video is a bag of features
    d_bag = (resampler(video.flip(2)) - resampler(video)).abs().max().item()
    resampler.time_embeddings.copy_(saved)
print(f"\nshuffle the {S} grid cells of an image: max |change| = {d_cells:.1e} (no spatial positions)")
print(f"reverse the 6 frames of a video:     max |change| = {d_frames:.1e} (temporal embeddings)")
print(f"  ... with temporal embeddings zeroed: max |change| = {d_bag:.1e}")
assert d_cells < 1e-5 and d_bag < 1e-5 and d_frames > 1e-3

emb = resampler.frame_embeddings(15)  # (15, Dr), stretched from the 8 learned ones
learned = resampler.time_embeddings
assert torch.equal(resampler.frame_embeddings(6), learned[:6])
assert torch.allclose(emb[0], learned[0]) and torch.allclose(emb[-1], learned[-1])
print("15 frames: temporal embeddings interpolated linearly from the 8 learned ones, same endpoints")

# ----------------------------------------------------------------------------- 3. what a latent looks at

# The first layer's attention, written out from its weights (paper Fig. 3): queries from the latents,
# keys from concat(features, latents). Checked against the layer's own output below.
attn = resampler.layers[0].attn
nh, hs = attn.n_head, attn.d_head
with torch.no_grad():
    media = resampler.proj(x) + resampler.frame_embeddings(1)[:, None]  # (1, 1, 1, S, Dr)
    media = media.view(1, S, Dr)  # (N=1, F*S, Dr)
    latents = attn.norm_latents(resampler.latents[None])  # (1, R, Dr)
    kv_in = torch.cat([attn.norm_media(media), latents], dim=1)  # (1, S + R, Dr)
    q = attn.to_q(latents).view(1, R, nh, hs).transpose(1, 2)  # (1, nh, R, hs)
    k, v = attn.to_kv(kv_in).view(1, S + R, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, 1, nh, S+R, hs)
    weights = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1)  # (1, nh, R, S + R)
    by_hand = attn.to_out((weights @ v).transpose(1, 2).reshape(1, R, nh * hs))  # (1, R, Dr)
    assert torch.allclose(by_hand, attn(media, resampler.latents[None]), atol=1e-5)

on_grid = weights[0, :, :, :S].sum(-1).mean(0)  # (R,) share of attention on the image, averaged over heads
print(f"\nlayer 0 (untrained): share of each latent's attention on the {S} image features "
      f"(the rest goes to the {R} latents):")
print("  " + " ".join(f"{v:.2f}" for v in on_grid.tolist()))
assert torch.allclose(weights.sum(-1), torch.ones(1, nh, R))

out = Path(__file__).resolve().parent.parent / "runs" / "lessons" / "05_latent_attention.png"
plt = pyplot(out)
if plt is not None:
    g = cfg.vision.stride
    grid = weights[0, :, :, :S].mean(0).view(R, 128 // g, 128 // g)  # (R, h, w) head-averaged
    fig, axes = plt.subplots(1, R + 1, figsize=(2 * (R + 1), 2.3))
    axes[0].imshow(world_image.numpy())
    axes[0].set_title("image")
    for r in range(R):
        axes[r + 1].imshow(grid[r], cmap="viridis")
        axes[r + 1].set_title(f"latent {r}")
    for ax in axes:
        ax.axis("off")
    fig.suptitle("where each latent looks in layer 0, untrained: the objects' cells already stand out")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"saved {out}")
print(f"\nOK: {S} image or {6 * 16} video features alike become {R} visual tokens; grid order is ignored.")
