"""`python -m miniflamingo ask`: caption your own image, or answer a question about it, few-shot.

    python -m miniflamingo ask --run runs/demo --image photo.jpg [--question Q] [--examples captions.jsonl]

Notable features
- Examples come from a JSONL file beside the user's images (captions.jsonl of DESIGN.md 5, or
  questions with answers), or from the synthetic world's val split when none of the right kind is given.
- RICES (paper App. A.2) picks the support: the examples whose frozen vision features are most
  cosine-similar to the image's, the most similar last; the least similar are dropped until the prompt
  fits the context. With no example, the prompt is zero-shot with up to two text-only examples.
- Bad input fails early: errors name the file and line of a bad example, or the image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from miniflamingo import fewshot as fs
from miniflamingo.data import DataError
from miniflamingo.evaluate import TASKS, load_run, open_items, run_tokenizer
from miniflamingo.readers import captions_jsonl, load_image, read_jsonl
from miniflamingo.trainutil import CheckpointError


def read_examples(path, image_size: int) -> list[dict]:
    """Examples for `ask`, one JSON object per line, image paths relative to the file: {"image", "caption"}
    (captions.jsonl of DESIGN.md 5; its folder will do) or {"image", "question", "answer"}. Read by
    readers.py's JSONL reader, so errors name the file and line as everywhere else."""
    jsonl = captions_jsonl(path)

    def parse(obj, where):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {str(obj)[:80]}")
        texts = ("caption",) if "caption" in obj else ("question", "answer")
        for k in ("image", *texts):
            if not isinstance(obj.get(k), str):
                raise DataError(f'{where}: "{k}" must be a string, got '
                                f'{"nothing" if k not in obj else type(obj[k]).__name__} (expected '
                                f'{{"image": relpath, "caption": str}} or {{"image": relpath, "question": '
                                f'str, "answer": str}})')
        blank = [k for k in texts if not obj[k].strip()]
        if blank:
            raise DataError(f'{where}: empty "{blank[0]}"')
        return {**{k: obj[k] for k in texts}, "image": load_image(jsonl.parent / obj["image"], image_size,
                                                                  where)}

    return read_jsonl(jsonl, parse, skip_bad=False)[0]


def ask(model, tok, image, question: str | None = None, examples: list[dict] = (), shots: int = 4):
    """Caption `image` (uint8 (H, W, 3)), or answer `question` about it, few-shot: RICES picks up to `shots`
    of the examples of the right kind (captions, or questions with answers), the most similar last, and
    drops the least similar ones until the prompt fits the context. With no example of that kind, or
    shots = 0, the prompt is zero-shot with up to two text-only examples. Returns (answer, prompt)."""
    task = TASKS["vqa" if question else "captioning"]
    pool = [x for x in examples if ("question" if question else "caption") in x]

    def shot(media, x: dict | None = None) -> fs.Shot:  # an example x, or the query when x is None
        if question:
            return fs.vqa_shot(media, x["question"], x["answer"]) if x else fs.vqa_shot(media, question)
        return fs.caption_shot(media, x["caption"]) if x else fs.caption_shot(media)

    features = fs.vision_features(model, [image] + [x["image"] for x in pool])
    n = min(shots, len(pool))
    order = fs.rices_support(fs.pooled(features[:1])[0], fs.pooled(features[1:]), n) if n else []
    wanted, context = n, model.cfg.lm.context_length

    def fits(prompt) -> bool:
        return len(prompt.ids) + task.max_new_tokens <= context

    # RICES examples, the least similar dropped first; then zero-shot with two, one, no text-only examples
    candidates = [[shot(features[1 + j], pool[j]) for j in order[len(order) - k:]] for k in range(n, 0, -1)]
    candidates += [fs.text_only([shot(None, x) for x in pool[:k]]) for k in range(min(2, len(pool)), -1, -1)]
    prompts = (fs.build_prompt(tok, c, shot(features[0])) for c in candidates)  # built as tried
    prompt = next((p for p in prompts if fits(p)), None)
    if prompt is None:  # not even the bare query fits: the question itself is too long
        query = fs.build_prompt(tok, [], shot(features[0]))
        raise ValueError(f"the prompt needs {len(query.ids)} tokens without examples (plus "
                         f"{task.max_new_tokens} for the answer); the model's context is {context} tokens: "
                         f"ask a shorter question")
    used = len(prompt.media) - 1  # the examples' images (text-only ones have none), not the query's
    if used < wanted:
        print(f"(using {used} of {wanted} examples with images: the prompt must fit the model's "
              f"{context}-token context)")
    return fs.generate_answers(model, tok, [prompt], task.max_new_tokens)[0], prompt


def main(argv: list[str] | None = None) -> int:
    """Caption your own image, or answer a question about it, few-shot from examples."""
    from miniflamingo.world import World

    ap = argparse.ArgumentParser(prog="python -m miniflamingo ask", description=main.__doc__)
    ap.add_argument("--run", required=True, help="run folder holding flamingo.pt")
    ap.add_argument("--image", required=True, help="an image file (letterboxed to the model's size)")
    ap.add_argument("--question", default=None, help="a question about the image (default: caption it)")
    ap.add_argument("--examples", default=None,
                    help='JSONL of {"image", "caption"} (captions.jsonl, or its folder) or {"image", '
                         '"question", "answer"}; default: examples from the synthetic world')
    ap.add_argument("--shots", type=int, default=4, help="examples in the prompt, chosen by RICES")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, as in eval; 0: default")
    args = ap.parse_args(argv)
    if args.shots < 0:
        ap.error(f"--shots must be >= 0, got {args.shots}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model, cfg = load_run(args.run)
        tok = run_tokenizer(args.run, cfg)
        image = load_image(Path(args.image), cfg.vision.image_size, "--image")
        examples = read_examples(args.examples, cfg.vision.image_size) if args.examples else []
    except (FileNotFoundError, CheckpointError, DataError, ValueError) as e:
        print(f"ask: {e}", file=sys.stderr)
        return 1
    kind = "question" if args.question else "caption"
    if not any(kind in x for x in examples):
        world = World(image_size=cfg.vision.image_size)
        items = open_items(world, "vqa" if args.question else "captioning", 16, "val", 0)
        examples = [{"image": x["media"], "question": x["question"], "answer": x["answer"]} if args.question
                    else {"image": x["media"], "caption": x["answer"]} for x in items]
        print(f"(no {kind} examples given: using {len(examples)} from the synthetic world's val split)")
    try:
        answer, prompt = ask(model, tok, image, args.question, examples, args.shots)
    except ValueError as e:
        print(f"ask: {e}", file=sys.stderr)
        return 1
    print(f"prompt: {tok.decode(prompt.ids)}")
    print(f"answer: {answer}")
    return 0
