"""Metrics: CIDEr-D against hand-computed cases, an independent slow implementation and (when
installed) pycocoevalcap; VQA accuracy against the official examples and a leave-one-out oracle."""

import math
import re
from collections import Counter
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miniflamingo.metrics import (
    accuracy,
    cider_d,
    exact_match,
    normalize_answer,
    tokenize_caption,
    vqa_accuracy,
)

L2 = math.log(2)  # idf of an n-gram found in one image of two

# ----------------------------------------------------------------------------- CIDEr-D: an oracle


def slow_cider_d(cands, refs, sigma=6.0):
    """Straight from the CIDEr-D formula, recomputing everything per n-gram order:
    g_k(s)[w] = tf(w, s) * log(N / max(1, df(w))), df(w) = #images whose references contain w;
    CIDEr-D_k = mean_j exp(-(l_c - l_j)^2 / (2 sigma^2)) * sum_w min(g_c, g_j) g_j / (|g_c| |g_j|);
    CIDEr-D = 10 * mean_k CIDEr-D_k."""

    def words(s):
        return re.findall(r"[a-z0-9]+", s.lower())

    def grams(s, k):
        w = words(s)
        return [tuple(w[i : i + k]) for i in range(len(w) - k + 1)]

    n_images = len(refs)
    scores = {}
    for i, cand in cands.items():
        per_order = []
        for k in range(1, 5):

            def g(s, k=k):
                tf = Counter(grams(s, k))
                df = {w: sum(any(w in grams(r, k) for r in refs[j]) for j in refs) for w in tf}
                return {w: tf[w] * math.log(n_images / max(1, df[w])) for w in tf}

            gc = g(cand)
            total = 0.0
            for ref in refs[i]:
                gr = g(ref)
                norm = math.sqrt(sum(v * v for v in gc.values())) * math.sqrt(sum(v * v for v in gr.values()))
                if norm == 0:
                    continue
                penalty = math.exp(-((len(words(cand)) - len(words(ref))) ** 2) / (2 * sigma**2))
                total += penalty * sum(min(v, gr.get(w, 0.0)) * gr.get(w, 0.0) for w, v in gc.items()) / norm
            per_order.append(total / len(refs[i]))
        scores[i] = 10 * sum(per_order) / 4
    return sum(scores.values()) / len(scores), scores


VOCAB = ["a", "dog", "cat", "red", "blue", "runs", "on", "grass", "big", "Small,", "ball."]
sentence = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=8).map(" ".join)


@st.composite
def caption_sets(draw, max_images=5):
    """Random references (1-4 per image) and candidates: random, empty, or one of the references."""
    n_images = draw(st.integers(2, max_images))
    refs = {i: draw(st.lists(sentence, min_size=1, max_size=4)) for i in range(n_images)}
    cands = {i: draw(st.one_of(sentence, st.just(""), st.sampled_from(refs[i]))) for i in refs}
    return cands, refs


def assert_scores_close(got, want):
    (mean, per), (want_mean, want_per) = got, want
    assert set(per) == set(want_per)
    diff = max(abs(per[i] - want_per[i]) for i in per)
    assert diff < 1e-9, f"per-image scores differ by {diff}: {per} vs {want_per}"
    assert mean == pytest.approx(want_mean, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- CIDEr-D: by hand


def test_cider_d_two_word_exact_match_is_5():
    # every n-gram is in one image of two: idf log 2; 1- and 2-gram cosines are 1, there are no
    # 3- or 4-grams, so 10 * (1 + 1 + 0 + 0) / 4
    mean, per = cider_d({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]})
    assert per == pytest.approx({0: 5.0, 1: 5.0}) and mean == pytest.approx(5.0)


def test_cider_d_shared_word_has_zero_idf():
    # "a" is in both images (idf 0): it drops out, the other n-grams of orders 1-3 still match
    mean, per = cider_d({0: "a dog runs", 1: "a cat sits"}, {0: ["a dog runs"], 1: ["a cat sits"]})
    assert per == pytest.approx({0: 7.5, 1: 7.5})


def test_cider_d_partial_match_with_length_penalty():
    # 1-grams: cand {x, y}, ref {x, y, z, w}, all weight L2: cos = 2 / (sqrt 2 * 2) = 1/sqrt 2;
    # 2-grams: cand {xy}, ref {xy, yz, zw}: cos = 1/sqrt 3; length 2 vs 4: exp(-4 / 72)
    _, per = cider_d({0: "x y", 1: "p q"}, {0: ["x y z w"], 1: ["p q"]})
    want = 10 * math.exp(-4 / 72) * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4
    assert per[0] == pytest.approx(want, rel=1e-12)


def test_cider_d_clips_repeated_ngrams():
    # cand "x x": 1-gram {x: 2 L2}, ref {x: L2, y: L2}: clipped dot min(2L2, L2) * L2 = L2^2,
    # norms 2 L2 and sqrt 2 L2, so cos = 1 / (2 sqrt 2) (unclipped it would be 1 / sqrt 2)
    _, per = cider_d({0: "x x", 1: "p q"}, {0: ["x y"], 1: ["p q"]})
    assert per[0] == pytest.approx(10 / (2 * math.sqrt(2)) / 4, rel=1e-12)


def test_cider_d_averages_over_references():
    # image 0 matches one of its two references exactly and the other not at all
    mean, per = cider_d({0: "a b", 1: "e f"}, {0: ["a b", "c d"], 1: ["e f"]})
    assert per == pytest.approx({0: 2.5, 1: 5.0}) and mean == pytest.approx(3.75)


def test_cider_d_ignores_case_and_punctuation():
    refs = {0: ["A red ball."], 1: ["two blue cubes"]}
    got = cider_d({0: "a RED, ball!", 1: "Two blue cubes"}, refs)
    assert got == cider_d({0: "a red ball", 1: "two blue cubes"}, refs)
    assert got[0] == pytest.approx(7.5)  # orders 1-3 match, no 4-grams
    assert tokenize_caption("A dog's ball-game, 3.5!") == ["a", "dog", "s", "ball", "game", "3", "5"]


def test_cider_d_one_image_and_empty_candidate_score_zero():
    assert cider_d({"x": "a red ball"}, {"x": ["a red ball"]}) == (0.0, {"x": 0.0})  # idf log(1/1) = 0
    _, per = cider_d({0: "", 1: "p q"}, {0: ["a b"], 1: ["p q"]})
    assert per[0] == 0.0 and per[1] == pytest.approx(5.0)


def test_cider_d_rejects_mismatched_ids_and_empty_references():
    with pytest.raises(ValueError, match="'img7'"):
        cider_d({"img1": "a"}, {"img1": ["a"], "img7": ["b"]})
    with pytest.raises(ValueError, match="'img9'"):
        cider_d({"img1": "a", "img9": "b"}, {"img1": ["a"]})
    with pytest.raises(ValueError, match="references\\['img1'\\]"):
        cider_d({"img1": "a", "img2": "b"}, {"img1": [], "img2": ["b"]})
    with pytest.raises(ValueError, match="references\\['img1'\\]"):
        cider_d({"img1": "a", "img2": "b"}, {"img1": "a", "img2": ["b"]})  # a string, not a list
    with pytest.raises(ValueError, match="no captions"):
        cider_d({}, {})


# ----------------------------------------------------------------------------- CIDEr-D: oracles, properties


@settings(max_examples=30, deadline=None)
@given(caption_sets())
def test_cider_d_matches_slow_reference(sets):
    cands, refs = sets
    assert_scores_close(cider_d(cands, refs), slow_cider_d(cands, refs))


@settings(max_examples=30, deadline=None)
@given(caption_sets())
def test_cider_d_matches_pycocoevalcap(sets):
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    cands, refs = sets
    # pycocoevalcap takes pre-tokenized text (PTBTokenizer's output): give it ours
    res = {i: [" ".join(tokenize_caption(c))] for i, c in cands.items()}
    gts = {i: [" ".join(tokenize_caption(r)) for r in rs] for i, rs in refs.items()}
    mean, scores = cider.Cider().compute_score(gts, res)
    assert_scores_close(cider_d(cands, refs), (float(mean), {i: float(s) for i, s in zip(gts, scores)}))


@settings(max_examples=25, deadline=None)
@given(caption_sets(), sentence)
def test_cider_d_candidate_equal_to_its_references_scores_highest(sets, other):
    cands, refs = sets
    truth = refs[0][0] + " unique0"  # "unique0" is in image 0 only: idf > 0
    refs = {**refs, 0: [truth] * len(refs[0])}
    best = cider_d({**cands, 0: truth}, refs)[1][0]
    assert best >= cider_d({**cands, 0: other}, refs)[1][0] - 1e-12
    assert best > 0 and cider_d({**cands, 0: "zebra xylophone"}, refs)[1][0] == 0.0


@settings(max_examples=25, deadline=None)
@given(caption_sets(), st.randoms(use_true_random=False))
def test_cider_d_invariant_to_id_renaming(sets, rnd):
    cands, refs = sets
    names = [f"img-{j}" for j in range(len(refs))]
    rnd.shuffle(names)
    rename = dict(zip(refs, names))
    mean, per = cider_d(cands, refs)
    mean2, per2 = cider_d({rename[i]: c for i, c in cands.items()}, {rename[i]: r for i, r in refs.items()})
    assert mean2 == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert {rename[i]: s for i, s in per.items()} == pytest.approx(per2, rel=1e-12, abs=1e-15)


@settings(max_examples=25, deadline=None)
@given(caption_sets())
def test_cider_d_length_penalty(sets):
    # with one reference per image the penalty is a single factor exp(-delta^2 / 72): dividing it
    # out recovers the score without penalty (sigma -> infinity)
    cands, refs = sets
    refs = {i: r[:1] for i, r in refs.items()}
    _, per = cider_d(cands, refs)
    _, no_penalty = cider_d(cands, refs, sigma=1e12)
    for i in refs:
        delta = len(tokenize_caption(cands[i])) - len(tokenize_caption(refs[i][0]))
        assert per[i] == pytest.approx(no_penalty[i] * math.exp(-(delta**2) / 72), rel=1e-9, abs=1e-12)
        assert per[i] <= no_penalty[i] + 1e-12


def test_cider_d_longer_candidate_scores_lower():
    # "x" is in every image's references (idf 0), so padding with it leaves the 1-gram vectors
    # as they are; the longer candidate loses on the length penalty and the new n-grams
    refs = {0: ["big red ball x"], 1: ["small blue cube x"]}
    cands = [{0: "big red ball x" + " x" * extra, 1: "small blue cube x"} for extra in range(4)]
    scores = [cider_d(c, refs)[1][0] for c in cands]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


# ----------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("yes.", "yes"),
        ("Two", "2"),
        ("a dog", "dog"),
        ("The Red Ball!", "red ball"),
        ("none", "0"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("black-and-white", "black and white"),  # a mark inside a word becomes a space
        ("yes, sir", "yes sir"),  # a mark touching a space is deleted
        ("cats,dogs, birds", "catsdogs birds"),  # ... everywhere in the answer (official quirk)
        ("1,000", "1000"),  # a number with a comma: every mark deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("  ten\tapples\n", "10 apples"),
        ("well", "well"),  # a real word, not "we'll"
    ],
)
def test_normalize_answer_official_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


def official_process_punctuation(in_text):
    """vqaEval.processPunctuation as published (regexes and re.UNICODE passed as count included)."""
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
             ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
    comma_strip = re.compile(r"(\d)(\,)(\d)")
    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    out_text = in_text
    for p in punct:
        if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return period_strip.sub("", out_text, re.UNICODE)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab1 .,-!?/'\"()", max_size=12))
def test_punctuation_matches_official_script(text):
    want = official_process_punctuation(text.strip()).lower()  # evaluate() strips first
    assert normalize_answer(text) == " ".join(w for w in want.split() if w not in ("a", "an", "the"))


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(n_match, expected):
    # 3 of 10: 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3): (7 + 3 * 2/3) / 10 = 0.9
    answers = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_official_examples():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0  # one answer: exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("dog", "dog")


ANSWERS = ["2", "two", "dog", "a dog", "Dog.", "yes", "no", "red"]


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(ANSWERS), st.lists(st.sampled_from(ANSWERS), min_size=2, max_size=10))
def test_vqa_accuracy_matches_subset_oracle(prediction, answers):
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    subsets = list(combinations(norm, len(norm) - 1))  # each leaves out one answer
    want = sum(min(1.0, sum(a == pred for a in s) / 3) for s in subsets) / len(subsets)
    assert vqa_accuracy(prediction, answers) == pytest.approx(want, rel=1e-12)


def test_exact_match_and_accuracy():
    assert exact_match("Two dogs.", "2 dogs") and not exact_match("two dogs", "3 dogs")
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy(x > 1 for x in range(4)) == 0.5
    with pytest.raises(ValueError, match="no examples"):
        accuracy([])
