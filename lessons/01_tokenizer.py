"""Lesson 1: the tokenizer and Flamingo's special tokens.

What it teaches
- Text becomes ids with byte-level BPE: 256 single bytes, then merges learned from a corpus, most
  frequent pair first. Any string round-trips, even one the tokenizer never saw.
- Flamingo adds two tokens to the LM's vocabulary (paper 2.3, App. A.3.1): `<image>` marks where a
  picture sits in the text, `<|endofchunk|>` ends the text that belongs to it. With `<|endoftext|>`
  they are always the LAST three ids, so the model knows them from the vocabulary size alone.
- Special tokens enter only on purpose: `encode` parses them (templates our own code builds),
  `encode_ordinary` never does (raw data: a caption that types "<image>" must not summon a picture).

Paper: section 2.3 and App. A.3.1 (interleaved data, <image> and <EOC>).
Run: python lessons/01_tokenizer.py
"""

import miniflamingo as mf
from miniflamingo import tokenizer as tokenizer_module
from miniflamingo.world import World


def show(tok, ids):
    """One line: each id with the text it stands for."""
    return " ".join(f"{i}:{tok.decode([i])!r}" for i in ids)


# ----------------------------------------------------------------------------- 1. the default tokenizer

tok = mf.Tokenizer.default()  # data_samples/tokenizer.tiktoken, trained on the synthetic world's text
print(f"{tok}: 256 bytes + {tok.n_vocab - 256 - 3} merges + 3 special tokens")
print(f"  <|endoftext|> = {tok.eot_id}, <image> = {tok.image_id}, <|endofchunk|> = {tok.eoc_id}")
assert (tok.eot_id, tok.image_id, tok.eoc_id) == (tok.n_vocab - 3, tok.n_vocab - 2, tok.n_vocab - 1)

# The model never sees the tokenizer: FlamingoConfig derives the same ids from lm.vocab_size.
cfg = mf.FlamingoConfig.preset("tiny")
assert (cfg.eot_id, cfg.image_id, cfg.eoc_id) == (tok.eot_id, tok.image_id, tok.eoc_id)
assert cfg.lm.vocab_size == tok.n_vocab
print(f"  tiny preset: lm.vocab_size = {cfg.lm.vocab_size}, so image_id = {cfg.image_id} there too")

# ----------------------------------------------------------------------------- 2. a Flamingo prompt

# The few-shot template of the paper (App. A.2): one chunk per image, each closed by <|endofchunk|>.
prompt = "<image>Output: a red circle<|endofchunk|><image>Output:"
ids = tok.encode(prompt)
print(f"\nencode({prompt!r})\n  {show(tok, ids)}")
assert ids.count(tok.image_id) == 2 and ids.count(tok.eoc_id) == 1
assert tok.decode(ids) == prompt

# The same characters as raw data text: plain text, no special id anywhere.
raw = tok.encode_ordinary(prompt)
print(f"encode_ordinary(same text): {len(raw)} ids, none special\n  {show(tok, raw[:8])} ...")
assert not {tok.eot_id, tok.image_id, tok.eoc_id} & set(raw)
assert tok.decode(raw) == prompt  # same text back, different ids

# ----------------------------------------------------------------------- 3. BPE compresses what it has seen

world = World(seed=0)
caption = world.image_text_pairs(1, split="test")[0]["caption"]
odd = "Zebrafish quizzically juggle 17 kumquats"
for text in (caption, odd):
    n_bytes, n = len(text.encode()), len(tok.encode_ordinary(text))
    print(f"{n_bytes:3d} bytes -> {n:2d} tokens ({n_bytes / n:.1f} bytes/token): {text!r}")
assert len(tok.encode_ordinary(caption)) < len(tok.encode_ordinary(odd))  # world text is what it learned

# Byte-level: nothing is ever out of vocabulary.
for text in ("naïve café", "🦩 flamingo", "\t<image>?"):
    assert tok.decode(tok.encode_ordinary(text)) == text

# ----------------------------------------------------------------------------- 4. where merges come from

# Train a 300-id tokenizer on 200 captions: 41 merges. The first ones are the most frequent pairs.
corpus = "\n".join(p["caption"] for p in world.image_text_pairs(200))
small = tokenizer_module.train(corpus, vocab_size=300, log=lambda *a: None)
merges = sorted((rank, token) for token, rank in small.mergeable_ranks.items() if rank >= 256)
print("\nfirst merges learned from 200 captions:", ", ".join(repr(t.decode()) for _, t in merges[:12]))
print(f"last merges: {', '.join(repr(t.decode()) for _, t in merges[-6:])}")
assert small.n_vocab == 300 and small.image_id == 298
print(f"  '{caption}': {len(small.encode_ordinary(caption))} tokens with 300 ids, "
      f"{len(tok.encode_ordinary(caption))} with {tok.n_vocab}")
print("\nOK: special tokens are the last three ids, parsed only by encode; every string round-trips.")
