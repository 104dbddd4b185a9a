"""`python -m miniflamingo <command> [options]`: each command lives in the module that owns it,
as a `main(argv)` function, imported only when asked for (so `--help` is instant)."""

import importlib
import sys

COMMANDS = {
    # command: (module, function, one-line help)
    "tokenizer": ("miniflamingo.tokenizer", "main", "train a byte-level BPE tokenizer on a text corpus"),
    "world": ("miniflamingo.world", "main", "write the synthetic visual world to a folder"),
    "pretrain-lm": ("miniflamingo.pretrain_lm", "main", "pretrain the small GPT on the text corpus"),
    "pretrain-vision": ("miniflamingo.pretrain_vision", "main", "contrastive pretraining of the NFNet"),
    "train": ("miniflamingo.train", "main", "train Flamingo's resampler and gated xattn on the frozen parts"),
    "eval": ("miniflamingo.evaluate", "main", "few-shot evaluation: a table of tasks by shots, eval.json"),
    "ask": ("miniflamingo.ask", "main", "caption or answer a question about your own image"),
    "demo": ("miniflamingo.demo", "main", "the whole pipeline on the synthetic world, then a few-shot table"),
    "data": ("miniflamingo.readers", "main", "check a local data set and print one tokenized row"),
}


def usage() -> str:
    lines = ["usage: python -m miniflamingo <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`python -m miniflamingo <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
