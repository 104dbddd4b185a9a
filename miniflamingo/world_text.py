"""Words of the synthetic world: captions, questions with VQA-style answers, made-up words, stand-ins.

Notable features
- Captions are a pure function of (attrs, template); objects are always listed in reading order,
  so a document that fixes its template makes every later caption predictable from the image.
- Questions come with 10 answers, mostly the canonical one plus a few acceptable variants
  (VQA-style, so `vqa_accuracy`'s min(#matches / 3, 1) has something to average over).
- Made-up words: CVC and CV-CVC syllables ("dax", "tupek"), none of them a word the world uses.
- `stand_in(attrs)`: the words that replace an image in the LM's text corpus. They compose
  ("red circle" = red + circle), which is what let binding reach unseen shapes (issue 3 findings).
"""

from __future__ import annotations

import itertools

import numpy as np

from miniflamingo.world_render import COLOURS, NOVEL_SHAPES, SHAPES

# 3x3 grid cells, row-major (reading order)
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
             "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS = ("left", "right", "up", "down")
# Binding chunks, documents and eval alike: the made-up word right after its image, `<image>dax<|endofchunk|>`
# (the drill form). Frozen's "This is a dax." puts three tokens between the image and its word; our
# 2x128 LM did not learn to bind through them (text-only 5-way probe 0.22 after 1500 steps of 32 x 128
# tokens), while with the word right after its stand-in it reached 1.00 on drills and 0.76 on the full mix.
BINDING_TEXT = "{word}"
CAPTION_TEXT = "Output: {caption}"  # DESIGN.md 6: <image>Output: {caption}<|endofchunk|>
QA_TEXT = "Question: {question} Short answer: {answer}"  # as in <image>Question: {q} Short answer: {a}

SYNONYMS = {  # acceptable variants that sometimes appear among the 10 answers
    "circle": ["disc", "round"], "square": ["box"], "cross": ["plus"], "diamond": ["rhombus"],
    "ring": ["donut"], "rectangle": ["bar"], "purple": ["violet"], "small": ["little", "tiny"],
    "large": ["big"], "top left": ["upper left"], "top right": ["upper right"], "top": ["top middle"],
    "bottom": ["bottom middle"], "centre": ["middle", "center"], "bottom left": ["lower left"],
    "bottom right": ["lower right"], "grows": ["gets bigger"], "shrinks": ["gets smaller"],
    "grow": ["grows"], "shrink": ["shrinks"], "up": ["upward"], "down": ["downward"],
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def count_word(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


# ----------------------------------------------------------------------------- captions


def _obj(o: dict, size: bool = False, position: bool = False) -> str:
    words = (o["size"] + " " if size else "") + o["colour"] + " " + o["shape"]
    return article(words) + " " + words + (" at the " + o["position"] if position else "")


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _grouped(objs: list[dict]) -> str:
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o["colour"], o["shape"])] = groups.get((o["colour"], o["shape"]), 0) + 1
    return _and([f"{count_word(n)} {c} {plural(s) if n > 1 else s}" for (c, s), n in groups.items()])


CAPTION_TEMPLATES = {  # name -> objects (reading order) -> caption; a document keeps one template
    "full": lambda objs: _and([_obj(o, size=True, position=True) for o in objs]),
    "plain": lambda objs: _and([_obj(o) for o in objs]),
    "sizes": lambda objs: _and([_obj(o, size=True) for o in objs]),
    "there": lambda objs: f"there {'is' if len(objs) == 1 else 'are'} "
             + _and([_obj(o, position=True) for o in objs]),
    "count": lambda objs: f"{count_word(len(objs))} shape{'s' * (len(objs) > 1)}: "
             + _and([_obj(o) for o in objs]),
    "grid": lambda objs: "; ".join(f"{o['position']}: {o['colour']} {o['shape']}" for o in objs),
    "grouped": _grouped,
}
EVAL_CAPTION_TEMPLATE = "full"  # held-out captioning uses this one: it names every attribute


def caption(attrs: dict, template: str = "full") -> str:
    if template not in CAPTION_TEMPLATES:
        raise ValueError(f"unknown caption template {template!r}; choose from {list(CAPTION_TEMPLATES)}")
    return CAPTION_TEMPLATES[template](attrs["objects"])


def video_caption(attrs: dict, template: str = "event") -> str:
    """Template "event": "a red circle moves left"; "full" adds "while a pink ring stays still"."""
    ev, objs = attrs["event"], attrs["objects"]
    o = objs[ev["object"]]
    main = f"{article(o['colour'])} {o['colour']} {o['shape']} {event_phrase(ev)}"
    if template == "event" or len(objs) == 1:
        return main
    others = [_obj(o) for i, o in enumerate(objs) if i != ev["object"]]
    return main + " while " + _and(others) + (" stays still" if len(others) == 1 else " stay still")


def event_phrase(ev: dict) -> str:
    if ev["kind"] == "move":
        return "moves " + ev["direction"]
    if ev["kind"] == "colour":
        return "turns " + ev["to"]
    return ev["kind"]  # "grows" / "shrinks"


# ----------------------------------------------------------------------------- questions


def answers10(answer: str, rng: np.random.Generator) -> list[str]:
    """VQA-style: 10 human answers, mostly the canonical one, 0-2 acceptable variants."""
    variants = SYNONYMS.get(answer, [])
    if answer.isdigit():
        variants = [count_word(int(answer))]
    k = int(rng.integers(0, 3)) if variants else 0
    return [answer] * (10 - k) + [variants[int(rng.integers(len(variants)))] for _ in range(k)]


QUESTION_KINDS = ("colour", "shape", "count", "position", "size", "yesno")


def question(attrs: dict, rng: np.random.Generator, kind: str | None = None,
             forbidden: frozenset = frozenset()) -> dict:
    """A question about an image: {"kind", "question", "answer", "answers" (10)}. `forbidden` lists
    (colour, shape) pairs a yes/no question must not mention (held-out combinations in "train")."""
    objs = attrs["objects"]
    kind = kind or QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    o = objs[int(rng.integers(len(objs)))]
    same_shape = sum(x["shape"] == o["shape"] for x in objs)
    same_pair = sum((x["shape"], x["colour"]) == (o["shape"], o["colour"]) for x in objs)
    where = f"the {o['shape']}" if same_shape == 1 else f"the shape at the {o['position']}"
    if kind == "colour":
        q, a = f"What colour is {where}?", o["colour"]
    elif kind == "shape":
        q, a = f"What shape is at the {o['position']}?", o["shape"]
    elif kind == "count":
        r = rng.integers(3)
        if r == 0:
            q, a = "How many shapes are there?", len(objs)
        elif r == 1:
            q, a = f"How many {plural(o['shape'])} are there?", same_shape
        else:
            q, a = f"How many {o['colour']} shapes are there?", sum(x["colour"] == o["colour"] for x in objs)
        a = str(a)
    elif kind in ("position", "size"):
        name = f"the {o['colour']} {o['shape']}"
        if same_pair > 1:
            name = f"the {o['shape']} at the {o['position']}"
        if kind == "position" and same_pair == 1:
            q, a = f"Where is {name}?", o["position"]
        else:
            q, a = f"Is {name} small or large?", o["size"]
    elif kind == "yesno":
        present = {(x["colour"], x["shape"]) for x in objs}
        if rng.random() < 0.5:
            c, s = o["colour"], o["shape"]
        else:
            absent = [p for p in itertools.product(COLOURS, SHAPES) if p not in present | forbidden]
            c, s = absent[int(rng.integers(len(absent)))]
        q, a = f"Is there {article(c)} {c} {s}?", "yes" if (c, s) in present else "no"
    else:
        raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")
    return {"kind": kind, "question": q, "answer": a, "answers": answers10(a, rng)}


VIDEO_QUESTION_KINDS = ("what", "detail")


def video_question(attrs: dict, rng: np.random.Generator, kind: str | None = None) -> dict:
    """Motion questions: "What does the red circle do?" -> "moves left"; or the event's detail:
    "Which way does the red circle move?" -> "left", "What colour does ... turn?", "Does ... grow or
    shrink?" -> "grow"."""
    ev = attrs["event"]
    o = attrs["objects"][ev["object"]]
    name = f"the {o['colour']} {o['shape']}"
    kind = kind or VIDEO_QUESTION_KINDS[int(rng.integers(2))]
    if kind == "what":
        q, a = f"What does {name} do?", event_phrase(ev)
    elif ev["kind"] == "move":
        q, a = f"Which way does {name} move?", ev["direction"]
    elif ev["kind"] == "colour":
        q, a = f"What colour does {name} turn?", ev["to"]
    else:
        q, a = f"Does {name} grow or shrink?", ev["kind"][:-1]  # "grow" / "shrink"
    return {"kind": "motion_" + kind, "question": q, "answer": a, "answers": answers10(a, rng)}


# ----------------------------------------------------------------------------- made-up words


_ONSETS = list("bdfgklmnprstvz")
_VOWELS = list("aeiou")
_CODAS = list("bdgklmnprstx")


# Real words a made-up word must not be: the world's own words and common English words that the
# syllable patterns can spell (no dictionary ships with the project, so this list is written out).
_ENGLISH = """
bad bag ban bar bat bed beg bet bid big bin bit bob bog box bud bug bum bun bus but dab dad dam den
dig dim din dip dog dot dub dug fab fad fan far fat fed fib fig fin fit fix fog fox fun fur gab gag
gal gap gas gel get gig gin god got gum gun gut kid kin kit lab lad lag lap led leg let lid lip lit
lob log lot lug mad man map mat men met mid mix mob mom mop mud mug mum nab nag nap net nil nip nod
nor not nun nut pad pal pan par pat peg pen pep per pet pig pin pit pod pop pot pub pun pup put rag
ram ran rap rat red rib rid rig rim rip rob rod rot rub rug rum run rut sad sag sap sat set sex sip
sir sit six sob sod son sub sum sun sup tab tag tan tap tar tax ten tin tip top tot tub tug tun vat
vet vex zip basis bonus lemon melon robin robot solid rapid vivid tulip timid minus virus panel
vomit salad sonar lunar radar kebab focus motel model modem nomad pedal petal rebel relax remix
denim devil fatal final metal moral mural naval navel novel rival rural total tumor sedan satin
tenor visor demon lemur lotus venus tutor vapor valid token topaz gamut sinus bogus rumor bison
rotor meter fever lever never sever river liver tiger super paper lager later bagel label level
linen limit debut begun began bikes baker biker diner diver duvet fiber gamer mater mover navel
pilot polar pupil radon ramen refer rider ruler sober sonic tapas timer toxic tuber vital zebra
licit livid lurid mimic manor medal navel tonal tidal venom vigil""".split()


def _world_words() -> set[str]:
    text = " ".join(
        [
            *POSITIONS,
            *NUMBERS,
            *DIRECTIONS,
            *COLOURS,
            *SHAPES,
            *NOVEL_SHAPES,
            *_ENGLISH,
            *itertools.chain(*SYNONYMS.values()),
            BINDING_TEXT,
            CAPTION_TEXT,
            QA_TEXT,
            "a an and are at is it of on the this what where how many yes no does do turn turns grow"
            " grows shrink move moves still stays while",
        ]
    )
    return set(text.lower().replace(".", " ").replace(":", " ").replace("?", " ").split())


def word_pool() -> list[str]:
    """All made-up words: CVC ("dax") and CV-CVC ("tupek"), minus any word the world itself uses."""
    cvc = ["".join(p) for p in itertools.product(_ONSETS, _VOWELS, _CODAS)]
    cv = ["".join(p) for p in itertools.product(_ONSETS, _VOWELS)]
    taken = _world_words()
    return [w for w in cvc + [a + b for a in cv for b in cvc] if w not in taken]


_POOL: list[str] = []


def made_up_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct made-up words, fresh for each document or episode (about 60k to draw from)."""
    if not _POOL:
        _POOL.extend(word_pool())
    idx = rng.choice(len(_POOL), size=n, replace=False)
    return [_POOL[i] for i in idx]


def vector_words(rng: np.random.Generator, n: int) -> list[str]:
    """Arbitrary symbols ("q7v", "zk2") for LM drills whose image slots carry random "vectors":
    the LM must learn to match any token pattern, not a fixed set of shape words (issue 3 finding 1)."""
    alphabet = np.array(list("bcdfghjklmnpqrstvwxz0123456789"))
    return ["".join(alphabet[rng.integers(len(alphabet), size=int(rng.integers(2, 4)))]) for _ in range(n)]


# ----------------------------------------------------------------------------- stand-ins


def stand_in(attrs: dict) -> str:
    """The words that replace an image (or video) in the LM corpus: "red circle", "red circle ,
    blue square", "red circle moves left". Separate words, so their embeddings compose."""
    if "event" in attrs:
        o = attrs["objects"][attrs["event"]["object"]]
        return f"{o['colour']} {o['shape']} {event_phrase(attrs['event'])}"
    return " , ".join(f"{o['colour']} {o['shape']}" for o in attrs["objects"])
