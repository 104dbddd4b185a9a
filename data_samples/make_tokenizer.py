"""Rebuild the default tokenizer from the synthetic world's text (what shipped was made this way):

    python data_samples/make_tokenizer.py
    python -m miniflamingo tokenizer --corpus data_samples/tokenizer_corpus.txt --vocab-size 1024 \
        --out data_samples/tokenizer.tiktoken

The corpus mixes the LM pretraining text (drills with stand-in words), captions, video captions and
document text, so every word of the world is a token or two. Novel shapes never appear in it.
"""

from pathlib import Path

from miniflamingo.world import World

w = World()
parts = w.lm_corpus(500, seed=0)
parts += [p["caption"] for p in w.image_text_pairs(500, seed=0)]
parts += [p["caption"] for p in w.video_text_pairs(100, seed=0)]
parts += ["<|endofchunk|>".join(t for t in d["texts"] if t) for d in w.documents(200, seed=0)]
out = Path(__file__).parent / "tokenizer_corpus.txt"
out.write_text("<|endoftext|>".join(parts))
print(f"wrote {out}: {out.stat().st_size:,} bytes")
