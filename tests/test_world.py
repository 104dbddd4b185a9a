"""The synthetic world: determinism, held-out splits, well-formed bursty documents, episodes, the CLI.

Answers and video events are checked against independent oracles: answers recomputed from the
scene attrs by other code, motion read back from the rendered pixels.
"""

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from miniflamingo import world_text as wt
from miniflamingo.world import (
    BLOB_SHAPES,
    COLOURS,
    HELDOUT_COMBOS,
    NOVEL_SHAPES,
    SHAPES,
    SIZES,
    World,
    main,
)
from miniflamingo.world_docs import FAMILIES, LM_FAMILIES
from miniflamingo.world_render import render_background, shape_mask, strip_to_video, video_strip

W = World(seed=0)


@pytest.fixture(scope="module")
def train_docs():
    return W.documents(60, "train")


def _media_attrs(doc):
    """Every scene of a document, video frames' colour changes included."""
    out = []
    for a in doc["media_attrs"]:
        if a is not None:
            out += W.frames(a) if "event" in a else [a]
    return out


def _combos(attrs_list):
    return {(o["colour"], o["shape"]) for a in attrs_list for o in a["objects"]}


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_world_different_seed_different_world():
    a, b = World(0).image_text_pairs(4), World(0).image_text_pairs(4)
    assert all(np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"] for x, y in zip(a, b))
    da, db = World(0).documents(4, seed=3), World(0).documents(4, seed=3)
    for x, y in zip(da, db):
        assert x["texts"] == y["texts"] and x["task"] == y["task"]
        for p, q in zip(x["images"], y["images"]):
            assert (p is None and q is None) or np.array_equal(p, q)
    assert World(0).lm_corpus(5) == World(0).lm_corpus(5)
    ea, eb = W.binding_episode(3, 2, seed=5), W.binding_episode(3, 2, seed=5)
    assert np.array_equal(ea["query"]["image"], eb["query"]["image"]) and ea["candidates"] == eb["candidates"]
    # a different world seed, call seed or split changes the content
    for other in (World(1).image_text_pairs(4), W.image_text_pairs(4, seed=1), W.image_text_pairs(4, "test")):
        assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))
    assert World(1).lm_corpus(5) != World(0).lm_corpus(5)


def test_items_are_independent_of_how_many_are_drawn():
    # item i has its own generator: asking for more items never changes the first ones
    assert [p["caption"] for p in W.image_text_pairs(3)] == [p["caption"] for p in W.image_text_pairs(6)[:3]]


# ----------------------------------------------------------------------------- held out


def test_heldout_combinations_never_in_train(train_docs):
    seen = _combos(p["attrs"] for p in W.image_text_pairs(300))
    seen |= _combos(f for v in W.video_text_pairs(60) for f in W.frames(v["attrs"]))
    seen |= _combos(a for d in train_docs for a in _media_attrs(d))
    seen |= _combos(p["attrs"] for p in W.vision_pairs(200))
    assert not seen & set(HELDOUT_COMBOS), f"held-out combos rendered in train: {seen & set(HELDOUT_COMBOS)}"
    assert len(seen) >= len(COLOURS) * len(SHAPES) - len(HELDOUT_COMBOS) - 4  # everything else does appear
    text = " ".join(W.lm_corpus(400)) + " ".join(t for d in train_docs for t in d["texts"] if t)
    for c, s in HELDOUT_COMBOS:
        assert not re.search(rf"\b{c} {wt.plural(s)}\b|\b{c} {s}\b", text), f"'{c} {s}' in train text"
    # ... while the evaluation splits do show them
    assert _combos(p["attrs"] for p in W.image_text_pairs(300, "test")) & set(HELDOUT_COMBOS)
    items = W.heldout_combo_set(8)
    assert {tuple(x["combo"]) for x in items} == set(HELDOUT_COMBOS)
    assert all(tuple(x["combo"]) in _combos([x["attrs"]]) for x in items)
    with pytest.raises(ValueError, match="train"):
        W.heldout_combo_set(2, split="train")


def test_novel_shapes_never_in_any_training_stage(train_docs):
    assert not set(NOVEL_SHAPES) & set(SHAPES) and not set(NOVEL_SHAPES) & set(BLOB_SHAPES)
    assert len(SHAPES) >= 6 and len(NOVEL_SHAPES) >= 5 and len(BLOB_SHAPES) >= 40 and len(COLOURS) >= 6
    shapes = {s for _, s in _combos(p["attrs"] for p in W.vision_pairs(300))}
    assert len(shapes & set(BLOB_SHAPES)) >= 40 and shapes & set(SHAPES)  # blobs mixed in, nearly all used
    shapes |= {s for _, s in _combos(p["attrs"] for p in W.image_text_pairs(100))}
    shapes |= {s for _, s in _combos(a for d in train_docs for a in _media_attrs(d))}
    assert not shapes & set(NOVEL_SHAPES)
    words = set(re.findall(r"[a-z]+", " ".join(W.lm_corpus(400)).lower()))
    assert not words & set(NOVEL_SHAPES)
    ep = W.binding_episode(5, 1, novel=True)
    assert set(ep["shapes"]) <= set(NOVEL_SHAPES)
    with pytest.raises(ValueError, match="novel"):
        W.binding_episode(2, 1, novel=True, split="train")


# ----------------------------------------------------------------------------- documents


def test_documents_are_aligned_and_well_formed(train_docs):
    docs = train_docs + W.documents(12, "val", families=list(FAMILIES))
    assert {d["task"] for d in docs} == set(FAMILIES)
    for d in docs:
        assert len(d["texts"]) == len(d["images"]) == len(d["media_attrs"])
        assert all((t is None) != (m is None) for t, m in zip(d["texts"], d["images"])), "one per index"
        media = [m for m in d["images"] if m is not None]
        assert 3 <= len(media) <= 8
        for m in media:
            assert m.dtype == np.uint8 and m.shape[-3:] == (64, 64, 3) and m.ndim in (3, 4)
        for t in d["texts"]:
            assert t is None or ((t.startswith(("Output: ", "Question: ")) or t.isalpha()) and "<" not in t)
        assert d["images"][0] is not None  # each media comes before its text


def _word(text):
    return re.fullmatch(r"([a-z]+)", text).group(1)


def test_binding_documents_are_consistent_and_need_their_context():
    docs = W.documents(40, families=["binding"])
    first_words = Counter()
    for d in docs:
        media, texts = d["media_attrs"][::2], d["texts"][1::2]
        pairs = [(a["objects"][0]["shape"], _word(t)) for a, t in zip(media, texts)]
        assert len(set(pairs)) == len({s for s, _ in pairs}) == len({w for _, w in pairs}), "word <-> shape"
        assert dict(pairs) == {s: w for w, s in d["latent"]["words"].items()}
        first_words[pairs[0]] += 1
    # across documents the same shape gets other words: only the earlier chunks can tell the answer
    assert max(first_words.values()) == 1
    assert len({s for s, _ in first_words}) > 3


def _solve_ambiguous(support, query):
    """Oracle: the bound attribute is the one each word's examples all share (None if both do)."""
    fits = []
    for attr in ("colour", "shape"):
        by_word = {}
        for s in support:
            by_word.setdefault(s["word"], set()).add(s["attrs"]["objects"][0][attr])
        if all(len(v) == 1 for v in by_word.values()):
            value = {next(iter(v)): w for w, v in by_word.items()}
            fits.append(value.get(query["attrs"]["objects"][0][attr]))
    return fits


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ambiguous_episodes_are_a_coin_flip_at_one_shot_and_solvable_from_two(k):
    for seed in range(10):
        ep = W.ambiguous_episode(k, seed=seed)
        assert len(ep["support"]) == 2 * k and ep["answer"] in ep["candidates"]
        fits = _solve_ambiguous(ep["support"], ep["query"])
        if k == 1:  # both readings fit the examples and they disagree on the query
            assert sorted(fits) == sorted(ep["candidates"])
        else:
            assert fits == [ep["answer"]]


def test_ambiguous_documents_bind_one_value_per_word():
    for d in W.documents(20, families=["ambiguous"]):
        bound = d["latent"]["bound"]
        for a, t in zip(d["media_attrs"][::2], d["texts"][1::2]):
            assert a["objects"][0][bound] == d["latent"]["words"][_word(t)]


def test_blob_binding_documents_bind_words_to_blob_shapes_never_novel_ones():
    """train --blob-binding P: that share of binding documents names blob shapes (each word still one
    shape throughout), never the held-out novel shapes; 0 leaves every document as it was."""
    def drawn(ds):
        return [(d["texts"], d["media_attrs"]) for d in ds]

    docs = {p: W.documents(40, families=["binding"], blob_binding=p) for p in (0.0, 0.5, 1.0)}
    assert drawn(docs[0.0]) == drawn(W.documents(40, families=["binding"]))  # 0 draws nothing extra
    blob_docs_allowed = {0.0: (0, 0), 0.5: (1, 39), 1.0: (40, 40)}  # of 40: none, some but not all, all
    for p, ds in docs.items():
        blob = [set(d["latent"]["words"].values()) <= set(BLOB_SHAPES) for d in ds]
        named = [set(d["latent"]["words"].values()) <= set(SHAPES) for d in ds]
        assert all(b != n for b, n in zip(blob, named))  # one kind or the other, never mixed
        low, high = blob_docs_allowed[p]
        assert low <= sum(blob) <= high, (p, sum(blob))
        for d in ds:
            for a, t in zip(d["media_attrs"][::2], d["texts"][1::2]):
                assert a["objects"][0]["shape"] == d["latent"]["words"][_word(t)]
                assert a["objects"][0]["shape"] not in NOVEL_SHAPES


@pytest.mark.parametrize("n_way,k_shot,novel", [(2, 1, False), (5, 1, False), (5, 4, True), (3, 0, False)])
def test_binding_episode(n_way, k_shot, novel):
    ep = W.binding_episode(n_way, k_shot, novel=novel, seed=1)
    assert len(ep["candidates"]) == n_way and ep["answer"] in ep["candidates"]
    expected = {w: k_shot for w in ep["candidates"]} if k_shot else {}
    assert Counter(s["word"] for s in ep["support"]) == Counter(expected)
    shape_of = dict(zip(ep["candidates"], ep["shapes"]))
    assert all(s["attrs"]["objects"][0]["shape"] == shape_of[s["word"]] for s in ep["support"])
    assert ep["query"]["attrs"]["objects"][0]["shape"] == shape_of[ep["answer"]]


# ----------------------------------------------------------------------------- questions and captions


def _oracle_answer(attrs, q):
    """Recompute an answer from the attrs by parsing the question: independent of world_text.question."""
    objs = attrs["objects"]
    m = re.fullmatch(r"What colour is the (\w+)\?", q)
    if m:
        return next(o["colour"] for o in objs if o["shape"] == m[1])
    m = re.fullmatch(r"What (?:colour is the shape|shape is) at the ([\w ]+)\?", q)
    if m:
        o = next(o for o in objs if o["position"] == m[1])
        return o["colour"] if q.startswith("What colour") else o["shape"]
    if q == "How many shapes are there?":
        return str(len(objs))
    m = re.fullmatch(r"How many (\w+) shapes are there\?", q)
    if m:
        return str(sum(o["colour"] == m[1] for o in objs))
    m = re.fullmatch(r"How many (\w+) are there\?", q)
    if m:
        return str(sum(wt.plural(o["shape"]) == m[1] for o in objs))
    m = re.fullmatch(r"Where is the (\w+) (\w+)\?", q)
    if m:
        return next(o["position"] for o in objs if (o["colour"], o["shape"]) == (m[1], m[2]))
    m = re.fullmatch(r"Is the (\w+) (?:at the )?([\w ]+) small or large\?", q)
    if m:
        return next(o["size"] for o in objs if {m[1], m[2]} <= {o["colour"], o["shape"], o["position"]})
    m = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q)
    if m:
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"unparsed question {q!r}")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_questions_match_an_independent_oracle(seed):
    for item in W.vqa_set(6, seed=seed):
        assert _oracle_answer(item["attrs"], item["question"]) == item["answer"]
        assert len(item["answers"]) == 10 and Counter(item["answers"]).most_common(1)[0][0] == item["answer"]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_captions_name_every_object(seed):
    (p,) = W.image_text_pairs(1, seed=seed)
    objs = p["attrs"]["objects"]
    assert 1 <= len(objs) <= 4 and len({o["position"] for o in objs}) == len(objs)
    for name in wt.CAPTION_TEMPLATES:
        cap = wt.caption(p["attrs"], name)
        assert all(o["colour"] in cap and o["shape"] in cap for o in objs), (name, cap)
    full = wt.caption(p["attrs"], "full")
    assert all(f"{o['size']} {o['colour']} {o['shape']} at the {o['position']}" in full for o in objs)


def test_eval_sets_have_ten_answers_and_references():
    for item in W.video_qa_set(8) + W.heldout_combo_set(4) + W.vqa_set(6):
        assert len(item["answers"]) == 10 and item["answers"][0] == item["answer"]
    for item in W.caption_set(5):
        assert item["caption"] == item["references"][0] and 1 <= len(item["references"]) <= 5


# ----------------------------------------------------------------------------- pixels


def test_shapes_are_distinguishable_even_when_small():
    names = SHAPES + NOVEL_SHAPES
    for size in SIZES.values():
        masks = {n: shape_mask(n, 32, 32, size * 64, 64)[0] for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                diff = np.abs(masks[a] - masks[b]).sum() / max(masks[a].sum(), masks[b].sum())
                assert diff > 0.15, f"{a} and {b} differ in only {diff:.0%} of their area at radius {size}"


def test_video_events_can_be_read_back_from_the_pixels():
    checked = 0
    for v in W.video_text_pairs(40, "val"):
        a = v["attrs"]
        if len(a["objects"]) != 1:
            continue
        bg = np.clip(render_background(a["background"], 64) + 0.5, 0, 255).astype(np.uint8)
        masks = [np.abs(f.astype(int) - bg).sum(-1) > 60 for f in v["video"]]  # (H, W) object pixels
        ev = a["event"]
        if ev["kind"] == "move":
            (y0, x0), (y1, x1) = [np.argwhere(m).mean(0) for m in (masks[0], masks[-1])]  # centroids
            delta = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[ev["direction"]]
            assert delta > 20, (ev, delta)
        elif ev["kind"] in ("grows", "shrinks"):
            assert (masks[-1].sum() > masks[0].sum()) == (ev["kind"] == "grows")
        else:
            mean = v["video"][-1][masks[-1]].mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
            assert nearest == ev["to"] and v["caption"].endswith("turns " + ev["to"])
        checked += 1
    assert checked >= 10
    assert np.array_equal(strip_to_video(video_strip(v["video"])), v["video"])


# ----------------------------------------------------------------------------- text corpus and CLI


def test_lm_corpus_families():
    for fam in LM_FAMILIES:
        docs = W.lm_corpus(6, families=[fam])
        assert all(d.endswith("<|endofchunk|>") and "<image>" not in d for d in docs), fam
    drill = W.lm_corpus(1, seed=2, families=["binding_drill"])[0]
    chunks = drill.split("<|endofchunk|>")[:-1]
    shape_word = {}
    for c in chunks:  # " red circle\ndax": a shape keeps its word
        words = c.split()
        assert shape_word.setdefault(words[1], words[-1]) == words[-1]


def test_cli_writes_readable_files(tmp_path, capsys):
    tmp_path = tmp_path / "new" / "world"  # the command creates its folder
    assert main(["--out", str(tmp_path), "--n", "4", "--lm-docs", "3", "--frames", "5"]) == 0
    assert "frames/s" in capsys.readouterr().out
    rows = {n: [json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in
            ("captions", "vision_captions", "videos", "documents", "lm_corpus")}
    assert [len(r) for r in rows.values()] == [4, 4, 4, 4, 3]
    for r in rows["captions"] + rows["vision_captions"]:
        assert np.asarray(Image.open(tmp_path / r["image"])).shape == (64, 64, 3) and r["caption"]
    for r in rows["videos"]:
        assert np.asarray(Image.open(tmp_path / r["video"])).shape == (64, 64 * 5, 3) and r["frames"] == 5
    for d in rows["documents"]:
        assert len(d["texts"]) == len(d["images"])
        assert all((t is None) != (m is None) for t, m in zip(d["texts"], d["images"]))
        assert all(Image.open(tmp_path / m).size[1] == 64 for m in d["images"] if m)
    assert json.loads((tmp_path / "world.json").read_text())["novel_shapes"] == list(NOVEL_SHAPES)


def test_rendering_throughput():
    t = time.perf_counter()
    W.image_text_pairs(200)
    rate = 200 / (time.perf_counter() - t)
    print(f"world: {rate:.0f} images/s (image_text_pairs, one core)")  # no assert: timings are noisy here


def test_size_twin_differs_in_one_size_only():
    """A size twin (the contrastive stage's hard negative for size): the same scene with one object's size
    flipped, so its caption differs in exactly that size word, its pixels differ, and it is reproducible."""
    for i, pair in enumerate(W.vision_pairs(12, p_blob=0.0)):
        twin = W.size_twin(pair, i)
        a, b = pair["attrs"]["objects"], twin["attrs"]["objects"]
        changed = [k for k, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(a) == len(b) and len(changed) == 1
        x, y = a[changed[0]], b[changed[0]]
        assert {x["size"], y["size"]} == {"small", "large"} and {**x, "size": 0, "radius": 0} == {
            **y, "size": 0, "radius": 0}
        words = [(u, v) for u, v in zip(pair["caption"].split(), twin["caption"].split()) if u != v]
        assert pair["caption"] == wt.caption(pair["attrs"], "full") and words in ([("small", "large")],
                                                                                  [("large", "small")])
        assert (pair["image"] != twin["image"]).any()
        assert (W.size_twin(pair, i)["image"] == twin["image"]).all()
