"""Tokenizer and BPE trainer: round trips, special-token handling, and the trainer against an independent
slow reference that rescans every word at every merge."""

import base64
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

import miniflamingo as mf
from miniflamingo import tokenizer as tk
from miniflamingo.bpe import count_words, load_ranks, save_ranks, train_bpe
from miniflamingo.tokenizer import EOC, EOT, IMAGE, SPECIALS, Tokenizer

# GPT-2's regex as first released (tiktoken's spelling with possessive quantifiers is claimed equivalent)
GPT2_ORIGINAL_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# text mixing arbitrary unicode with the special strings and near misses of them
fragments = st.one_of(st.text(max_size=20), st.sampled_from(
    [EOT, IMAGE, EOC, "<image", "image>", "<|endof", "|>", " <image> ", "Output: ", " dax"]))
mixed_text = st.lists(fragments, max_size=8).map("".join)


def reference_train(text: str, n_ranks: int):
    """Textbook BPE: every merge recounts all pairs over every word occurrence (slow, obviously right).
    Same rules as the fast trainer: most frequent pair, ties to the smallest (left id, right id)."""
    pieces = regex.split("|".join(regex.escape(s) for s in SPECIALS), text)
    words = [[b for b in w.encode("utf-8")] for p in pieces for w in regex.findall(GPT2_ORIGINAL_PAT, p)]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < n_ranks:
        pairs = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[a] + vocab[b]
        new_id = vocab.index(merged) if merged in vocab else len(vocab)
        if new_id == len(vocab):
            vocab.append(merged)
        merges.append((vocab[a], vocab[b]))
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return {t: i for i, t in enumerate(vocab)}, merges, words


# ----------------------------------------------------------------------------- the tokenizer


def test_default_matches_tiny_preset(tok):
    cfg = mf.FlamingoConfig.preset("tiny")
    assert tok.n_vocab == cfg.lm.vocab_size == 1024
    ids = (tok.eot_id, tok.image_id, tok.eoc_id)
    assert ids == (cfg.eot_id, cfg.image_id, cfg.eoc_id) == (1021, 1022, 1023)


def test_default_compresses_its_corpus(tok):
    text = (tk.DATA_SAMPLES / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    ratio = len(text.encode()) / len(tok.encode(text))
    assert ratio > 3.0, f"only {ratio:.2f} bytes/token on the corpus it was trained on"


def test_each_special_is_one_id(tok):
    for s, i in zip(SPECIALS, (tok.eot_id, tok.image_id, tok.eoc_id)):
        assert tok.encode(s) == [i]
        assert tok.decode([i]) == s
    ids = tok.encode("<image>Output: a red circle<|endofchunk|><|endoftext|>")
    assert ids[0] == tok.image_id and ids[-2:] == [tok.eoc_id, tok.eot_id]
    assert sum(i >= tok.n_vocab - 3 for i in ids) == 3


@settings(max_examples=30, deadline=None)
@given(text=st.text())
def test_round_trip_unicode(tok, text):
    assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=30, deadline=None)
@given(text=mixed_text)
def test_specials_only_enter_on_purpose(tok, text):
    special_ids = {tok.eot_id, tok.image_id, tok.eoc_id}
    ordinary = tok.encode_ordinary(text)
    assert not special_ids & set(ordinary), "encode_ordinary let a special token in"
    assert tok.decode(ordinary) == text
    parsed = tok.encode(text)
    assert tok.decode(parsed) == text
    assert sum(i in special_ids for i in parsed) == sum(text.count(s) for s in SPECIALS)


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        tok.decode([5, 1024])


def test_from_tiktoken_keeps_gpt2_layout(monkeypatch):
    # a stand-in for gpt2: merges 0..299, then its own <|endoftext|> as the last id (like 50256)
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256} | {bytes([65, i]): 257 + i for i in range(43)}
    fake = tiktoken.Encoding("fake", pat_str=tk.GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    t = Tokenizer.from_tiktoken("gpt2")
    assert (t.eot_id, t.image_id, t.eoc_id, t.n_vocab) == (300, 301, 302, 303)
    assert t.encode_ordinary("abab") == fake.encode_ordinary("abab")


def test_from_tiktoken_offline_error(monkeypatch):
    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(RuntimeError, match=r"'gpt2'.*no network"):
        Tokenizer.from_tiktoken("gpt2")


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        Tokenizer.load(bad)
    bad.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(255)))
    with pytest.raises(ValueError, match="missing for bytes \\[255\\]"):
        Tokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        Tokenizer.load(tmp_path / "nothere.tiktoken")


# ----------------------------------------------------------------------------- the trainer


def test_trainer_hand_computed_merges():
    # words: "ab" x1, " ab" x2, " abc" x2, " bc" x1. Pair counts: ab 5, " a" 4, bc 3 -> merge "ab";
    # then " ab" 4 -> " ab"; then (" ab", c) 2 -> " abc"; then a tie at 1 between (" ", b) and (b, c):
    # the smaller ids (32, 98) win -> " b"; then " bc"; then no pair is left, so training stops early.
    ranks, merges = train_bpe(count_words("ab ab ab abc abc bc"), n_ranks=300)
    assert merges == [(b"a", b"b"), (b" ", b"ab"), (b" ab", b"c"), (b" ", b"b"), (b" b", b"c")]
    assert [t for t, i in sorted(ranks.items(), key=lambda kv: kv[1])][256:] == [b"ab", b" ab", b" abc",
                                                                                 b" b", b" bc"]


@settings(max_examples=25, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "b", "ab", " ", "  ", "\n", "c", "'s", "é", "9", EOC, "!?"]),
                     max_size=60).map("".join),
       n_merges=st.integers(0, 40))
def test_trainer_matches_slow_reference(text, n_merges):
    ranks, merges = train_bpe(count_words(text, SPECIALS), 256 + n_merges)
    ref_ranks, ref_merges, ref_words = reference_train(text, 256 + n_merges)
    assert merges == ref_merges
    assert ranks == ref_ranks
    # tiktoken, merging by lowest rank, replays the merges: same segmentation as training produced
    t = Tokenizer(ranks)
    pieces = regex.split("|".join(regex.escape(s) for s in SPECIALS), text)
    words = [w for p in pieces for w in regex.findall(GPT2_ORIGINAL_PAT, p)]
    assert [t.encode_ordinary(w) for w in words] == ref_words


def test_special_tokens_are_never_merged():
    ranks, _ = train_bpe(count_words(f"dax{EOC}wug{IMAGE}dax{EOT}" * 50, SPECIALS), n_ranks=400)
    merged = [t for t in ranks if len(t) > 1]
    assert not [t for t in merged if any(c in t for c in b"<|>")], "a special token's bytes were merged"
    assert b"dax" in ranks and b"wug" in ranks


def test_save_load_round_trip(tmp_path, monkeypatch):
    text = (tk.DATA_SAMPLES / "tokenizer_corpus.txt").read_text(encoding="utf-8")[:20_000]
    trained = tk.train(text, vocab_size=400, log=lambda msg: None)
    path = tmp_path / "t.tiktoken"
    trained.save(path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own loader, without writing a cache
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == load_ranks(path) == trained.mergeable_ranks
    loaded = Tokenizer.load(path)
    assert loaded.n_vocab == 400
    assert loaded.encode(text) == trained.encode(text)


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"<image>Output: a small red circle at the top left{EOC}\n" * 30, encoding="utf-8")
    out = tmp_path / "out.tiktoken"
    assert tk.main(["--corpus", str(corpus), "--vocab-size", "280", "--out", str(out)]) == 0
    assert "n_vocab=280" in capsys.readouterr().out
    t = Tokenizer.load(out)
    assert (t.n_vocab, t.image_id) == (280, 278)
    assert t.encode(corpus.read_text(encoding="utf-8"))[0] == t.image_id


def test_save_ranks_is_tiktoken_format(tmp_path):
    path = tmp_path / "r.tiktoken"
    ranks = {bytes([i]): i for i in range(256)} | {b" red": 256}
    save_ranks(ranks, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "AA== 0" and lines[-1] == f"{base64.b64encode(b' red').decode()} 256"
