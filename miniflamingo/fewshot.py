"""Few-shot prompting and decoding, as in the paper (App. A.2, DESIGN.md 6).

Notable features
- Prompts read like the training documents: each support example is a chunk `<image>{text}<|endofchunk|>`
  and the query is `<image>{prefix}`, for the model to continue. Texts come from world_text.py, the very
  strings the world's documents use: "Output: {caption}", "Question: {q} Short answer: {a}",
  "{word}". Each text is tokenized on its own, as data.py does in training.
- Zero-shot prompts carry two text-only examples: the task's format with the images removed (paper App.
  A.2), so the model knows what to write but has seen no image-text pair of the task.
- Support selection: random, or RICES (retrieval-based in-context example selection, paper App. A.2):
  cosine similarity of the frozen vision encoder's mean-pooled features, the most similar example LAST,
  next to the query.
- Open-ended tasks: beam search with 3 beams (`Flamingo.generate`), stopping at <|endofchunk|>.
- Close-ended tasks: candidates ranked by log-likelihood. The prompt and its media go through the model
  once, into a KV cache; the cache is copied once per candidate and all candidates are scored in one batch.
- Prompt ensembling (close-ended, paper App. A.2): log-likelihoods averaged over permutations of the
  support examples' order.
- Blind prompts: the same token ids with every media zeroed, for the baseline rows of the result tables.

Shapes: B prompts, C candidates per prompt, T media slots, F frames, H x W pixels, P prompt length,
Lc candidate length, V vocabulary, N media, S grid cells, Dv vision width.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch

from miniflamingo.data import media_to_tensor
from miniflamingo.world_text import BINDING_TEXT, CAPTION_TEXT, QA_TEXT
from miniflamingo.xattn import compute_phi

NUM_BEAMS = 3  # paper App. A.2: open-ended outputs by beam search with 3 beams

# ----------------------------------------------------------------------------- prompts


class Shot(NamedTuple):
    """One chunk of a prompt. A support example has an answer; the query has answer "" and the model
    continues its prefix. prefix + answer is exactly the text a training document would hold."""

    media: object  # uint8 image (H, W, 3), video (F, H, W, 3) or its vision features (F, S, Dv); None: text
    prefix: str  # "Output:"
    answer: str  # " a red circle" (leading space), "" for the query


class Prompt(NamedTuple):
    ids: list[int]  # with one <image> per media
    media: list  # the media of each <image>, in order


def _shot(template: str, slot: str, media, value: str | None, **fields) -> Shot:
    """Split a world template at its answer slot: "Question: {question} Short answer: {answer}" ->
    prefix "Question: ... Short answer:", answer " {answer}" plus what follows the slot; "{word}" ->
    prefix "", answer "{word}"."""
    head, tail = template.split("{" + slot + "}")
    space = " " if head.endswith(" ") else ""  # the space before the slot belongs to the answer's first token
    return Shot(media, head[: len(head) - len(space)].format(**fields),
                "" if value is None else f"{space}{value}{tail}")


def caption_shot(media, caption: str | None = None) -> Shot:
    """`<image>Output: {caption}<|endofchunk|>` (DESIGN.md 6)."""
    return _shot(CAPTION_TEXT, "caption", media, caption)


def vqa_shot(media, question: str, answer: str | None = None) -> Shot:
    """`<image>Question: {q} Short answer: {a}<|endofchunk|>` (DESIGN.md 6); videos too."""
    return _shot(QA_TEXT, "answer", media, answer, question=question)


def binding_shot(media, word: str | None = None) -> Shot:
    """`<image>{word}<|endofchunk|>`: binding and classification (Frozen's "this is a dax", without the
    "this is a": world_text.BINDING_TEXT says why)."""
    return _shot(BINDING_TEXT, "word", media, word)


def text_only(shots: list[Shot]) -> list[Shot]:
    """The same examples with their images removed: the zero-shot prompt's two examples."""
    return [s._replace(media=None) for s in shots]


def build_prompt(tok, support: list[Shot], query: Shot) -> Prompt:
    """support chunks, then the query's `<image>{prefix}`. Text-only chunks have no <image>."""
    ids, media = [], []
    for i, s in enumerate(support + [query]):
        if s.media is not None:
            ids.append(tok.image_id)
            media.append(s.media)
        if i < len(support):
            ids += tok.encode_ordinary(s.prefix + s.answer) + [tok.eoc_id]
        else:  # the query: the model writes the answer and the <|endofchunk|>
            ids += tok.encode_ordinary(s.prefix)
    return Prompt(ids, media)


def answer_ids(tok, answer: str) -> list[int]:
    """What the model must write after the query's prefix: the answer, then <|endofchunk|>."""
    return tok.encode_ordinary(answer) + [tok.eoc_id]


# ----------------------------------------------------------------------------- support selection


def random_support(pool_size: int, n: int, rng: np.random.Generator) -> list[int]:
    if n > pool_size:
        raise ValueError(f"cannot draw {n} support examples from a pool of {pool_size}")
    return rng.choice(pool_size, n, replace=False).tolist()


def rices_support(query_features: torch.Tensor, pool_features: torch.Tensor, n: int) -> list[int]:
    """The n pool examples whose features are most cosine-similar to the query's, ordered from the least
    to the most similar, so the most similar sits last, next to the query (paper App. A.2).
    query_features (Dv,), pool_features (P, Dv)."""
    if query_features.dim() != 1 or pool_features.dim() != 2 or n > len(pool_features):
        raise ValueError(f"expected query (Dv,), pool (P >= n={n}, Dv), got {tuple(query_features.shape)}, "
                         f"{tuple(pool_features.shape)}")
    q = torch.nn.functional.normalize(query_features.float(), dim=0)
    pool = torch.nn.functional.normalize(pool_features.float(), dim=1)
    sim = pool @ q  # (P,) cosine similarities
    return sim.topk(n).indices.flip(0).tolist()  # topk is most similar first: reverse it


@torch.no_grad()
def vision_features(model, media: list, batch_size: int = 256) -> list[torch.Tensor]:
    """Frozen vision features of each media, (F, S, Dv) each. The encoder is frozen, so an evaluation can
    encode every image once and reuse the features in every prompt that shows it: media_batch takes
    them in place of pixels."""
    dev = next(model.parameters()).device
    frames = [media_to_tensor(m) for m in media]  # each (F, 3, H, W)
    flat = torch.cat(frames)  # (N*F, 3, H, W)
    feats = torch.cat([model.vision(flat[i:i + batch_size].to(dev)) for i in range(0, len(flat), batch_size)])
    return list(feats.split([len(f) for f in frames]))  # frames are encoded independently: (F, S, Dv) each


def pooled(features: list[torch.Tensor]) -> torch.Tensor:
    """(F, S, Dv) features of N media -> (N, Dv), the mean over frames and grid cells: what RICES compares."""
    return torch.stack([f.mean(dim=(0, 1)) for f in features])


# ----------------------------------------------------------------------------- batching


def media_batch(media_lists: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """Media of B prompts -> (B, T, F, 3, H, W) pixels in [0, 1], or (B, T, F, S, Dv) when the media are
    vision features, and frames (B, T) long, the real frames of each slot. T = the most media in a
    prompt, F = the most frames. As in data.collate: unused slots and frames are zeros, and the resampler
    skips them by `frames`, so an image stays an image beside a video."""
    tensors = [[media_to_tensor(m) for m in ms] for ms in media_lists]
    sizes = {tuple(t.shape[1:]) for ts in tensors for t in ts}
    if len(sizes) != 1:
        raise ValueError(f"expected media of one per-frame shape in a batch, got {sorted(sizes)}")
    T = max(len(ts) for ts in tensors)
    F = max(t.shape[0] for ts in tensors for t in ts)
    out = torch.zeros(len(tensors), T, F, *sizes.pop())  # (B, T, F, 3, H, W) or (B, T, F, S, Dv)
    frames = torch.zeros(len(tensors), T, dtype=torch.long)  # (B, T)
    for i, ts in enumerate(tensors):
        for j, t in enumerate(ts):
            out[i, j, : len(t)] = t
            frames[i, j] = len(t)
    return out, frames


@torch.no_grad()
def encode_prompt_media(model, prompts: list[Prompt], blind: bool = False) -> torch.Tensor | None:
    """The media of B prompts -> latents (B, T, R, Dr), once, for generation and scoring to reuse; None
    when no prompt has media (text only). blind=True zeroes every media: the baseline rows. A black frame
    has the same features in every slot, so it is encoded once and repeated: exactly encoding zero pixels."""
    if not any(p.media for p in prompts):
        return None
    dev = next(model.parameters()).device
    batch, frames = media_batch([p.media for p in prompts])
    batch, frames = batch.to(dev), frames.to(dev)
    if blind:
        B, T, F = batch.shape[:3]
        H = model.cfg.vision.image_size
        black = model.vision(torch.zeros(1, 3, H, H, device=dev))  # (1, S, Dv)
        features = black.expand(B, T, F, *black.shape[1:])  # (B, T, F, S, Dv)
    elif batch.dim() == 6:
        features = model.encode_vision(batch)  # pixels (B, T, F, 3, H, W) -> (B, T, F, S, Dv)
    else:
        features = batch  # already (B, T, F, S, Dv)
    return model.encode_media(vision_features=features, media_frames=frames)  # (B, T, R, Dr)


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> ids (B, P) long and mask (B, P) bool, left-padded (the LM's positions are relative)."""
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=device)
    return ids, mask


# ----------------------------------------------------------------------------- open-ended: generate


def decode_answer(tok, new_ids: list[int]) -> str:
    """Generated ids -> text up to <|endofchunk|> (padding and the stop token dropped)."""
    if tok.eoc_id in new_ids:
        new_ids = new_ids[: new_ids.index(tok.eoc_id)]
    return tok.decode([t for t in new_ids if t != tok.eot_id]).strip()


@torch.no_grad()
def generate_answers(model, tok, prompts: list[Prompt], max_new_tokens: int, num_beams: int = NUM_BEAMS,
                     blind: bool = False, batch_size: int = 32) -> list[str]:
    """Continue each prompt until <|endofchunk|> or max_new_tokens; beam search with 3 beams by default."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i:i + batch_size]
        P = max(len(p.ids) for p in part)
        latents = encode_prompt_media(model, part, blind)  # (B, T, R, Dr)
        out = model.generate([p.ids for p in part], max_new_tokens=max_new_tokens, num_beams=num_beams,
                             media_latents=latents)
        answers += [decode_answer(tok, row[P:].tolist()) for row in out]  # (B, P + new): keep the new
    return answers


# ----------------------------------------------------------------------------- close-ended: rank


@torch.no_grad()
def score_candidates(model, tok, prompts: list[Prompt], candidates: list[list[str]],
                     blind: bool = False) -> torch.Tensor:
    """Log-likelihood of each candidate answer (its tokens and the closing <|endofchunk|>) after its
    prompt: (B, C). The prompt's media are encoded once and its text runs once, into a KV cache; the
    cache is then copied C times and the B*C candidates run in one batch on top of it."""
    B, C = len(prompts), len(candidates[0])
    if len(candidates) != B or any(len(c) != C for c in candidates):
        raise ValueError(f"expected {B} lists of the same number of candidates, got lengths "
                         f"{[len(c) for c in candidates]}")
    dev = next(model.parameters()).device
    ids, mask = left_pad([p.ids for p in prompts], tok.eot_id, dev)  # (B, P)
    latents = encode_prompt_media(model, prompts, blind)  # (B, T, R, Dr), once
    P = ids.shape[1]
    cands = [answer_ids(tok, a) for cs in candidates for a in cs]
    Lc = max(len(c) for c in cands)
    cand = torch.tensor([c + [tok.eot_id] * (Lc - len(c)) for c in cands], device=dev)  # (B*C, Lc), right pad
    real = torch.tensor([[True] * len(c) + [False] * (Lc - len(c)) for c in cands], device=dev)

    # 1. the prompt, once: fills the cache and gives the first candidate token's distribution
    cache = model.lm.new_cache(B, P + Lc)
    phi = compute_phi(ids, tok.image_id, mask)  # (B, P)
    logits, _ = model.lm(inputs_embeds=model.embed(ids), cache=cache, key_mask=None if mask.all() else mask,
                         before_block=model._xattn_hook(latents, phi))
    first = logits[:, -1].float().log_softmax(dim=-1)  # (B, V)

    # 2. every candidate of every prompt, on a copy of its prompt's cache. Right padding only follows the
    # real tokens, so causal attention keeps it out of their scores.
    rows = torch.arange(B, device=dev).repeat_interleave(C)  # (B*C,): prompt of each candidate
    cache.reorder(rows)
    key_mask = torch.cat([mask[rows], torch.ones_like(real)], dim=1)  # (B*C, P + Lc)
    phi_c = compute_phi(torch.cat([ids[rows], cand], dim=1), tok.image_id, key_mask)[:, P:]  # (B*C, Lc)
    logits_c, _ = model.lm(inputs_embeds=model.embed(cand), cache=cache,
                           key_mask=None if key_mask.all() else key_mask,
                           before_block=model._xattn_hook(None if latents is None else latents[rows],
                                                          phi_c))  # (B*C, Lc, V)
    logp = torch.cat([first[rows, None], logits_c[:, :-1].float().log_softmax(dim=-1)], dim=1)  # (B*C, Lc, V)
    token_logp = logp.gather(2, cand[..., None]).squeeze(2)  # (B*C, Lc): log p(token j | prompt, tokens < j)
    return torch.where(real, token_logp, 0.0).sum(dim=1).view(B, C)


def permutations(n: int, n_perm: int, rng: np.random.Generator) -> list[list[int]]:
    """The identity, then distinct random orders of n support examples: min(n_perm, n!) in all."""
    if n < 8 and math.factorial(n) <= n_perm:  # few enough: all of them
        return [list(p) for p in itertools.permutations(range(n))]
    n_perm = min(n_perm, math.factorial(n))  # more distinct orders than exist would never be drawn
    perms, seen = [list(range(n))], {tuple(range(n))}
    while len(perms) < n_perm:
        p = rng.permutation(n).tolist()
        if tuple(p) not in seen:
            seen.add(tuple(p))
            perms.append(p)
    return perms


@torch.no_grad()
def ensemble_scores(model, tok, supports: list[list[Shot]], queries: list[Shot],
                    candidates: list[list[str]], n_perm: int = 1, seed: int = 0, blind: bool = False,
                    batch_size: int = 32) -> torch.Tensor:
    """Prompt ensembling (paper App. A.2): each episode's candidates are scored after up to n_perm orders
    of its support examples, and the log-likelihoods averaged over the orders: (E, C)."""
    prompts, owner, cands = [], [], []
    for e, (support, query) in enumerate(zip(supports, queries)):
        for perm in permutations(len(support), n_perm, np.random.default_rng([seed, e])):
            prompts.append(build_prompt(tok, [support[i] for i in perm], query))
            owner.append(e)
            cands.append(candidates[e])
    parts = [score_candidates(model, tok, prompts[i:i + batch_size], cands[i:i + batch_size], blind)
             for i in range(0, len(prompts), batch_size)]
    scores = torch.cat(parts)  # (orders of all episodes, C)
    owner = torch.tensor(owner, device=scores.device)
    total = torch.zeros(len(queries), scores.shape[1], device=scores.device).index_add_(0, owner, scores)
    return total / torch.bincount(owner, minlength=len(queries))[:, None]  # (E, C): mean over orders
