"""Lesson 12: why the LM must copy.

What it teaches
- In a few-shot binding prompt, `<image>dax<|endofchunk|><image>wug<|endofchunk|><image>` + candidate,
  the answer depends on which SUPPORT image looks like the QUERY image. Cross-attention cannot compare
  them: each text token sees only the image just before it (phi, paper 2.3), so the query's tokens read
  the query image alone. Shown below: change every support image and the first cross-attention layer's
  output at the query's tokens stays exactly the same.
- So matching images across a document is the frozen LM's job: its self-attention has to find the
  earlier chunk whose visual tokens resemble the query's and copy the word after it (an induction head).
  Flamingo's training freezes the LM (paper 2.2, Table 3 viii), so the LM must bring that skill along.
- The experiment: the same Flamingo training (the demo's recipe) on two frozen LMs. One is the demo's,
  pretrained on text with in-context binding (drills: an image slot, then its word, repeated; DESIGN.md
  5). The other is pretrained on the same world's captions and questions with no in-context binding
  (`pretrain-lm --families pairs`). Both caption (4-shot CIDEr-D 571 and 604, measured); only the first
  binds (5-way 1-shot 85% against 17.5%, chance 20%).
- Captioning needs only each token's own image, which cross-attention provides. (With the paper's
  learning rate on the gates, which open slowly here, the second Flamingo captioned far worse, 116
  against 503; a likely reason: on an LM that cannot predict the binding documents' words, 60% of the
  training documents are mostly noise to it. The demo trains the gates at 20x; lesson 13.)

Setup, stated plainly. The full form needs the demo's run (vision.pt, lm.pt, flamingo.pt, eval.json:
`python -m miniflamingo demo`); it pretrains the second LM (the demo's recipe, 900 steps) and trains a
Flamingo on it (1300 steps), about 7 minutes on 2 cores. --quick uses random parts and a few steps: it
checks the mechanism of part 1 and that the pipeline of part 2 runs, not what it learns.

Paper: section 2.3 (each token attends to one image; the LM's self-attention carries earlier images),
2.5 and 3.1 (few-shot learning), Table 3 (viii) (the frozen LM).
Run: python lessons/12_why_the_lm_must_copy.py [--run runs/demo]  (writes runs/lessons/12_no_copy/);
--quick: the test
"""

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import miniflamingo as mf
from miniflamingo import demo, evaluate, pretrain_lm, train
from miniflamingo.trainutil import save_checkpoint
from miniflamingo.world import World
from miniflamingo.world_text import BINDING_TEXT
from miniflamingo.xattn import compute_phi

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", default="runs/demo", help="the demo's run folder")
ap.add_argument("--out", default="runs/lessons/12_no_copy", help="where the second LM and Flamingo go")
ap.add_argument("--quick", action="store_true", help="random parts and a few steps (the test)")
args = ap.parse_args()
torch.manual_seed(0)
t_start = time.perf_counter()
tok = mf.Tokenizer.default()
cfg = mf.FlamingoConfig.preset("tiny")
world = World(seed=0)

# ----------------------------------------------------------------------------- 1. what xattn can see

print("1. A 3-way binding prompt with a candidate answer, and what the first cross-attention layer sees")
episode = world.binding_episode(3, 1, split="val", seed=0)
text = "".join(f"<image>{BINDING_TEXT.format(word=s['word'])}<|endofchunk|>" for s in episode["support"])
text += f"<image>{BINDING_TEXT.format(word=episode['answer'])}<|endofchunk|>"  # the query, a candidate
ids = torch.tensor([tok.encode(text)])  # (1, L)
print(f"   prompt: {text!r} (the query's word: {episode['answer']!r})")
model = mf.Flamingo(cfg).eval()
images = [s["image"] for s in episode["support"]] + [episode["query"]["image"]]
media = torch.stack([torch.as_tensor(im).permute(2, 0, 1).float() / 255 for im in images])  # (T, 3, H, W)
media = media[None, :, None]  # (1, T, 1, 3, H, W)
feats = model.encode_vision(media)  # (1, T, 1, S, Dv)
phi = compute_phi(ids, cfg.image_id)  # (1, L)
query = phi[0] == len(images)  # the query's tokens: phi(t) = T, the last image
print(f"   phi(t): {phi[0].tolist()}; the query's tokens are the last {int(query.sum())}")
other = feats.clone()
other[:, :-1] = model.encode_vision(torch.rand_like(media[:, :-1]))  # every support image replaced
layer = model.xattn[0]
with torch.no_grad():
    layer.attn_gate.fill_(1.0), layer.ff_gate.fill_(1.0)  # opened: an untrained layer would be the identity
    x = model.lm.wte(ids)  # the layer's input at block 0: token embeddings
    y, y_other = (layer(x, model.encode_media(vision_features=f), phi)[0]
                  for f in (feats, other))  # (L, D) each
same_at_query = torch.equal(y[query], y_other[query])
changed_elsewhere = not torch.allclose(y[~query & (phi[0] > 0)], y_other[~query & (phi[0] > 0)])
print(f"   support images replaced: xattn output at the query's tokens unchanged: {same_at_query}; "
      f"at the support's tokens changed: {changed_elsewhere}")
assert same_at_query and changed_elsewhere  # paper 2.3: a token sees only its own image

# ----------------------------------------------------------------------------- 2. two LMs, one recipe

out = Path(args.out)
tmp = None
if args.quick:  # random stage-1 parts and a demo stand-in: the pipeline only
    tmp = tempfile.TemporaryDirectory()
    run = Path(tmp.name) / "demo"
    run.mkdir()
    save_checkpoint(run / "vision.pt", {"model": model.vision.state_dict(), "config": asdict(cfg.vision)})
    out = Path(tmp.name) / "no_copy"
    lm_budget = ["--steps", "4", "--docs", "100", "--val-docs", "10", "--batch-size", "4",
                 "--eval-batches", "1"]
    train_budget = ["--steps", "3", "--docs", "40", "--pairs", "20", "--videos", "8", "--batch-size", "4",
                    "--pair-batch-size", "4", "--video-batch-size", "2", "--log-every", "1"]
    episodes = "1"
else:
    run = Path(args.run)
    missing = [p for p in ("vision.pt", "lm_log.jsonl", "eval.json") if not (run / p).is_file()]
    if missing:
        raise SystemExit(f"lesson 12: {run / missing[0]} not found; run `python -m miniflamingo demo` "
                         f"first (or pass --run with the demo's folder)")
    lm_budget = [*demo.FULL["lm"], "--threads", "1"]  # the demo's recipe; the LM is as fast on 1 thread
    train_budget = [*demo.FULL["train"], "--log-every", "100"]
    episodes = "40"
stamp = json.dumps({"run": str(run.resolve()), "lm": lm_budget, "train": train_budget})  # what out holds
if (out / "source.json").is_file() and (out / "source.json").read_text() != stamp:
    shutil.rmtree(out)  # made from other parts or budgets: start over rather than resume it
out.mkdir(parents=True, exist_ok=True)
(out / "source.json").write_text(stamp)
TASKS = {"captioning": "4", "binding_2way": "1", "binding_5way": "1"}  # task -> shots (binding: per class)

print(f"\n2. Pretraining an LM on text with no in-context binding (captions and questions of unrelated "
      f"images), then training Flamingo on it with the demo's recipe, in {out}")
if not (out / "lm.pt").is_file():
    assert pretrain_lm.main(["--run", str(out), "--families", "pairs", "--seed", "0", *lm_budget]) == 0
if not (out / "flamingo.pt").is_file():
    assert train.main(["--run", str(out), "--vision", str(run / "vision.pt"), "--lm", str(out / "lm.pt"),
                       "--seed", "0", *train_budget]) == 0
if not (out / "eval.json").is_file():
    assert evaluate.main(["--run", str(out), "--shots", "4", "--k", "1", "--episodes", episodes,
                          "--tasks", ",".join(TASKS)]) == 0


def probe(folder: Path) -> float:
    """The LM's text-only 5-way binding probe, as pretrain-lm logged it last (lm_corpus.binding_probe)."""
    rows = [json.loads(line) for line in (folder / "lm_log.jsonl").read_text().splitlines()]
    return [r["binding_probe"] for r in rows if "binding_probe" in r][-1]


def results(folder: Path, row: str = "shots") -> dict:
    """The metrics of TASKS (x100) from the run's eval.json; row "blind" for the media-zeroed ones."""
    tasks = json.loads((folder / "eval.json").read_text())["tasks"]
    return {t: 100 * tasks[t][row][s] for t, s in TASKS.items()}


# ----------------------------------------------------------------------------- 3. the comparison

rows = {"no-copy LM (pairs only)": (probe(out), results(out))}
if not args.quick:
    rows = {"demo LM (binding drills)": (probe(run), results(run)), **rows}
print("\n3. The same Flamingo training on two frozen LMs (x100; chance: 50 2-way, 20 5-way)")
print(f"   {'frozen LM':26s} {'LM probe':>8s} {'captions':>9s} {'2-way':>6s} {'5-way':>6s}")
for name, (p, r) in rows.items():
    print(f"   {name:26s} {100 * p:8.0f} {r['captioning']:9.1f} {r['binding_2way']:6.1f} "
          f"{r['binding_5way']:6.1f}")
if not args.quick:
    (p_copy, r_copy), (p_none, r_none) = rows.values()
    # The claims, with room for 40-episode noise (a binomial standard error of about 6 points at 20%):
    assert p_none < 0.4 < p_copy, "only the drilled LM binds words to image slots in text"
    assert r_none["binding_5way"] < 40 < r_copy["binding_5way"], "only its Flamingo binds"
    assert r_none["binding_2way"] < 65 < r_copy["binding_2way"]
    blind = results(out, "blind")["captioning"]
    print(f"   no-copy Flamingo's captions with media zeroed: {blind:.1f}")
    assert r_none["captioning"] > max(blind + 100, 0.8 * r_copy["captioning"]), "both Flamingos caption"
    print("   Captions need only each token's own image, which cross-attention gives; binding needs the LM "
          "to match images across the document, which only the drilled LM learned.")
if tmp is not None:
    tmp.cleanup()
print(f"\nlesson 12 done in {time.perf_counter() - t_start:.0f} s")
