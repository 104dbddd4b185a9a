"""The Perceiver Resampler (paper 2.1, Fig. 3, App. A.1.1): any number of visual features in, a fixed
number R of visual tokens out.

Notable features
- R learned latent queries cross-attend to the features of one media (all its frames at once); the keys
  and values are concat(features, latents), so the latents also attend to each other (paper Fig. 3).
- Video: learned temporal embeddings, one per frame, are added before the frames are flattened into one
  key/value set. A video with more frames than `max_frames` gets linearly interpolated temporal
  embeddings (paper App. B.1.2: trained with 8 frames, evaluated with 30).
- Batches mixing images and videos: `frames` (B, T) gives each media's real-frame count; the keys of the
  padded frames are masked out and each media's temporal embeddings follow its own count, so a media's
  latents do not depend on how many frames the other media in the batch have (padding changes nothing).
- No spatial position encoding (the paper saw no gain from it), so the output does not change when the
  S grid cells of a frame are permuted.
- Squared-ReLU feed-forward (paper App. A.1.4, as in Primer), pre-LayerNorm everywhere, a final LayerNorm.
- A linear projection Dv -> Dr when the vision width differs from the resampler's (NFNet-F6 gives 3072,
  the paper's resampler is 1536 wide); with it the paper preset has ~194M parameters, as in Table 5.
- `MLPResampler` (resampler.kind = "mlp"): the Table 3 ablation (vi), no attention, for lesson 13.

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

    def forward(self, x: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (N, M, Dr) features, latents (N, R, Dr); key_mask (N, M + R) bool, True = a real key, or None
        (all real). The latents' own keys are always real, so no query is left with nothing to attend to."""
        N, M, _ = x.shape  # M = F * S features of one media
        R = latents.shape[1]
        nh, hs = self.n_head, self.d_head
        latents = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(x), latents], dim=1)  # (N, M + R, Dr), paper: kv = concat(x_f, x)
        q = self.to_q(latents).view(N, R, nh, hs).transpose(1, 2)  # (N, nh, R, hs)
        k, v = self.to_kv(kv_in).view(N, M + R, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, N, nh, M+R, hs)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, M+R): all queries alike
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, nh, R, hs)
        return self.to_out(out.transpose(1, 2).reshape(N, R, nh * hs))  # (N, R, Dr)


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(cfg)
        self.ffw = FeedForward(cfg.d_model, cfg.ff_mult)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        latents = latents + self.attn(x, latents, key_mask)  # paper Fig. 3: x = x + attention_i(x, [x_f, x])
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

    def media_frame_embeddings(self, frames: torch.Tensor, n_slots: int) -> torch.Tensor:
        """(N,) real-frame counts -> (N, n_slots, Dr) temporal embeddings, each media by its own count.
        Up to max_frames frames: the first n learned ones (an image is frame 0). Beyond: the learned ones
        linearly interpolated over the n frames (paper App. B.1.2), as F.interpolate(align_corners=True)
        would. Slots past a media's n frames are padding; they get the last learned one and are masked."""
        emb = self.time_embeddings  # (max_frames, Dr)
        last = emb.shape[0] - 1
        f = torch.arange(n_slots, device=emb.device, dtype=torch.float32)  # (F,), positions in float32
        n = frames.to(emb.device, torch.float32).clamp(min=2)[:, None]  # (N, 1); n - 1 > 0 below
        stretch = torch.where(n - 1 > last, last / (n - 1), 1.0)  # (N, 1), 1 = the learned ones as they are
        pos = (f * stretch).clamp(max=last)  # (N, F): where each frame sits in the learned table
        lo = pos.floor().long()  # (N, F)
        hi = (lo + 1).clamp(max=last)
        w = (pos - lo)[..., None].to(emb.dtype)  # (N, F, 1); 0 gives emb[lo] exactly
        # index_select, not emb[lo]: on a GPU the backward of advanced indexing sorts its (N*F) indices
        # into these few rows, a slow kernel; index_select's backward adds atomically.
        N, F = lo.shape
        lo_emb, hi_emb = (emb.index_select(0, i.reshape(-1)).view(N, F, -1) for i in (lo, hi))  # (N, F, Dr)
        return torch.lerp(lo_emb, hi_emb, w)  # (N, F, Dr)

    def frame_embeddings(self, n_frames: int) -> torch.Tensor:
        """(n_frames, Dr) temporal embeddings of a media with n_frames real frames."""
        frames = torch.tensor([n_frames], device=self.time_embeddings.device)
        return self.media_frame_embeddings(frames, n_frames)[0]  # (F, Dr)

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, F, S, Dv) features; frames (B, T) long, the number of real frames of each media (the
        first ones; the rest are padding, 0 = an empty slot), or None: all F frames are real."""
        if x.dim() != 5 or x.shape[-1] != self.d_media:
            raise ValueError(
                f"expected vision features (B, T, F, S, Dv={self.d_media}), got {tuple(x.shape)}"
            )
        B, T, n_frames, S, _ = x.shape
        R, D = self.cfg.num_latents, self.cfg.d_model
        if frames is not None:
            if frames.shape != (B, T) or frames.dtype != torch.long:
                raise ValueError(f"expected frames (B={B}, T={T}) long, got {frames.dtype} "
                                 f"{tuple(frames.shape)}")
            if not frames.is_meta and frames.numel() and (frames.min() < 0 or frames.max() > n_frames):
                raise ValueError(f"frames must be real-frame counts in [0, F={n_frames}], got "
                                 f"{int(frames.min())}..{int(frames.max())}")
        x = self.proj(x)  # (B, T, F, S, Dr)
        if frames is None:
            x = x + self.frame_embeddings(n_frames)[:, None, :]  # (F, 1, Dr) broadcast over the S cells
            key_mask = None
        else:
            emb = self.media_frame_embeddings(frames.reshape(B * T), n_frames)  # (N, F, Dr)
            x = x + emb.view(B, T, n_frames, 1, D)  # (B, T, F, 1, Dr) broadcast over the S cells
            real = torch.arange(n_frames, device=x.device) < frames.reshape(B * T, 1).to(x.device)  # (N, F)
            real = real[:, :, None].expand(B * T, n_frames, S).reshape(B * T, n_frames * S)  # (N, F*S)
            key_mask = torch.cat([real, real.new_ones(B * T, R)], dim=1)  # (N, F*S + R): latents always real
        x = x.reshape(B * T, n_frames * S, D)  # (N, F*S, Dr): all frames of a media in one key/value set
        latents = self.latents.expand(B * T, R, D)  # (N, R, Dr)
        for layer in self.layers:
            latents = layer(x, latents, key_mask)
        return self.norm(latents).view(B, T, R, D)  # (B, T, R, Dr)


class MLPResampler(nn.Module):
    """Paper Table 3 (vi), "Perceiver -> MLP": the same (B, T, F, S, Dv) -> (B, T, R, Dr) with no attention.

    The paper does not spell its MLP out; ours: project and add the temporal embeddings as the Perceiver
    does, average the real frames of each cell, run a squared-ReLU MLP on every cell, then a learned linear
    map mixes the S cells into R tokens (token mixing as in MLP-Mixer). It sees the same inputs and gives
    the cross-attention the same number of tokens; what it lacks is queries that choose what to read."""

    def __init__(self, cfg: ResamplerConfig, d_media: int, n_cells: int):
        super().__init__()
        self.cfg, self.d_media, self.n_cells = cfg, d_media, n_cells
        D = cfg.d_model
        self.proj = nn.Linear(d_media, D) if d_media != D else nn.Identity()
        self.time_embeddings = nn.Parameter(torch.randn(cfg.max_frames, D))  # (max_frames, Dr)
        self.ffw = FeedForward(D, cfg.ff_mult)
        self.mix = nn.Linear(n_cells, cfg.num_latents)  # S cells -> R tokens, per channel
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-1] != self.d_media or x.shape[3] != self.n_cells:
            raise ValueError(f"expected vision features (B, T, F, S={self.n_cells}, Dv={self.d_media}), "
                             f"got {tuple(x.shape)}")
        B, T, n_frames, S, _ = x.shape
        if n_frames > self.cfg.max_frames:
            raise ValueError(f"the MLP resampler has {self.cfg.max_frames} temporal embeddings, F={n_frames}")
        if frames is None:
            frames = torch.full((B, T), n_frames, dtype=torch.long, device=x.device)
        x = self.proj(x) + self.time_embeddings[:n_frames, None, :]  # (B, T, F, S, Dr)
        real = torch.arange(n_frames, device=x.device) < frames.to(x.device)[..., None]  # (B, T, F)
        real = real.to(x.dtype)
        x = (x * real[..., None, None]).sum(2) / real.sum(2).clamp(min=1)[..., None, None]  # (B, T, S, Dr)
        x = x + self.ffw(x)  # per cell, residual
        x = self.mix(x.transpose(2, 3)).transpose(2, 3)  # (B, T, Dr, S) -> (B, T, Dr, R) -> (B, T, R, Dr)
        return self.norm(x)  # (B, T, R, Dr)
