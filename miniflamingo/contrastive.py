"""Contrastive image-text pretraining of the vision encoder (Flamingo App. B.1.3, after CLIP and ALIGN):
the dual encoder and its loss. The training command lives in pretrain_vision.py.

Notable features
- A small bidirectional transformer text encoder; both towers are mean-pooled (image: over the S grid
  cells, text: over real tokens), projected to a joint width and L2-normalised.
- The two-term InfoNCE loss, image->text and text->image, with a trainable inverse temperature
  (log-parameterised, clamped at 100 as in CLIP) and label smoothing 0.1 (paper App. B.1.3).
- Optional `positives` (B, B): captions that repeat inside a batch count as positives of each other
  (a deviation: the synthetic world repeats captions, web alt-text almost never does).
- `clipped_parameters()`: what adaptive gradient clipping (agc.py) clips: both encoders, not the final
  projections or the temperature (NFNet sec. 4.1).

Shapes: N images, B batch of pairs, S grid cells, L text length, Dv vision width, Dt text width,
Dj joint embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from miniflamingo.config import VisionConfig
from miniflamingo.vision import VisionEncoder


@dataclass
class ContrastiveConfig:
    """The text tower and the loss. The vision tower is a VisionConfig."""

    vocab_size: int = 1024  # Tokenizer.default().n_vocab
    max_len: int = 64  # longest caption in tokens; longer captions are an error, not silently cut
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128  # Dt
    d_joint: int = 128  # Dj
    init_inv_temp: float = 10.0  # CLIP starts at 1 / 0.07 ~ 14; ALIGN learns it too
    max_inv_temp: float = 100.0  # clamp, as CLIP does, so the logits cannot blow up
    label_smoothing: float = 0.1  # paper App. B.1.3

    def __post_init__(self):
        assert self.d_model % self.n_head == 0, (
            f"contrastive d_model={self.d_model} must be divisible by n_head={self.n_head}")


# ----------------------------------------------------------------------------- text tower


class TextBlock(nn.Module):
    """Pre-LN transformer block with full (bidirectional) attention over the real tokens.

    It works on the real tokens only, packed as (N, D) (see TextEncoder): the per-token layers (the
    qkv and output projections, the MLP) skip the padding, and only attention lays the tokens out as
    (B, L) rows, with padding keys masked out."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """x (N, D): the real tokens; mask (B, L) bool; where (N,): their flat indices into B * L."""
        (B, L), D = mask.shape, x.shape[1]
        qkv = self.qkv(self.ln1(x))  # (N, 3D)
        qkv = qkv.new_zeros(B * L, 3 * D).index_copy(0, where, qkv).view(B, L, 3 * D)
        q, k, v = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in qkv.split(D, dim=2))
        # (B, nh, L, hs); no causal mask: every token sees the whole caption, padding keys are masked out
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(B * L, D)[where])  # (N, D): padding rows dropped
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """ids (B, L) long, mask (B, L) bool (True = real token) -> mean-pooled features (B, Dt).

    Unpadded: the blocks see only the real tokens, packed (the "varlen" layout of BERT-style encoders
    and FlashAttention). The world's captions average 24 tokens with batches padded to about 44, so the
    padded tower spent about half its work on padding (forward + backward 1.68x faster packed, batch
    128: benchmarks/vision_step.py). The function is the padded one's: tests/test_contrastive.py checks it
    against a padded reference."""

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(TextBlock(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"expected ids and mask (B, L) with L <= {self.cfg.max_len}, got ids "
                             f"{tuple(ids.shape)} and mask {tuple(mask.shape)}")
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"every caption needs a real token; rows {empty} of mask {tuple(mask.shape)} "
                             f"have none")
        B, L = ids.shape
        where = mask.flatten().nonzero().squeeze(1)  # (N,) flat indices of the real tokens
        pos = torch.arange(L, device=ids.device).repeat(B)[where]
        x = self.wte(ids.flatten()[where]) + self.wpe(pos)  # (N, Dt)
        for block in self.blocks:
            x = block(x, mask, where)
        x = self.ln_f(x)
        row = torch.div(where, L, rounding_mode="floor")  # each token's caption
        total = x.new_zeros(B, x.shape[1]).index_add(0, row, x)
        return total / mask.sum(1, keepdim=True).to(x.dtype)  # (B, Dt): mean over real tokens


# ----------------------------------------------------------------------------- the two towers and the loss


class ContrastiveModel(nn.Module):
    """The dual encoder of Flamingo App. B.1.3: VisionEncoder + TextEncoder, joint L2-normalised space."""

    def __init__(self, vision_cfg: VisionConfig, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(vision_cfg)
        self.image_proj = nn.Linear(vision_cfg.d_out, cfg.d_joint)
        self.text = TextEncoder(cfg)
        self.text_proj = nn.Linear(cfg.d_model, cfg.d_joint)
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(cfg.init_inv_temp)))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, Dj), unit norm. Mean-pool the S grid cells, then project."""
        return F.normalize(self.image_proj(self.vision(images).mean(dim=1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, Dj), unit norm."""
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def inv_temp(self) -> torch.Tensor:
        return self.log_inv_temp.clamp(max=math.log(self.cfg.max_inv_temp)).exp()

    def forward(self, images, ids, mask, positives=None) -> torch.Tensor:
        return contrastive_loss(self.embed_images(images), self.embed_texts(ids, mask), self.inv_temp(),
                                self.cfg.label_smoothing, positives)

    def clipped_parameters(self) -> list[nn.Parameter]:
        """What AGC clips: both encoders, not the final projections or the temperature (NFNet sec. 4.1)."""
        return list(self.vision.parameters()) + list(self.text.parameters())


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, inv_temp: torch.Tensor | float,
                     label_smoothing: float = 0.1, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Two-term InfoNCE (paper App. B.1.3), averaged over the two directions:
        L = 1/2 [ CE(softmax_j(tau x_i . y_j), i) + CE(softmax_i(tau x_i . y_j), j) ]
    img, txt (B, Dj) L2-normalised, row i of each is a matched pair. The paper sums the two terms; we
    average them so that a model that knows nothing scores log(B), like a single softmax.
    positives: optional (B, B) bool, True where pair (i, j) matches (deviation: repeated captions);
    the target then spreads uniformly over the row's positives. None = the diagonal."""
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"expected img and txt embeddings (B, Dj) of the same shape, got {tuple(img.shape)} "
                         f"and {tuple(txt.shape)}")
    logits = inv_temp * img @ txt.T  # (B, B): logits[i, j] = similarity of image i and text j
    B = logits.shape[0]
    if positives is None:
        target = torch.arange(B, device=logits.device)
        t_i2t = t_t2i = target
    else:
        pos = positives.to(logits.dtype)
        t_i2t = pos / pos.sum(1, keepdim=True)  # (B, B) rows: images -> texts
        t_t2i = pos.T / pos.T.sum(1, keepdim=True)  # rows: texts -> images
    i2t = F.cross_entropy(logits, t_i2t, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(logits.T, t_t2i, label_smoothing=label_smoothing)
    return 0.5 * (i2t + t2i)


def main(argv: list[str] | None = None) -> int:
    """`python -m miniflamingo pretrain-vision`: see pretrain_vision.py."""
    from miniflamingo.pretrain_vision import main as run

    return run(argv)
