"""Stage 2 of training (DESIGN.md 4): next-token pretraining of the small GPT on text.

    python -m miniflamingo pretrain-lm                       # tiny preset, synthetic world corpus, ~2 min
    python -m miniflamingo pretrain-lm --corpus my.txt --run runs/lm --steps 2000 --preset small
    python -m miniflamingo pretrain-lm --lm.n_layer=4        # any config override

Notable features
- The corpus: by default the synthetic world's LM documents (`World.lm_corpus`: documents with each
  image replaced by words naming it, plus binding drills), so the frozen LM already copies in context
  what Flamingo will ask it to bind (DESIGN.md 5). Or any text file with `--corpus`.
- Documents are joined by <|endoftext|>; each step samples random contiguous windows. Batches are drawn
  from a generator seeded by (seed, step), so a resumed run sees the same batches as an uninterrupted one.
- `DIR/lm.pt` is written atomically and holds {"model", "config", "step", "optimizer"}; a run resumes
  from it. `DIR/lm_log.jsonl` gets a line per logged step and per evaluation.
- AdamW with decay on matrices only, warmup + cosine, global grad-norm clip 1 (paper App. B.1.2).
- `--dtype auto`: bf16 autocast only where it was measured to help (benchmarks/lm_autocast.py).
- Reports in-context copying (loss on a random sequence's repeat vs its first occurrence), the skill
  Flamingo's few-shot binding rests on; `--copy-drills FRAC` mixes in repeated random sequences.

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

from miniflamingo.config import FlamingoConfig, LMConfig
from miniflamingo.lm import GPT
from miniflamingo.trainutil import (
    JsonlLogger,
    Progress,
    configure_optimizer,
    get_lr,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

FALLBACK_CORPUS = Path(__file__).resolve().parent.parent / "data_samples" / "tokenizer_corpus.txt"


# ----------------------------------------------------------------------------- data


def load_corpus(args, tok) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train ids, held-out ids, description): 1-D long tensors of documents joined by <|endoftext|>."""

    def join(docs: list[str]) -> torch.Tensor:
        ids = []
        for d in docs:
            ids += [tok.eot_id] + tok.encode(d)
        return torch.tensor(ids, dtype=torch.long)

    if args.corpus is None:
        try:
            from miniflamingo.world import World

            World.lm_corpus  # noqa: B018 (checks the world module offers the corpus)
        except (ImportError, AttributeError) as e:
            print(f"synthetic world corpus unavailable ({e}); using {FALLBACK_CORPUS}", file=sys.stderr)
            path = FALLBACK_CORPUS
        else:
            world = World()
            train = world.lm_corpus(args.docs, seed=args.seed)
            val = world.lm_corpus(args.val_docs, seed=args.seed + 1_000_003)  # other documents
            return join(train), join(val), f"synthetic world, {args.docs} + {args.val_docs} held-out docs"
    else:
        path = Path(args.corpus)
    if not path.is_file():
        raise SystemExit(f"pretrain-lm: corpus file {path} not found")
    ids = join([path.read_text(encoding="utf-8")])
    n_val = max(len(ids) // 20, args.seq_len + 2)  # last 5% held out
    if len(ids) - n_val < args.seq_len + 2:
        raise SystemExit(f"pretrain-lm: corpus {path} has {len(ids)} tokens, too few for --seq-len "
                         f"{args.seq_len}")
    return ids[:-n_val], ids[-n_val:], f"{path}: {len(ids)} tokens, last {n_val} held out"


def get_batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random contiguous windows: x = ids[s : s+L], y = ids[s+1 : s+L+1], each (B, L)."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])  # (B, L+1)
    return windows[:, :-1], windows[:, 1:]


def copy_drills(batch_x, batch_y, vocab: torch.Tensor, frac: float, gen: torch.Generator):
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
        batch_x[r], batch_y[r] = row[:-1], row[1:]
    return batch_x, batch_y


@torch.no_grad()
def evaluate(model, ids, args, device, autocast) -> float:
    """Mean loss over fixed held-out windows (the same every call: a fixed generator)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(ids, args.batch_size, min(args.seq_len, len(ids) - 2), gen)
        with autocast:
            losses.append(model(x.to(device), y.to(device))[1].item())
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
    ap.add_argument("--docs", type=int, default=4000, help="synthetic world documents to train on")
    ap.add_argument("--val-docs", type=int, default=200, help="synthetic world documents held out")
    ap.add_argument("--run", default="runs/lm", help="run folder: lm.pt, lm_log.jsonl (default runs/lm)")
    ap.add_argument("--steps", type=int, default=300, help="total optimizer steps (the lr schedule's length)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) at this step")
    ap.add_argument("--seconds", type=float, default=None, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: lm.context_length)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=30)
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
    args.seq_len = args.seq_len or cfg.context_length
    if args.seq_len > cfg.context_length:
        raise SystemExit(f"pretrain-lm: --seq-len {args.seq_len} exceeds lm.context_length="
                         f"{cfg.context_length}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = auto_dtype(cfg, device) if args.dtype == "auto" else args.dtype
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    from miniflamingo.tokenizer import Tokenizer

    tok = Tokenizer.default()
    if tok.n_vocab != cfg.vocab_size:
        raise SystemExit(f"pretrain-lm: tokenizer has {tok.n_vocab} ids but lm.vocab_size={cfg.vocab_size}")
    t0 = time.perf_counter()
    train_ids, val_ids, what = load_corpus(args, tok)
    print(f"corpus: {what}; {len(train_ids):,} train / {len(val_ids):,} held-out tokens "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    drill_vocab = train_ids.unique()
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
        step = state["step"]
        print(f"resuming from {ckpt_path} at step {step}", file=sys.stderr)
    print(f"GPT {cfg.n_layer}x{cfg.d_model} ({cfg.pos}): {model.num_params() / 1e6:.2f}M parameters; "
          f"{dtype} on {device}; batch {args.batch_size} x {args.seq_len}", file=sys.stderr)

    def checkpoint():
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                                    "step": step, "optimizer": opt.state_dict()})

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
        x, y = get_batch(train_ids, args.batch_size, args.seq_len, gen)
        if args.copy_drills > 0:
            x, y = copy_drills(x, y, drill_vocab, args.copy_drills, gen)
        with autocast:
            _, loss = train_model(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss = loss.item()
        if not math.isfinite(loss):
            raise SystemExit(f"pretrain-lm: loss is {loss} at step {step}; lower --lr or use --dtype fp32")
        progress.update(step, loss, tokens=x.numel(), lr=lr)
        if step % args.log_every == 0 or step == stop:
            log.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm.item(),
                    tokens_per_s=progress.tokens / (time.perf_counter() - progress.t0))
        if step % args.eval_every == 0 and step < stop:
            first, second = copy_losses(model, drill_vocab, device, n=min(32, cfg.context_length // 2))
            log.log(step=step, val_loss=evaluate(model, val_ids, args, device, autocast),
                    copy_first_half=first, copy_second_half=second)
        if step % args.save_every == 0:
            checkpoint()
        if args.seconds is not None and time.perf_counter() - t_start > args.seconds:
            print(f"\nstopping after {args.seconds:g} s at step {step}", file=sys.stderr)
            break
    progress.close()
    checkpoint()
    val = evaluate(model, val_ids, args, device, autocast)
    first, second = copy_losses(model, drill_vocab, device, n=min(32, cfg.context_length // 2))
    log.log(step=step, val_loss=val, copy_first_half=first, copy_second_half=second)
    log.close()
    print(f"in-context copy of a random token sequence: loss {first:.2f} on its first occurrence, "
          f"{second:.2f} on its repeat", file=sys.stderr)
    print(f"step {step}/{args.steps}: held-out loss {val:.4f} (ppl {math.exp(val):.2f}); "
          f"{time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
