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
import json
import sys
from pathlib import Path

import torch

from miniflamingo import fewshot as fs
from miniflamingo.data import DataError
from miniflamingo.evaluate import TASKS, load_run, open_items, run_tokenizer
from miniflamingo.readers import load_image
from miniflamingo.trainutil import CheckpointError


def read_examples(path, image_size: int) -> list[dict]:
    """Examples for `ask`, one JSON object per line, image paths relative to the file: {"image", "caption"}
    (captions.jsonl, DESIGN.md 5) or {"image", "question", "answer"}. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON line ({e})") from None
        texts = ("caption",) if isinstance(obj, dict) and "caption" in obj else ("question", "answer")
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("image", *texts)):
            raise DataError(f'{where}: expected {{"image": relpath, "caption": str}} or {{"image": relpath, '
                            f'"question": str, "answer": str}}, got {str(obj)[:80]}')
        examples.append({**{k: obj[k] for k in texts}, "image": load_image(path.parent / obj["image"],
                                                                           image_size, where)})
    return examples


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
    while True:
        if n:
            support = [shot(features[1 + j], pool[j]) for j in order[len(order) - n:]]
        else:
            support = fs.text_only([shot(None, x) for x in pool[:2]])
        prompt = fs.build_prompt(tok, support, shot(features[0]))
        if n == 0 or len(prompt.ids) + task.max_new_tokens <= model.cfg.lm.context_length:
            break
        n -= 1  # drop the least similar example
    return fs.generate_answers(model, tok, [prompt], task.max_new_tokens)[0], prompt


def main(argv: list[str] | None = None) -> int:
    """Caption your own image, or answer a question about it, few-shot from examples."""
    from miniflamingo.world import World

    ap = argparse.ArgumentParser(prog="python -m miniflamingo ask", description=main.__doc__)
    ap.add_argument("--run", required=True, help="run folder holding flamingo.pt")
    ap.add_argument("--image", required=True, help="an image file (letterboxed to the model's size)")
    ap.add_argument("--question", default=None, help="a question about the image (default: caption it)")
    ap.add_argument("--examples", default=None, help='JSONL of {"image", "caption"} (captions.jsonl) or '
                    '{"image", "question", "answer"}; default: examples from the synthetic world')
    ap.add_argument("--shots", type=int, default=4, help="examples in the prompt, chosen by RICES")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, as in eval; 0: default")
    args = ap.parse_args(argv)
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
    answer, prompt = ask(model, tok, image, args.question, examples, args.shots)
    print(f"prompt: {tok.decode(prompt.ids)}")
    print(f"answer: {answer}")
    return 0
