"""Lesson 8: the interleaved pipeline and p_next.

What it teaches
- Every training example is an aligned document {texts, images} (paper App. A.3, M3W/OBELICS style);
  an image-text pair is just the document [image, caption]. Tokenising puts `<image>` where each
  media sits and `<|endofchunk|>` (EOC) at the end of the text that belongs to a media.
- Which image a run of text belongs to is a choice: on a web page a caption may come before or after
  its picture. p_next (paper A.3.2) attaches each run to the NEXT image with probability p_next, else to
  the previous one; through phi(t) (lesson 6) that decides which image the text cross-attends to.
- Batches: random windows keeping at most max_media media (paper: 256 tokens, first 5 images), padded,
  media stacked as (B, T, F, 3, H, W), targets -100 where no loss applies. A mixture draws one batch per
  dataset per step, weighted by lambda_m (paper 2.4: 1.0 / 0.2 / 0.2 / 0.03, gradients accumulated).
- Packing (ours, for speed; the paper does not say how it batches): short documents padded to the
  longest of their batch waste most positions, so training puts several side by side in one row.
  `segments` names each position's document, and the model keeps them apart (attention within a
  segment, phi restarting at each), so the loss is the padded batch's.

Paper: App. A.3 (M3W processing, A.3.1 <image>/<EOC>, A.3.2 p_next), section 2.4 (the mixture).
Run: python lessons/08_interleaved_data.py
"""

import numpy as np
import torch

import miniflamingo as mf
from miniflamingo.data import (
    DocumentDataset,
    MixtureSampler,
    Source,
    collate,
    document_to_tokens,
    sample_subsequence,
)
from miniflamingo.world import World
from miniflamingo.xattn import compute_phi

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
tok = mf.Tokenizer.default()
world = World(seed=0)
pictures = [p["image"] for p in world.image_text_pairs(3)]  # uint8 (64, 64, 3) each

# An aligned document: exactly one of texts[i], images[i] is set at each position.
texts = ["three shapes", None, "a red circle", None, "two blue squares", None, "a green star"]
images = [None, pictures[0], None, pictures[1], None, pictures[2], None]
print("document:", [t if t is not None else "<picture>" for t in texts])


def show(ids: list[int]) -> str:
    return tok.decode(ids).replace("<|endofchunk|>", "<EOC>")


def seen_by(ids: list[int], run: str) -> int:
    """Which image (1-based; 0 = none) the text `run` cross-attends to: phi at its first token (lesson 6)."""
    piece = tok.encode_ordinary(run)  # each text entry is encoded on its own, so its ids appear as is
    start = next(i for i in range(len(ids)) if ids[i:i + len(piece)] == piece)
    return int(compute_phi(torch.tensor([ids]), tok.image_id)[0, start])


# ----------------------------------------------------------------------------- 1. placing the images

runs = ["three shapes", "a red circle", "two blue squares", "a green star"]
for p_next in (0.0, 1.0):
    ids, media = document_to_tokens(texts, images, tok, p_next=p_next)
    print(f"\np_next = {p_next}: {show(ids)!r}")
    print("  text run -> image it attends to: " + ", ".join(f"{r!r} -> {seen_by(ids, r)}" for r in runs))
    assert ids.count(tok.image_id) == len(media) == 3
# p_next = 0: each run belongs to the image before it; the first run has none (phi = 0).
# p_next = 1: each run belongs to the image after it; the last run can only look back.
assert [seen_by(document_to_tokens(texts, images, tok, p_next=0.0)[0], r) for r in runs] == [0, 1, 2, 3]
assert [seen_by(document_to_tokens(texts, images, tok, p_next=1.0)[0], r) for r in runs] == [1, 2, 3, 3]

# p_next = 0.5 (the paper's value for web pages): a fresh coin per run and per draw.
rng = np.random.default_rng(0)
draws = [document_to_tokens(texts, images, tok, p_next=0.5, rng=rng)[0] for _ in range(1000)]
for r, prev in zip(runs[1:3], (1, 2)):
    share = np.mean([seen_by(ids, r) == prev + 1 for ids in draws])
    print(f"p_next = 0.5: {r!r} attends to the next image in {share:.1%} of 1000 draws")
    assert abs(share - 0.5) < 0.05

# ----------------------------------------------------------------------------- 2. a batch

doc_row = document_to_tokens(texts, images, tok, p_next=0.0)
pair = world.image_text_pairs(1, split="val")[0]
pair_row = ([tok.image_id] + tok.encode_ordinary(pair["caption"]) + [tok.eoc_id], [pair["image"]])
input_ids, media, targets = collate([doc_row, pair_row], tok, max_media=3)
print(f"\ncollate 2 rows -> input_ids {tuple(input_ids.shape)}, media {tuple(media.shape)} "
      f"(B, T, F, 3, H, W), targets {tuple(targets.shape)}")
print("which media slots hold a picture (row 1 is a pair: slots 1 and 2 are zero padding):",
      (media.flatten(2).abs().sum(-1) > 0).tolist())
print("row 0, input -> target (-100: no loss):")
for t in range(12):
    target = "-100" if targets[0, t] < 0 else repr(tok.decode([targets[0, t].item()]))
    print(f"  {tok.decode([input_ids[0, t].item()])!r:18} -> {target}")
print("  ...")
first_image = int((input_ids[0] == tok.image_id).nonzero()[0])
assert (targets[0, :first_image] == -100).all(), "no loss before the first <image> (phi = 0: pure LM)"
next_is_image = input_ids[0, 1:] == tok.image_id  # target t is input t + 1
assert (targets[0, :-1][next_is_image] == -100).all(), "which image comes next is not predicted"
assert (targets[1, len(pair_row[0]) - 1:] == -100).all(), "no loss on padding"
assert media[1, 1:].abs().sum() == 0

# ----------------------------------------------------------------------------- 3. windows and the mixture

long_ids, long_media = document_to_tokens(texts * 3, images * 3, tok)  # 9 images
window, kept = sample_subsequence(long_ids, long_media, seq_len=40, max_media=2,
                                  rng=np.random.default_rng(1), image_id=tok.image_id)
print(f"\na 9-image document, a random 40-token window keeping at most 2 media: "
      f"{window.count(tok.image_id)} <image> tokens, {len(kept)} media")
assert window.count(tok.image_id) == len(kept) <= 2 and len(window) <= 41

docs = DocumentDataset.from_documents(world.documents(8), tok)
image_pairs = DocumentDataset.from_pairs(world.image_text_pairs(8), tok)
video_pairs = DocumentDataset.from_pairs(world.video_text_pairs(4), tok)
sources = [  # paper 2.4: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03; here documents, pairs, videos
    Source("documents", docs, weight=1.0, batch_size=2, seq_len=64),
    Source("image-text", image_pairs, weight=0.2, batch_size=4, seq_len=32),
    Source("video-text", video_pairs, weight=0.2, batch_size=2, seq_len=32),
]
print("\none mixture step: a batch from every dataset, loss = sum of lambda_m * NLL_m")
for b in MixtureSampler(sources, seed=0).batch(0):
    print(f"  {b.name:11} lambda {b.weight:3.1f}: input_ids {tuple(b.input_ids.shape)}, "
          f"media {tuple(b.media.shape)}")
    assert b.media.shape[2] == (world.video_frames if b.name == "video-text" else 1)

# ----------------------------------------------------------------------------- 4. packing

rows = [docs.row(i, np.random.default_rng(i), 256, 8) for i in range(8)]  # 8 world documents
x, media, y, frames = collate(rows, tok, return_frames=True)
px, pmedia, py, pframes, segments = collate(rows, tok, return_frames=True, pack=True)
lengths = [len(ids) - 1 for ids, _ in rows]
print(f"\n8 documents of {min(lengths)}-{max(lengths)} tokens: padded {tuple(x.shape)}, "
      f"{1 - sum(lengths) / x.numel():.0%} of it padding; packed {tuple(px.shape)}, "
      f"{1 - sum(lengths) / px.numel():.0%} padding")
held = [sorted(set(row.tolist()) - {-1}) for row in segments]  # -1 marks padding
print(f"  the documents each packed row holds (its segments): {held}")
assert px.numel() < x.numel() and (segments >= 0).sum() == sum(lengths)
torch.manual_seed(0)
model = mf.Flamingo(mf.FlamingoConfig.preset("tiny"))
with torch.no_grad():  # opened gates, as after training, so that the images matter
    for layer in model.xattn:
        layer.attn_gate.fill_(0.5)
        layer.ff_gate.fill_(0.5)
    _, loss = model(x, media, y, media_frames=frames)
    _, packed_loss = model(px, pmedia, py, media_frames=pframes, segments=segments)
print(f"  loss padded {loss.item():.6f}, packed {packed_loss.item():.6f}: the same, to rounding")
assert torch.allclose(loss, packed_loss, atol=1e-5)
print("\nOK: <image> marks each media, p_next picks the image each text attends to, batches mask their loss, "
      "packing saves the padding.")
