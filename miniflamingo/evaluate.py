"""Few-shot evaluation on the synthetic world (DESIGN.md 6, issue 7), the result table, and its command:

    python -m miniflamingo eval --run runs/demo --shots 0,4,8,16 [--rices] [--tasks vqa,captioning]

(`python -m miniflamingo ask`, few-shot on the user's own image, is in ask.py.)

Notable features
- The task suite, all on held-out data ("test" queries, "val" support pools): captioning (CIDEr-D), VQA
  and video motion questions (VQA accuracy), questions about held-out attribute combinations, and fast
  binding of made-up words: 2-way and 5-way, ambiguous (colour or shape?), and shapes never seen in any
  training stage (accuracy, candidates ranked by log-likelihood).
- Shots count support examples; for the N-way binding tasks they count examples per class (k, as in
  Frozen), so 5-way k = 1 shows five images. Binding at k = 0 has no support: chance is expected.
- Every cell (task x shots) also runs blind: the same prompts with every media zeroed (with --rices,
  random examples instead of the retrieved ones: their choice would carry the query's image).
- A shot count whose prompts do not fit lm.context_length is skipped, reported as null in eval.json and
  "-" in the table, never truncated.
- `--jobs N` splits the tasks over N processes (evaluate_in_processes) and merges their results into the
  eval.json one process would write: the eval's many small ops gain little from a second thread.
- eval.json: {"tasks": {name: {"metric", "unit", "shots": {"0": x, ...}, "blind": {"0": x, ...}}},
  "settings": {...}, "samples": {name: {"4": [[prediction, answer], ...]}}}, raw metric values (the table
  shows them x100, as the paper does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from miniflamingo import fewshot as fs
from miniflamingo.config import FlamingoConfig
from miniflamingo.flamingo import Flamingo
from miniflamingo.metrics import cider_d, vqa_accuracy
from miniflamingo.tokenizer import Tokenizer
from miniflamingo.trainutil import (
    CheckpointError,
    avoid_cudnn_attention,
    load_checkpoint,
    start_command,
    write_json,
)
from miniflamingo.world_render import HELDOUT_COMBOS

# ----------------------------------------------------------------------------- the tasks


class Task(NamedTuple):
    kind: str  # "open": generate, then score the text; "close": rank the candidates
    metric: str  # "cider_d", "vqa_accuracy" or "accuracy"
    per_class: bool = False  # shots count examples per class (k)
    max_new_tokens: int = 0  # open-ended: the longest answer it may write (captions: up to 36 tokens)


TASKS = {
    "captioning": Task("open", "cider_d", max_new_tokens=40),
    "vqa": Task("open", "vqa_accuracy", max_new_tokens=8),
    "video_qa": Task("open", "vqa_accuracy", max_new_tokens=8),
    "heldout_combos": Task("open", "vqa_accuracy", max_new_tokens=8),
    "binding_2way": Task("close", "accuracy", per_class=True),
    "binding_5way": Task("close", "accuracy", per_class=True),
    "ambiguous": Task("close", "accuracy", per_class=True),
    "novel_2way": Task("close", "accuracy", per_class=True),
    "novel_5way": Task("close", "accuracy", per_class=True),
}
METRIC_NAMES = {"cider_d": "CIDEr-D", "vqa_accuracy": "VQA acc.", "accuracy": "accuracy"}
DEFAULT_EPISODES = 32  # per cell: the whole suite takes about a minute on 2 CPU cores with the tiny preset
N_SAMPLES = 3  # predictions kept per open-ended cell, to read what the model writes


def open_items(world, name: str, n: int, split: str, seed: int) -> list[dict]:
    """Queries ("test") or support pool ("val") of an open-ended task: [{"media", "question" (None for
    captions), "answer", "references", "kind", "attrs"}]. Held-out combinations take their support
    from ordinary colour and shape questions about images that hold none of the held-out combinations
    (the world bans them from "train" only, so about a quarter of "val" images show one), so the support
    never shows the query's combination, let alone its answer."""
    if name == "captioning":
        return [{"media": x["image"], "question": None, "answer": x["caption"], "references": x["references"],
                 "kind": None} for x in world.caption_set(n, split, seed)]
    if name == "heldout_combos" and split != "test":
        held_out, drawn = set(HELDOUT_COMBOS), 6 * n  # a third of the questions are colour or shape ones
        while True:
            items = [x for x in world.vqa_set(drawn, split, seed) if x["kind"] in ("colour", "shape")
                     and not any((o["colour"], o["shape"]) in held_out for o in x["attrs"]["objects"])]
            if len(items) >= n:
                items = items[:n]
                break
            drawn *= 2
    elif name == "vqa":
        items = world.vqa_set(n, split, seed)
    elif name == "video_qa":
        # the kind that tells what the model sees: the event (move, colour, grows, shrinks)
        items = [{**x, "image": x["video"], "kind": x["attrs"]["event"]["kind"]}
                 for x in world.video_qa_set(n, split, seed)]
    elif name == "heldout_combos":
        items = world.heldout_combo_set(n, split, seed)
    else:
        raise ValueError(f"{name!r} is not an open-ended task")
    return [{"media": x["image"], "question": x["question"], "answer": x["answer"],
             "references": x["answers"], "kind": x["kind"], "attrs": x["attrs"]} for x in items]


def encoded_open_items(model, world, name: str, n: int, pool_size: int, seed: int, rices: bool = False):
    """(queries, pool, features) of an open-ended task, each media replaced by its frozen vision features
    (F, S, Dv): the encoder sees each media once, not once per prompt. features: (query, pool) pooled
    features for RICES, or None."""
    queries = open_items(world, name, n, "test", seed)
    pool = open_items(world, name, pool_size, "val", seed)
    for items in (queries, pool):
        for x, f in zip(items, fs.vision_features(model, [x["media"] for x in items])):
            x["media"] = f  # (F, S, Dv)
    features = None
    if rices:
        features = (fs.pooled([q["media"] for q in queries]), fs.pooled([p["media"] for p in pool]))
    return queries, pool, features


def cell_key(name: str, seed: int) -> list[int]:
    """The random key of a task's cells (support sampling): the same prompts in every caller."""
    return [seed, list(TASKS).index(name)]


def item_shot(item: dict, with_answer: bool = True) -> fs.Shot:
    answer = item["answer"] if with_answer else None
    if item["question"] is None:
        return fs.caption_shot(item["media"], answer)
    return fs.vqa_shot(item["media"], item["question"], answer)


def binding_episode(world, name: str, k: int, seed: int) -> dict:
    if name == "ambiguous":
        return world.ambiguous_episode(k, "test", seed)
    n_way = 2 if name.endswith("2way") else 5
    return world.binding_episode(n_way, k, novel=name.startswith("novel"), split="test", seed=seed)


def score(metric: str, predictions: list[str], items: list[dict]) -> float:
    if metric == "cider_d":
        return cider_d(dict(enumerate(predictions)), {i: x["references"] for i, x in enumerate(items)})[0]
    return float(np.mean([vqa_accuracy(p, x["references"]) for p, x in zip(predictions, items)]))


def score_by_kind(predictions: list[str], items: list[dict]) -> dict[str, float]:
    """VQA accuracy per question kind (colour, size, ...; for videos the event: move, grows, ...), in the
    order the kinds first appear: a total can hide a kind at chance (size questions were, in issue 7)."""
    kinds: dict[str, list[float]] = {}
    for p, x in zip(predictions, items):
        kinds.setdefault(x["kind"], []).append(vqa_accuracy(p, x["references"]))
    return {k: float(np.mean(v)) for k, v in kinds.items()}


# ----------------------------------------------------------------------------- one cell of the table


def open_cell(model, tok, task: Task, queries, pool, n_shots: int, rng_key: list[int], features=None,
              batch_size: int = 32) -> tuple[float | None, float | None, list[str]]:
    """(metric, blind metric, predictions) with n_shots support examples per query; (None, None, [])
    when the prompts do not fit the context. features: (query, pool) pooled features for RICES, or None."""
    # The blind row sees no pixel of the query, not even through the choice of its examples: with RICES
    # its prompts are the random-support ones (RICES picks examples by the query's image, and a blind
    # model that copies the most similar example's answer would be reading the image through them).
    rices = n_shots > 0 and features is not None
    prompts, random_prompts = [], []
    for i, query in enumerate(queries):
        rng = np.random.default_rng([*rng_key, n_shots, i])
        if n_shots == 0:  # two text-only examples (paper App. A.2)
            support = fs.text_only([item_shot(pool[j]) for j in fs.random_support(len(pool), 2, rng)])
        else:
            support = [item_shot(pool[j]) for j in fs.random_support(len(pool), n_shots, rng)]
        random_prompts.append(fs.build_prompt(tok, support, item_shot(query, with_answer=False)))
        if rices:  # most similar last
            support = [item_shot(pool[j]) for j in fs.rices_support(features[0][i], features[1], n_shots)]
            prompts.append(fs.build_prompt(tok, support, item_shot(query, with_answer=False)))
    prompts = prompts if rices else random_prompts

    def fit(ps) -> bool:
        return max(len(p.ids) for p in ps) + task.max_new_tokens <= model.cfg.lm.context_length

    if not fit(prompts):
        return None, None, []
    predictions = fs.generate_answers(model, tok, prompts, task.max_new_tokens, batch_size=batch_size)
    blind = None
    if prompts is random_prompts or fit(random_prompts):
        blind = score(task.metric, fs.generate_answers(model, tok, random_prompts, task.max_new_tokens,
                                                       blind=True, batch_size=batch_size), queries)
    return score(task.metric, predictions, queries), blind, predictions


def close_cell(model, tok, episodes: list[dict], n_perm: int, seed: int,
               batch_size: int = 32) -> tuple[float | None, float | None]:
    """(accuracy, blind accuracy) of ranking each episode's candidate words; (None, None) if too long."""
    images = [s["image"] for e in episodes for s in e["support"]] + [e["query"]["image"] for e in episodes]
    features = iter(fs.vision_features(model, images))  # each image once, whatever the support orders
    supports = [[fs.binding_shot(next(features), s["word"]) for s in e["support"]] for e in episodes]
    queries = [fs.binding_shot(next(features)) for e in episodes]
    candidates = [[fs.binding_shot(None, w).answer for w in e["candidates"]] for e in episodes]
    longest = max(len(fs.build_prompt(tok, s, q).ids) for s, q in zip(supports, queries))
    longest += max(len(fs.answer_ids(tok, a)) for c in candidates for a in c)
    if longest > model.cfg.lm.context_length:
        return None, None
    answers = torch.tensor([e["candidates"].index(e["answer"]) for e in episodes])
    out = []
    for blind in (False, True):
        scores = fs.ensemble_scores(model, tok, supports, queries, candidates, n_perm, seed, blind,
                                    batch_size)  # (E, C)
        out.append(float((scores.argmax(dim=1).cpu() == answers).float().mean()))
    return tuple(out)


# ----------------------------------------------------------------------------- the suite


@torch.no_grad()
def evaluate(model, tok, world, tasks=None, shots=(0, 4, 8, 16), episodes: int = DEFAULT_EPISODES,
             rices: bool = False, seed: int = 0, *, k_shots=(0, 1, 2, 4), ensemble: int = 3,
             pool_size: int = 64, batch_size: int = 32, binding_episodes: int | None = None,
             log=None) -> dict:
    """Run the task suite: {"tasks": {name: {"metric", "unit", "shots": {str(n): value or None},
    "blind": {...}}}, "settings": {...}, "samples": {...}}. Open-ended tasks use `shots`, binding tasks
    `k_shots` (per class). `episodes`: queries or episodes per cell; `binding_episodes`: episodes per cell of
    the binding tasks instead (None: `episodes`), which are cheap to rank; `ensemble`: support orders averaged
    for binding; `rices`: open-ended support by similarity from a pool of `pool_size` "val" examples
    (binding episodes come with their own support). `log`: a print-like callable for progress, or None."""
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    if max(shots, default=0) > pool_size:
        raise ValueError(f"{max(shots)} shots need a support pool of at least that size, got {pool_size}")
    was_training = model.training
    model.eval()
    binding_episodes = episodes if binding_episodes is None else binding_episodes
    settings = {"episodes": episodes, "binding_episodes": binding_episodes, "rices": rices, "seed": seed,
                "ensemble": ensemble, "pool_size": pool_size, "world_seed": world.seed}
    samples = {name: {} for name in tasks if TASKS[name].kind == "open"}  # [prediction, answer] pairs
    results = {"tasks": {}, "settings": settings, "samples": samples}
    for name in tasks:
        task, start = TASKS[name], time.perf_counter()
        counts = list(k_shots if task.per_class else shots)
        row = {"metric": task.metric, "unit": "shots per class" if task.per_class else "shots",
               "shots": {}, "blind": {}}
        if task.kind == "open":
            queries, pool, features = encoded_open_items(model, world, name, episodes, pool_size, seed, rices)
        for n in counts:
            if task.kind == "open":
                value, blind, predictions = open_cell(model, tok, task, queries, pool, n,
                                                      cell_key(name, seed), features, batch_size)
                samples[name][str(n)] = [[p, q["answer"]] for p, q in zip(predictions[:N_SAMPLES], queries)]
                if task.metric == "vqa_accuracy" and predictions:
                    row.setdefault("kinds", {})[str(n)] = score_by_kind(predictions, queries)
            elif name == "ambiguous" and n > 4:  # the world's ambiguous episodes have 0-4 examples per word
                value, blind = None, None
            else:
                eps = [binding_episode(world, name, n, seed * 100_000 + i) for i in range(binding_episodes)]
                value, blind = close_cell(model, tok, eps, ensemble, seed, batch_size)
            row["shots"][str(n)], row["blind"][str(n)] = value, blind
        results["tasks"][name] = row
        if log is not None:
            log(f"eval {name}: {time.perf_counter() - start:.1f}s")
    model.train(was_training)
    return results


def format_table(results: dict) -> str:
    """Tasks by shot counts, each with its blind row; metrics x100 ("-": prompts too long, skipped)."""
    lines, header = [], None
    for name, row in results["tasks"].items():
        keys = list(row["shots"])
        head = (row["unit"], keys)
        if head != header:
            header = head
            unit = "k per class" if row["unit"] == "shots per class" else "shots"
            lines.append(f"{'task':<16}{'metric':<10}{unit:>12}" + "".join(f"{k:>8}" for k in keys))
        for label, metric, values in ((name, METRIC_NAMES[row["metric"]], row["shots"]),
                                      ("", "blind", row["blind"])):
            cells = "".join("       -" if values[k] is None else f"{100 * values[k]:8.1f}" for k in keys)
            lines.append(f"{label:<16}{metric:<10}{'':>12}{cells}")
    return "\n".join(lines)


def format_results(results: dict) -> str:
    """The table, then the per-kind lines of the question-answering tasks (when eval.json has them)."""
    return "\n".join(filter(None, [format_table(results), format_kinds(results)]))


def format_kinds(results: dict) -> str:
    """One line per question-answering task and shot count: its accuracy per question kind, x100."""
    lines = []
    for name, row in results["tasks"].items():
        for n, kinds in row.get("kinds", {}).items():
            cells = ", ".join(f"{k} {100 * v:.0f}" for k, v in kinds.items())
            lines.append(f"{name} by kind, {n} shots: {cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs


def load_run(run_dir) -> tuple[Flamingo, FlamingoConfig]:
    """DIR/flamingo.pt ({"model": state_dict, "config": FlamingoConfig.to_dict(), ...}) -> (model in eval
    mode, cfg). Errors name the file: missing, unreadable, or weights that do not fit the config."""
    path = Path(run_dir) / "flamingo.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; train one first: python -m miniflamingo train "
                                f"--run {run_dir}")
    state = load_checkpoint(path)  # weights_only=True; a CheckpointError names the file if corrupt
    if "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: expected keys 'model' and 'config', got {sorted(state)}")
    try:
        cfg = FlamingoConfig.from_dict(state["config"])
        model = Flamingo(cfg)
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AssertionError, ValueError) as e:
        raise CheckpointError(f"{path}: the weights do not fit the saved config: {e}") from e
    return model.eval(), cfg


def run_tokenizer(run_dir, cfg: FlamingoConfig) -> Tokenizer:
    """DIR/tokenizer.tiktoken if the run has one, else the default; its size must be the model's."""
    path = Path(run_dir) / "tokenizer.tiktoken"
    tok = Tokenizer.load(path) if path.is_file() else Tokenizer.default()
    if tok.n_vocab != cfg.lm.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.n_vocab} ids but the model's lm.vocab_size is "
                         f"{cfg.lm.vocab_size}; put the run's tokenizer in {path}")
    return tok


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,4,8, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"shot counts must be >= 0, got {text!r}")
    return counts


# Seconds of each task in the demo's eval (40 queries / 100 episodes a cell, 1 thread, seed 0's AMD run):
# the weights by which --jobs splits the suite. Only the split's balance depends on them, not a result.
TASK_SECONDS = {"captioning": 2.9, "vqa": 1.2, "video_qa": 1.7, "heldout_combos": 1.1, "binding_2way": 5.0,
                "binding_5way": 12.4, "ambiguous": 4.7, "novel_2way": 4.8, "novel_5way": 11.5}


def split_tasks(tasks: list[str], jobs: int) -> list[list[str]]:
    """`tasks` in up to `jobs` groups of about equal cost (TASK_SECONDS): the longest first, each into the
    group with the least so far. Each group keeps the suite's order; empty groups are dropped."""
    groups, load = [[] for _ in range(max(1, jobs))], [0.0] * max(1, jobs)
    for t in sorted(tasks, key=lambda t: -TASK_SECONDS.get(t, 1.0)):
        i = load.index(min(load))
        groups[i].append(t)
        load[i] += TASK_SECONDS.get(t, 1.0)
    return [[t for t in tasks if t in g] for g in groups if g]


def evaluate_in_processes(argv: list[str], tasks: list[str], jobs: int, out: Path, run_first) -> dict:
    """`tasks` split over up to `jobs` processes (split_tasks): each group but the first in a child `eval`
    (same options, its tasks, its own temporary output), the first here by run_first(group) -> results;
    then the children's tasks and samples merged in, in the order of `tasks`, as one process writes
    them. With one group, run_first(tasks) alone. A task's cells do not depend on which process ran it
    or with which others (each draws its episodes from its own keys; tests/test_evaluate.py checks the
    merged results against one process). Two processes took the demo's eval from 56.5 s on 2 threads
    to 39.8 s (docs/EXPERIMENTS.md, "The evaluation stage")."""
    groups = split_tasks(tasks, jobs)
    if len(groups) < 2:
        return run_first(tasks)
    children = []
    try:
        for i, group in enumerate(groups[1:], 1):
            part = out.with_name(f".{out.name}.part{i}")
            cmd = ["eval", *argv, "--tasks", ",".join(group), "--out", str(part), "--jobs", "1"]
            children.append((start_command(cmd, stdout=subprocess.DEVNULL), part, group))
        results = run_first(groups[0])
        for proc, part, group in children:
            if proc.wait() != 0:
                raise SystemExit(f"eval: the process evaluating {', '.join(group)} failed (exit "
                                 f"{proc.returncode}; its messages are above)")
            other = json.loads(part.read_text())
            part.unlink()
            results["tasks"].update(other["tasks"])
            results["samples"].update(other["samples"])
    finally:
        for proc, part, _ in children:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            part.unlink(missing_ok=True)
    results["tasks"] = {t: results["tasks"][t] for t in tasks}
    results["samples"] = {t: results["samples"][t] for t in tasks if t in results["samples"]}
    return results


def main(argv: list[str] | None = None) -> int:
    """Few-shot evaluation of a trained run on the synthetic world: prints the table, writes DIR/eval.json."""
    from miniflamingo.world import World

    ap = argparse.ArgumentParser(prog="python -m miniflamingo eval", description=main.__doc__)
    ap.add_argument("--run", required=True, help="run folder holding flamingo.pt")
    ap.add_argument("--shots", type=_counts, default=[0, 4, 8, 16], help="support examples (open-ended)")
    ap.add_argument("--k", type=_counts, default=[0, 1, 2, 4], help="examples per class (binding tasks)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--episodes", type=int, default=DEFAULT_EPISODES, help="queries or episodes per cell")
    ap.add_argument("--binding-episodes", type=int, default=None,
                    help="episodes per cell of the binding tasks (default: --episodes). Ranking a few "
                         "words costs far less than writing answers, and a goal such as 98%% needs more "
                         "than 40 episodes to be told from 100%%")
    ap.add_argument("--rices", action="store_true", help="support by similarity of frozen vision features")
    ap.add_argument("--ensemble", type=int, default=3, help="support orders averaged for binding tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to write the results (default DIR/eval.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the eval's ops are "
                    "small; 2 threads ran 40x slower than 1 on a busy 2-core machine); 0: torch's default")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes to split the tasks over, each with --threads (the demo: one per core; "
                         "same results, 39.8 s against 56.5 s on one process of 2 threads)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if min(args.episodes, args.ensemble, 1 if args.binding_episodes is None else args.binding_episodes) < 1:
        ap.error("--episodes, --binding-episodes and --ensemble must be >= 1")
    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        model, cfg = load_run(args.run)
        tok = run_tokenizer(args.run, cfg)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 1
    model.to(args.device)
    avoid_cudnn_attention(torch.device(args.device))
    tasks = list(TASKS) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:  # before any child starts
        ap.error(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    world = World(seed=args.world_seed, image_size=cfg.vision.image_size)
    out = Path(args.out) if args.out else Path(args.run) / "eval.json"
    start = time.perf_counter()

    def run(group: list[str]) -> dict:
        return evaluate(model, tok, world, group, args.shots, args.episodes, args.rices, args.seed,
                        k_shots=args.k, ensemble=args.ensemble, pool_size=max([64, *args.shots]),
                        binding_episodes=args.binding_episodes,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))

    results = evaluate_in_processes(argv, tasks, args.jobs, out, run)
    results["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    print(format_results(results))
    write_json(results, out)
    print(f"wrote {out} ({results['settings']['seconds']}s)")
    return 0
