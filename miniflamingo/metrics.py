"""Metrics of the few-shot evaluation: CIDEr-D for captions, VQA accuracy for questions, accuracy
for binding and classification (paper App. B.1.4-B.1.5, DESIGN.md section 6).

Notable features
- `cider_d` computes the same numbers as the COCO caption evaluation (pycocoevalcap's
  CiderScorer): n-grams 1-4, tf-idf with document frequencies taken from the references of the
  whole set, clipped per-n cosine, Gaussian length penalty (sigma 6), times 10. A test checks it
  against pycocoevalcap on random caption sets.
- Our tokenizer stands in for the Stanford PTBTokenizer (Java), see `tokenize_caption`.
- `vqa_accuracy` applies the official VQA answer normalisation (processPunctuation,
  processDigitArticle of vqaEval.py) and averages min(#matches / 3, 1) over leave-one-out subsets.
- Plain Python and dicts as sparse vectors: nothing here touches tensors, so there is no shape
  legend.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable

# ----------------------------------------------------------------------------- CIDEr-D

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits


def tokenize_caption(text: str) -> list[str]:
    """Lower-case and keep runs of letters and digits: every other character separates words.

    Differences from the PTBTokenizer of the COCO evaluation, which splits off punctuation and
    then drops the punctuation tokens: PTB keeps clitics as tokens ("dog's" -> dog 's, "don't"
    -> do n't; here dog s, don t), keeps hyphenated words and decimals whole ("black-and-white",
    "3.5"; here split at the mark), and keeps symbols such as $ % & # as tokens (dropped here).
    On captions made of plain words, as in our synthetic world, the two agree.
    """
    return _WORD.findall(text.lower())


def _ngram_counts(words: list[str], n: int) -> Counter:
    """Counts of the 1..n-grams of a sentence, keyed by word tuples."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check_ids(candidates: dict, references: dict) -> None:
    for name, ids, others in (("references", candidates, references), ("candidates", references, candidates)):
        missing = [i for i in ids if i not in others]
        if missing:
            raise ValueError(f"cider_d: id {missing[0]!r} has no entry in {name} ({len(missing)} missing)")
    if not references:
        raise ValueError("cider_d: no captions to score")
    for i, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"cider_d: references[{i!r}] must be a non-empty list of strings, got {refs!r}")


def cider_d(
    candidates: dict[Hashable, str],
    references: dict[Hashable, list[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D (Vedantam et al. 2015) of one candidate caption per image against its references:
    the score that COCO, and the Flamingo paper, report as "CIDEr".

    Returns (mean over images, {id: score}). Scores lie in [0, 10]; 10 takes a candidate of 4 or
    more words equal to each of its references (and n-grams not shared by every image). With one
    image every idf is log(1/1) = 0, so the score is 0: CIDEr needs a set of images. An empty
    candidate scores 0.
    """
    _check_ids(candidates, references)
    cand_counts = {i: _ngram_counts(tokenize_caption(candidates[i]), n) for i in references}
    ref_counts = {i: [_ngram_counts(tokenize_caption(r), n) for r in refs] for i, refs in references.items()}

    # document frequency: in how many images' reference sets an n-gram occurs (candidates not counted)
    doc_freq = Counter()
    for refs in ref_counts.values():
        doc_freq.update(set().union(*refs))
    log_num_images = math.log(len(references))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        """One sparse vector per n-gram order, and its L2 norm. An n-gram absent from every
        reference gets df 1, as in pycocoevalcap (log(max(1, df)))."""
        vecs = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vecs[len(gram) - 1][gram] = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
        return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]

    scores = {}
    for i, counts in cand_counts.items():
        cand_vecs, cand_norms = tfidf(counts)
        cand_len = sum(c for gram, c in counts.items() if len(gram) == 1)
        total = 0.0
        for ref in ref_counts[i]:
            ref_vecs, ref_norms = tfidf(ref)
            ref_len = sum(c for gram, c in ref.items() if len(gram) == 1)
            # CIDEr-D's Gaussian length penalty. pycocoevalcap measures lengths in bigrams
            # (words - 1); the difference is the same whenever both sentences have a word, and an
            # empty sentence scores 0 either way.
            penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                if cand_norms[k] == 0 or ref_norms[k] == 0:
                    continue  # no k-grams (or all with idf 0) on one side: cosine taken as 0
                ref_vec = ref_vecs[k]
                # CIDEr-D clips the candidate's weight at the reference's, so repeating a
                # matching n-gram cannot raise the score ("gaming", Vedantam et al. sec. 6)
                dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in cand_vecs[k].items())
                total += penalty * dot / (cand_norms[k] * ref_norms[k])
        # mean over the n orders and the references, times 10 (as in the COCO evaluation)
        scores[i] = 10.0 * total / (n * len(ref_counts[i]))
    return sum(scores.values()) / len(scores), scores


# ----------------------------------------------------------------------------- VQA accuracy

# The tables of the official VQA evaluation (vqaEval.py, Antol et al. 2015).
_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')  # vqaEval.punct: "." is handled apart, "'" kept
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# official regex "(?!<=\d)(\.)(?!\d)": its first group is a lookahead that never fires, so it
# removes every period not followed by a digit ("yes." -> "yes", "3.5" stays)
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Answers typed without the apostrophe get it back. The essential part of the official table:
# it leaves out words that are also real words ("well", "shed", "wed", "ill"), as we do, and
# double contractions ("wouldn'tve") that we omit.
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
        "how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't o'clock "
        "shan't should've shouldn't that's there'd there're there's they'd they'll they're they've "
        "wasn't we've weren't what'll what're what's what've when's where'd where's where've who'd "
        "who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've"
    ).split()
}


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark touching a space is deleted ("yes, sir" -> "yes sir"),
    one inside a word becomes a space ("black-and-white" -> "black and white"); when the text
    holds a number like 1,000 every mark is deleted ("1,000" -> "1000")."""
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, restore
    contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official normalisation of a VQA answer: "Two dogs." -> "2 dogs", "a Dog" -> "dog"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers (usually 10).

    An answer counts as right if at least 3 humans gave it: min(#matches / 3, 1), averaged over
    the subsets that leave out one human answer each, as the official script does. 3 matches of
    10 give 0.9, 2 give 0.6, 1 gives 0.3.

    Differences from vqaEval.py: we normalise the human answers fully, always (the official script
    relies on the dataset's answers being normalised already and only strips their punctuation);
    with a single answer there is nothing to leave out, so we score exact match (0 or 1).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_accuracy: answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # leaving out answer j leaves total - matches[j] matches among the others
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


# ----------------------------------------------------------------------------- exact match, accuracy


def exact_match(prediction: str, answer: str) -> bool:
    """Equality after the VQA normalisation (case, punctuation, articles, number words)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(correct: Iterable[bool]) -> float:
    """Fraction of True: for binding and classification, where each example is right or wrong."""
    correct = list(correct)
    if not correct:
        raise ValueError("accuracy: no examples to score")
    return sum(bool(c) for c in correct) / len(correct)
