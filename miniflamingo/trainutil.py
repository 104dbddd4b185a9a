"""Small pure helpers shared by the three training stages (vision, LM, Flamingo). No Trainer class:
each stage is one straight script that calls these.

Notable features
- `get_lr`: linear warmup then cosine decay to min_lr_ratio * max_lr (or constant), as in the paper's
  training recipes (App. B.1.2: warmup, then a schedule).
- `configure_optimizer`: AdamW that decays only matrices (>= 2-D weights) and never biases, norm gains,
  learned position/temporal embeddings or Perceiver latents, or anything whose name matches `no_decay`
  (the Flamingo stage passes "resampler": the paper, App. B.1.2, uses "no weight decay for the Perceiver
  Resampler and weight decay of 0.1 for the other trainable parameters").
- `save_checkpoint` is atomic (temp file in the same folder, fsync, os.replace): a crash mid-write leaves
  the previous checkpoint intact. `load_checkpoint` uses weights_only=True and names the file when it is
  missing, truncated or corrupt.
- `JsonlLogger` (one JSON object per line), `Progress` (step/total, loss, tokens/s, ETA on stderr),
  `seed_everything`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- schedule and optimizer


def get_lr(step: int, max_lr: float, warmup: int, total: int, schedule: str = "cosine",
           min_lr_ratio: float = 0.1) -> float:
    """Learning rate at `step` (0-based): linear warmup over `warmup` steps to max_lr, then cosine decay
    to min_lr_ratio * max_lr at step `total` (and flat after it), or constant at max_lr."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    min_lr = min_lr_ratio * max_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# Parameters that are learned vectors/tables standing for positions or queries, not weights mapping
# one activation to another: shrinking them towards 0 has no regularising meaning (GPT-2, Perceiver).
NO_DECAY_NAMES = ("latents", "pos_emb", "time_embeddings")


def decay_split(named_params: Iterable[tuple[str, torch.Tensor]], no_decay: Iterable[str] = NO_DECAY_NAMES):
    """Split trainable parameters into (decay, no_decay) lists of names: decay = 2-D or more and no
    `no_decay` substring in the name. Biases, LayerNorm gains and scalar gates are 0/1-D."""
    no_decay = tuple(no_decay)
    decay, keep = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue  # frozen parts (Flamingo's vision encoder and LM) never reach the optimizer
        (decay if p.dim() >= 2 and not any(s in name for s in no_decay) else keep).append(name)
    return decay, keep


def configure_optimizer(model_or_params, lr: float, weight_decay: float, betas=(0.9, 0.95),
                        no_decay: Iterable[str] = NO_DECAY_NAMES, lr_mult: dict[str, float] | None = None
                        ) -> torch.optim.AdamW:
    """AdamW with two param groups. Accepts a module, (name, param) pairs, or bare params (then only
    the >= 2-D rule applies). A tied matrix appears once (named_parameters deduplicates).
    lr_mult {name suffix: k}: those parameters get a group of their own whose "lr_mult" is k; the training
    loop sets each group's lr to k times the schedule's."""
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
    else:
        named = list(model_or_params)
        if named and not isinstance(named[0], tuple):
            named = [(f"param{i}", p) for i, p in enumerate(named)]
    params = dict(named)
    decay, keep = decay_split(named, no_decay)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in keep], "weight_decay": 0.0, "names": keep},
    ]
    for suffix, k in (lr_mult or {}).items():
        for g in groups[:2]:
            picked = [n for n in g["names"] if n.endswith(suffix)]
            if picked:
                g["names"] = [n for n in g["names"] if n not in picked]
                g["params"] = [params[n] for n in g["names"]]
                groups.append({"params": [params[n] for n in picked], "weight_decay": g["weight_decay"],
                               "names": picked, "lr_mult": k})
    # On a GPU the fused kernel does the whole update in one pass over each parameter, where foreach (the
    # default) runs several multi-tensor kernels. Not timed on its own (issue 6).
    fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def avoid_cudnn_attention(device: torch.device) -> None:
    """On a GPU, take cuDNN's kernel out of SDPA's choices (process-wide): flash and memory-efficient
    attention remain. Measured on an H200 (torch 2.11, small preset, batch 256, issue 6): SDPA picked cuDNN
    for every attention of the step, and each call cost 1.8 ms of host time (a graph built per new shape,
    and our row lengths change with every batch) against 0.1 ms for the others: 220 of the step's 535 ms
    of host time. Without it the step went from 584 to 290 ms. No effect on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def compile_regions(model: nn.Module) -> int:
    """torch.compile each repeated block in place (regional compilation): the LM's blocks, the gated
    xattn-dense layers and the resampler's layers. Returns how many modules were compiled.

    Why not the whole model: its forward reads the host twice by design (the resampler groups media by
    their frame counts, Flamingo checks phi once), and each read is a graph break; media counts of 1
    (image-text batches) and more (documents) recompiled the whole graph until dynamo's limit (issue 6,
    measured on an H200). A block has neither: every block of a kind shares one compiled graph, its
    kernels fused, and the host logic around them stays eager. dynamic=True: row lengths change per batch.
    """
    from miniflamingo.lm import Block
    from miniflamingo.resampler import ResamplerLayer
    from miniflamingo.xattn import GatedXAttnDense

    n = 0
    for module in model.modules():
        if isinstance(module, (Block, GatedXAttnDense, ResamplerLayer)):
            module.compile(dynamic=True)
            n += 1
    return n


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a checkpoint)."""


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file atomically: write(f) fills a fresh temp file beside `path`, which is synced and then
    renamed over it, so readers see the old file or the new one, never half; the rename itself is made
    durable (POSIX). Temp files that a writer killed mid-write (SIGKILL) left are removed."""
    path = Path(path)
    # A fresh name in the same folder (so the rename stays on one filesystem), created with the usual
    # permissions (0666 less the umask; mkstemp's 0600 would make every checkpoint owner-only).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{random.SystemRandom().getrandbits(32):08x}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_checkpoint(path, state: dict) -> None:
    """Write `state` with torch.save atomically (atomic_write), creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def write_json(obj, path, indent: int = 1) -> None:
    """Write `obj` as JSON atomically (atomic_write): a run killed mid-write leaves the old file or the
    new one, never a truncated one that the next run cannot read."""
    text = json.dumps(obj, indent=indent) + "\n"  # serialised first: an unserialisable obj writes nothing
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def die_with_parent() -> None:
    """preexec_fn of a child process (start_command's): on Linux, ask the kernel to send it SIGTERM when
    its parent dies, even by SIGKILL (prctl PR_SET_PDEATHSIG), so no orphan keeps working and writing the
    run's files beside a rerun. Elsewhere a no-op: the parents' `finally` still stops their children on
    ordinary exits."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_command(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """`python -m miniflamingo ARGV` in a child process (the demo's LM stage, eval's --jobs) that imports
    this checkout, as its parent does, and dies with its parent (die_with_parent)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "miniflamingo", *argv], env=env,
                            preexec_fn=die_with_parent, **popen_kwargs)


def resume_mismatches(saved_args: dict, args, names, defaults: dict | None = None) -> list[str]:
    """The options among `names` that differ from those a checkpoint was trained with, as
    "--name (saved != now)": resuming with another data stream or schedule would silently train another
    run than the one the checkpoint began. An option the checkpoint's code did not have yet counts as
    its default there (`defaults`), else as None."""
    defaults = defaults or {}
    saved = {k: saved_args.get(k, defaults.get(k)) for k in names}
    return [f"--{k.replace('_', '-')} ({saved[k]!r} != {getattr(args, k)!r})"
            for k in names if saved[k] != getattr(args, k)]


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True): plain tensors and containers only, no pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it to start over"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


# ----------------------------------------------------------------------------- logging


class JsonlLogger:
    """Appends one JSON object per line (per step or eval), flushed at once so a crash loses nothing."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict | None = None, **fields) -> None:
        record = {**(record or {}), **fields}
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One status line: `step 120/500 | loss 3.214 | 41k tok/s | 0:12 elapsed, ETA 0:39`.
    On a terminal it redraws in place with \\r; otherwise (logs, CI) it prints a line every `every` steps."""

    def __init__(self, total: int, start: int = 0, every: int = 50, stream=None, desc: str = ""):
        self.total, self.start, self.every, self.desc = total, start, every, desc
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0
        self._last_draw = 0.0

    def update(self, step: int, loss: float | None = None, tokens: int = 0, **extra) -> str:
        """Call after finishing `step` (1-based count of steps done); `tokens` processed in this step."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        parts = [f"{self.desc}step {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()]
        if self.tokens and elapsed > 0:
            parts.append(f"{self.tokens / elapsed / 1000:.1f}k tok/s")
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts.append(f"{_duration(elapsed)} elapsed, ETA {_duration(eta) if done > 0 else '?'}")
        line = " | ".join(parts)
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw > 0.1 or step >= self.total:
                self.stream.write("\r" + line + "\033[K")
                self.stream.flush()
                self._last_draw = now
        elif step % self.every == 0 or step >= self.total or done == 1:
            self.stream.write(line + "\n")
            self.stream.flush()
        return line

    def write(self, message: str) -> None:
        """A line of its own (an evaluation result) that the status line does not overwrite."""
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.stream.flush()
        self._last_draw = 0.0  # redraw the status line on the next update

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs) so runs are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def release_freed_memory() -> bool:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim); True if it ran, False where the C
    library has no malloc_trim (macOS, musl). Why: rendering and encoding the world allocate hundreds of
    thousands of small arrays and batch-sized buffers, and glibc keeps what they free mapped, in one arena
    per thread, so the process's resident memory stays at its peak for the rest of the run. Measured on the
    demo's Flamingo data (render, then encode on 2 threads): 2.10 GiB resident after encoding, 0.63 GiB
    after the trim (1.46 GiB when encoded on one thread, untrimmed)."""
    import ctypes

    try:  # the C library already loaded in this process (find_library would spawn ldconfig each call)
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
