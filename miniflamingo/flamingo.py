"""The Flamingo model (paper 2, Fig. 3): a frozen vision encoder and a frozen LM, bridged by a trained
Perceiver Resampler and trained GATED XATTN-DENSE layers interleaved before the LM's blocks.

Notable features
- Freezing is explicit and visible: vision and LM get requires_grad False in __init__ and stay in eval
  mode (`train()` is overridden), so `forward` has no side effects. Only the resampler, the xattn layers
  and the embeddings of the two tokens Flamingo adds (<image>, <|endofchunk|>) train: those two rows live
  in a small parameter of their own, swapped in through `GPT.forward(inputs_embeds=...)`, so the frozen
  table never gets a gradient or weight decay.
- The xattn layers go in through the GPT's `before_block` hook: no copy of the LM's code.
- `generate`: greedy or beam search (paper: 3 beams) with the GPT's KV cache; media are encoded and
  resampled once per call; stops at <|endofchunk|>; left-padded batches of prompts of different lengths.
- Media can also come in precomputed: frozen vision features (`vision_features=`, e.g. cached for
  training) or resampled latents (`media_latents=`, e.g. to rank many answers against one prompt).

Shapes: B batch, L text length, T media slots per row, F frames, C=3 channels, H x W pixels,
S grid cells, Dv vision width, R latents, Dr resampler width, D = LM width, V vocabulary, k beams.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miniflamingo.config import FlamingoConfig
from miniflamingo.lm import GPT, KVCache
from miniflamingo.resampler import MLPResampler, PerceiverResampler
from miniflamingo.vision import VisionEncoder
from miniflamingo.xattn import GatedXAttnDense, compute_phi


class Flamingo(nn.Module):
    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        if cfg.resampler.kind == "mlp":  # the Table 3 ablation (vi), lesson 13
            self.resampler = MLPResampler(cfg.resampler, cfg.vision.d_out, n_cells=cfg.vision.grid_size ** 2)
        else:
            self.resampler = PerceiverResampler(cfg.resampler, d_media=cfg.vision.d_out)
        self.lm = GPT(cfg.lm)
        # One GATED XATTN-DENSE layer before blocks 0, every, 2*every, ... The paper starts at the first
        # block (App. A.1.2 / Fig. 4); open_flamingo starts at block every-1 (cross_attn_every_n_layers).
        # xattn.after_last (a deviation, off in the paper presets) adds one more after the last block,
        # last in the list: in the paper's 24-80-block LMs all but the first layer's queries have been
        # through LM blocks that read the question; in a 2-block LM only one layer's has, through one.
        self.xattn = nn.ModuleList(
            GatedXAttnDense(cfg.xattn, cfg.lm.d_model, cfg.resampler.d_model) for _ in range(cfg.n_xattn)
        )
        # paper 2.3: <image> and <|endofchunk|> are added to the vocabulary and their embeddings train.
        self.special_ids = (cfg.image_id, cfg.eoc_id)
        self.special_embeddings = nn.Parameter(torch.empty(len(self.special_ids), cfg.lm.d_model))  # (2, D)
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(False)
        self.reset_special_embeddings()
        self.train()  # puts the frozen parts in eval mode, see train()

    def train(self, mode: bool = True) -> Flamingo:
        super().train(mode)
        self.vision.eval()  # frozen parts stay in eval mode, whatever the caller asks of the whole model
        self.lm.eval()
        return self

    @torch.no_grad()
    def reset_special_embeddings(self) -> None:
        """Start the trainable <image>, <|endofchunk|> embeddings from the LM's rows. Called in __init__;
        call again after loading pretrained LM weights (`load_pretrained` does)."""
        if self.special_embeddings.is_meta:  # no values to copy, and meta indexing imports sympy (a second)
            return
        self.special_embeddings.copy_(self.lm.wte.weight[list(self.special_ids)])

    def load_pretrained(self, vision_state: dict | None = None, lm_state: dict | None = None) -> None:
        """Load pretrained weights into the frozen parts (stage 1 and 2 of DESIGN.md 4)."""
        if vision_state is not None:
            self.vision.load_state_dict(vision_state)
        if lm_state is not None:
            self.lm.load_state_dict(lm_state)
            self.reset_special_embeddings()

    def param_counts(self) -> dict[str, int]:
        """Parameters per part; "total" also counts the two trainable special-token rows (2 * D)."""
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())  # a tied matrix counted once

        n = {k: count(getattr(self, k)) for k in ("vision", "resampler", "xattn", "lm")}
        n["total"] = count(self)
        return n

    # ----------------------------------------------------------------------------- media

    def encode_vision(self, media: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C, H, W) pixels in [0, 1] -> (B, T, F, S, Dv) frozen features, each frame on its own."""
        if media.dim() != 6 or media.shape[3] != 3:
            raise ValueError(f"expected media (B, T, F, C=3, H, W) in [0, 1], got {tuple(media.shape)}")
        B, T, n_frames, C, H, W = media.shape
        feats = self.vision(media.reshape(B * T * n_frames, C, H, W))  # (B*T*F, S, Dv)
        return feats.view(B, T, n_frames, *feats.shape[1:])  # (B, T, F, S, Dv)

    def encode_media(self, media=None, *, vision_features=None, media_frames=None) -> torch.Tensor:
        """Pixels (B, T, F, C, H, W) or vision features (B, T, F, S, Dv) -> media latents (B, T, R, Dr).
        media_frames (B, T) long: real frames per media (the rest is padding, skipped by the resampler), or
        None: all F frames are real."""
        if vision_features is None:
            vision_features = self.encode_vision(media)
        return self.resampler(vision_features, media_frames)

    def _media_latents(self, B, media, vision_features, media_latents,
                       media_frames=None) -> torch.Tensor | None:
        given = [m is not None for m in (media, vision_features, media_latents)]
        if sum(given) > 1:
            raise ValueError("pass at most one of media, vision_features and media_latents")
        if media_frames is not None and media_latents is not None:
            raise ValueError("media_frames goes with media or vision_features, not with media_latents")
        if media_latents is None and sum(given):
            media_latents = self.encode_media(media, vision_features=vision_features,
                                              media_frames=media_frames)
        if media_latents is not None:
            R, Dr = self.cfg.resampler.num_latents, self.cfg.resampler.d_model
            if media_latents.dim() != 4 or media_latents.shape[0] != B or media_latents.shape[2:] != (R, Dr):
                raise ValueError(
                    f"expected media latents (B={B}, T, R={R}, Dr={Dr}), got {tuple(media_latents.shape)}"
                )
        return media_latents

    # ----------------------------------------------------------------------------- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): the frozen LM table, with the trainable rows of the added tokens."""
        x = self.lm.wte(input_ids)  # (B, L, D)
        for row, token_id in enumerate(self.special_ids):
            x = torch.where((input_ids == token_id)[..., None], self.special_embeddings[row], x)
        return x

    def _xattn_hook(self, latents: torch.Tensor | None, phi: torch.Tensor):
        """The GPT's before_block(i, x) hook: run the xattn layer that sits before block i, if any."""
        if latents is None:  # no media: every token has phi = 0, and the layers are identities there
            return None
        every, n_layer = self.cfg.xattn.every, self.cfg.lm.n_layer

        def before_block(i: int, x: torch.Tensor) -> torch.Tensor:
            if i == n_layer:  # after the last block: the extra layer of xattn.after_last, if any
                return self.xattn[-1](x, latents, phi, phi_checked=True) if self.cfg.xattn.after_last else x
            return self.xattn[i // every](x, latents, phi, phi_checked=True) if i % every == 0 else x

        return before_block

    def _check_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"expected input_ids (B, L) long, got {getattr(input_ids, 'shape', input_ids)}")
        if input_ids.shape[1] > self.cfg.lm.context_length:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds lm.context_length={self.cfg.lm.context_length}"
            )

    def _phi(self, input_ids, key_mask, latents, checked: bool = False, segments=None) -> torch.Tensor:
        """phi (B, L), after checking that every <image> has a media slot (unless the caller has)."""
        phi = compute_phi(input_ids, self.cfg.image_id, key_mask, segments)  # paper 2.3
        # the highest slot a row reads (its last position's phi, unless packed: then padding's 0 ends it)
        n_images, T = phi.amax(dim=1), 0 if latents is None else latents.shape[1]
        if not checked and len(n_images) and not n_images.is_meta and int(n_images.max()) > T:
            row = int(n_images.argmax())
            raise ValueError(
                f"row {row} has {int(n_images[row])} <image> tokens but there are only {T} media slots"
            )
        return phi

    def forward(self, input_ids, media=None, targets=None, *, attention_mask=None, vision_features=None,
                media_latents=None, media_frames=None, return_logits: bool = True,
                media_checked: bool = False, segments=None):
        """input_ids (B, L) long; media (B, T, F, C, H, W) in [0, 1] (or vision_features (B, T, F, S, Dv),
        or media_latents (B, T, R, Dr)); targets (B, L) with -100 = no loss; attention_mask (B, L) bool,
        False on (left) padding; media_frames (B, T) long, real frames per media when shorter media are
        padded to F (data.collate(return_frames=True)), None = all real.
        Returns logits (B, L, V) and the mean cross-entropy (None without targets); return_logits=False
        (training) returns (None, loss) and runs the LM head only where there is a target.
        media_checked: the batch comes from data.collate, which has checked on the host that each row's
        <image> tokens have media slots; the forward then skips checking it again, on a GPU a wait for
        the device (issue 6: train.py's loop keeps the host queueing work ahead of the GPU).
        segments (B, L) long: rows packed by data.collate(pack=True), -1 on padding. Each segment attends
        only to itself in the LM and reads only its own media (phi is 0 until its own first <image>), so
        the loss is the unpacked batch's. Needs only-immediate-media cross-attention: with all previous
        media a token would also see the earlier segments' images.
        """
        self._check_ids(input_ids)
        if segments is not None and not self.cfg.xattn.only_immediate_media:
            raise ValueError("packed rows (segments) need xattn.only_immediate_media=True: with all previous "
                             "media, a row's tokens would see the images of the rows packed before it")
        attention_mask = None if attention_mask is None else attention_mask.bool()
        latents = self._media_latents(input_ids.shape[0], media, vision_features, media_latents, media_frames)
        phi = self._phi(input_ids, attention_mask, latents, checked=media_checked, segments=segments)
        return self.lm(inputs_embeds=self.embed(input_ids), targets=targets, key_mask=attention_mask,
                       before_block=self._xattn_hook(latents, phi), return_logits=return_logits,
                       segments=segments)

    # ----------------------------------------------------------------------------- generation

    def _next_logprobs(self, cache: KVCache, ids, mask, latents, n_new: int) -> torch.Tensor:
        """Feed the last n_new tokens of ids (B, P + n_new) through the LM after the P cached ones; return the
        next token's log-probabilities (B, V). <image> is never generated: there would be no media for it."""
        phi = compute_phi(ids, self.cfg.image_id, mask)[:, -n_new:]  # (B, n_new), counts the cached images
        key_mask = None if bool(mask.all()) else mask
        logits, _ = self.lm(inputs_embeds=self.embed(ids[:, -n_new:]), cache=cache, key_mask=key_mask,
                            before_block=self._xattn_hook(latents, phi))
        logp = logits[:, -1].float().log_softmax(dim=-1)  # (B, V)
        logp[:, self.cfg.image_id] = float("-inf")
        return logp

    @torch.no_grad()
    def greedy(self, ids, mask, latents, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of prepared prompts (see `generate`). Returns (B, L + new)."""
        eoc, pad = self.cfg.eoc_id, self.cfg.eot_id
        B, L = ids.shape
        cache = self.lm.new_cache(B, L + max_new_tokens)
        logp = self._next_logprobs(cache, ids, mask, latents, L)  # the prompt in one pass
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logp.argmax(dim=-1))  # (B,), finished rows are padded
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, mask.new_ones(B, 1)], 1)
            done = done | (token == eoc)  # <|endofchunk|> itself is kept
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logp = self._next_logprobs(cache, ids, mask, latents, 1)
        return ids

    @torch.no_grad()
    def beam_search(self, ids, mask, latents, max_new_tokens: int, num_beams: int) -> torch.Tensor:
        """Beam search over the sum of token log-probabilities (no length penalty), prepared prompts as in
        `generate`. A beam that emitted <|endofchunk|> stays in the beam with its score frozen (its only
        continuation is padding, at no cost); a prompt is settled once its best finished beam scores at least
        as well as every open one, since open scores can only go down. Returns the best beam, (B, L + new)."""
        eoc, pad, k = self.cfg.eoc_id, self.cfg.eot_id, num_beams
        B, L = ids.shape
        cache = self.lm.new_cache(B, L + max_new_tokens)
        logp = self._next_logprobs(cache, ids, mask, latents, L)  # (B, V): the prompt once, not once per beam
        V = logp.shape[1]
        beams = torch.arange(B, device=ids.device).repeat_interleave(k)  # (B*k,) beams start as their prompt
        cache.reorder(beams)
        ids, mask, logp = ids[beams], mask[beams], logp[beams]
        latents = None if latents is None else latents[beams]
        # Only the first copy is live at the start, so the first step picks k different tokens.
        scores = torch.full((B, k), float("-inf"), device=ids.device)
        scores[:, 0] = 0.0
        scores = scores.view(-1)  # (B*k,)
        finished = torch.zeros(B * k, dtype=torch.bool, device=ids.device)
        pad_only = torch.full((V,), float("-inf"), device=ids.device)
        pad_only[pad] = 0.0
        for step in range(max_new_tokens):
            cand = scores[:, None] + torch.where(finished[:, None], pad_only, logp)  # (B*k, V)
            scores, index = cand.view(B, k * V).topk(k, dim=1)  # (B, k) each, over all beams of a prompt
            source = (index // V + torch.arange(B, device=ids.device)[:, None] * k).view(-1)  # (B*k,)
            token = (index % V).view(-1)  # (B*k,)
            scores = scores.view(-1)
            # More beams than finite candidates (a tiny vocabulary, the first step) picks -inf ones, maybe
            # <image>: such a beam is dead, so pad it and let it finish.
            dead = scores == float("-inf")
            token = torch.where(dead, pad, token)
            ids = torch.cat([ids[source], token[:, None]], 1)
            mask = torch.cat([mask[source], mask.new_ones(B * k, 1)], 1)
            finished = finished[source] | (token == eoc) | dead
            cache.reorder(source)
            best_done = torch.where(finished, scores, float("-inf")).view(B, k).max(1).values  # (B,)
            best_open = torch.where(finished, float("-inf"), scores).view(B, k).max(1).values
            if bool((best_done >= best_open).all()) or step == max_new_tokens - 1:
                break
            logp = self._next_logprobs(cache, ids, mask, latents, 1)
        best = scores.view(B, k).argmax(dim=1)  # (B,)
        return ids.view(B, k, -1)[torch.arange(B, device=ids.device), best]  # (B, L + new)

    def _prepare_prompts(self, input_ids, attention_mask):
        """-> ids (B, L) long and mask (B, L) bool, left-padded with <|endoftext|>."""
        if isinstance(input_ids, (list, tuple)):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with an input_ids tensor, not with a list of id lists")
            L = max(len(row) for row in input_ids)
            pad = self.cfg.eot_id
            ids = torch.tensor([[pad] * (L - len(row)) + list(row) for row in input_ids], dtype=torch.long,
                               device=self.special_embeddings.device)
            attention_mask = torch.tensor([[False] * (L - len(row)) + [True] * len(row) for row in input_ids],
                                          device=ids.device)
            return ids, attention_mask
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"expected attention_mask {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be left padding: False on the left, then True to the end")
        return input_ids, mask

    @torch.no_grad()
    def generate(self, input_ids, media=None, max_new_tokens: int = 20, num_beams: int = 1, *,
                 attention_mask=None, vision_features=None, media_latents=None,
                 media_frames=None) -> torch.Tensor:
        """Continue each prompt until <|endofchunk|> (kept in the output) or max_new_tokens.

        input_ids: (B, L) long, with optional attention_mask (B, L), False on LEFT padding; or a list of B id
        lists of any lengths, which is left-padded here. Media (and media_frames) as in `forward`, encoded
        and resampled once.
        Returns (B, L + new) long: the (left-padded) prompts, then the new tokens; rows that finished early
        are padded on the right with <|endoftext|>. Left padding is exact: the LM's positions are relative
        (ALiBi/rotary), padded keys are masked out, and phi skips padding.
        """
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_beams, max_new_tokens >= 1, got {num_beams}, {max_new_tokens}")
        ids, mask = self._prepare_prompts(input_ids, attention_mask)
        self._check_ids(ids)
        if ids.shape[1] + max_new_tokens > self.cfg.lm.context_length:
            raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"lm.context_length={self.cfg.lm.context_length}")
        latents = self._media_latents(ids.shape[0], media, vision_features, media_latents,  # once
                                      media_frames)
        self._phi(ids, mask, latents)
        if num_beams == 1:
            return self.greedy(ids, mask, latents, max_new_tokens)
        return self.beam_search(ids, mask, latents, max_new_tokens, num_beams)
