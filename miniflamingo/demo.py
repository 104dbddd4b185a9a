"""`python -m miniflamingo demo`: the whole paper, small, on a laptop CPU in about ten minutes.

    python -m miniflamingo demo                 # everything under runs/demo/
    python -m miniflamingo demo --quick         # the same pipeline in about a minute (a smoke test)
    python -m miniflamingo demo --run DIR       # elsewhere; a rerun resumes where it stopped

Notable features
- The stages of DESIGN.md 4, each also a command of its own: contrastive pretraining of the vision
  encoder (`pretrain-vision`), next-token pretraining of the LM (`pretrain-lm`), Flamingo training with
  both frozen (`train`), then few-shot evaluation (`eval`) on held-out images, combinations and shapes.
- Before Flamingo training it checks, and prints, that the frozen LM binds in context from text alone
  (fresh made-up words, each image an LM slot: lm_corpus.py): cross-attention shows each token only its
  own image, so matching a query image to an earlier one is the LM's job (DESIGN.md 5). If the LM
  cannot, it says so.
- Vision and LM pretraining run side by side, each on one core (start_in_background says why).
- Stages are cached: a finished stage is recorded in RUN/stages.json and skipped on a rerun; an
  interrupted stage resumes from its own checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from miniflamingo import evaluate, pretrain_vision, train
from miniflamingo.trainutil import start_command, write_json

# Budgets for 2 CPU cores. --quick keeps every stage but shrinks it to seconds: it checks that the
# pipeline runs, not that it learns.
FULL = {
    # The vision stage runs beside the LM's (~260-290 s on the other core), so it may take about as long.
    # 550 steps on 40k pairs instead of 400 on 20k (seed 0, held out): zero-shot shape accuracy 0.81 ->
    # 0.96, retrieval R@1 0.90 -> 0.97. Flamingo on it (same LM, 1300 steps, 1 thread, 100 episodes, k=1):
    # 5-way binding 82% -> 93%, 2-way 92% -> 96%, novel shapes 85% / 53% -> 81% / 53%.
    # Then batches of 64 for 1100 steps instead of 128 for 550 (same pairs seen, twice the updates; a
    # step half as long, so the same time): seeds 2 and 3 had drawn encoders whose features read shape
    # at 88.5 / 84.1% (benchmarks/feature_probe.py); now 97.7 / 95.3%, and seed 0's 96.1 -> 99.3%. The
    # count of updates is what mattered: 128 x 750 gave 96.6 / 96.2% in 1.2x the time, 96 x 750 92.2%.
    "vision": ["--steps", "1100", "--batch-size", "64", "--n-train", "40000"],
    # The LM: smeared keys in its second layer (lm.CausalSelfAttention) moved its binding jump from steps
    # 900-1200 to 500-600 (seeds 0-3; probe 98-100% at the end of 800- and 1400-step schedules), so it
    # trains 900 steps instead of 1400 (~120 s less) and finishes before the vision stage; its core then
    # renders Flamingo's data and helps the vision stage finish (WhenLMDone, below). Held-out loss and
    # binding probe every 200 steps. Not smaller batches: 24 windows a step instead of 32 moved the plain
    # LM's jump late (session 11: seed 0's probe 44% at step 1400, seed 1's 86%; with 32, 92% and 98% by
    # step 900).
    "lm": ["--steps", "900", "--eval-every", "200"],
    # Gates at 20x the lr (a deviation from the paper, which gives no per-parameter rates): with the
    # paper's rates the tanh gates had opened only to 0.02 / 0.16 after 1300 steps. Same seed-0 parts,
    # 1300 steps, 40 episodes: 5-way 1-shot binding 77.5% -> 90%, 4-shot captions 503 -> 550 CIDEr-D
    # (x5: 92.5% / 565, x50: 82.5% / 625). Lesson 13 shows it beside the no-gating ablation.
    # Blob binding 0.3: three binding documents in ten name the vision stage's blob shapes. Same parts,
    # 1 thread, 200 episodes at k = 1, seeds 0 / 1: novel shapes 2-way 78.5 -> 86.5% / 82.5 -> 92.5%,
    # 5-way 66 -> 70.5% / 62 -> 74%; named 5-way 98.5 -> 97% / 100 -> 98.5%.
    # Not fewer steps to save time: with 1150 (session 11, four demo seeds; seed 3: 575 s end to end) seed 1's
    # Flamingo did not bind at all (5-way 24%, 2-way 50% at k = 1; with 1300, 99% / 99%), the others still
    # did (5-way 99 / 86 / 96%). Binding is a late jump here too, so the schedule keeps its room past it.
    "train": ["--steps", "1300", "--lr", "2e-3", "--gate-lr-mult", "20", "--blob-binding", "0.3"],
    # Binding cells rank a few words, so they take 100 episodes (+20 s on 1 thread): on 40, a goal of 98%
    # can only be met at 100%, and seeds differ by 10-25 points in a cell. Open-ended cells write their
    # answers by beam search and keep 40.
    "eval": ["--episodes", "40", "--binding-episodes", "100"],
}
QUICK = {
    "vision": ["--steps", "4", "--n-train", "256", "--n-eval", "64", "--batch-size", "32"],
    "lm": ["--steps", "4", "--docs", "100", "--val-docs", "10", "--batch-size", "4", "--eval-batches", "1"],
    "train": ["--steps", "3", "--docs", "40", "--pairs", "20", "--videos", "8", "--batch-size", "4",
              "--pair-batch-size", "4", "--video-batch-size", "2", "--log-every", "1"],
    "eval": ["--episodes", "1", "--shots", "0,1", "--k", "0,1"],
}


# ----------------------------------------------------------------------------- stages


def start_in_background(name: str, argv: list[str], done: dict, run: Path):
    """Start a stage in a child process, its output going to RUN/NAME_stage.log: (process, start time,
    log path), or None if an earlier run finished it. Stage 1 (vision) and stage 2 (LM) are independent
    (DESIGN.md 4), so on 2 cores the demo runs them side by side, one thread each: the LM is no faster on
    two (22.6k tokens/s on 2 threads, 23.4k on 1); the vision stage takes both once the LM is done."""
    if done.get(name):
        print(f"== {name}: done in an earlier run ({done[name]['seconds']:.0f} s), skipped", flush=True)
        return None
    log_path = run / f"{name}_stage.log"
    print(f"== {name}: python -m miniflamingo {' '.join(argv)}  (in the background; its output goes to "
          f"{log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = start_command(argv, stdout=log, stderr=subprocess.STDOUT)
    return proc, time.perf_counter(), log_path


def finish_background(name: str, job, done: dict, state_path: Path, show=("probe", "held-out")) -> None:
    """Wait for a stage started by start_in_background; print its lines that matter (those containing
    any of `show`), or its last lines if it failed."""
    if job is None:
        return
    proc, t0, log_path = job
    if proc.poll() is None:
        print(f"== waiting for {name} ({log_path})", flush=True)
    rc = proc.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    if rc:
        print("\n".join(lines[-20:]), flush=True)
        raise SystemExit(f"demo: stage {name} failed (exit {rc}); its output: {log_path}")
    for line in lines:
        if any(word in line for word in show):
            print(f"   {name}: {line}", flush=True)
    done[name] = {"seconds": time.perf_counter() - t0}
    write_json(done, state_path)  # whole or not at all: temp file, then rename


def load_state(state_path: Path) -> dict:
    if not state_path.exists():
        return {}
    try:
        done = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"demo: {state_path} is not valid JSON ({e}); delete it to rerun every stage "
                         "(finished stages then resume from their checkpoints)") from e
    if not isinstance(done, dict):
        raise SystemExit(f"demo: {state_path} holds {type(done).__name__}, not the demo's stage record; "
                         "delete it to rerun every stage")
    return done


def final_binding_probe(log_path: Path) -> float:
    """The LM's binding probe (lm_corpus.binding_probe, 100 episodes) that pretrain-lm logged last: the
    demo reads it rather than loading the LM to run the same probe again."""
    probes = [r["binding_probe"] for r in map(json.loads, log_path.read_text().splitlines())
              if "binding_probe" in r] if log_path.is_file() else []
    if not probes:
        raise SystemExit(f"demo: {log_path} holds no binding_probe; was the LM pretrained on the world's "
                         "corpus? Delete the run's lm.pt and rerun the demo")
    return probes[-1]


class WhenLMDone:
    """The vision stage's on_step hook, for when the LM finishes first (it does, with the demo's 900 LM
    steps): its core is free then, so a thread renders Flamingo's training data (train.render_data: no
    model needed; ~17 s) while the vision stage trains, and once that is done the vision stage takes all
    `threads` (a tiny vision step on 1 / 2 threads: 0.47 / 0.33 s, same losses). Rendering holds the GIL
    only between numpy calls, and the vision step spends its time in torch ops, which release it."""

    def __init__(self, job, train_argv: list[str], threads: int):
        self.job, self.train_argv, self.threads = job, train_argv, threads
        self.thread: threading.Thread | None = None
        self.rendered: dict | None = None
        self.error: BaseException | None = None
        self.raised = False

    def render(self) -> None:
        try:
            self.rendered = train.render_data(self.train_argv)
        except BaseException as e:  # re-raised in the main thread by result()
            self.error = e

    def __call__(self, step: int) -> None:
        if self.raised or (self.job is not None and self.job[0].poll() is None):  # poll: one waitpid
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self.render, name="render-flamingo-data", daemon=True)
            self.thread.start()
        elif not self.thread.is_alive():
            torch.set_num_threads(self.threads)
            self.raised = True

    def result(self) -> dict | None:
        """render_data's result once the thread is done (waiting for it), or None if it never started.
        Handed over, not kept: the hook outlives the vision stage, and the pixels must not stay in memory
        beside their features through Flamingo's training."""
        if self.thread is None:
            return None
        self.thread.join()
        if self.error is not None:
            raise self.error
        rendered, self.rendered = self.rendered, None
        return rendered


def run_stage(name: str, fn, argv: list[str], done: dict, state_path: Path, **kwargs) -> None:
    if done.get(name):
        print(f"== {name}: done in an earlier run ({done[name]['seconds']:.0f} s), skipped", flush=True)
        return
    print(f"== {name}: python -m miniflamingo {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = fn(argv[1:], **kwargs)
    if rc:
        raise SystemExit(f"demo: stage {name} failed (exit {rc})")
    done[name] = {"seconds": time.perf_counter() - t0}
    write_json(done, state_path)  # whole or not at all: temp file, then rename


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
    done = load_state(state_path)
    if done.get("quick", args.quick) != args.quick:
        raise SystemExit(f"demo: {run} holds a {'quick' if done['quick'] else 'full'} run; use another --run")
    done["quick"] = args.quick
    # Stages set their own thread counts in this process (vision: 1); Flamingo training gains from all
    # cores (15.5k tokens/s on 2 threads, 9.8k on 1, the tiny preset), so it gets the count torch began with.
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    common = ["--run", str(run), "--seed", str(args.seed)]

    train_argv = ["train", *common, "--threads", str(threads), *budget["train"]]
    lm_job = start_in_background("lm", ["pretrain-lm", *common, "--threads", "1", *budget["lm"]], done, run)
    prepared = None
    try:
        when_lm_done = WhenLMDone(lm_job, train_argv[1:], threads)
        # --resume: an interrupted vision stage continues from its last checkpoint (none: from step 0)
        run_stage("vision", pretrain_vision.main, ["pretrain-vision", *common, "--resume", *budget["vision"]],
                  done, state_path, on_step=when_lm_done)
        rendered = when_lm_done.result()
        lm_running = lm_job is not None and lm_job[0].poll() is None
        if not done.get("train") and (rendered is not None or lm_running):
            # Encode Flamingo's training data now, on the vision stage's core: the pixels drawn while it
            # trained, or, if the LM is still training (a slow machine), rendered here too (Flamingo's
            # stage 235 -> 211 s, seed 0, when the LM was the longer stage).
            print("== encoding Flamingo's training data" + ("" if rendered else " (rendered now: the LM still"
                                                              " trains)"), flush=True)
            # On every core, even while the LM still trains on one. Before, this ran on the vision
            # stage's one thread unless WhenLMDone had raised the count, which it does only at a vision
            # step after its rendering: an LM that ended late in the vision stage or after it left its
            # core idle through the encoding, 23.9-28.5 s on one thread against 13.4-14.6 s on two
            # (seed 0, docs/EXPERIMENTS.md, "The demo's schedule"). The features are the same on any
            # number of threads (train.world_data encodes each batch on one).
            torch.set_num_threads(threads)
            prepared = train.prepare_data(train_argv[1:], rendered)
        del rendered  # the features replace the pixels
        finish_background("lm", lm_job, done, state_path)
    finally:
        if lm_job is not None and lm_job[0].poll() is None:  # interrupted: do not leave it running
            lm_job[0].terminate()

    acc = final_binding_probe(run / "lm_log.jsonl")
    print(f"== LM binding probe: 5-way, fresh made-up words, images as slots: {acc:.0%} (chance 20%)",
          flush=True)
    if acc < 0.5 and not args.quick:
        # Binding appears in the LM as a jump after about 500 steps (README, "The demo"); a run that
        # missed it still trains, since captions and questions need only each token's own image.
        print("   The frozen LM does not bind words in context, so Flamingo will not learn few-shot binding"
              " on top of it (captioning and VQA still can). Pretrain the LM longer: python -m miniflamingo"
              f" pretrain-lm --run {run} --steps 1500 (after deleting {run}/lm.pt), then rerun the demo.",
              flush=True)
    done["lm_probe"] = acc

    run_stage("train", train.main, train_argv, done, state_path, prepared=prepared)
    del prepared  # free the training features before evaluation
    if done.get("eval"):  # the table of an earlier run, so a rerun always ends with it
        print(evaluate.format_results(json.loads((run / "eval.json").read_text())))
    # Every core is free by now: the tasks split over one process per core, one thread each (eval --jobs),
    # 37-40 s against 53-57 s on one process of 2 threads and 66-69 s on 1, the same numbers cell for cell
    # (seed 0's AMD run; docs/EXPERIMENTS.md, "The evaluation stage"): its many small ops hold the GIL.
    eval_argv = ["eval", "--run", str(run), "--threads", "1", "--jobs", str(threads), *budget["eval"]]
    run_stage("eval", evaluate.main, eval_argv, done, state_path)
    print(f"== demo finished in {time.perf_counter() - t0:.0f} s; everything is in {run}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
