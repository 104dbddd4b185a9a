"""Stage 2 of training (DESIGN.md 4): next-token pretraining of the small GPT on text.

    python -m miniflamingo pretrain-lm                       # tiny preset, synthetic world corpus, ~4 min
    python -m miniflamingo pretrain-lm --corpus my.txt --run runs/lm --steps 2000 --preset small
    python -m miniflamingo pretrain-lm --lm.n_layer=4        # any config override

Notable features
- The corpus: by default the synthetic world's LM documents (`World.lm_corpus`: documents with each
  image replaced by words naming it, plus binding drills), so the frozen LM already copies in context
  what Flamingo will ask it to bind (DESIGN.md 5). Each image becomes ONE position, an image slot whose
  vector composes from those words (lm_corpus.py says why). Or any text file with `--corpus`.
- Documents are joined by <|endoftext|>; each step samples random contiguous windows. Batches are drawn
  from a generator seeded by (seed, step), so a resumed run sees the same batches as an uninterrupted one.
- `DIR/lm.pt` is written atomically and holds {"model", "config", "step", "optimizer"}; a run resumes
  from it. `DIR/lm_log.jsonl` gets a line per logged step and per evaluation.
- AdamW with decay on matrices only, warmup + cosine, global grad-norm clip 1 (paper App. B.1.2).
- `--dtype auto`: bf16 autocast only where it was measured to help (benchmarks/lm_autocast.py).
- Watches the skill Flamingo's few-shot binding rests on, at every evaluation and at the end: on the
  world's corpus a 5-way binding probe (`lm_corpus.binding_probe`, fresh made-up words; the demo reads
  its last value from lm_log.jsonl), on a text file in-context copying (loss on a random sequence's
  repeat vs its first occurrence). `--copy-drills FRAC` mixes in repeated random sequences.

Shapes: B batch, L window length.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from miniflamingo import lm_corpus
from miniflamingo.config import FlamingoConfig, LMConfig
from miniflamingo.lm import GPT
from miniflamingo.trainutil import (
    JsonlLogger,
    Progress,
    avoid_cudnn_attention,
    configure_optimizer,
    get_lr,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from miniflamingo.world import default_world

# ----------------------------------------------------------------------------- data


def load_corpus(args, tok) -> tuple[lm_corpus.Corpus, lm_corpus.Corpus, str]:
    """(train, held-out, description): documents joined, each after <|endoftext|>. The world's documents
    have an image slot per image (lm_corpus.py); a text file has none."""
    if args.corpus is None:
        world = default_world()
        families = args.families and args.families.split(",")  # None: world_docs.LM_FAMILIES' weights
        train = world.lm_corpus(args.docs, seed=args.seed, families=families)
        val = world.lm_corpus(args.val_docs, seed=args.seed + 1_000_003, families=families)  # other documents
        return (lm_corpus.encode_documents(train, tok), lm_corpus.encode_documents(val, tok),
                f"synthetic world, {args.docs} + {args.val_docs} held-out docs, an image slot per image"
                + (f", families {args.families}" if args.families else ""))
    path = Path(args.corpus)
    if not path.is_file():
        raise SystemExit(f"pretrain-lm: corpus file {path} not found")
    ids = torch.tensor([tok.eot_id] + tok.encode(path.read_text(encoding="utf-8")), dtype=torch.long)
    n_val = max(len(ids) // 20, args.seq_len + 2)  # last 5% held out
    if len(ids) - n_val < args.seq_len + 2:
        raise SystemExit(f"pretrain-lm: corpus {path} has {len(ids)} tokens, too few for --seq-len "
                         f"{args.seq_len}")
    return (lm_corpus.text_corpus(ids[:-n_val]), lm_corpus.text_corpus(ids[-n_val:]),
            f"{path}: {len(ids)} tokens, last {n_val} held out")


def copy_drills(batch_x, batch_y, batch_slots, vocab: torch.Tensor, frac: float, gen: torch.Generator):
    """Replace a fraction of the rows by a random sequence of tokens, drawn uniformly from `vocab` (the
    ordinary tokens of the corpus), repeated over the whole window ("a b c a b c a b c ..."). After its
    first period a row is predictable only by copying from context, which pushes a small LM to form the
    induction-style heads that few-shot binding needs. Uniform draws, not corpus spans: in a span,
    bigram statistics already predict much, which weakens the push to copy."""
    B, L = batch_x.shape
    for r in range(int(round(frac * B))):
        period = int(torch.randint(8, 33, (), generator=gen))
        span = vocab[torch.randint(0, len(vocab), (period,), generator=gen)]
        row = span.repeat(L // period + 2)[: L + 1]  # (L+1,)
        batch_x[r], batch_y[r], batch_slots[r] = row[:-1], row[1:], -1
    return batch_x, batch_y, batch_slots


@torch.no_grad()
def evaluate(model, corpus: lm_corpus.Corpus, args, device, autocast) -> float:
    """Mean loss over fixed held-out windows (the same every call: a fixed generator)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(args.eval_batches):
        seq_len = min(args.seq_len, len(corpus.ids) - 2)
        x, y, slots = lm_corpus.get_batch(corpus, args.batch_size, seq_len, gen)
        with autocast:
            loss = lm_corpus.forward(model, corpus, x.to(device), slots.to(device), y.to(device))[1]
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def copy_losses(model, vocab: torch.Tensor, device, n: int = 32, rows: int = 32) -> tuple[float, float]:
    """In-context copying, the skill few-shot binding rests on (DESIGN.md 5): mean loss on the first and
    on the second half of rows "x1..xn x1..xn", the x drawn uniformly from `vocab` (the corpus' ordinary
    tokens). Only copying from context makes the second half predictable."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    a = vocab[torch.randint(0, len(vocab), (rows, n), generator=gen)]  # (B, n)
    seq = torch.cat([a, a], dim=1).to(device)  # (B, 2n)
    logits, _ = model(seq[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none")
    model.train()
    return nll[:, : n - 1].mean().item(), nll[:, n:].mean().item()  # (first half, second half)


# ----------------------------------------------------------------------------- precision


def auto_dtype(cfg: LMConfig, device: torch.device) -> str:
    """bf16 autocast where it was measured to pay (benchmarks/lm_autocast.py, 2 CPU cores, batch 16 x 256:
    tiny (2 x 128) 0.82x, width 64 0.98x, width 256 1.37x, width 512 1.30x; an earlier run: 2.8x at width
    256, 1.1-2.3x slower at 64). On CPU the casts around each matmul cost more than narrow matmuls save,
    so bf16 from width 256 up; on GPUs with bf16 support always."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cfg.d_model >= 256 else "fp32"


# ----------------------------------------------------------------------------- the run


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m miniflamingo pretrain-lm", description="Pretrain the small GPT on text.",
        epilog="Any other --part.field=value argument overrides the preset's config, e.g. --lm.n_layer=4.",
    )
    ap.add_argument("--preset", default="tiny", help="config preset (default tiny)")
    ap.add_argument("--corpus", default=None, help="text file (default: the synthetic world's LM documents)")
    ap.add_argument("--docs", type=int, default=20000, help="synthetic world documents to train on")
    ap.add_argument("--families", default=None,
                    help="comma-separated document families, equally weighted (default: the weights of "
                         "world_docs.LM_FAMILIES); lesson 12: 'pairs' alone, text with no in-context binding")
    ap.add_argument("--val-docs", type=int, default=200, help="synthetic world documents held out")
    ap.add_argument("--run", default="runs/lm", help="run folder: lm.pt, lm_log.jsonl (default runs/lm)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (the lr schedule's length)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) at this step")
    ap.add_argument("--seconds", type=float, default=None, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None,
                    help="window length (default: 128 on the world's corpus, whose documents are about 80 "
                         "tokens; lm.context_length on a text file)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="auto")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (costs 20-30 s, no gain on CPU)")
    ap.add_argument("--copy-drills", type=float, default=0.0,
                    help="fraction of each batch replaced by repeated random spans (in-context copy drills)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=100)
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = FlamingoConfig.preset(args.preset).override(overrides).lm
    # Binding emerged after a number of STEPS (about 1000 at 32 x 128 on the tiny preset), so on the
    # world's short documents many short windows beat a few long ones.
    if args.seq_len is None:
        args.seq_len = min(128, cfg.context_length) if args.corpus is None else cfg.context_length
    if args.seq_len > cfg.context_length:
        raise SystemExit(f"pretrain-lm: --seq-len {args.seq_len} exceeds lm.context_length="
                         f"{cfg.context_length}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    avoid_cudnn_attention(device)
    dtype = auto_dtype(cfg, device) if args.dtype == "auto" else args.dtype
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    from miniflamingo.tokenizer import Tokenizer

    tok = Tokenizer.default()
    if tok.n_vocab != cfg.vocab_size:
        raise SystemExit(f"pretrain-lm: tokenizer has {tok.n_vocab} ids but lm.vocab_size={cfg.vocab_size}")
    t0 = time.perf_counter()
    train, val, what = load_corpus(args, tok)
    print(f"corpus: {what}; {len(train.ids):,} train / {len(val.ids):,} held-out tokens "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    world = default_world() if args.corpus is None else None  # then watch the LM learn to bind
    drill_vocab = train.ids.unique()
    drill_vocab = drill_vocab[drill_vocab < tok.eot_id]  # ordinary tokens seen in the corpus
    model = GPT(cfg).to(device)
    opt = configure_optimizer(model, args.lr, args.weight_decay)
    run = Path(args.run)
    ckpt_path, step = run / "lm.pt", 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if state["config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"pretrain-lm: {ckpt_path} holds a different LM config {state['config']}; "
                             f"use another --run or the same preset/overrides")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if "rng" in state:  # dropout's draws (--lm.dropout > 0) continue as if never stopped
            torch.set_rng_state(state["rng"].cpu())
        step = state["step"]
        print(f"resuming from {ckpt_path} at step {step}", file=sys.stderr)
    last_good = f"{ckpt_path} (step {step})" if step else "none"
    print(f"GPT {cfg.n_layer}x{cfg.d_model} ({cfg.pos}): {model.num_params() / 1e6:.2f}M parameters; "
          f"{dtype} on {device}; batch {args.batch_size} x {args.seq_len}", file=sys.stderr)

    def checkpoint():
        nonlocal last_good
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                                    "step": step, "optimizer": opt.state_dict(),
                                    "rng": torch.get_rng_state()})
        last_good = f"{ckpt_path} (step {step})"

    def skills(final: bool = False) -> dict:
        """The in-context skill Flamingo will need: binding on the world's corpus (slots), copying a
        random token sequence on plain text."""
        if world is not None:
            acc = lm_corpus.binding_probe(model, tok, world, episodes=100 if final else 50)
            progress.write(f"step {step}: 5-way binding probe (fresh words, slots) {acc:.0%}, chance 20%")
            return {"binding_probe": acc}
        first, second = copy_losses(model, drill_vocab, device, n=min(32, cfg.context_length // 2))
        progress.write(f"step {step}: in-context copy of a random token sequence: loss {first:.2f} on its "
                       f"first occurrence, {second:.2f} on its repeat")
        return {"copy_first_half": first, "copy_second_half": second}

    train_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    stop = min(args.steps, args.stop_at or args.steps)
    log = JsonlLogger(run / "lm_log.jsonl")
    progress = Progress(stop, start=step, every=args.log_every, desc="pretrain-lm ")
    t_start = time.perf_counter()
    model.train()
    while step < stop:
        lr = get_lr(step, args.lr, args.warmup, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # batches depend on step alone
        x, y, slots = lm_corpus.get_batch(train, args.batch_size, args.seq_len, gen)
        if args.copy_drills > 0:
            x, y, slots = copy_drills(x, y, slots, drill_vocab, args.copy_drills, gen)
        with autocast:
            _, loss = lm_corpus.forward(train_model, train, x.to(device), slots.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        # Checked before the update, so the parameters (and the next checkpoint) are never non-finite.
        loss, grad_norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise SystemExit(f"pretrain-lm: {name} is {value} at step {step + 1} on a batch of {what}; "
                                 f"last good checkpoint: {last_good}; lower --lr or use --dtype fp32")
        opt.step()
        step += 1
        progress.update(step, loss, tokens=x.numel(), lr=lr)
        if step % args.log_every == 0 or step == stop:
            log.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                    tokens_per_s=progress.tokens / (time.perf_counter() - progress.t0))
        if step % args.eval_every == 0 and step < stop:
            log.log(step=step, val_loss=evaluate(model, val, args, device, autocast), **skills())
        if step % args.save_every == 0:
            checkpoint()
        if args.seconds is not None and time.perf_counter() - t_start > args.seconds:
            print(f"\nstopping after {args.seconds:g} s at step {step}", file=sys.stderr)
            break
    progress.close()
    checkpoint()
    val_loss = evaluate(model, val, args, device, autocast)
    log.log(step=step, val_loss=val_loss, **skills(final=True))
    log.close()
    print(f"step {step}/{args.steps}: held-out loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}); "
          f"{time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
