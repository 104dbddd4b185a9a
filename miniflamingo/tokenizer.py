"""The tokenizer: byte-level BPE on tiktoken, plus Flamingo's special tokens.

Notable features
- Three special tokens, always the LAST three ids, in this order:
  `<|endoftext|>` (eot_id = n_vocab - 3), `<image>` (image_id = n_vocab - 2) and
  `<|endofchunk|>` (eoc_id = n_vocab - 1). paper 2.2 / App. A.3.1: `<image>` marks where a media sits
  in the text and `<|endofchunk|>` ends the text that belongs to it. Keeping them last lets the config
  derive the ids from vocab_size alone, and lets Flamingo train just those embedding rows.
- Special tokens enter only on purpose: `encode` parses them (for the prompt templates our code builds),
  `encode_ordinary` never does (raw data text: a literal "<image>" in a caption stays plain text).
- `Tokenizer.default()` is the small BPE in data_samples/ (1024 ids, the tiny preset's vocab_size);
  `Tokenizer.load(path)` reads any tiktoken ranks file; `Tokenizer.from_tiktoken("gpt2")` wraps a
  standard encoding for real data, offline only.
- `python -m miniflamingo tokenizer --corpus FILE --vocab-size N --out FILE` trains one
  (the trainer lives in bpe.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tiktoken

from miniflamingo.bpe import GPT2_PAT, count_words, load_ranks, save_ranks, train_bpe

EOT, IMAGE, EOC = "<|endoftext|>", "<image>", "<|endofchunk|>"
SPECIALS = (EOT, IMAGE, EOC)  # the order of the last three ids
DATA_SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
DEFAULT_PATH = DATA_SAMPLES / "tokenizer.tiktoken"


class Tokenizer:
    """A tiktoken encoding whose last three ids are <|endoftext|>, <image>, <|endofchunk|>."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str = GPT2_PAT,
                 name: str = "miniflamingo"):
        base = max(mergeable_ranks.values()) + 1
        specials = {tok: base + i for i, tok in enumerate(SPECIALS)}
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                      special_tokens=specials)
        self.name = name
        self.mergeable_ranks = mergeable_ranks  # token bytes -> id, without the specials
        self.n_vocab = base + len(SPECIALS)
        self.eot_id, self.image_id, self.eoc_id = (specials[s] for s in SPECIALS)
        assert (self.eot_id, self.image_id, self.eoc_id) == tuple(range(self.n_vocab - 3, self.n_vocab))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def default(cls) -> Tokenizer:
        """The small BPE shipped in data_samples/, trained on the synthetic world's text."""
        return cls.load(DEFAULT_PATH)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A tiktoken ranks file (`base64 rank` per line), as `python -m miniflamingo tokenizer` writes."""
        return cls(load_ranks(path), name=Path(path).stem)

    @classmethod
    def from_tiktoken(cls, name: str) -> Tokenizer:
        """Wrap a standard tiktoken encoding ("gpt2", "cl100k_base", ...) for real data.

        We keep its merges and regex, drop its own special tokens and append ours right after the
        merges. For gpt2 that keeps <|endoftext|> = 50256 and adds <image> = 50257,
        <|endofchunk|> = 50258. Encodings whose <|endoftext|> is not right after the merges
        (cl100k_base: 100257) get it renumbered; harmless, as our LM is trained from scratch.
        """
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken downloads on first use; we never have a network
            raise RuntimeError(
                f"could not load tiktoken encoding {name!r} offline: no network is available at run "
                f"time and it is not in tiktoken's cache (set TIKTOKEN_CACHE_DIR to a folder holding "
                f"its cached file), or use Tokenizer.load(path) / Tokenizer.default(). Cause: {e!r}"
            ) from e
        return cls(enc._mergeable_ranks, pat_str=enc._pat_str, name=f"{name}+flamingo")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Text with special tokens parsed: only for templates our own code builds."""
        return self._enc.encode(text, allowed_special=set(SPECIALS))

    def encode_ordinary(self, text: str) -> list[int]:
        """Raw data text: "<image>" or "<|endofchunk|>" inside it are encoded as plain text."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Ids (any iterable of ints, e.g. a 1-D tensor's tolist()) back to text."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got {bad[:5]}")
        return self._enc.decode(ids)

    def save(self, path: str | Path) -> None:
        """Write the merges in tiktoken's ranks format (the specials are implied: the next 3 ids)."""
        save_ranks(self.mergeable_ranks, path)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"


def train(text: str, vocab_size: int, log=print) -> Tokenizer:
    """Train a tokenizer of `vocab_size` ids in all: 256 bytes + merges + the 3 special tokens."""
    n_ranks = vocab_size - len(SPECIALS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIALS)} (256 bytes + 3 specials), "
                         f"got {vocab_size}")
    word_counts = count_words(text, special_tokens=SPECIALS)
    log(f"{len(text):,} characters, {sum(word_counts.values()):,} words, {len(word_counts):,} unique")
    ranks, merges = train_bpe(word_counts, n_ranks,
                              progress=lambda n, s: log(f"  {n}/{n_ranks - 256} merges, {s:.1f}s"))
    if len(ranks) < n_ranks:
        log(f"warning: the corpus ran out of pairs after {len(merges)} merges: "
            f"{len(ranks) + len(SPECIALS)} ids instead of {vocab_size}")
    return Tokenizer(ranks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m miniflamingo tokenizer",
                                description="Train a byte-level BPE tokenizer (tiktoken ranks format).")
    p.add_argument("--corpus", required=True, type=Path, help="UTF-8 text file to train on")
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="total ids: 256 bytes + merges + 3 special tokens (default 1024, the tiny preset)")
    p.add_argument("--out", required=True, type=Path, help="where to write the .tiktoken ranks file")
    args = p.parse_args(argv)
    if not args.corpus.is_file():
        p.error(f"--corpus {args.corpus} does not exist")

    start = time.perf_counter()
    tok = train(args.corpus.read_text(encoding="utf-8"), args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}: n_vocab={tok.n_vocab} (eot={tok.eot_id}, image={tok.image_id}, "
          f"eoc={tok.eoc_id}) in {time.perf_counter() - start:.1f}s")
    return 0
