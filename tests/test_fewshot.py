"""Few-shot prompting and decoding (issue 7): exact prompt strings and ids, prompts that tokenize like the
training documents, RICES on hand-built features, close-ended scoring from one cached prompt against the
full forward of every sequence, prompt ensembling as a mean over orders, blind prompts as zero pixels, and
decoding from precomputed vision features equal to decoding from pixels."""

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from miniflamingo import fewshot as fs
from miniflamingo.data import document_to_tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def image(value: int) -> np.ndarray:
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), value, dtype=np.uint8)


# ----------------------------------------------------------------------------- prompt strings


def test_caption_prompt_exact(tok):
    a, b, q = image(10), image(20), image(30)
    support = [fs.caption_shot(a, "a red circle"), fs.caption_shot(b, "two blue squares")]
    p = fs.build_prompt(tok, support, fs.caption_shot(q))
    assert tok.decode(p.ids) == ("<image>Output: a red circle<|endofchunk|><image>Output: two blue squares"
                                 "<|endofchunk|><image>Output:")
    e = tok.encode_ordinary
    assert p.ids == ([tok.image_id] + e("Output: a red circle") + [tok.eoc_id] + [tok.image_id]
                     + e("Output: two blue squares") + [tok.eoc_id] + [tok.image_id] + e("Output:"))
    assert [m is x for m, x in zip(p.media, (a, b, q))] == [True] * 3 and len(p.media) == 3


def test_vqa_zero_shot_prompt_has_two_text_only_examples(tok):
    support = fs.text_only([fs.vqa_shot(image(1), "What colour is the star?", "red"),
                            fs.vqa_shot(image(2), "How many shapes are there?", "3")])
    q = image(3)
    p = fs.build_prompt(tok, support, fs.vqa_shot(q, "Where is the ring?"))
    assert tok.decode(p.ids) == ("Question: What colour is the star? Short answer: red<|endofchunk|>"
                                 "Question: How many shapes are there? Short answer: 3<|endofchunk|>"
                                 "<image>Question: Where is the ring? Short answer:")
    assert p.ids.count(tok.image_id) == 1 and len(p.media) == 1 and p.media[0] is q
    e = tok.encode_ordinary
    assert p.ids == (e("Question: What colour is the star? Short answer: red") + [tok.eoc_id]
                     + e("Question: How many shapes are there? Short answer: 3") + [tok.eoc_id]
                     + [tok.image_id] + e("Question: Where is the ring? Short answer:"))


def test_binding_prompt_and_candidates_exact(tok):
    p = fs.build_prompt(tok, [fs.binding_shot(image(1), "dax"), fs.binding_shot(image(2), "wug")],
                        fs.binding_shot(image(3)))
    assert tok.decode(p.ids) == "<image>dax<|endofchunk|><image>wug<|endofchunk|><image>"
    answer = fs.binding_shot(None, "dax").answer
    assert answer == "dax" and fs.answer_ids(tok, answer) == tok.encode_ordinary("dax") + [tok.eoc_id]


def test_prompts_tokenize_like_the_training_documents(tok, world):
    """The support chunks are exactly data.py's tokens of the same document, and prefix + answer tokenize as
    the full chunk text, so a ranked or generated answer is the token sequence training taught."""
    caps = world.caption_set(3, "val")
    qas = world.vqa_set(6, "val") + world.video_qa_set(2, "val")
    ep = world.binding_episode(5, 1, split="val")
    shots = ([fs.caption_shot(c["image"], c["caption"]) for c in caps]
             + [fs.vqa_shot(x.get("image", x.get("video")), x["question"], x["answer"]) for x in qas]
             + [fs.binding_shot(s["image"], s["word"]) for s in ep["support"]])
    for s in shots:
        assert tok.encode_ordinary(s.prefix) + tok.encode_ordinary(s.answer) == tok.encode_ordinary(
            s.prefix + s.answer), s
    doc_ids, doc_media = document_to_tokens([x for s in shots for x in (None, s.prefix + s.answer)],
                                            [x for s in shots for x in (s.media, None)], tok)
    p = fs.build_prompt(tok, shots, fs.caption_shot(caps[0]["image"]))
    assert p.ids[: len(doc_ids)] == doc_ids and all(a is b for a, b in zip(p.media, doc_media))


# ----------------------------------------------------------------------------- support selection


def test_rices_picks_the_most_similar_and_puts_it_last():
    pool = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [100.0, 90.0, 0.0], [0.9, 0.1, 0.0],
                         [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]])
    query = torch.tensor([1.0, 0.05, 0.0])
    # cosine to the query: 0 ~1.0 (0.9988), 3 0.995, 2 0.77 (despite its norm), 5 0.74, 1 0.05, 4 0
    assert fs.rices_support(query, pool, 1) == [0]
    assert fs.rices_support(query, pool, 3) == [2, 3, 0]
    assert fs.rices_support(query * 7, pool, 3) == [2, 3, 0]  # cosine: the query's scale does not matter


def test_random_support_and_permutations():
    rng = np.random.default_rng(0)
    s = fs.random_support(10, 4, rng)
    assert len(set(s)) == 4 and all(0 <= i < 10 for i in s)
    with pytest.raises(ValueError, match="pool of 3"):
        fs.random_support(3, 4, rng)
    assert fs.permutations(0, 3, rng) == [[]]
    assert fs.permutations(2, 3, rng) == [[0, 1], [1, 0]]
    for n, k in [(3, 4), (5, 3), (20, 6)]:
        perms = fs.permutations(n, k, rng)
        assert perms[0] == list(range(n)) and len(perms) == k and len({tuple(p) for p in perms}) == k
        assert all(sorted(p) == list(range(n)) for p in perms)


# ----------------------------------------------------------------------------- close-ended scoring


def full_forward_loglik(model, tok, prompt, answer) -> float:
    """Oracle: the whole sequence through Flamingo.forward, no cache, no batching, pixels encoded here."""
    a = fs.answer_ids(tok, answer)
    ids = torch.tensor([prompt.ids + a])
    with torch.no_grad():
        media, frames = fs.media_batch([prompt.media]) if prompt.media else (None, None)
        logits, _ = model(ids, media, media_frames=frames)
    logp = logits[0].double().log_softmax(-1)  # (L, V)
    P = len(prompt.ids)
    return sum(float(logp[P - 1 + j, t]) for j, t in enumerate(a))


@settings(max_examples=6, deadline=None)
@given(st.data())
def test_cached_scoring_equals_full_forward_of_each_candidate(model, tok, world, data):
    """Prompts of different lengths and media counts (left padding, padded media slots), a text-only
    example, candidates of different token lengths: one cached prompt pass + one batch of candidates
    gives each candidate's log-likelihood as a full forward of prompt + candidate does."""
    n_prompts = data.draw(st.integers(1, 3))
    prompts, cands = [], []
    for b in range(n_prompts):
        ep = world.binding_episode(3, data.draw(st.integers(0, 2)), seed=b)
        support = [fs.binding_shot(s["image"], s["word"]) for s in ep["support"]]
        if data.draw(st.booleans()):
            support = fs.text_only([fs.binding_shot(None, "blick")]) + support
        prompts.append(fs.build_prompt(tok, support, fs.binding_shot(ep["query"]["image"])))
        cands.append([fs.binding_shot(None, w).answer for w in ep["candidates"][:2]] + [" tupekzo."])
    got = fs.score_candidates(model, tok, prompts, cands)
    want = [[full_forward_loglik(model, tok, p, a) for a in cs] for p, cs in zip(prompts, cands)]
    want = torch.tensor(want, dtype=torch.float64)
    diff = (got.double() - want).abs().max().item()
    print(f"cached vs full forward: max |diff| = {diff:.2e}")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"cached scoring != full forward (max diff {diff:.2e})\n{m}")


def test_text_only_prompts_score_and_generate_without_media(model, tok):
    """The LM alone (no media anywhere): as the stand-in text the LM was pretrained on."""
    prompts = [fs.build_prompt(tok, fs.text_only([fs.binding_shot(None, "dax")]), fs.binding_shot(None)),
               fs.build_prompt(tok, [], fs.caption_shot(None))]
    assert fs.encode_prompt_media(model, prompts) is None
    cands = [[" dax.", " wug."], [" a red circle", " two"]]
    want = [[full_forward_loglik(model, tok, p, a) for a in cs] for p, cs in zip(prompts, cands)]
    want = torch.tensor(want)
    torch.testing.assert_close(fs.score_candidates(model, tok, prompts, cands), want, atol=1e-4, rtol=1e-5)
    assert len(fs.generate_answers(model, tok, prompts, max_new_tokens=3)) == 2


def test_ensembling_averages_over_support_orders(model, tok, world):
    eps = [world.binding_episode(2, 2, seed=s) for s in range(2)]
    supports = [[fs.binding_shot(s["image"], s["word"]) for s in e["support"]] for e in eps]
    queries = [fs.binding_shot(e["query"]["image"]) for e in eps]
    cands = [[fs.binding_shot(None, w).answer for w in e["candidates"]] for e in eps]
    got = fs.ensemble_scores(model, tok, supports, queries, cands, n_perm=3, seed=5)
    for e in range(2):
        perms = fs.permutations(4, 3, np.random.default_rng([5, e]))
        assert len(perms) == 3
        prompts = [fs.build_prompt(tok, [supports[e][i] for i in p], queries[e]) for p in perms]
        each = [fs.score_candidates(model, tok, [p], [cands[e]])[0] for p in prompts]
        assert not torch.allclose(each[0], each[1])  # the order matters, so the mean is not trivial
        torch.testing.assert_close(got[e], torch.stack(each).mean(0), atol=1e-4, rtol=1e-5)
    one = fs.ensemble_scores(model, tok, supports, queries, cands, n_perm=1)
    plain = fs.score_candidates(model, tok, [fs.build_prompt(tok, supports[0], queries[0])], [cands[0]])
    torch.testing.assert_close(one[0], plain[0])


# ----------------------------------------------------------------------------- media, blind, decoding


def test_media_batch_layout_and_blind_is_zero_pixels(model, tok, world):
    video = world.video_qa_set(1, "val")[0]["video"]  # (3, H, W, 3)
    a, b = image(255), image(128)
    batch, frames = fs.media_batch([[a], [video, b]])
    assert batch.shape == (2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE) and frames.tolist() == [[1, 0], [3, 1]]
    assert torch.all(batch[0, 0, 0] == 1.0) and torch.all(batch[0, 0, 1:] == 0)  # frames padded with zeros
    assert torch.all(batch[0, 1] == 0)  # an unused slot
    torch.testing.assert_close(batch[1, 1, 0], torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 128 / 255))
    prompts = [fs.Prompt([tok.image_id], [a]), fs.Prompt([tok.image_id, 5, tok.image_id], [video, b])]
    blind = fs.encode_prompt_media(model, prompts, blind=True)
    zeros = model.encode_media(torch.zeros_like(batch), media_frames=frames)  # every media zeroed
    torch.testing.assert_close(blind, zeros, atol=1e-5, rtol=1e-5)
    seeing = fs.encode_prompt_media(model, prompts)
    assert not torch.allclose(seeing, zeros, atol=1e-3)
    # an image's latents do not depend on a video elsewhere in the batch (frame padding is masked)
    alone = fs.encode_prompt_media(model, [prompts[0]])
    torch.testing.assert_close(seeing[0, :1], alone[0], atol=1e-5, rtol=1e-5)


def test_decode_answer_stops_at_endofchunk(tok):
    ids = tok.encode_ordinary(" a red circle") + [tok.eoc_id] + tok.encode_ordinary(" more") + [tok.eot_id]
    assert fs.decode_answer(tok, ids) == "a red circle"
    assert fs.decode_answer(tok, tok.encode_ordinary(" two") + [tok.eot_id, tok.eot_id]) == "two"


def test_generation_from_features_equals_generation_from_pixels(model, tok, world):
    """The evaluation encodes every media once and prompts with its features: same answers as pixels, and
    the same as Flamingo.generate with 3 beams on the raw prompt."""
    caps = world.caption_set(4, "val")
    pixels = [fs.build_prompt(tok, [fs.caption_shot(c["image"], c["caption"]) for c in caps[:2]],
                              fs.caption_shot(caps[i]["image"])) for i in (2, 3)]
    feats = fs.vision_features(model, [m for p in pixels for m in p.media])
    featured = [fs.Prompt(p.ids, feats[3 * i:3 * i + 3]) for i, p in enumerate(pixels)]
    a = fs.generate_answers(model, tok, pixels, max_new_tokens=6)
    assert a == fs.generate_answers(model, tok, featured, max_new_tokens=6)
    out = model.generate([pixels[0].ids], fs.media_batch([pixels[0].media])[0], max_new_tokens=6, num_beams=3)
    assert a[0] == fs.decode_answer(tok, out[0, len(pixels[0].ids):].tolist())
    pooled = fs.pooled(feats)
    assert pooled.shape == (6, model.cfg.vision.d_out)
