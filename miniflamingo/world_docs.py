"""Bursty interleaved documents, the LM's text corpus, and the held-out evaluation episodes.

Notable features
- Every document has a latent task that only its earlier chunks reveal (DESIGN.md 5): a caption
  template, a question kind, made-up words bound to shapes (fast binding, N-way), a word bound to a
  colour OR a shape (ambiguous binding: one example cannot tell which; off by default, see FAMILIES), or
  the one attribute it names.
- The LM corpus is the same documents with each image replaced by its stand-in words, plus drills:
  binding over shape words, binding over random symbol "vectors" (so the LM learns to match any
  token pattern: this is what let binding reach never-seen shapes, issue 3), and ambiguous binding
  (off by default: see LM_FAMILIES).
- Evaluation episodes mirror the training documents exactly, on held-out splits and shapes.

A chunk is (attrs, text): attrs of one image or video (rendered by World.render), text without
special tokens. Functions take the World first; World exposes them as methods.
"""

from __future__ import annotations

import numpy as np

from miniflamingo import world_text as wt
from miniflamingo.tokenizer import EOC
from miniflamingo.world_render import BLOB_SHAPES, COLOURS, HELDOUT_COMBOS, NOVEL_SHAPES, SHAPES
from miniflamingo.world_text import BINDING_TEXT, CAPTION_TEMPLATES, CAPTION_TEXT, QA_TEXT

# Document families and their default weights; documents(families=...) takes a dict or a list of names.
# Binding-heavy: binding is the slowest skill to learn (the others also come from the image-text and
# video-text pairs). Measured in one demo-sized run (same LM, 1400 steps): 5-way 1-shot binding 90% with
# binding at 0.6; with 0.25 and 700 steps it stayed at chance, with 0.6 and 700 steps it reached 47.5%.
# Ambiguous documents are off by default (weights are normalised, so the rest keep their ratios): the
# frozen LM binds by shape whatever the examples say (LM_FAMILIES, below), so a word bound to a colour is
# noise to learn from, and it cost binding. Without them (same encoder and LM, 1300 steps, 200 episodes,
# k = 1, seeds 0 / 1): 5-way binding 94.5 -> 97.5% / 97 -> 100%, novel shapes 2-way 77.5 -> 81% /
# 79 -> 87.5%, 5-way 55.5 -> 67.5% / 58 -> 64.5%; ambiguous binding stayed at chance (52.5-54%).
# Video documents at 0.15 (and binding at 0.7, so that binding keeps its share: the weights sum to 1.1)
# instead of 0.05 and 0.6: "which way does it move" went from learned in no run of two to learned in three
# of four (session 10, seed 0's encoder and LM, 1300 steps, 200 questions at 4 shots: video questions 40.5
# and 48.8% before (motion 11 and 21%), 64.7, 67.8, 58.8 and 53.0% after (motion 70-74%, and 30% in the
# demo's own run), VQA 53-56% -> 51.5-59.5%, 5-way binding 97-97.5% -> 97.5-98.5%). At 0.2 without raising
# binding (session 8) VQA had fallen.
FAMILIES = {"captions": 0.1, "questions": 0.1, "binding": 0.7, "ambiguous": 0.0, "attribute": 0.05,
            "video": 0.15}
# Drill-heavy: with 0.2 documents and 0.3 each of the two binding drills the tiny LM's binding probe
# reached 0.90 at step 1250 (32 x 128 tokens), 0.39 with the five families at 0.2 each (one run each).
# Ambiguous drills (a word bound to a colour or a shape, which two examples decide) are off by default:
# in a tenth of the corpus the tiny LM never learned the vote (it always bound by shape: 0-7% right when
# the words named colours, at any k; nor with a quarter, nor with them first), and they cost it plain
# binding. Without them (their tenth to the two binding drills), text-only 5-way 1-shot binding on 400
# test episodes: the four demo seeds' LMs 99.8 / 99.5 / 98.5 / 100%, against 92.5 / 98.3 / 97.5 / 98.3%
# with them. When binding appears stays a draw (probe above 80% at steps 800-1200). README has the runs.
LM_FAMILIES = {"documents": 0.2, "binding_drill": 0.35, "vector_drill": 0.35, "ambiguous_drill": 0.0,
               "pairs": 0.1}
MAX_MEDIA = 8  # media per document: 3 to 8


def _pick(rng, weights, default: dict) -> str:
    """A family name drawn from weights: a dict name -> weight, a list of names (uniform), or None."""
    weights = default if weights is None else weights
    if not isinstance(weights, dict):
        weights = {name: 1.0 for name in weights}
    unknown = set(weights) - set(default)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {list(default)}")
    names = list(weights)
    p = np.array([weights[k] for k in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _one(world, rng, split: str, shape: str, colour: str | None = None) -> dict:
    """A one-object scene: the media of binding chunks."""
    obj = world.obj(rng, split, shape, int(rng.integers(9)), colour=colour)
    return {"objects": [obj], "background": world.background(rng)}


def _labels(rng, n_way: int, n_media: int) -> list[int]:
    """Class of each chunk: every class once (in random order), then random classes."""
    return rng.permutation(n_way).tolist() + rng.integers(n_way, size=n_media - n_way).tolist()


def ambiguous_chunks(world, rng, split: str, k: int, n_query: int, p_conflict: float = 1.0):
    """Two made-up words, each bound to one value of a hidden attribute (both colours, or both shapes).
    Word j's k examples share its value and differ in the other attribute; a conflicting query has the
    bound value of one word and the other attribute of the other word's example, so at k = 1 it is a
    coin flip by construction and from k = 2 on the shared value decides (issue 3, ambiguous binding).
    Returns (latent, supports [(attrs, word)] shuffled, queries [(attrs, word)])."""
    if not 0 <= k <= 4:
        raise ValueError(f"ambiguous binding needs 0 <= k <= 4 examples per word, got {k}")
    for _ in range(100):  # resample until no held-out combination appears in "train"
        bound = ("colour", "shape")[int(rng.integers(2))]
        bvals, ovals = (list(COLOURS), list(SHAPES)) if bound == "colour" else (list(SHAPES), list(COLOURS))
        b = [bvals[i] for i in rng.choice(len(bvals), 2, replace=False)]
        kk = max(k, 1)
        o = [ovals[i] for i in rng.choice(len(ovals), 2 * kk, replace=False)]  # distinct: each matches once
        pairs = [(j, b[j], o[j * kk + i]) for j in range(2) for i in range(k)]
        for _q in range(n_query):
            j = int(rng.integers(2))
            if rng.random() < p_conflict:  # the other attribute of one of the other word's examples
                pairs.append((j, b[j], o[(1 - j) * kk + int(rng.integers(kk))]))
            else:
                pairs.append((j, b[j], ovals[int(rng.integers(len(ovals)))]))
        combos = [(v, w) if bound == "colour" else (w, v) for _, v, w in pairs]  # (colour, shape)
        if split != "train" or not set(combos) & set(HELDOUT_COMBOS):
            break
    words = wt.made_up_words(rng, 2)
    chunks = [(_one(world, rng, split, s, c), words[j]) for (j, _, _), (c, s) in zip(pairs, combos)]
    support = [chunks[i] for i in rng.permutation(2 * k)]
    latent = {"bound": bound, "words": {words[0]: b[0], words[1]: b[1]}}
    return latent, support, chunks[2 * k :]


# ----------------------------------------------------------------------------- document families


def document_chunks(world, rng, split: str, families=None, blob_binding: float = 0.0
                    ) -> tuple[str, dict, list[tuple[dict, str]]]:
    """One document: (family, latent task, chunks). `blob_binding`: the share of binding documents whose
    words name the vision stage's blob shapes instead of the eight named ones (see `train --blob-binding`);
    at 0 the random stream, and so every document, is what it was without the option."""
    family = _pick(rng, families, FAMILIES)
    forbidden = frozenset(HELDOUT_COMBOS) if split == "train" else frozenset()
    m = int(rng.integers(3, MAX_MEDIA + 1))
    if family == "captions":
        template = list(CAPTION_TEMPLATES)[int(rng.integers(len(CAPTION_TEMPLATES)))]
        scenes = [world.scene(rng, split) for _ in range(m)]
        return family, {"template": template}, [(a, CAPTION_TEXT.format(caption=wt.caption(a, template)))
                                                for a in scenes]
    if family == "questions":
        kind = wt.QUESTION_KINDS[int(rng.integers(len(wt.QUESTION_KINDS)))] if rng.random() < 0.7 else None
        chunks = []
        for _ in range(m):
            a = world.scene(rng, split)
            q = wt.question(a, rng, kind, forbidden)
            chunks.append((a, QA_TEXT.format(question=q["question"], answer=q["answer"])))
        return family, {"kind": kind or "mixed"}, chunks
    if family == "binding":
        n_way = int(rng.integers(2, 6))
        m = int(rng.integers(max(3, n_way + 1), MAX_MEDIA + 1))
        # Blob shapes (never named in any caption, never the held-out novel ones) make the model match
        # shapes it has no word for, as novel-shape binding must (issue 7; the numbers are in README).
        pool = BLOB_SHAPES if blob_binding > 0 and rng.random() < blob_binding else SHAPES
        shapes = [pool[i] for i in rng.choice(len(pool), n_way, replace=False)]
        words = wt.made_up_words(rng, n_way)
        chunks = [(_one(world, rng, split, shapes[c]), BINDING_TEXT.format(word=words[c]))
                  for c in _labels(rng, n_way, m)]
        return family, {"words": dict(zip(words, shapes))}, chunks
    if family == "ambiguous":
        k = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
        n_query = int(rng.integers(1, MAX_MEDIA - 2 * k + 1))
        latent, support, queries = ambiguous_chunks(world, rng, split, k, n_query, p_conflict=0.7)
        return family, latent, [(a, BINDING_TEXT.format(word=w)) for a, w in support + queries]
    if family == "attribute":
        attr = ("colour", "shape", "count")[int(rng.integers(3))]
        chunks = []
        for _ in range(m):
            if attr == "colour":
                c = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                a = world.scene(rng, split, shapes=[s for s in SHAPES if (c, s) not in forbidden], colour=c)
                value = c
            elif attr == "shape":
                a = world.scene(rng, split, shape=SHAPES[int(rng.integers(len(SHAPES)))])
                value = a["objects"][0]["shape"]
            else:
                a = world.scene(rng, split)
                value = wt.count_word(len(a["objects"]))
            chunks.append((a, CAPTION_TEXT.format(caption=value)))
        return family, {"attribute": attr}, chunks
    if family == "video":
        m = int(rng.integers(3, 7))
        mode = ("event", "full", "what", "detail")[int(rng.integers(4))]
        chunks = []
        for _ in range(m):
            a = world.video_scene(rng, split)
            if mode in ("event", "full"):
                chunks.append((a, CAPTION_TEXT.format(caption=wt.video_caption(a, mode))))
            else:
                q = wt.video_question(a, rng, mode)
                chunks.append((a, QA_TEXT.format(question=q["question"], answer=q["answer"])))
        return family, {"mode": mode}, chunks
    raise AssertionError(family)


# ----------------------------------------------------------------------------- the LM's text corpus


def lm_document(world, rng, families=None) -> str:
    """One text document: " red circle\ndax<|endofchunk|> blue star\nwug<|endofchunk|>".
    Families (LM_FAMILIES): "documents" (world documents, images -> stand-in words), "binding_drill",
    "vector_drill", "ambiguous_drill" (weight 0 by default, see LM_FAMILIES; name it to draw it), "pairs"
    (unrelated captions and questions)."""
    family = _pick(rng, families, LM_FAMILIES)

    def label(word: str) -> str:
        return BINDING_TEXT.format(word=word)

    if family == "documents":
        _, _, chunks = document_chunks(world, rng, "train")
        parts = [(wt.stand_in(a), t) for a, t in chunks]
    elif family == "binding_drill":
        n_way = int(rng.integers(2, 6))
        shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), n_way, replace=False)]
        words = wt.made_up_words(rng, n_way)
        labels = _labels(rng, n_way, int(rng.integers(max(3, n_way + 1), MAX_MEDIA + 1)))
        parts = [(wt.stand_in(_one(world, rng, "train", shapes[c])), label(words[c])) for c in labels]
    elif family == "vector_drill":
        # image slots carry arbitrary symbols: a key bound to the word, often after a noise symbol that
        # changes every time (as a shape's colour does), so only the key can be matched
        n_way = int(rng.integers(2, 6))
        keys = list(dict.fromkeys(wt.vector_words(rng, n_way + 3)))[:n_way]
        n_way = len(keys)
        words = wt.made_up_words(rng, n_way)
        labels = _labels(rng, n_way, int(rng.integers(max(3, n_way + 1), MAX_MEDIA + 1)))
        noise = [wt.vector_words(rng, 1)[0] + " " if rng.random() < 0.7 else "" for _ in labels]
        parts = [(n + keys[c], label(words[c])) for n, c in zip(noise, labels)]
    elif family == "ambiguous_drill":
        k = int(rng.integers(2, 4))  # resolvable: 2-3 examples per word
        n_query = int(rng.integers(1, MAX_MEDIA - 2 * k + 1))
        _, support, queries = ambiguous_chunks(world, rng, "train", k, n_query)
        parts = [(wt.stand_in(a), label(w)) for a, w in support + queries]
        if rng.random() < 0.5:  # the same puzzle over symbols: colours and shapes become random vectors
            names = list(COLOURS) + list(SHAPES)
            symbols = dict(zip(names, wt.vector_words(rng, len(names))))
            parts = [(" ".join(symbols[w] for w in s.split()), t) for s, t in parts]
    else:  # "pairs": unrelated images, each with a caption or a question
        parts = []
        for _ in range(int(rng.integers(3, MAX_MEDIA + 1))):
            a = world.scene(rng, "train")
            if rng.random() < 0.5:
                template = list(CAPTION_TEMPLATES)[int(rng.integers(len(CAPTION_TEMPLATES)))]
                text = CAPTION_TEXT.format(caption=wt.caption(a, template))
            else:
                q = wt.question(a, rng, forbidden=frozenset(HELDOUT_COMBOS))
                text = QA_TEXT.format(question=q["question"], answer=q["answer"])
            parts.append((wt.stand_in(a), text))
    # " red circle\ndax": the leading space makes the stand-in tokenize like the same words inside a
    # caption (" red", " circle"); the newline makes the text tokenize exactly as it does after <image> in
    # a Flamingo document ("Output", not " Output"), and it marks where the image ends: the token before
    # the text is always the same, as <image> is in Flamingo. Measured: with a space instead, the LM never
    # learned to bind (probe 0.10 after 1500 steps; likely because a vector drill's symbols then run
    # straight into its word, so no token says where the word starts).
    return "".join(f" {s}\n{t}{EOC}" for s, t in parts)


# ----------------------------------------------------------------------------- evaluation (held out)


def binding_episode(world, n_way: int, k_shot: int, novel: bool = False, split: str = "test",
                    seed: int = 0) -> dict:
    """N-way k-shot fast binding: fresh made-up words name n_way shapes (NOVEL_SHAPES if novel);
    k_shot support images per word (random colours, sizes, positions), shuffled; one query image.
    Returns {"support": [{"image", "word", "attrs"}], "query": {"image", "attrs"}, "answer": word,
    "candidates": [n_way words], "template": BINDING_TEXT}. Chance is 1 / n_way."""
    pool = NOVEL_SHAPES if novel else SHAPES
    if not 2 <= n_way <= len(pool) or k_shot < 0:
        raise ValueError(f"binding needs 2 <= n_way <= {len(pool)} and k_shot >= 0, got {n_way}, {k_shot}")
    if novel and split == "train":
        raise ValueError("novel shapes are never drawn in the train split")
    rng = world.rng(split, "novel_binding" if novel else "binding", seed, n_way, k_shot)
    shapes = [pool[i] for i in rng.choice(len(pool), n_way, replace=False)]
    words = wt.made_up_words(rng, n_way)
    labels = [c for c in range(n_way) for _ in range(k_shot)]
    order = [labels[i] for i in rng.permutation(len(labels))] if labels else []
    support = [_one(world, rng, split, shapes[c]) for c in order]
    target = int(rng.integers(n_way))
    query = _one(world, rng, split, shapes[target])
    support = [{"image": world.render(a), "word": words[c], "attrs": a} for a, c in zip(support, order)]
    return {"support": support,
            "query": {"image": world.render(query), "attrs": query}, "answer": words[target],
            "candidates": words, "shapes": shapes, "template": BINDING_TEXT}


def ambiguous_episode(world, k_shot: int, split: str = "test", seed: int = 0) -> dict:
    """2-way ambiguous binding, k_shot examples per word (0-4), a conflicting query: chance (50%) at
    k_shot <= 1 by construction, solvable from 2. Same dict as binding_episode plus "bound"."""
    rng = world.rng(split, "ambiguous", seed, k_shot)
    latent, support, queries = ambiguous_chunks(world, rng, split, k_shot, 1, p_conflict=1.0)
    (qa, answer), words = queries[0], list(latent["words"])
    return {"support": [{"image": world.render(a), "word": w, "attrs": a} for a, w in support],
            "query": {"image": world.render(qa), "attrs": qa}, "answer": answer, "candidates": words,
            "bound": latent["bound"], "template": BINDING_TEXT}


def vqa_set(world, n: int, split: str = "test", seed: int = 0) -> list[dict]:
    """Held-out VQA: [{"image", "question", "answer", "answers" (10), "kind", "attrs"}], kinds in turn.
    Draw support examples from "val" and queries from "test"."""
    out = []
    for i in range(n):
        rng = world.rng(split, "vqa", seed, i)
        a = world.scene(rng, split)
        q = wt.question(a, rng, wt.QUESTION_KINDS[i % len(wt.QUESTION_KINDS)])
        out.append({"image": world.render(a), **q, "attrs": a})
    return out


def caption_set(world, n: int, split: str = "test", seed: int = 0,
                template: str = wt.EVAL_CAPTION_TEMPLATE) -> list[dict]:
    """Held-out captions in one template: [{"image", "caption", "references", "attrs"}]; references
    are the caption plus the same objects listed in other orders (up to 5), for CIDEr-D."""
    out = []
    for i in range(n):
        rng = world.rng(split, "captions", seed, i)
        a = world.scene(rng, split)
        objs = a["objects"]
        shuffled = [[objs[j] for j in rng.permutation(len(objs))] for _ in range(8)]
        refs = [wt.caption(a, template)] + [CAPTION_TEMPLATES[template](o) for o in shuffled]
        out.append({"image": world.render(a), "caption": refs[0], "references": list(dict.fromkeys(refs))[:5],
                    "attrs": a})
    return out


def video_qa_set(world, n: int, split: str = "test", seed: int = 0) -> list[dict]:
    """Held-out video motion questions:
    [{"video", "question", "answer", "answers", "kind", "caption", "attrs"}]."""
    out = []
    for i in range(n):
        rng = world.rng(split, "video_qa", seed, i)
        a = world.video_scene(rng, split)
        q = wt.video_question(a, rng, wt.VIDEO_QUESTION_KINDS[i % 2])
        out.append({"video": world.render(a), **q, "caption": wt.video_caption(a), "attrs": a})
    return out


def heldout_combo_set(world, n: int, split: str = "test", seed: int = 0) -> list[dict]:
    """Images holding a HELDOUT_COMBOS object (never rendered in train), with a question about it
    (its colour or its shape, in turn) and a "full" caption: [{"image", "combo", "caption", "question",
    "answer", "answers", "kind", "attrs"}]."""
    if split == "train":
        raise ValueError("held-out combinations are never rendered in the train split")
    out = []
    for i in range(n):
        rng = world.rng(split, "heldout_combos", seed, i)
        colour, shape = HELDOUT_COMBOS[i % len(HELDOUT_COMBOS)]
        a = world.scene(rng, split, n_objects=int(rng.integers(1, 4)))
        others = [o for o in a["objects"] if o["shape"] != shape]  # keep "the star" unambiguous
        cells = [c for c in range(9) if wt.POSITIONS[c] not in {o["position"] for o in others}]
        target = world.obj(rng, split, shape, cells[int(rng.integers(len(cells)))], colour=colour)
        a["objects"] = sorted(others + [target], key=lambda o: wt.POSITIONS.index(o["position"]))
        if i % 2 == 0:
            q, ans, kind = f"What colour is the {shape}?", colour, "colour"
        else:
            q, ans, kind = f"What shape is at the {target['position']}?", shape, "shape"
        out.append({"image": world.render(a), "combo": [colour, shape], "caption": wt.caption(a, "full"),
                    "question": q, "answer": ans, "answers": wt.answers10(ans, rng), "kind": kind,
                    "attrs": a})
    return out
