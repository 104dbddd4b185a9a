"""The small GPT: the language model that Flamingo freezes and interleaves cross-attention into.

Notable features
- nanoGPT-style pre-LN decoder: LayerNorm -> causal self-attention -> residual, LayerNorm -> GeLU MLP
  -> residual; `F.scaled_dot_product_attention` does the attention.
- Relative positions only: ALiBi (Press et al. 2022, default) or rotary (Su et al. 2021). They make
  in-context copying easy to learn (a 2-layer ALiBi GPT learns it in seconds; learned absolute positions
  did not in minutes), and few-shot binding in Flamingo rests on the frozen LM copying in context
  (DESIGN.md 5). Being relative, they also make left padding harmless: with `key_mask` a left-padded
  row gives its real tokens exactly the logits of the unpadded row.
- Smeared keys (`lm.smear_keys`, the tiny preset only, a deviation): in every layer but the first, each
  head's key mixes in the previous position's key with a learned weight (Olsson et al. 2022), so a layer
  can copy what followed a match; the tiny LM learns in-context binding about twice as soon. The paper's
  presets keep plain keys.
- `before_block(i, x)` hook on the residual stream: Flamingo inserts its GATED XATTN-DENSE layers there
  (paper 2.2) without copying this file. It is called before blocks 0 .. n_layer - 1 and once more with
  i = n_layer, after the last block (before the final LayerNorm).
- `inputs_embeds` instead of `idx`, so Flamingo can swap in trainable embeddings for the tokens it adds.
- A KV cache (`new_cache`) for incremental decoding, with `reorder` for beam search.
- GPT-2 init: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer); optional weight tying.
- Paper-size presets build on `torch.device("meta")` instantly: the ALiBi slopes, the bias and the
  rotary tables are computed on the fly in `forward`, never stored as buffers.

Shapes: B batch, L text length (new tokens), P tokens already in the cache, Lk = P + L keys,
D = d_model, nh heads, hs = head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from miniflamingo.config import LMConfig
from miniflamingo.data import segment_starts, to_device

# ----------------------------------------------------------------------------- positions


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... (Press et al. 2022, sec. 3).
    For a head count that is not a power of two, their reference code takes the slopes of the next
    lower power of two and fills up with every other slope of the next higher one."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return power_of_two(n_head)
    lower = 2 ** math.floor(math.log2(n_head))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_head - lower]


def rotary_tables(pos: torch.Tensor, d_head: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles pos * base^(-2i/hs), each (L, hs/2), in float32."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, device=pos.device, dtype=torch.float32) / d_head)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1[i], x2[i]) of the two halves of the head dimension by its angle, so that
    q . k depends only on the distance between their positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, L, hs/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, L, hs)
    return out.to(x.dtype)


def attention_mask(past: int, L: int, key_mask, slopes, device, segments=None) -> torch.Tensor:
    """What SDPA gets as `attn_mask` for L new queries at positions past .. past+L-1 over Lk = past+L keys.

    Without slopes (rotary): bool, True = may attend, shape (B|1, 1, L, Lk).
    With slopes (ALiBi): float, bias -slope_h * (i - j) on allowed keys and -inf elsewhere, (B|1, nh, L, Lk).
    A query always may attend to itself, even when key_mask marks it as padding: a left-padding query
    has no real key before it, and a row of all -inf would make softmax NaN. Its output is never used,
    and real queries never see padded keys, since a real query's own position is not padding.
    segments (B, Lk) long, packed rows (data.collate's pack): a query sees only keys of its own segment,
    so each packed row attends as it would alone (ALiBi and rotary depend on i - j only).
    """
    q_pos = torch.arange(past, past + L, device=device)
    k_pos = torch.arange(past + L, device=device)
    dist = q_pos[:, None] - k_pos[None, :]  # (L, Lk), i - j
    allowed = (dist >= 0)[None, None]  # (1, 1, L, Lk), causal
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, :] | (dist == 0))  # (B, 1, L, Lk)
    if segments is not None:
        allowed = allowed & (segments[:, None, past:, None] == segments[:, None, None, :])  # (B, 1, L, Lk)
    if slopes is None:
        return allowed
    bias = -slopes.view(1, -1, 1, 1) * dist  # (1, nh, L, Lk), ALiBi: linear penalty on distance
    return bias.masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    Tensors are allocated on first use with the dtype/device of the keys (bf16 under autocast)."""

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, max_len, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # tokens cached in every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k, v (B, nh, L, hs) after the cached ones; return all keys/values (B, nh, P+L, hs)."""
        B, nh, L, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + L
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) batch rows, e.g. the surviving beams of beam search."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        self.batch_size = len(index)


# ----------------------------------------------------------------------------- the blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.d_head, self.dropout = cfg.n_head, cfg.d_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.c_proj.residual = True  # scaled init, see GPT._init_weights
        # Smeared keys (Olsson et al. 2022), in every layer but the first: head h's key at j is
        # s_h k_j + (1 - s_h) k_{j-1}, s_h = sigmoid(smear_h) learned, 0.5 at init. Binding words to images
        # in context is an induction pattern: the query's slot must find the key of the word AFTER the
        # matching support slot, which a plain key only carries once an earlier layer has copied the
        # previous token into it. With the previous key mixed in, the tiny LM's 5-way binding probe jumped
        # at step 500 instead of 900-1200 (seeds 0-3; docs/EXPERIMENTS.md, "The LM stage"). Not in the
        # first layer: smearing there too, the LM bound the first token of a made-up word by its slot but
        # copied the second from whichever support word began the same way (one token of context), and
        # stalled at 82-86%; with the first layer plain, its heads give the later layer's keys and queries
        # the token before, so the second token is copied from the word that follows the matching slot.
        # torch.zeros, not empty: the GPT init touches only Linear and Embedding weights.
        self.smear = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.smear_keys and layer > 0 else None

    def smear_keys(self, k: torch.Tensor, key_mask: torch.Tensor | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
        """k (B, nh, Lk, hs), all keys from position 0 -> the smeared keys. The key before position 0, and
        before a real token that follows left padding (key_mask (B, Lk), False = padding), is zero, so a
        padded row's real tokens get the keys of the unpadded row; so is the key before each segment of a
        packed row (segments (B, Lk)), so each gets the keys it would have alone."""
        prev = k if key_mask is None else k * key_mask[:, None, :, None].to(k.dtype)
        prev = F.pad(prev, (0, 0, 1, 0))[:, :, :-1]  # (B, nh, Lk, hs): the key at j - 1, zero at j = 0
        if segments is not None:
            same = ~segment_starts(segments)  # (B, Lk): j - 1 is in j's segment
            prev = prev * same[:, None, :, None].to(k.dtype)
        s = torch.sigmoid(self.smear).to(k.dtype).view(1, -1, 1, 1)  # (1, nh, 1, 1)
        return torch.lerp(prev, k, s)  # s * k + (1 - s) * prev

    def forward(self, x, mask, rotary, cache: KVCache | None, layer: int, key_mask=None, segments=None):
        B, L, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # (B, L, D) each
        q = q.view(B, L, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, L, hs)
        k = k.view(B, L, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, L, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, Lk, hs); the cache keeps the keys unsmeared
        if self.smear is not None:
            # all Lk keys: a cached step smears its new key with the last
            k = self.smear_keys(k, key_mask, segments)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # SDPA kernels want the float mask in the query's dtype (bf16)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, L, hs)
        y = y.transpose(1, 2).contiguous().view(B, L, D)  # (B, L, D), heads side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model)
        self.c_proj = nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model)
        self.c_proj.residual = True
        self.dropout = cfg.dropout

    def forward(self, x):
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: LMConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, rotary, cache, layer, key_mask=None, segments=None):
        x = x + self.attn(self.ln_1(x), mask, rotary, cache, layer, key_mask, segments)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.pos == "rope" and cfg.d_head % 2:
            raise ValueError(f"rotary positions need an even head size, got lm.d_head={cfg.d_head}")
        self.cfg = cfg
        # _weight skips nn.Embedding's own normal_ init (ours follows): on the meta device that call alone
        # imports torch._dynamo, a second of CPU time.
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens (Press & Wolf 2017)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02); projections that write into the residual stream get std / sqrt(2 * n_layer),
        # since each of the 2 * n_layer residual branches adds its variance to the stream.
        # Meta tensors hold no values, and normal_ on them is slow the first time: skip.
        if any(p.is_meta for p in module.parameters(recurse=False)):
            return
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = self.cfg.context_length if max_len is None else max_len
        if max_len > self.cfg.context_length:
            raise ValueError(f"cache max_len={max_len} exceeds lm.context_length={self.cfg.context_length}")
        return KVCache(self.cfg.n_layer, batch_size, max_len)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, cache=None, key_mask=None,
                before_block=None, return_logits: bool = True, segments=None):
        """(logits (B, L, V), mean cross-entropy over targets != -100, or None without targets).
        return_logits=False (training): (None, loss), the head run only at positions with a target; in a
        tiny Flamingo batch 43% of them have one, and the head with its log-softmax was the largest
        non-attention cost of the step (issue 6). segments (B, L) long: packed rows (data.collate's pack),
        each attending only within itself."""
        cfg = self.cfg
        x = self._embed(idx, inputs_embeds)  # (B, L, D)
        B, L, _ = x.shape
        past = 0 if cache is None else cache.length
        self._check(B, L, past, targets, cache, key_mask)
        if segments is not None and (cache is not None or tuple(segments.shape) != (B, L)):
            cached = " and a cache" if cache is not None else ""
            raise ValueError(f"segments are for training on packed rows: expected (B, L) = ({B}, {L}) and no "
                             f"cache, got {tuple(segments.shape)}{cached}")

        rotary = slopes = None
        if cfg.pos == "rope":
            rotary = rotary_tables(torch.arange(past, past + L, device=x.device), cfg.d_head)
        else:
            slopes = to_device(torch.tensor(alibi_slopes(cfg.n_head)), x.device)  # no wait for a GPU
        # One mask for all layers. Rotary with no cache and no padding is plain causal: SDPA's is_causal.
        mask = None
        if slopes is not None or past > 0 or key_mask is not None or segments is not None:
            mask = attention_mask(past, L, key_mask, slopes, x.device, segments)

        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)  # Flamingo's gated xattn-dense layers go here (paper 2.2)
            x = block(x, mask, rotary, cache, i, key_mask, segments)
        if before_block is not None:
            x = before_block(len(self.blocks), x)  # after the last block: see Flamingo's xattn.after_last
        if cache is not None:
            cache.length += L
        h = self.ln_f(x)  # (B, L, D)
        head_at_targets = not return_logits and targets is not None
        if head_at_targets:
            # Targets may sit on the host while x is elsewhere, and training keeps them there: nonzero
            # on a GPU tensor makes the host wait for the GPU (its result's size is data), so train.py
            # passes the host's targets and the positions go over by a copy that does not wait (issue 6).
            keep = (targets.reshape(B * L) != -100).nonzero().squeeze(1)  # (n,) positions with a target
            h = h.reshape(B * L, -1).index_select(0, to_device(keep, x.device))  # (n, D)
            targets = to_device(targets.reshape(B * L).index_select(0, keep), x.device)  # (n,)
        elif targets is not None:
            targets = to_device(targets, x.device)
        logits = self.lm_head(h)  # (B, L, V), or (n, V) at the targets only

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return (None if head_at_targets else logits), loss

    def _embed(self, idx, inputs_embeds) -> torch.Tensor:
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (B, L) and inputs_embeds (B, L, D)")
        if idx is not None:
            if idx.dim() != 2 or idx.dtype != torch.long:
                raise ValueError(f"expected idx (B, L) long, got {tuple(idx.shape)} {idx.dtype}")
            return self.wte(idx)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"expected inputs_embeds (B, L, D={self.cfg.d_model}), got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _check(self, B, L, past, targets, cache, key_mask) -> None:
        if past + L > self.cfg.context_length:
            what = f"{past} cached + {L} new tokens" if cache is not None else f"sequence length {L}"
            raise ValueError(f"{what} exceeds lm.context_length={self.cfg.context_length}")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch size {cache.batch_size}, input has {B}")
            if past + L > cache.max_len:
                raise ValueError(f"{past} cached + {L} new tokens exceed the cache's max_len={cache.max_len}")
        if targets is not None and tuple(targets.shape) != (B, L):
            raise ValueError(f"expected targets (B, L) = ({B}, {L}), got {tuple(targets.shape)}")
        if key_mask is not None and (tuple(key_mask.shape) != (B, past + L) or key_mask.dtype != torch.bool):
            raise ValueError(
                f"expected key_mask (B, cached + new) = ({B}, {past + L}) bool, "
                f"got {tuple(key_mask.shape)} {key_mask.dtype}"
            )
