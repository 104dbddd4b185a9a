"""The LM's pretraining corpus with image slots: each image is ONE position, as in Flamingo.

    " red circle\\ndax<|endofchunk|> blue square\\nwug<|endofchunk|>"      (World.lm_corpus: readable text)
 -> <image>dax<|endofchunk|><image>wug<|endofchunk|>                    (ids, as Flamingo will see them)
    with the embedding at each <image> = e(<image>) + (e(" red") + e(" circle")) / sqrt(2)

Notable features
- Why slots (DESIGN.md 5, issue 3's feasibility findings): in Flamingo an image is one <image> token whose
  residual the cross-attention fills; matching a query image to an earlier one is the frozen LM's job. So
  the LM must learn to bind a word to whatever VECTOR sits at an image position, not to words spelled out
  over several positions. Measured: an LM that bound words to spelled-out stand-ins (" red circle\\ndax",
  text-only probe 72%) gave a Flamingo that bound at chance (5-way 1-shot 27.5% vs blind 20%, demo run).
- A slot's vector composes from its stand-in's token embeddings (red + circle, so colours and shapes are
  separable directions), scaled by 1/sqrt(n) so its size does not grow with the stand-in's length. The
  vector drills' stand-ins are random symbols ("q7v 3gf"), so their slots are arbitrary vectors: the LM
  learns to match ANY vector, which is what lets Flamingo bind shapes no stage has seen.
- The <image> row is part of every slot, so Flamingo's trainable <image> embedding starts from the LM's
  own "here is an image" marker; the cross-attention adds the content.
- The text after a slot is tokenized on its own, exactly as data.py tokenizes a chunk after <image>.

Shapes: N corpus tokens, S slots, K stand-in tokens per slot (padded), B batch, L window, D width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from miniflamingo.tokenizer import EOC

MAX_STAND_IN = 16  # K: stand-in tokens kept per slot (a two-object scene is 5 tokens; videos fewer than 10)


def split_chunk(chunk: str) -> tuple[str, str]:
    """" red circle\\ndax" -> ("red circle", "dax"): the stand-in words, then the chunk's text."""
    stand_in, sep, text = chunk.partition("\n")
    if not sep:
        raise ValueError(f"an LM corpus chunk is ' <stand-in words>\\n<text>', got {chunk!r}")
    return stand_in.strip(), text


class Corpus(NamedTuple):
    ids: torch.Tensor  # (N,) long: the documents' tokens, each document after <|endoftext|>
    slot_of: torch.Tensor  # (N,) long: the slot index at each <image> position, -1 elsewhere
    slot_table: torch.Tensor  # (S, K) long: each slot's stand-in token ids, padded with -1


def text_corpus(ids: torch.Tensor) -> Corpus:
    """Plain text (a --corpus file): no image slots."""
    return Corpus(ids, torch.full_like(ids, -1), torch.empty(0, MAX_STAND_IN, dtype=torch.long))


def encode_documents(docs: list[str], tok) -> Corpus:
    """Documents of World.lm_corpus -> Corpus: each chunk " <stand-in>\n<text><|endofchunk|>" becomes
    <image> (a slot holding the stand-in's token ids), the text's own tokens, <|endofchunk|>."""
    ids, slot_of, table = [], [], []
    for d, doc in enumerate(docs):
        chunks = doc.split(EOC)
        if chunks[-1]:
            raise ValueError(f"LM corpus document {d} does not end with {EOC}: ...{doc[-40:]!r}")
        ids.append(tok.eot_id)
        slot_of.append(-1)
        for chunk in chunks[:-1]:
            stand_in, text = split_chunk(chunk)
            words = tok.encode_ordinary(" " + stand_in)[:MAX_STAND_IN]
            table.append(words + [-1] * (MAX_STAND_IN - len(words)))
            body = tok.encode_ordinary(text) + [tok.eoc_id]
            ids += [tok.image_id] + body
            slot_of += [len(table) - 1] + [-1] * len(body)
    return Corpus(torch.tensor(ids, dtype=torch.long), torch.tensor(slot_of, dtype=torch.long),
                  torch.tensor(table, dtype=torch.long).view(-1, MAX_STAND_IN))


def get_batch(corpus: Corpus, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random contiguous windows: x = ids[s : s+L], y = ids[s+1 : s+L+1], slots = slot_of[s : s+L], each
    (B, L). Predicting an <image> is masked (-100): where images go is the document's choice, not text."""
    ids, slot_of = corpus.ids, corpus.slot_of
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen).tolist()
    x = torch.stack([ids[s: s + seq_len + 1] for s in starts])  # (B, L+1)
    slots = torch.stack([slot_of[s: s + seq_len + 1] for s in starts])  # (B, L+1)
    y = x[:, 1:].masked_fill(slots[:, 1:] >= 0, -100)
    return x[:, :-1], y, slots[:, :-1]


def embed(lm, x: torch.Tensor, slots: torch.Tensor, slot_table: torch.Tensor) -> torch.Tensor:
    """(B, L) ids and slots -> (B, L, D) inputs_embeds: the token embeddings, and at each slot
    e(<image>) + sum of its stand-in's embeddings / sqrt(count)."""
    emb = lm.wte(x)  # (B, L, D)
    at = (slots >= 0).nonzero(as_tuple=True)
    if len(at[0]) == 0:
        return emb
    words = slot_table[slots[at]]  # (n, K)
    valid = (words >= 0).unsqueeze(-1)  # (n, K, 1)
    vecs = (lm.wte(words.clamp(min=0)) * valid).sum(1) / valid.sum(1).clamp(min=1).sqrt()  # (n, D)
    return emb.index_put(at, emb[at] + vecs)


def forward(lm, corpus: Corpus, x, slots, targets=None):
    """The LM on a batch of `corpus` with slots: (logits, loss). `lm` may be torch.compile'd."""
    base = getattr(lm, "_orig_mod", lm)  # the table lives on the uncompiled module
    return lm(inputs_embeds=embed(base, x, slots, corpus.slot_table.to(x.device)), targets=targets)


@torch.no_grad()
def binding_probe(lm, tok, world, n_way: int = 5, episodes: int = 100, seed: int = 0,
                  k_shot: int = 1) -> float:
    """Text-only fast binding, the skill Flamingo's few-shot binding rests on (DESIGN.md 5): n_way x k_shot
    support slots (each image's stand-in, val split) with fresh made-up words, then the query's slot; the LM
    must rank the word bound to the query's shape first, scoring each word and its <|endofchunk|>."""
    from miniflamingo.world_text import BINDING_TEXT, stand_in

    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    correct = 0
    for e in range(episodes):
        ep = world.binding_episode(n_way, k_shot, split="val", seed=seed + e)
        doc = "".join(f" {stand_in(s['attrs'])}\n{BINDING_TEXT.format(word=s['word'])}{EOC}"
                      for s in ep["support"])
        doc += f" {stand_in(ep['query']['attrs'])}\n{EOC}"  # the query's slot; its text is scored below
        corpus = encode_documents([doc], tok)
        p, p_slots = corpus.ids[:-1], corpus.slot_of[:-1]  # up to and including the query's slot
        conts = [tok.encode_ordinary(BINDING_TEXT.format(word=w)) + [tok.eoc_id] for w in ep["candidates"]]
        L = len(p) + max(map(len, conts))
        x = torch.full((len(conts), L), tok.eot_id, dtype=torch.long)
        slots = torch.full((len(conts), L), -1, dtype=torch.long)
        for i, c in enumerate(conts):
            x[i, : len(p) + len(c)] = torch.cat([p, torch.tensor(c)])
            slots[i, : len(p)] = p_slots
        logp = forward(lm, corpus, x.to(device), slots.to(device))[0].float().log_softmax(-1)
        # log P(candidate | prefix): the logits at position len(p) - 1 + j predict candidate token j
        scores = [sum(logp[i, len(p) - 1 + j, t].item() for j, t in enumerate(c))
                  for i, c in enumerate(conts)]
        correct += ep["candidates"][scores.index(max(scores))] == ep["answer"]
    lm.train(was_training)
    return correct / episodes
