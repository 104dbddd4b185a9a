"""The Perceiver Resampler (paper 2.1, Fig. 3, App. A.1.1): any number of visual features in, a fixed
number R of visual tokens out.

Notable features
- R learned latent queries cross-attend to the features of one media (all its frames at once); the keys
  and values are concat(features, latents), so the latents also attend to each other (paper Fig. 3).
- Video: learned temporal embeddings, one per frame, are added before the frames are flattened into one
  key/value set. A video with more frames than `max_frames` gets linearly interpolated temporal
  embeddings (paper App. B.1.2: trained with 8 frames, evaluated with 30).
- Batches mixing images and videos: `frames` (B, T) gives each media's real-frame count; media are
  grouped by that count and each group runs on its real frames only, so a media's latents do not depend
  on how many frames the other media in the batch have, and padding costs no work.
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
from miniflamingo.data import to_device


class SquaredReLU(torch.autograd.Function):
    """relu(x)^2 with a hand-written backward, 2 * relu(x) * grad (a product, then an in-place doubling).
    Autograd's relu-then-square runs pow, pow, mul, mul and threshold_backward over the (tokens,
    ff_mult * D) hidden layer; on the tiny preset's training step (CPU, 1 thread, batch 64) those took
    61 ms of a 1000 ms step; this one is 2.09x faster there (benchmarks/step_parts.py, issue 6). Same
    values, same gradients (tests/test_resampler.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2)  # d/dx relu(x)^2 = 2 relu(x): zero wherever x <= 0


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return SquaredReLU.apply(x)


class FeedForward(nn.Module):
    """LayerNorm -> Linear(D, ff_mult*D) -> squared ReLU -> Linear(ff_mult*D, D), no biases.
    Squared ReLU is what the paper uses in every layer it trains (App. A.1.4); the xattn layers share it."""

    def __init__(self, d_model: int, ff_mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, ff_mult * d_model, bias=False)
        self.proj = nn.Linear(ff_mult * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(squared_relu(self.fc(self.norm(x))))


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
        """x (N, M, Dr) features, latents (N, R, Dr): all real (PerceiverResampler drops padding first)."""
        N, M, _ = x.shape  # M = F * S features of one media
        R = latents.shape[1]
        nh, hs = self.n_head, self.d_head
        latents = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(x), latents], dim=1)  # (N, M + R, Dr), paper: kv = concat(x_f, x)
        q = self.to_q(latents).view(N, R, nh, hs).transpose(1, 2)  # (N, nh, R, hs)
        k, v = self.to_kv(kv_in).view(N, M + R, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, N, nh, M+R, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, nh, R, hs)
        return self.to_out(out.transpose(1, 2).reshape(N, R, nh * hs))  # (N, R, Dr)


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(cfg)
        self.ffw = FeedForward(cfg.d_model, cfg.ff_mult)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(x, latents)  # paper Fig. 3: x = x + attention_i(x, [x_f, x])
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
        """(n_frames, Dr) temporal embeddings of a media with n_frames frames. Up to max_frames: the first
        n learned ones (an image is frame 0). Beyond: the learned ones linearly interpolated over the n
        frames (paper App. B.1.2), as F.interpolate(align_corners=True) would."""
        emb = self.time_embeddings  # (max_frames, Dr)
        last = emb.shape[0] - 1
        if n_frames <= last + 1:
            return emb[:n_frames]
        pos = torch.arange(n_frames, device=emb.device, dtype=torch.float32) * (last / (n_frames - 1))  # (F,)
        lo = pos.floor().long().clamp(max=last)
        hi = (lo + 1).clamp(max=last)
        w = (pos - lo)[:, None].to(emb.dtype)  # (F, 1)
        # index_select, not emb[lo]: on a GPU the backward of advanced indexing sorts its indices, a slow
        # kernel; index_select's backward adds atomically.
        return torch.lerp(emb.index_select(0, lo), emb.index_select(0, hi), w)  # (F, Dr)

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, F, S, Dv) features; frames (B, T) long, the number of real frames of each media (the
        first ones; the rest are padding, 0 = an empty slot), or None: all F frames are real.

        With frames, media are grouped by their real-frame count and each group runs on its own frames
        only, so padding costs nothing: in a tiny training batch with one video, every image is padded to
        the video's 6 frames and rows to 8 media slots, and 22% of the frame slots were real (issue 6). An
        empty slot gives zeros: no token reads it (phi never points past a row's images). The counts are
        read on the host: keep frames there (train.py does) and no device sync is needed. Frames on the
        meta device carry no counts, so there (shapes only) every frame counts as real."""
        if x.dim() != 5 or x.shape[-1] != self.d_media:
            raise ValueError(
                f"expected vision features (B, T, F, S, Dv={self.d_media}), got {tuple(x.shape)}"
            )
        B, T, n_frames, S, _ = x.shape
        R, D = self.cfg.num_latents, self.cfg.d_model
        flat = x.reshape(B * T, n_frames, S, x.shape[-1])  # (N, F, S, Dv)
        if frames is not None and (frames.shape != (B, T) or frames.dtype != torch.long):
            raise ValueError(f"expected frames (B={B}, T={T}) long, got {frames.dtype} {tuple(frames.shape)}")
        if frames is None or frames.is_meta:
            return self.resample(flat).view(B, T, R, D)
        counts = frames.reshape(B * T).tolist()  # one read of (B*T) counts; free when frames are on the host
        if min(counts, default=0) < 0 or max(counts, default=0) > n_frames:
            raise ValueError(f"frames must be real-frame counts in [0, F={n_frames}], got "
                             f"{min(counts)}..{max(counts)}")
        groups: dict[int, list[int]] = {}  # real frames -> media (rows of flat)
        for i, n in enumerate(counts):
            groups.setdefault(n, []).append(i)
        out = None
        for n, rows in groups.items():
            if n == 0:
                continue
            idx = to_device(torch.tensor(rows), x.device)  # built on the host: no wait for a GPU
            y = self.resample(flat.index_select(0, idx)[:, :n])  # (len(rows), R, Dr): real frames only
            out = (y.new_zeros(B * T, R, D) if out is None else out).index_copy(0, idx, y)
        if out is None:  # nothing but empty slots
            out = self.latents.new_zeros(B * T, R, D)
        return out.view(B, T, R, D)  # (B, T, R, Dr)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F, S, Dv) features, all F frames real -> (N, R, Dr) latents."""
        N, n_frames, S, _ = x.shape
        R, D = self.cfg.num_latents, self.cfg.d_model
        x = self.proj(x) + self.frame_embeddings(n_frames)[:, None, :]  # (N, F, S, Dr); (F, 1, Dr) over cells
        x = x.reshape(N, n_frames * S, D)  # (N, F*S, Dr): all frames of a media in one key/value set
        latents = self.latents.expand(N, R, D)  # (N, R, Dr)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)  # (N, R, Dr)


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
        real = torch.arange(n_frames, device=x.device) < to_device(frames, x.device)[..., None]  # (B, T, F)
        real = real.to(x.dtype)
        x = (x * real[..., None, None]).sum(2) / real.sum(2).clamp(min=1)[..., None, None]  # (B, T, S, Dr)
        x = x + self.ffw(x)  # per cell, residual
        x = self.mix(x.transpose(2, 3)).transpose(2, 3)  # (B, T, Dr, S) -> (B, T, Dr, R) -> (B, T, R, Dr)
        return self.norm(x)  # (B, T, R, Dr)
