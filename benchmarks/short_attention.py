"""The attention calls of one Flamingo training step, each timed forward + backward with every SDPA kernel
(issue 6: on an H200, flash attention's backward took 2.9 ms a call on the short-key attentions of the
small preset's step, 40 ms of its 301 ms of device time).

    python benchmarks/short_attention.py                            # small preset, batch 512, on a GPU
    python benchmarks/short_attention.py --preset tiny --batch-size 8 --repeats 3    # a CPU dry run

Notable features
- The calls are recorded, not guessed: a real training step's three batches (the world's documents,
  image-text and video-text pairs, as benchmarks/train_throughput.py builds them) go through a meta-device
  copy of the model with `F.scaled_dot_product_attention` wrapped, which notes each call's shapes, mask
  and causality. The frozen vision features are zeros from a stand-in encoder of the right shape: the
  shapes do not depend on their values, and no vision encoder has to run.
- Each distinct call is then timed on the device with random inputs of its shapes (bf16 on a GPU, fp32 on
  a CPU): forward and backward to q, k and v, under train's choice of kernels (`default`: all but
  cuDNN's, trainutil.avoid_cudnn_attention), under each backend alone (flash, memory-efficient, math,
  cuDNN; a backend that refuses the call, e.g. flash with a mask, is left blank and the reason printed)
  and as plain batched matmuls and a softmax written out (`explicit`). Median of --repeats after a
  warmup, each repeat 5 calls queued between two waits for the device (wall clock, so what the host
  spends launching a call counts where it exceeds the device's time). Calls per step times the time per
  call gives the step's share.
- Not measured here: cuDNN's cost of building a graph for each new shape (training's rows change length
  every batch; 1.8 ms of host time a call on an H200, trainutil.avoid_cudnn_attention): every shape here
  repeats after its warmup. Inputs are fresh contiguous tensors, where the model passes views.

Shapes: N calls' batch, nh heads, Lq queries, Lk keys, hs head size.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput.py, beside this file

from train_throughput import sync, world_sampler  # noqa: E402

from miniflamingo.config import FlamingoConfig  # noqa: E402
from miniflamingo.flamingo import Flamingo  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
DEFAULT = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # train's (trainutil)


def record_calls(preset: str, batch_size: int) -> tuple[collections.Counter, dict]:
    """{(q shape, k shape, v shape, mask shape or None, is_causal): calls in one step}, and who made them."""
    cfg = FlamingoConfig.preset(preset)
    model = Flamingo(cfg).to("meta")
    S, Dv = cfg.vision.grid_size ** 2, cfg.vision.d_out

    def features(frames: torch.Tensor) -> torch.Tensor:  # a stand-in encoder: (n, 3, H, W) -> (n, S, Dv)
        return torch.zeros(frames.shape[0], S, Dv)

    sampler = world_sampler(cfg, batch_size, features)  # the benchmark's batches, train.py's sources
    calls, where = collections.Counter(), {}
    real_sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape),
               None if attn_mask is None else (tuple(attn_mask.shape), str(attn_mask.dtype)), is_causal)
        calls[key] += 1
        frame = sys._getframe(1)
        where.setdefault(key, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return real_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = recording  # the model's modules look it up at call time
    try:
        for b in sampler.batch(0):
            media = None if b.media is None else b.media.to("meta")
            segments = None if b.segments is None else b.segments.to("meta")  # packed, as train.py does
            model(b.input_ids.to("meta"), vision_features=media, targets=b.targets,
                  media_frames=b.frames, return_logits=False, media_checked=True, segments=segments)
    finally:
        F.scaled_dot_product_attention = real_sdpa
    return calls, where


def explicit_attention(q, k, v, attn_mask=None, is_causal=False):
    """softmax(q k^T / sqrt(hs) + mask) v as batched matmuls in the inputs' dtype and a float32 softmax.
    (SDPA's math backend on a GPU runs bf16 inputs in float32 throughout, unless told otherwise.)"""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else \
            scores + attn_mask
    return scores.softmax(-1).to(q.dtype) @ v


def time_call(key, device, dtype, backend: str, repeats: int, inner: int = 5) -> float | str:
    """Median seconds of forward + backward of one call, or why the backend could not run it. Each repeat
    queues `inner` calls between two waits for the device, so a call's launch overhead overlaps the work
    before it as in a training step (one call between two waits would time the launches as well)."""
    q_shape, k_shape, v_shape, mask, is_causal = key
    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=True)
               for s in (q_shape, k_shape, v_shape))
    attn_mask = None
    if mask is not None:
        shape, kind = mask
        if kind == "torch.bool":
            attn_mask = torch.rand(shape, device=device) < 0.9
            attn_mask[..., 0] = True  # every query keeps a key: no all-masked rows
        else:  # under autocast the model's float mask reaches SDPA in the queries' dtype
            attn_mask = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(q_shape[:-1] + v_shape[-1:], device=device, dtype=dtype)

    def once():
        if backend == "explicit":
            out = explicit_attention(q, k, v, attn_mask, is_causal)
        else:
            with sdpa_kernel(DEFAULT if backend == "default" else [BACKENDS[backend]]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    try:  # warmup; a backend that cannot run the call (or runs out of memory) raises here
        once()
        sync(device)
    except Exception as e:  # noqa: BLE001 - the reason is printed
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}"
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            once()
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=512,
                    help="interleaved and image-text rows (videos: half as many)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    calls, where = record_calls(args.preset, args.batch_size)
    print(f"torch {torch.__version__}, {device} ({dtype}), {args.preset} preset, batch {args.batch_size}: "
          f"{sum(calls.values())} attention calls a step, {len(calls)} distinct (recorded in "
          f"{time.perf_counter() - t0:.0f} s)")
    names = ["default", "flash", "efficient", "math"] + (["cudnn"] if device.type == "cuda" else []) + \
        ["explicit"]
    print(f"{'call (q / k shapes, mask)':50s} {'where':15s} {'n':>3s} " + " ".join(f"{n:>9s}" for n in names)
          + "   ms per call, forward + backward")
    totals, refused, reasons = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), {}
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1] * kv[0][0][0]):
        q_shape, k_shape, _, mask, is_causal = key
        ms = {b: time_call(key, device, dtype, b, args.repeats) for b in names}
        for b in names:  # a call a backend refuses runs on the default choice's kernel: counted at its time
            ran = isinstance(ms[b], float)
            totals[b] += n * (ms[b] if ran else ms["default"] if isinstance(ms["default"], float) else 0.0)
            if not ran:
                refused[b] += n
                reasons.setdefault((b, ms[b]), where[key])
        mask_text = "causal" if is_causal else ("" if mask is None else f"mask {mask[1].split('.')[-1]}")
        label = f"{'x'.join(map(str, q_shape))} / {'x'.join(map(str, k_shape))} {mask_text}"
        print(f"{label[:50]:50s} {where[key]:15s} {n:3d} "
              + " ".join(f"{1e3 * ms[b]:9.3f}" if isinstance(ms[b], float) else f"{'-':>9s}" for b in names))
    print(f"a step's {sum(calls.values())} attention calls, forward + backward (default: train's choice, "
          f"every kernel but cuDNN's; a refused call counted at the default's time):")
    print("  " + ", ".join(f"{b} {1e3 * t:.1f} ms" + (f" ({refused[b]} refused)" if refused[b] else "")
                          for b, t in totals.items()))
    for (b, why), at in reasons.items():
        print(f"  {b} refused (first at {at}): {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
