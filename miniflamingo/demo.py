"""`python -m miniflamingo demo`: the whole paper, small, on a laptop CPU in about ten minutes.

    python -m miniflamingo demo                 # everything under runs/demo/
    python -m miniflamingo demo --quick         # the same pipeline in about a minute (a smoke test)
    python -m miniflamingo demo --run DIR       # elsewhere; a rerun resumes where it stopped

Notable features
- The stages of DESIGN.md 4, each also a command of its own: contrastive pretraining of the vision
  encoder (`pretrain-vision`), next-token pretraining of the LM (`pretrain-lm`), Flamingo training with
  both frozen (`train`), then few-shot evaluation (`eval`) on held-out images, combinations and shapes.
- Before Flamingo training it checks, and prints, that the frozen LM copies in context from text alone
  (binding drills with fresh made-up words): cross-attention shows each token only its own image, so
  matching a query image to an earlier one is the LM's job (DESIGN.md 5). If the LM cannot, it says so.
- Stages are cached: a finished stage is recorded in RUN/stages.json and skipped on a rerun; an
  interrupted stage resumes from its own checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from miniflamingo import evaluate, pretrain_lm, pretrain_vision, train
from miniflamingo.config import FlamingoConfig
from miniflamingo.lm import GPT
from miniflamingo.tokenizer import Tokenizer
from miniflamingo.trainutil import load_checkpoint
from miniflamingo.world import default_world
from miniflamingo.world_text import BINDING_TEXT, stand_in

# Budgets for 2 CPU cores. --quick keeps every stage but shrinks it to seconds: it checks that the
# pipeline runs, not that it learns.
FULL = {
    "vision": ["--steps", "400"],
    "lm": ["--steps", "400"],
    "train": ["--steps", "900", "--lr", "2e-3"],
    "eval": ["--episodes", "40"],
}
QUICK = {
    "vision": ["--steps", "4", "--n-train", "256", "--n-eval", "64", "--batch-size", "32"],
    "lm": ["--steps", "4", "--docs", "100", "--val-docs", "10", "--batch-size", "4", "--eval-batches", "1"],
    "train": ["--steps", "3", "--docs", "40", "--pairs", "20", "--videos", "8", "--batch-size", "4",
              "--pair-batch-size", "4", "--video-batch-size", "2", "--log-every", "1"],
    "eval": ["--episodes", "1", "--shots", "0,1", "--k", "0,1"],
}


# ----------------------------------------------------------------------------- the LM's copy probe


@torch.no_grad()
def lm_binding_probe(lm, tok, world, n_way: int = 5, episodes: int = 50, seed: int = 0) -> float:
    """Text-only fast binding: each support image is replaced by the words naming it, as in the LM's
    corpus (" red circle\\nThis is a dax.<|endofchunk|>"), with fresh made-up words; the LM must pick the
    word bound to the query's shape among the n_way candidates. Chance is 1 / n_way."""
    correct = 0
    for e in range(episodes):
        ep = world.binding_episode(n_way, 1, split="val", seed=seed + e)
        prefix = "".join(f" {stand_in(s['attrs'])}\n{BINDING_TEXT.format(word=s['word'])}<|endofchunk|>"
                         for s in ep["support"])
        prefix += f" {stand_in(ep['query']['attrs'])}\n" + BINDING_TEXT.split("{word}")[0].rstrip()
        p = tok.encode(prefix)
        conts = [tok.encode_ordinary(" " + w + ".") for w in ep["candidates"]]
        L = len(p) + max(len(c) for c in conts)
        ids = torch.full((len(conts), L), tok.eot_id, dtype=torch.long)
        for i, c in enumerate(conts):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        logp = lm(ids)[0].float().log_softmax(-1)  # (n_way, L, V); right padding never reaches the sum
        # log P(candidate | prefix): the logits at position len(p) - 1 + j predict candidate token j
        scores = [sum(logp[i, len(p) - 1 + j, t].item() for j, t in enumerate(c))
                  for i, c in enumerate(conts)]
        correct += ep["candidates"][scores.index(max(scores))] == ep["answer"]
    return correct / episodes


# ----------------------------------------------------------------------------- stages


def run_stage(name: str, fn, argv: list[str], done: dict, state_path: Path) -> None:
    if done.get(name):
        print(f"== {name}: done in an earlier run ({done[name]['seconds']:.0f} s), skipped", flush=True)
        return
    print(f"== {name}: python -m miniflamingo {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = fn(argv[1:])
    if rc:
        raise SystemExit(f"demo: stage {name} failed (exit {rc})")
    done[name] = {"seconds": time.perf_counter() - t0}
    state_path.write_text(json.dumps(done, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m miniflamingo demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="the whole pipeline in about a minute (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else FULL
    state_path = run / "stages.json"
    done = json.loads(state_path.read_text()) if state_path.exists() else {}
    if done.get("quick", args.quick) != args.quick:
        raise SystemExit(f"demo: {run} holds a {'quick' if done['quick'] else 'full'} run; use another --run")
    done["quick"] = args.quick
    t0 = time.perf_counter()
    common = ["--run", str(run), "--seed", str(args.seed)]

    run_stage("vision", pretrain_vision.main, ["pretrain-vision", *common, *budget["vision"]], done,
              state_path)
    run_stage("lm", pretrain_lm.main, ["pretrain-lm", *common, *budget["lm"]], done, state_path)

    state = load_checkpoint(run / "lm.pt")
    lm = GPT(FlamingoConfig.from_dict({"lm": state["config"]}).lm)
    lm.load_state_dict(state["model"])
    lm.eval()
    acc = lm_binding_probe(lm, Tokenizer.default(), default_world(), episodes=10 if args.quick else 100)
    print(f"== LM copy probe: 5-way text-only binding with fresh words: {acc:.0%} (chance 20%)", flush=True)
    if acc < 0.5 and not args.quick:
        # Measured: longer pretraining (up to 3000 steps), rotary positions and drill-only corpora did
        # not fix it either; see README "The demo today". Training goes on: captions and VQA still learn.
        print("   The frozen LM does not copy in context, so Flamingo cannot learn few-shot binding on top of"
              " it; captioning and VQA still can. This is the known open problem of the tiny recipe "
              "(README, 'The demo today').", flush=True)
    done["lm_probe"] = acc

    run_stage("train", train.main, ["train", *common, *budget["train"]], done, state_path)
    if done.get("eval"):  # the table of an earlier run, so a rerun always ends with it
        print(evaluate.format_table(json.loads((run / "eval.json").read_text())))
    run_stage("eval", evaluate.main, ["eval", "--run", str(run), *budget["eval"]], done, state_path)
    print(f"== demo finished in {time.perf_counter() - t0:.0f} s; everything is in {run}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
