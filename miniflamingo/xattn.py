"""GATED XATTN-DENSE (paper 2.2, Fig. 4 and 7, App. A.1.2): how text tokens see their image.

Notable features
- `compute_phi`: phi(t) = number of <image> tokens at positions <= t (paper 2.3), so the <image> token
  sees its own media and the text after it sees that media until the next <image>.
- Masked cross-attention to media phi(t) only (paper default), or to media 1..phi(t) when
  `only_immediate_media` is False (the Table 10 ablation). A token with phi(t) = 0 gets EXACTLY zero:
  it has no media, so it attends to nothing (not a softmax over nothing, not a uniform average).
- Tanh gates `attn_gate` and `ff_gate` initialised at 0, so an untrained layer is the identity and the
  Flamingo model starts as its frozen LM (paper 2.2). `XAttnConfig.gated=False` is the no-gating ablation.
- The layer is the identity wherever phi(t) = 0, dense feed-forward included, so text before the first
  image is exactly the frozen LM's (open_flamingo applies the FFW to every token; we do not, see below).
- Attention cost scales with each token's own media, L x R, not with all media of the row, L x T*R:
  tokens are grouped by their media and each group attends to its R latents only (see `attend_own_media`).
  With few keys per row (the tiny preset's training batches: up to 8 media of 8 latents a document, a few
  dozen media in a packed row) one masked call over all of them is faster on a CPU and computes the same
  function, equal to rounding (`attend_own_media_masked`).

Shapes: B batch, L text length, T media slots per row, R latents per media, D = LM width,
Dr = media width (the resampler's), nh heads, hs head size, E = nh * hs, N chunks per row, C tokens per chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miniflamingo.config import XAttnConfig
from miniflamingo.data import segment_starts
from miniflamingo.resampler import FeedForward


def compute_phi(input_ids: torch.Tensor, image_id: int, key_mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
    """phi (B, L) long: how many <image> tokens are at positions <= t (paper 2.3; the paper's phi is 1-based,
    so media slot phi(t) - 1, 0-based, is the one token t sees). Padding (key_mask False) never counts.
    With segments (B, L), packed rows (data.collate's pack), that count is kept only from a segment's
    own first <image> on, and phi is 0 before it: the segment's media slots follow the earlier segments'
    in the row, and no token sees another segment's media."""
    is_image = input_ids == image_id  # (B, L)
    if key_mask is not None:
        is_image = is_image & key_mask
    phi = is_image.long().cumsum(dim=1)
    if segments is None:
        return phi
    starts = segment_starts(segments)  # (B, L) first position of each segment
    before = torch.where(starts, phi - is_image.long(), 0).cummax(dim=1).values  # images before the segment
    return torch.where(phi > before, phi, 0)


def attend_own_media(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Each token attends to the R latents of media phi(t) only; tokens with phi(t) = 0 get zero.

    q (B, L, nh, hs), k and v (B, T, nh, R, hs), phi (B, L) -> (B, L, E).

    Tokens are grouped by the media they read, each group is cut into chunks of C = ceil(L / T) tokens,
    and every chunk attends to its media's R keys in one unmasked SDPA call, (B*N, nh, C, hs) queries x
    (B*N, nh, R, hs) keys: O(L * R) work per row however the images are placed, where a mask over all
    media costs O(L * T * R). A row needs at most sum_j ceil(count_j / C) <= ceil(L / C) + T = N <= 2T
    chunks, so every shape is fixed by (B, L, T): no host sync, and it runs on the meta device.
    We also tried gathering each token's own keys and values, (B*L, nh, R, hs), with one query per
    attention call. Measured in one run (the functions of benchmarks/xattn.py alone, `small` widths, float32,
    1 thread of a busy 2-core CPU): training shape (fwd+bwd, 4 rows x 256 tokens, 5 media) 49 ms grouped,
    412 ms gathered, 67 ms for the einsum baseline over all media; 32-shot shape (fwd, 2048 tokens, 32 media)
    31 ms grouped, 384 ms gathered, 642 ms baseline. Gathering copies R keys per token; grouping stays.
    """
    B, L, nh, hs = q.shape
    T, R = k.shape[1], k.shape[3]
    if T == 0:  # no media: no token has an image to attend to (the model's masked path handles this too)
        return q.new_zeros(B, L, nh * hs)
    E, C = nh * hs, -(-L // T)
    N = -(-L // C) + T  # chunks per row
    dev = phi.device
    # Rank of each token within its media's group: a stable sort by phi keeps each group in text order.
    order = phi.argsort(dim=1, stable=True)  # (B, L) token positions, sorted by media
    counts = phi.new_zeros(B, T + 1).scatter_add_(1, phi, torch.ones_like(phi))  # (B, T+1) tokens per media
    starts = counts.cumsum(dim=1) - counts  # (B, T+1) sorted position of each group's first token
    sorted_rank = torch.arange(L, device=dev) - starts.gather(1, phi.gather(1, order))  # (B, L)
    rank = torch.empty_like(phi).scatter_(1, order, sorted_rank)  # (B, L) rank of token t in its group
    # Group j >= 1 takes ceil(count_j / C) consecutive chunks; the phi = 0 group takes none.
    group_chunks = -(-counts // C)  # (B, T+1)
    group_chunks[:, 0] = 0
    chunk_end = group_chunks.cumsum(dim=1)  # (B, T+1) one past each group's last chunk
    chunk = (chunk_end - group_chunks).gather(1, phi) + rank // C  # (B, L) chunk of token t
    # Slot of each token in a (B, N*C + 1) table of chunked queries; the last slot of a row is a dummy for
    # the tokens without media. Flattened over the batch, so plain row indexing moves whole vectors.
    slot = torch.where(phi > 0, chunk * C + rank % C, N * C)  # (B, L)
    slot = (slot + torch.arange(B, device=dev)[:, None] * (N * C + 1)).view(-1)  # (B*L,)
    # Moves by index_copy / index_select, never `x[index]`: on a GPU the backward of advanced indexing
    # sorts the indices to accumulate duplicates (the dummy slots, chunks sharing a media) and took 70% of a
    # training step's device time (small preset, H200); these two have a gather and an atomic add instead.
    table = q.new_zeros(B * (N * C + 1), E).index_copy(0, slot, q.reshape(B * L, E))  # dummies: discarded
    qc = table.view(B, N * C + 1, E)[:, :-1].reshape(B * N, C, nh, hs).transpose(1, 2)  # (B*N, nh, C, hs)
    # The media of each chunk: the group whose chunk range holds it (unused chunks read the last media).
    c = torch.arange(N, device=dev).expand(B, N).contiguous()  # (B, N)
    media = torch.searchsorted(chunk_end, c, right=True).clamp(max=T) - 1  # (B, N), 0-based slot
    media = (media + torch.arange(B, device=dev)[:, None] * T).view(-1)  # (B*N,) rows of k, v
    # Selected in (R, nh) order, then transposed: SDPA's CPU kernel returns the keys' and values' gradients
    # in that memory layout, so index_select's backward (index_add) reads them contiguously. In (nh, R)
    # order it read them strided, 5 ms a call at the tiny preset's batch 64, a quarter of that when
    # contiguous (issue 6).
    k = k.transpose(2, 3).reshape(B * T, R, nh, hs).index_select(0, media).transpose(1, 2)  # (B*N, nh, R, hs)
    v = v.transpose(2, 3).reshape(B * T, R, nh, hs).index_select(0, media).transpose(1, 2)  # (B*N, nh, R, hs)
    out = F.scaled_dot_product_attention(qc, k, v)  # (B*N, nh, C, hs)
    out = torch.cat([out.transpose(1, 2).reshape(B, N * C, E), out.new_zeros(B, 1, E)], 1)  # (B, N*C + 1, E)
    return out.view(-1, E).index_select(0, slot).view(B, L, E)  # back in text order; dummy slots read 0


# Up to this many keys per row (T * R), `MaskedCrossAttention` runs `attend_own_media_masked`: one SDPA call
# per row over all of the row's media keys, masked to media phi(t). It does T times the grouped version's
# attention work, but in B * nh calls instead of B * N * nh tiny ones, and on a CPU that wins while the
# keys are few. `python benchmarks/xattn.py --keys` (attention alone, fwd + bwd, 16 rows of 15 tokens per
# media, 1 thread): grouped / masked time 1.9-2.4x up to 32 keys, 1.7x at 64 (the tiny padded batch),
# 1.5x at 128, 0.94x at 256 (tiny widths); 1.8x at 128, 1.3x at 256, 0.95x at 512 (small widths). Not
# measured on a GPU. Benchmarks set it to 0 to count model FLOPs as the L x R work each token needs.
# 256, not 128, since training packs rows (data.collate): a packed row of the tiny world's documents
# holds up to ~40 media, with 5-8 tokens per media, where grouping gains least. The demo's whole training
# step on its own data, 2 threads (`python benchmarks/packing.py`, medians of 20 steps, alternating):
# padded 188 ms, packed 154 ms with 128, 143 ms with 256 (an earlier /tmp run: 129 / 119 ms, and 118 ms
# with 1024).
MASKED_MAX_KEYS = 256


def attend_media_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: torch.Tensor,
                        only_immediate_media: bool) -> torch.Tensor:
    """One SDPA call over all T*R keys of each row, masked to media phi(t) (only_immediate_media) or to
    media 1..phi(t); zero where phi(t) = 0. L x T*R work. Same shapes as `attend_own_media`."""
    B, L, nh, hs = q.shape
    T, R = k.shape[1], k.shape[3]
    k = k.transpose(1, 2).reshape(B, nh, T * R, hs)  # (B, nh, T*R, hs)
    v = v.transpose(1, 2).reshape(B, nh, T * R, hs)  # (B, nh, T*R, hs)
    slot = torch.arange(T * R, device=q.device)[None, None, :] // R  # (1, 1, T*R) 0-based slot of each key
    if only_immediate_media:
        allowed = slot == phi[:, :, None] - 1  # (B, L, T*R): slot phi(t) - 1 only
    else:
        allowed = slot < phi[:, :, None]  # (B, L, T*R): slots 0 .. phi(t) - 1
    # A token without media would have no allowed key (softmax NaN): let it see all, then zero it below.
    has_media = (phi > 0)[:, :, None]  # (B, L, 1)
    allowed = allowed | ~has_media
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed[:, None])  # (B,nh,L,hs)
    return torch.where(has_media, out.transpose(1, 2).reshape(B, L, nh * hs), 0.0)  # (B, L, E)


def attend_own_media_masked(q, k, v, phi) -> torch.Tensor:
    """The same function as `attend_own_media` (each token attends to media phi(t) only, zero where
    phi(t) = 0) from one masked SDPA call over all T*R keys of the row: L x T*R work, cheaper for few keys
    (see MASKED_MAX_KEYS)."""
    return attend_media_masked(q, k, v, phi, only_immediate_media=True)


def attend_all_previous_media(q, k, v, phi) -> torch.Tensor:
    """The Table 10 ablation: token t attends to media 1..phi(t) (all previous images), zero if phi(t) = 0.

    Same shapes as `attend_own_media`. This needs a mask over all T*R keys of the row: its cost is
    L x T*R by nature."""
    return attend_media_masked(q, k, v, phi, only_immediate_media=False)


class MaskedCrossAttention(nn.Module):
    """Text queries (LM width D) attend to media keys/values (width Dr), masked by phi (paper 2.3)."""

    def __init__(self, cfg: XAttnConfig, d_model: int, d_media: int):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        # A plain attribute, so benchmarks/xattn.py can swap in its baselines around the same projections.
        self.attend = attend_own_media if cfg.only_immediate_media else attend_all_previous_media
        inner = cfg.n_head * cfg.d_head
        self.norm = nn.LayerNorm(d_model)  # the media arrive normalised: the resampler ends with a LayerNorm
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(d_media, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        T, R = media.shape[1], media.shape[2]
        nh, hs = self.n_head, self.d_head
        q = self.to_q(self.norm(x)).view(B, L, nh, hs)  # (B, L, nh, hs)
        kv = self.to_kv(media).view(B, T, R, 2, nh, hs).permute(3, 0, 1, 4, 2, 5)  # (2, B, T, nh, R, hs)
        attend = self.attend
        if attend is attend_own_media and T * R <= MASKED_MAX_KEYS:
            attend = attend_own_media_masked  # the same function (equal to rounding), faster for few keys
        k, v = kv.unbind(0)  # one backward (a stack), where kv[0], kv[1] would each zero-fill all of kv
        return self.to_out(attend(q, k, v, phi))  # (B, L, D)


class GatedXAttnDense(nn.Module):
    """Paper Fig. 7, before each chosen frozen LM block:
    y = y + tanh(attn_gate) * XAttn(LN(y), media[phi]);  y = y + tanh(ff_gate) * FFW(LN(y))."""

    def __init__(self, cfg: XAttnConfig, d_model: int, d_media: int):
        super().__init__()
        self.gated = cfg.gated
        self.attn = MaskedCrossAttention(cfg, d_model, d_media)
        self.ffw = FeedForward(d_model, cfg.ff_mult)
        # paper 2.2: tanh(0) = 0 at init, so the layer starts as the identity and the model as its LM.
        # Without gating (ablation) the gates are unused and frozen: DDP sees no unused trainable parameter.
        # One scalar each (paper 2.2), held as shape (1,): FSDP cannot shard 0-dim parameters.
        self.attn_gate = nn.Parameter(torch.zeros(1), requires_grad=cfg.gated)
        self.ff_gate = nn.Parameter(torch.zeros(1), requires_grad=cfg.gated)

    def forward(self, x: torch.Tensor, media: torch.Tensor, phi: torch.Tensor, phi_checked: bool = False
                ) -> torch.Tensor:
        """phi_checked: the caller has already checked phi's range (Flamingo does, once per forward), so
        the layer skips reading phi back to the host: on a GPU that read is a sync per layer (issue 6)."""
        self._check(x, media, phi, phi_checked)
        attn_gate = self.attn_gate.tanh() if self.gated else 1.0
        ff_gate = self.ff_gate.tanh() if self.gated else 1.0
        x = x + attn_gate * self.attn(x, media, phi)  # already exactly zero where phi = 0
        # Deviation from open_flamingo: no dense FFW either where phi = 0. A token with no image gets
        # nothing from vision, so the whole layer is the identity there and text before the first image is
        # the frozen LM's, whatever the gates (the text-only examples of zero-shot prompts stay pure LM).
        # Gate and mask folded into one (B, L, 1) factor: one pass over the FFW's output, not two (a where,
        # then the gate), forward and backward (issue 6). x + 0 * ffw(x) is x exactly: the FFW is finite.
        ff_scale = ff_gate * (phi > 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return x + ff_scale * self.ffw(x)

    def _check(self, x, media, phi, phi_checked: bool = False) -> None:
        if x.dim() != 3 or media.dim() != 4 or media.shape[0] != x.shape[0]:
            raise ValueError(
                f"expected x (B, L, D) and media (B, T, R, Dr) with the same B, got x {tuple(x.shape)}, "
                f"media {tuple(media.shape)}"
            )
        if tuple(phi.shape) != tuple(x.shape[:2]) or phi.dtype != torch.long:
            raise ValueError(
                f"expected phi (B, L) = {tuple(x.shape[:2])} long, got {tuple(phi.shape)} {phi.dtype}"
            )
        T = media.shape[1]
        if not phi_checked and phi.numel() and not phi.is_meta and (int(phi.min()) < 0 or int(phi.max()) > T):
            raise ValueError(
                f"phi refers to media slot {int(phi.max())} (1-based) but media has only {T} slots"
            )
