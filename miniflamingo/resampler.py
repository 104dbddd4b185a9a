"""The Perceiver Resampler (paper 2.1, Fig. 3, App. A.1.1): any number of visual features in, a fixed
number R of visual tokens out.

Notable features
- R learned latent queries cross-attend to the features of one media (all its frames at once); the keys
  and values are concat(features, latents), so the latents also attend to each other (paper Fig. 3).
- Video: learned temporal embeddings, one per frame, are added before the frames are flattened into one
  key/value set. A video with more frames than `max_frames` gets linearly interpolated temporal
  embeddings (paper App. B.1.2: trained with 8 frames, evaluated with 30).
- No spatial position encoding (the paper saw no gain from it), so the output does not change when the
  S grid cells of a frame are permuted.
- Squared-ReLU feed-forward (paper App. A.1.4, as in Primer), pre-LayerNorm everywhere, a final LayerNorm.
- A linear projection Dv -> Dr when the vision width differs from the resampler's (NFNet-F6 gives 3072,
  the paper's resampler is 1536 wide); with it the paper preset has ~194M parameters, as in Table 5.

Shapes: B batch, T media per row, F frames per media, S grid cells per frame, R latents,
Dv vision feature width, Dr = d_model the resampler's width, nh heads, hs head size, N = B * T.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miniflamingo.config import ResamplerConfig


class FeedForward(nn.Module):
    """LayerNorm -> Linear(D, ff_mult*D) -> squared ReLU -> Linear(ff_mult*D, D), no biases.
    Squared ReLU is what the paper uses in every layer it trains (App. A.1.4); the xattn layers share it."""

    def __init__(self, d_model: int, ff_mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, ff_mult * d_model, bias=False)
        self.proj = nn.Linear(ff_mult * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(self.norm(x))).square())


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to concat(media features, latents) (keys/values), paper Fig. 3."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        inner = cfg.n_head * cfg.d_head
        self.norm_media = nn.LayerNorm(cfg.d_model)
        self.norm_latents = nn.LayerNorm(cfg.d_model)
        self.to_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        N, M, _ = x.shape  # M = F * S features of one media
        R = latents.shape[1]
        nh, hs = self.n_head, self.d_head
        latents = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(x), latents], dim=1)  # (N, M + R, Dr), paper: kv = concat(x_f, x)
        q = self.to_q(latents).view(N, R, nh, hs).transpose(1, 2)  # (N, nh, R, hs)
        k, v = self.to_kv(kv_in).view(N, M + R, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, N, nh, M+R, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, nh, R, hs), no mask: every latent sees all
        return self.to_out(out.transpose(1, 2).reshape(N, R, nh * hs))  # (N, R, Dr)


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(cfg)
        self.ffw = FeedForward(cfg.d_model, cfg.ff_mult)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(x, latents)  # paper Fig. 3: x = x + attention_i(q=x, kv=[x_f, x])
        return latents + self.ffw(latents)  # x = x + ffw_i(x)


class PerceiverResampler(nn.Module):
    """(B, T, F, S, Dv) visual features -> (B, T, R, Dr) visual tokens, one set of R per media."""

    def __init__(self, cfg: ResamplerConfig, d_media: int):
        super().__init__()
        self.cfg, self.d_media = cfg, d_media
        D = cfg.d_model
        self.proj = nn.Linear(d_media, D) if d_media != D else nn.Identity()
        # torch.empty, then _init below: random init on the meta device costs a second of CPU the first
        # time, and a paper preset must build there instantly.
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, D))  # (R, Dr), the learned queries
        self.time_embeddings = nn.Parameter(torch.empty(cfg.max_frames, D))  # (max_frames, Dr)
        self.layers = nn.ModuleList(ResamplerLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(D)
        if not self.latents.is_meta:
            nn.init.normal_(self.latents)  # unit scale, as in open_flamingo; LayerNorm follows anyway
            nn.init.normal_(self.time_embeddings)

    def frame_embeddings(self, n_frames: int) -> torch.Tensor:
        """(n_frames, Dr) temporal embeddings. Up to max_frames: the first n_frames learned ones (an image
        is frame 0). Beyond: the learned ones linearly interpolated over n_frames (paper App. B.1.2)."""
        emb = self.time_embeddings  # (max_frames, Dr)
        if n_frames <= emb.shape[0]:
            return emb[:n_frames]
        stretched = F.interpolate(emb.T[None], size=n_frames, mode="linear", align_corners=True)  # (1, Dr, F)
        return stretched[0].T  # (F, Dr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-1] != self.d_media:
            raise ValueError(
                f"expected vision features (B, T, F, S, Dv={self.d_media}), got {tuple(x.shape)}"
            )
        B, T, n_frames, S, _ = x.shape
        R, D = self.cfg.num_latents, self.cfg.d_model
        x = self.proj(x)  # (B, T, F, S, Dr)
        x = x + self.frame_embeddings(n_frames)[:, None, :]  # (F, 1, Dr) broadcast over the S cells
        x = x.reshape(B * T, n_frames * S, D)  # (N, F*S, Dr): all frames of a media in one key/value set
        latents = self.latents.expand(B * T, R, D)  # (N, R, Dr)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).view(B, T, R, D)  # (B, T, R, Dr)
