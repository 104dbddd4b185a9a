"""Tokens/s and model FLOP utilisation (MFU) of the Flamingo training stage (issue 6, Performance).

    python benchmarks/train_throughput.py                          # tiny and small, 1 thread on a CPU
    python benchmarks/train_throughput.py --preset tiny --steps 10 --threads 2 --batch-size 64
    python benchmarks/train_throughput.py --preset tiny --profile  # + top ops of one step by CPU time

Notable features
- Times the real step of miniflamingo/train.py: one batch from each dataset of the mixture (synthetic
  world, frozen vision features cached by `with_features` as train.py does), forward with
  vision_features and media_frames, lambda-weighted backward, gradient clip 1.0, AdamW step. Random
  frozen weights: speed does not depend on what the weights are, so no stage-1/2 checkpoints needed.
- Model FLOPs are counted, not estimated, by torch.utils.flop_counter.FlopCounterMode on a meta-device
  copy of the model fed each timed step's own batches (row lengths vary from step to step). It counts the
  matmuls that actually run (2 FLOPs per multiply-add): forward of everything; backward of the trained
  parts (resampler, xattn, the two special embeddings: activation and weight grads, about 2x forward)
  and of the frozen LM (activation grads only, about 1x forward: autograd computes no weight grads for
  frozen weights); attention and the LM head included (on the meta device SDPA runs as counted bmm's).
  Not counted: elementwise ops, norms, softmax, AdamW. The frozen vision encoder does not run in the step.
  Padding is counted as run: the packed rows' (or with --no-pack the rows padded to the longest of their
  batch) and xattn's grouped chunks. The
  cross-attention is counted as grouped (L x R per row) also where the step runs one masked call over all
  T*R keys of a row (`xattn.MASKED_MAX_KEYS`: faster for few keys, T times the work, the rest masked out).
  The resampler runs real frames only (it groups media by frame count; the frames stay on the host, so the
  meta copy groups exactly as the real step does).
- MFU = counted FLOPs per second / this machine's matmul peak measured in the same run: a square matmul
  (2048 on a CPU, 8192 on a GPU), median of 5 repeats just before and 5 just after the preset's steps
  (the shared machine's speed drifts), in the dtype of the step (bf16 when autocast is used, the default
  on GPU).
- Tokens = input positions of all batches of a step, padding included, as train.py counts them. Rows are
  packed as train.py packs them (data.collate's pack: fewer padded positions for the same rows);
  `--no-pack` pads each row to the longest of its batch, as before.
- Medians over the timed steps after warmup; the step-time breakdown is data (sampler + copy to the
  device), forward, backward, optimizer (clip + AdamW). The peak is measured with the same threads
  as the step (--threads), so MFU compares like with like.

Shapes: B batch, L text length, T media slots, F frames, S grid cells, Dv feature width.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from miniflamingo import xattn  # noqa: E402
from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.data import DocumentDataset, MixtureSampler, Source, to_device  # noqa: E402
from miniflamingo.flamingo import Flamingo  # noqa: E402
from miniflamingo.tokenizer import Tokenizer  # noqa: E402
from miniflamingo.train import DEFAULT_WEIGHTS  # noqa: E402
from miniflamingo.trainutil import avoid_cudnn_attention, compile_regions, configure_optimizer  # noqa: E402
from miniflamingo.world import World  # noqa: E402

DEFAULT_STEPS = {"tiny": 10, "small": 3}  # small is slow on a CPU: keep the whole run under ~3 minutes
DEFAULT_BATCH = {"tiny": 16, "small": 8}  # interleaved rows per step on CPU (train.py's default is 16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock


# ----------------------------------------------------------------------------- the peak


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[list[float], int]:
    """FLOP/s of a large square matmul, one per repeat: the machine's practical peak. On a GPU 8192^3:
    2048^3 is too short to fill an H100-class chip (launch gaps would lower the peak, raising MFU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 20  # a GPU matmul takes well under a millisecond
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    return [2 * n**3 / t for t in times[1:]], n


# ----------------------------------------------------------------------------- counting FLOPs


def _cpu_flash(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


# torch's table has the CUDA attention kernels only; on a CPU SDPA runs these two, which it would count as 0.
CPU_ATTENTION = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
    if hasattr(torch.ops.aten, _name):
        CPU_ATTENTION[getattr(torch.ops.aten, _name)] = _fn


def count_flops(meta_model: Flamingo, batches, autocast) -> tuple[int, int]:
    """FLOPs of forward + backward of one step's batches: all, and the resampler's part of them. (The
    counter's per-module split is no use here: the xattn layers run inside the LM, through its hook.)"""
    # Model FLOPs: each token attends to its own media's R keys (L x R). For few keys the real step runs
    # one masked call over all T*R keys of a row instead (xattn.MASKED_MAX_KEYS), T times that work, all
    # of it on keys it then masks out: not counted, so the meta copy runs the grouped attention.
    saved, xattn.MASKED_MAX_KEYS = xattn.MASKED_MAX_KEYS, 0
    try:
        return _count_flops(meta_model, batches, autocast)
    finally:
        xattn.MASKED_MAX_KEYS = saved


def _count_flops(meta_model: Flamingo, batches, autocast) -> tuple[int, int]:
    total = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with total:  # entering a FlopCounterMode resets it: one block for the whole step
        for b in batches:
            with autocast():
                _, loss = meta_model(b.input_ids.to("meta"), vision_features=_meta(b.media),
                                     targets=b.targets, media_frames=b.frames, return_logits=False,
                                     segments=_meta(b.segments))
            (b.weight * loss).backward()
    part = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with part:  # the resampler alone: its input needs no grad, so this is exactly its share of the step
        for b in batches:
            if b.media is not None:
                with autocast():
                    latents = meta_model.resampler(_meta(b.media), b.frames)
                latents.float().sum().backward()
    meta_model.zero_grad(set_to_none=True)
    return total.get_total_flops(), part.get_total_flops()


def _meta(x):
    return None if x is None else x.to("meta")


# ----------------------------------------------------------------------------- model, data, step


class ModelIds:
    """The default tokenizer's text ids with the config's special ids: the small preset's vocabulary is
    bigger than the shipped tokenizer's, and the model finds <image> by its id (vocab_size - 2)."""

    def __init__(self, tok: Tokenizer, cfg: FlamingoConfig):
        if tok.n_vocab > cfg.lm.vocab_size:
            raise SystemExit(f"tokenizer has {tok.n_vocab} ids, more than lm.vocab_size={cfg.lm.vocab_size}")
        self.encode_ordinary = tok.encode_ordinary
        self.eot_id, self.image_id, self.eoc_id = cfg.eot_id, cfg.image_id, cfg.eoc_id


def build(preset: str, batch_size: int, device: torch.device, seed: int = 0, pack: bool = True):
    """A Flamingo of the preset with random frozen parts, and a mixture sampler over the world's features."""
    cfg = FlamingoConfig.preset(preset)
    torch.manual_seed(seed)
    model = Flamingo(cfg).to(device)  # before encoding: on a GPU the cached features stay there
    return model, world_sampler(cfg, batch_size, model.vision, seed, pack)


def world_sampler(cfg: FlamingoConfig, batch_size: int, encoder, seed: int = 0,
                  pack: bool = True) -> MixtureSampler:
    """train.py's three sources over the world's documents, image-text and video-text pairs, their media
    replaced by `encoder`'s features (frozen: encoded once, as train.py does), batch_size rows of each
    (videos: half as many) with train.py's weights, rows packed as train.py packs them (pack=False: each
    row padded to the longest of its batch)."""
    ids = ModelIds(Tokenizer.default(), cfg)
    sizes = {"interleaved": batch_size, "image_text": batch_size, "video_text": max(1, batch_size // 2)}
    world = World(seed=0, image_size=cfg.vision.image_size)
    n = 2 * batch_size  # enough items for two different batches; later steps reuse them in a new order
    data = {
        "interleaved": DocumentDataset.from_documents(world.documents(n, seed=seed), ids),
        "image_text": DocumentDataset.from_pairs(world.image_text_pairs(n, seed=seed), ids),
        "video_text": DocumentDataset.from_pairs(world.video_text_pairs(max(2, n // 2), seed=seed), ids),
    }
    data = {k: d.with_features(encoder, batch_size=32) for k, d in data.items()}
    sources = [Source(k, data[k], DEFAULT_WEIGHTS[k], sizes[k], seq_len=min(256, cfg.lm.context_length),
                      max_media=cfg.max_media, pack=pack) for k in data]
    return MixtureSampler(sources, seed=seed)


def train_step(model, opt, sampler, step: int, device: torch.device, autocast,
               overlap: bool = False) -> tuple[dict, int, list]:
    """train.py's loop body (one process). Returns seconds per phase, tokens, and the batches.
    overlap: wait for the device only at the end of the step, as train.py does, so the host queues work
    ahead; the phases then time the host's side only."""
    times = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
    clock = time.perf_counter()

    def lap(phase):
        nonlocal clock
        if not overlap or phase == "optimizer":
            sync(device)
        now = time.perf_counter()
        times[phase] += now - clock
        clock = now

    opt.zero_grad(set_to_none=True)
    batches, tokens, losses = sampler.batch(step), 0, []  # paper 2.4: one batch per dataset, then one update
    lap("data")
    for b in batches:
        x, y = to_device(b.input_ids, device), b.targets  # as train.py: no wait for the device
        feats = None if b.media is None else to_device(b.media, device)
        frames = b.frames  # on the host, as train.py keeps them: the resampler reads the counts
        segments = None if b.segments is None else to_device(b.segments, device)  # packed rows
        lap("data")
        if not (b.targets != -100).any():  # host targets: no device read, as in train.py
            continue
        with autocast():
            _, loss = model(x, vision_features=feats, targets=y, media_frames=frames, segments=segments,
                            return_logits=False,
                            media_checked=True)
        lap("forward")
        (b.weight * loss).backward()
        losses.append(loss.detach())
        tokens += x.numel()
        lap("backward")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    values = torch.stack([*losses, grad_norm.float()]).tolist()  # train.py's one read a step, after the clip
    if not all(map(math.isfinite, values)):
        raise SystemExit(f"a loss or the gradient norm is not finite at step {step}: {values}")
    opt.step()
    lap("optimizer")
    return times, tokens, batches


# Kernel classes for the device-time breakdown, first match wins: attention before matmul (the attention
# kernels' names hold "cutlass" too), index before copy ("scatter" holds "cat", index_copy "copy").
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "efficient_attention", "attention")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90", "xmma", "mm", "matmul", "linear")),
    ("fused (compiled)", ("triton_",)),  # torch.compile's kernels: several ops each
    ("index", ("index", "gather", "scatter", "embedding")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "cat")),
    ("norm/softmax", ("norm", "softmax", "log_softmax", "nll")),
    ("reduce", ("reduce", "sum")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("elementwise", ("elementwise", "vectorized", "add", "mul", "gelu", "relu", "tanh", "where", "fill")),
)


def kernel_class(name: str) -> str:
    name = name.lower()
    return next((c for c, words in KERNEL_CLASSES if any(w in name for w in words)), "other")


def profile_step(model, opt, sampler, step, device, autocast, rows: int = 25, overlap: bool = False) -> None:
    """Top ops of one step by self time (device time on a GPU), the step's wall time beside its device
    time (how busy the GPU was), and the device time by kernel class with launch counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        train_step(model, opt, sampler, step, device, autocast, overlap)
        sync(device)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if cuda:  # the kernels themselves: an aten op's row repeats its kernels' time
        events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or events
    else:  # leaf ops only would need the tree; the aten ops' self time is close enough for a CPU breakdown
        events = [e for e in events if e.key.startswith("aten::")]
    total = sum(getattr(e, key) for e in events)
    print(f"one step (profiled{', --overlap' if overlap else ''}): wall {1e3 * wall:.0f} ms, "
          f"{'device' if cuda else 'self CPU'} time {total / 1e3:.0f} ms "
          f"({100 * total / 1e6 / wall:.0f}% of the wall), {sum(e.count for e in events)} "
          f"{'kernel launches' if cuda else 'ops'}")
    by_class: dict[str, list[float]] = {}
    for e in events:
        c = by_class.setdefault(kernel_class(e.key), [0.0, 0])
        c[0] += getattr(e, key)
        c[1] += e.count
    print("by class: " + ", ".join(f"{c} {100 * t / max(total, 1):.0f}% ({n})" for c, (t, n) in
                                   sorted(by_class.items(), key=lambda kv: -kv[1][0])))


def host_waits(model, opt, sampler, step, device, autocast) -> None:
    """Where one step (as train.py runs it: --overlap) makes the host wait for the GPU: torch's sync debug
    mode warns at each synchronizing call, and the warnings name the line that made it."""
    import warnings
    from collections import Counter

    if device.type != "cuda":
        print("host waits: only on a GPU (torch.cuda.set_sync_debug_mode)")
        return
    sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, opt, sampler, step, device, autocast, overlap=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    print(f"host waits in one step (--overlap; the step's own end is one): {sum(where.values())}"
          + "".join(f", {n}x {k}" for k, n in where.most_common(12)))


# ----------------------------------------------------------------------------- one preset


def bench(preset: str, args, device: torch.device) -> dict:
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    steps = args.steps or DEFAULT_STEPS.get(preset, 3)
    batch = args.batch_size or (16 if device.type == "cuda" else DEFAULT_BATCH.get(preset, 4))
    t0 = time.perf_counter()
    model, sampler = build(preset, batch, device, pack=args.pack)
    setup = time.perf_counter() - t0
    meta_model = copy.deepcopy(model).to("meta")
    if args.compile == "model":
        model = torch.compile(model, dynamic=True)  # row lengths change from step to step
    elif args.compile == "regions":
        compile_regions(model)  # each block in place; the host logic between blocks stays eager
    opt = configure_optimizer(model, lr=1e-4, weight_decay=0.1,
                              no_decay=("resampler", "latents", "temporal", "special_embeddings"))
    model.train()
    peaks, n_peak = matmul_peak(device, dtype)  # before and after the steps: the machine's speed drifts
    rows = []
    for step in range(args.warmup + steps):
        times, tokens, batches = train_step(model, opt, sampler, step, device, autocast, args.overlap)
        if step >= args.warmup:
            flops, resampler = count_flops(meta_model, batches, autocast)
            media = [b.frames for b in batches if b.frames is not None]  # (B, T) real frames per slot
            rows.append(dict(times, total=sum(times.values()), tokens=tokens, flops=flops,
                             resampler=resampler,
                             loss_tokens=sum(int((b.targets != -100).sum()) for b in batches),
                             frames_real=sum(int(f.sum()) for f in media),
                             frames_run=sum(b.media.shape[0] * b.media.shape[1] * b.media.shape[2]
                                            for b in batches if b.media is not None)))
    peaks += matmul_peak(device, dtype)[0]
    peak = statistics.median(peaks)
    if args.profile:
        profile_step(model, opt, sampler, args.warmup + steps, device, autocast, overlap=args.overlap)
    if args.sync_debug:
        host_waits(model, opt, sampler, args.warmup + steps + 1, device, autocast)
    med = {k: statistics.median(r[k] for r in rows) for k in ("data", "forward", "backward", "optimizer",
                                                                "total")}
    achieved = statistics.median(r["flops"] / r["total"] for r in rows)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        preset=preset, device=str(device), compiled=args.compile, dtype="bf16" if bf16 else "fp32",
        overlap=args.overlap,
        threads=torch.get_num_threads(),
        batch=batch, steps=steps, setup_s=setup, params_total=sum(p.numel() for p in model.parameters()),
        params_trained=trained, tokens_per_step=statistics.median(r["tokens"] for r in rows),
        flops_per_step=statistics.median(r["flops"] for r in rows), step=med,
        **{k: statistics.median(r[k] for r in rows) for k in ("resampler", "loss_tokens", "frames_real",
                                                                "frames_run")},
        peak_n=n_peak, tokens_per_s=statistics.median(r["tokens"] / r["total"] for r in rows),
        achieved=achieved, peak=peak,
        mfu=achieved / peak, peak_range=(min(peaks), max(peaks)),
    )


def report(r: dict) -> None:
    s, compiled = r["step"], f", compiled: {r['compiled']}" if r["compiled"] else ""
    print(f"\n== {r['preset']} on {r['device']} ({r['dtype']}{compiled}, "
          f"{r['threads']} threads), batch {r['batch']} "
          f"(pairs {r['batch']}, videos {max(1, r['batch'] // 2)}), median of {r['steps']} steps; "
          f"setup {r['setup_s']:.1f} s")
    print(f"params {r['params_total'] / 1e6:.2f}M, trained {r['params_trained'] / 1e6:.2f}M; "
          f"{r['tokens_per_step']:.0f} tokens ({r['loss_tokens']:.0f} with a loss) and "
          f"{r['flops_per_step'] / 1e9:.2f} GFLOP per step, resampler "
          f"{100 * r['resampler'] / r['flops_per_step']:.0f}% "
          f"(it runs the {r['frames_real']:.0f} real frames of the batches' {r['frames_run']:.0f} "
          f"slots x frames)")
    overlap = "; --overlap: host time per phase, the wait for the device in optimizer" if r["overlap"] else ""
    print(f"step {1e3 * s['total']:.0f} ms = data {1e3 * s['data']:.0f} + forward {1e3 * s['forward']:.0f} + "
          f"backward {1e3 * s['backward']:.0f} + optimizer {1e3 * s['optimizer']:.0f} ms (medians{overlap})")
    print(f"tokens/s {r['tokens_per_s']:.0f}; achieved {r['achieved'] / 1e9:.2f} GFLOP/s; "
          f"peak ({r['dtype']} {r['peak_n']}^3 matmul, median of 10) {r['peak'] / 1e9:.1f} "
          f"GFLOP/s (range {r['peak_range'][0] / 1e9:.0f}-{r['peak_range'][1] / 1e9:.0f}); "
          f"MFU {100 * r['mfu']:.1f}%")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 10, small 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="interleaved rows and image-text rows per step, half as many videos "
                         "(default: 16 on GPU; on CPU tiny 16, small 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, 0: torch's default (one per core). Default 1: on the shared 2-core "
                         "machine 2 threads ran tiny 18x slower than 1, waiting on a core another job held")
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                    help="pack short rows together as train.py does (default); --no-pack pads each row to "
                         "the longest of its batch")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one more step")
    ap.add_argument("--overlap", action="store_true",
                    help="GPU: wait for the device once a step, as train.py does, not after each phase; the "
                         "phase times are then the host's")
    ap.add_argument("--compile", nargs="?", const="model", choices=["model", "regions"], default=None,
                    help="torch.compile the whole model (dynamic shapes), or 'regions': each LM block, xattn "
                         "layer and resampler layer (trainutil.compile_regions)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="GPU: run one more step and list the lines where the host waited for the device")
    ap.add_argument("--sdpa", default=None,
                    help="the SDPA backends allowed, comma-separated, from flash_attention, "
                         "efficient_attention, math, cudnn_attention (default: train.py's: all but cuDNN's "
                         "on a GPU, trainutil.avoid_cudnn_attention)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load}")
    if args.sdpa:  # exactly these backends
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = [b.strip().upper() for b in args.sdpa.split(",")]
        unknown = [b for b in names if b not in SDPBackend.__members__ or b == "ERROR"]
        if unknown:
            ap.error(f"--sdpa: unknown backend(s) {unknown}; choose from flash_attention, "
                     f"efficient_attention, math, cudnn_attention")
        allowed = sdpa_kernel([getattr(SDPBackend, b) for b in names])
    else:  # what train.py does
        avoid_cudnn_attention(device)
        allowed = contextlib.nullcontext()
    with allowed:
        for preset in args.preset:
            report(bench(preset, args, device))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
