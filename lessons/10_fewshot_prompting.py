"""Lesson 10: few-shot prompting, RICES and the few-shot curve.

What it teaches
- A few-shot prompt is just an interleaved document (paper 2.5, App. A.2): each support example is a
  chunk `<image>{text}<|endofchunk|>` and the query is `<image>{prefix}`, for the model to continue.
  No weights change; "learning" from the examples happens in the forward pass.
- Zero-shot prompts still carry two TEXT-ONLY examples (the task's format without images), so the model
  knows what to write (App. A.2).
- Open-ended answers are generated (beam search, 3 beams); close-ended ones are ranked: each candidate's
  log-likelihood after the same prompt, whose media are encoded once (fewshot.score_candidates).
- RICES (Retrieval-based In-Context Example Selection, App. A.2): pick the support examples whose frozen
  vision features are most cosine-similar to the query's, and put the most similar LAST, next to the
  query. With a contrastively pretrained encoder, similar features mean similar content: here the
  support shares the query's colour far more often than random support does.
- The few-shot curve: metric against number of shots, for each task, with a blind row (media zeroed).
  It needs a trained model: the demo's, if you have run `python -m miniflamingo demo` (runs/demo).

Setup, stated plainly. The vision encoder is the tiny NFNet pretrained here contrastively for 120 steps
on 2000 of the world's image-text pairs (about 45 s; the demo trains 1100 steps of 64 on 40000), enough for
colour, not yet for shape. The prompts are shown with an untrained Flamingo: their token layout does not
depend on training.

Paper: section 2.5 (few-shot in-context learning), 3.1 (few-shot results, Fig. 2), App. A.2 (prompts,
zero-shot with two text-only examples, RICES, beam search, ranking close-ended answers).
Run: python lessons/10_fewshot_prompting.py [--run runs/demo]  (saves runs/lessons/10_fewshot.png if a
trained run's eval.json is there); --quick: 40 pretraining steps and fewer queries (the test)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _plots import pyplot  # lessons/_plots.py: matplotlib if installed

import miniflamingo as mf
from miniflamingo import fewshot as fs
from miniflamingo import pretrain_vision
from miniflamingo.trainutil import load_checkpoint
from miniflamingo.world import World

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", default="runs/demo", help="a trained run, for the few-shot curve (optional)")
ap.add_argument("--quick", action="store_true", help="fewer pretraining steps and queries (the test)")
args = ap.parse_args()
torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)
t_start = time.perf_counter()
tok = mf.Tokenizer.default()
cfg = mf.FlamingoConfig.preset("tiny")
world = World(seed=0)
model = mf.Flamingo(cfg).eval()

# ----------------------------------------------------------------------------- 1. prompts are documents

vqa = world.vqa_set(3, "val")
query = world.vqa_set(1, "test")[0]
support = [fs.vqa_shot(x["image"], x["question"], x["answer"]) for x in vqa[:2]]
prompt = fs.build_prompt(tok, support, fs.vqa_shot(query["image"], query["question"]))
shown = tok.decode(prompt.ids).replace("<|endofchunk|>", "<|endofchunk|>\n  ")
print("2-shot VQA prompt, as the model reads it:\n  " + shown)
assert prompt.ids.count(tok.image_id) == len(prompt.media) == 3, "one <image> per support example and query"
assert prompt.ids.count(tok.eoc_id) == 2, "every support chunk ends with <|endofchunk|>; the query does not"
assert tok.decode(prompt.ids).endswith("Short answer:"), "the model continues the query's prefix"

zero = fs.build_prompt(tok, fs.text_only(support), fs.vqa_shot(query["image"], query["question"]))
print("\n0-shot prompt (two text-only examples, then the query):\n  " + tok.decode(zero.ids))
assert zero.ids.count(tok.image_id) == 1, "zero-shot: only the query has an image"

ep = world.binding_episode(2, 1, split="test", seed=0)
shots = [fs.binding_shot(s["image"], s["word"]) for s in ep["support"]]
bind = fs.build_prompt(tok, shots, fs.binding_shot(ep["query"]["image"]))
print(f"\n2-way 1-shot binding prompt: {tok.decode(bind.ids)}")
answers = [fs.binding_shot(None, w).answer for w in ep["candidates"]]
print(f"  ranked candidates: {answers}, each followed by <|endofchunk|>")
scores = fs.score_candidates(model, tok, [bind], [answers])
print(f"  log-likelihoods (untrained model): {scores[0].tolist()}")
assert scores.shape == (1, 2) and torch.isfinite(scores).all()

# ----------------------------------------------------------------------------- 2. RICES

steps, n_queries = (40, 40) if args.quick else (120, 120)
with tempfile.TemporaryDirectory() as tmp:
    print(f"\npretraining the vision encoder contrastively for {steps} steps ...", flush=True)
    pretrain_vision.main(["--run", tmp, "--steps", str(steps), "--n-train", "2000", "--n-eval", "64",
                          "--batch-size", "64", "--eval-every", str(steps)])
    model.load_pretrained(vision_state=load_checkpoint(Path(tmp) / "vision.pt")["model"])


def single_objects(items):
    return [x for x in items if len(x["attrs"]["objects"]) == 1]


pool = single_objects(world.caption_set(6 * n_queries, "val"))
queries = single_objects(world.caption_set(4 * n_queries, "test"))[:n_queries]
pool_f = fs.pooled(fs.vision_features(model, [x["image"] for x in pool]))  # (P, Dv)
query_f = fs.pooled(fs.vision_features(model, [x["image"] for x in queries]))  # (Q, Dv)


def colour(x):
    return x["attrs"]["objects"][0]["colour"]


rng = np.random.default_rng(0)
same = {"RICES": [], "random": []}
for i, q in enumerate(queries):
    picked = fs.rices_support(query_f[i], pool_f, 4)
    sims = torch.nn.functional.cosine_similarity(pool_f[picked], query_f[i][None]).tolist()
    assert sims == sorted(sims), "RICES puts the most similar example last, next to the query"
    same["RICES"] += [colour(pool[j]) == colour(q) for j in picked]
    same["random"] += [colour(pool[j]) == colour(q) for j in fs.random_support(len(pool), 4, rng)]
rate = {k: float(np.mean(v)) for k, v in same.items()}
print(f"support images sharing the query's colour, 4 shots x {len(queries)} queries: "
      f"RICES {rate['RICES']:.0%}, random {rate['random']:.0%} (1 in 8 colours: ~12%)")
q0 = queries[0]
print(f"  e.g. query '{q0['caption']}' -> RICES support, least to most similar: "
      f"{[pool[j]['caption'] for j in fs.rices_support(query_f[0], pool_f, 4)]}")
assert rate["RICES"] > 2 * rate["random"], "RICES finds examples that look like the query"

# ----------------------------------------------------------------------------- 3. the few-shot curve

results_path = Path(args.run) / "eval.json"
if results_path.is_file():
    results = json.loads(results_path.read_text())["tasks"]
    print(f"\nthe few-shot curve of {results_path} (metric x100 by shots; blind: media zeroed):")
    for name, r in results.items():
        row = " ".join(f"{k}:{100 * v:6.1f}" for k, v in r["shots"].items() if v is not None)
        blind = " ".join(f"{k}:{100 * v:6.1f}" for k, v in r["blind"].items() if v is not None)
        print(f"  {name:15s} {row}\n  {'  blind':15s} {blind}")
    out = Path("runs/lessons/10_fewshot.png")
    plt = pyplot(out)
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, r in results.items():
            ax = axes[0] if r["metric"] == "accuracy" else axes[1]
            xs = [int(k) for k, v in r["shots"].items() if v is not None]
            ax.plot(xs, [100 * r["shots"][str(k)] for k in xs], marker="o", label=name)
        axes[0].set(xlabel="examples per class (k)", ylabel="accuracy x100", title="binding")
        axes[1].set(xlabel="shots", ylabel="metric x100", title="open-ended", yscale="log")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out)
        print(f"saved {out}")
else:
    print(f"\nno {results_path}: run `python -m miniflamingo demo` (9-13.5 minutes on 2 cores) for a trained "
          "model, then this lesson again to see its few-shot curve")
print(f"\nOK ({time.perf_counter() - t_start:.0f} s): prompts are documents, zero-shot has two text-only "
      "examples, RICES picks look-alikes and puts the closest last.")
