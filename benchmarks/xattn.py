"""Benchmark the masked cross-attention (issue 5): ours, which groups tokens by their media so each token
attends to its own R latents (L x R), against the straightforward implementation that most public code
uses (flamingo-pytorch, open_flamingo): einsum over ALL media of the row, then a mask (L x T*R), and against
the other way to get L x R: gathering each token's own keys and values.

    python benchmarks/xattn.py                    # the `small` preset's widths, 1 thread
    python benchmarks/xattn.py --preset tiny --repeats 5
    python benchmarks/xattn.py --keys             # grouped vs one masked call, by keys per row (issue 6)

Two shapes:
- train:  resampler + one xattn layer, forward and backward; 5 media per row, 256 tokens (paper: 256-token
          M3W sequences with up to 5 images). Target: no slower than the einsum baseline.
- eval32: one xattn layer, forward only, on media already resampled (at evaluation the media are resampled
          once and then cross-attended at every layer); 32 media, 2048 tokens. Target: >= 3x faster and
          under 1/3 of the baseline's peak memory.
--keys times `attend_own_media` against `attend_own_media_masked` (one SDPA call over all T*R keys of a row,
masked to each token's media: L x T*R work) alone, forward and backward, at a training batch's shape with
T = 2 .. 32 media: where the masked call stops being faster is `xattn.MASKED_MAX_KEYS`.
All variants share the same layer and weights (only `layer.attn.attend` is swapped) and are checked to
agree before timing. Time: median over --repeats, the variants taking turns, so machine noise hits all
alike. Peak memory: bytes of tensor storage live at once during one call, above what existed before it,
counted by a TorchDispatchMode that sees every tensor torch allocates (tracemalloc only sees Python's own
allocations, not torch's C++ ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import miniflamingo as mf  # noqa: E402
from miniflamingo import xattn  # noqa: E402
from miniflamingo.resampler import PerceiverResampler  # noqa: E402
from miniflamingo.xattn import GatedXAttnDense, attend_own_media, attend_own_media_masked, compute_phi  # noqa: E402

# Each variant runs as named: the layer must not swap the grouped one for the masked one.
MASKED_DEFAULT, xattn.MASKED_MAX_KEYS = xattn.MASKED_MAX_KEYS, 0

# ----------------------------------------------------------------------------- the two other designs


def einsum_attention(q, k, v, phi):
    """The baseline: scores against all T*R media keys of the row, then mask to media phi(t) (as in
    flamingo-pytorch / open_flamingo's MaskedCrossAttention). q (B, L, nh, hs), k, v (B, T, nh, R, hs)."""
    B, L, nh, hs = q.shape
    T, R = k.shape[1], k.shape[3]
    k = k.transpose(1, 2).reshape(B, nh, T * R, hs)  # (B, nh, T*R, hs)
    v = v.transpose(1, 2).reshape(B, nh, T * R, hs)
    sim = torch.einsum("bihd,bhjd->bhij", q * hs**-0.5, k)  # (B, nh, L, T*R)
    media_time = torch.arange(T, device=q.device).repeat_interleave(R) + 1  # (T*R,), 1-based like phi
    sim = sim.masked_fill(phi[:, None, :, None] != media_time, -torch.finfo(sim.dtype).max)
    attn = sim.softmax(dim=-1).masked_fill((phi == 0)[:, None, :, None], 0.0)  # no media: zero
    out = torch.einsum("bhij,bhjd->bihd", attn, v)  # (B, L, nh, hs)
    return out.reshape(B, L, nh * hs)


def gather_attention(q, k, v, phi):
    """Each token gathers its own media's keys and values, (B*L, nh, R, hs), and attends with one query."""
    B, L, nh, hs = q.shape
    T, R = k.shape[1], k.shape[3]
    rows = ((phi - 1).clamp(min=0) + torch.arange(B, device=q.device)[:, None] * T).view(-1)  # (B*L,)
    kt = k.reshape(B * T, nh, R, hs)[rows]  # (B*L, nh, R, hs)
    vt = v.reshape(B * T, nh, R, hs)[rows]
    q = q.reshape(B * L, nh, 1, hs)  # one query per attention call
    out = torch.nn.functional.scaled_dot_product_attention(q, kt, vt)  # (B*L, nh, 1, hs)
    return torch.where((phi > 0)[..., None], out.view(B, L, nh * hs), 0.0)


OURS, BASE = "ours (grouped)", "einsum baseline"
VARIANTS = {OURS: attend_own_media, "masked": attend_own_media_masked, "gather": gather_attention,
            BASE: einsum_attention}

# ----------------------------------------------------------------------------- measuring


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of CPU tensor storages created inside the context while they live; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.refs:  # a view or an in-place result shares a storage already counted
                    n = storage.nbytes()
                    self.refs[key] = weakref.ref(storage, lambda _, k=key, n=n: self._freed(k, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn) -> int:
    with PeakMemory() as m:
        fn()
    return m.peak


def image_positions(L: int, T: int, prefix: int = 4) -> list[int]:
    """T <image> tokens spread evenly after a short text prefix, like interleaved documents and prompts."""
    return [prefix + i * (L - prefix) // T for i in range(T)]


def make_ids(B: int, L: int, T: int, cfg: mf.FlamingoConfig) -> torch.Tensor:
    ids = torch.randint(0, cfg.eot_id, (B, L))
    ids[:, image_positions(L, T)] = cfg.image_id
    return ids


def bench(cases: dict, repeats: int) -> dict:
    """cases: name -> (fn per variant). Returns name -> {variant: (median seconds, peak bytes)}."""
    results = {}
    for shape, fns in cases.items():
        times = {v: [] for v in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for v, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t0)
        results[shape] = {v: (statistics.median(times[v]), peak_bytes(fn)) for v, fn in fns.items()}
    return results


# ----------------------------------------------------------------------------- the two shapes


def setup(cfg: mf.FlamingoConfig):
    torch.manual_seed(0)
    layer = GatedXAttnDense(cfg.xattn, cfg.lm.d_model, cfg.resampler.d_model)
    with torch.no_grad():  # as after some training, so the backward pass reaches everything
        layer.attn_gate.fill_(0.5)
        layer.ff_gate.fill_(0.5)
    resampler = PerceiverResampler(cfg.resampler, d_media=cfg.vision.d_out)
    return layer, resampler


def train_case(cfg, layer, resampler, B: int, L: int = 256, T: int = 5) -> dict:
    S = cfg.vision.grid_size**2
    feats = torch.randn(B, T, 1, S, cfg.vision.d_out)  # frozen vision features (B, T, F, S, Dv)
    x = torch.randn(B, L, cfg.lm.d_model, requires_grad=True)  # the LM's residual stream
    phi = compute_phi(make_ids(B, L, T, cfg), cfg.image_id)
    params = [*layer.parameters(), *resampler.parameters(), x]

    def step(attend):
        def run():
            layer.attn.attend = attend
            for p in params:
                p.grad = None
            layer(x, resampler(feats), phi).square().mean().backward()
        return run

    return {v: step(fn) for v, fn in VARIANTS.items()}


def eval_case(cfg, layer, attention_only: bool, B: int = 1, L: int = 2048, T: int = 32) -> dict:
    media = torch.randn(B, T, cfg.resampler.num_latents, cfg.resampler.d_model)  # resampled once
    x = torch.randn(B, L, cfg.lm.d_model)
    phi = compute_phi(make_ids(B, L, T, cfg), cfg.image_id)

    def forward(attend):
        @torch.no_grad()
        def run():
            layer.attn.attend = attend
            return (layer.attn if attention_only else layer)(x, media, phi)
        return run

    return {v: forward(fn) for v, fn in VARIANTS.items()}


def check_agreement(cases: dict) -> None:
    for shape, fns in cases.items():
        if shape.startswith("eval"):
            outs = {v: fn() for v, fn in fns.items()}
            for v, out in outs.items():
                torch.testing.assert_close(out, outs[BASE], atol=1e-4, rtol=1e-4, msg=lambda m, v=v: v + m)


def keys_sweep(cfg, repeats: int, B: int = 16, per_media: int = 15) -> None:
    """Grouped vs masked attention alone, fwd + bwd, by media per row (per_media tokens each, as in the
    tiny training batch: 8 media in 118 tokens): where does one masked call stop paying?"""
    nh, hs, R = cfg.xattn.n_head, cfg.xattn.d_head, cfg.resampler.num_latents
    print(f"attention alone, fwd + bwd: {nh} heads of {hs}, R={R}, B={B}, L={per_media} tokens per media; "
          f"median of {repeats}")
    print(f"{'media T':>7} {'keys T*R':>8} {'grouped ms':>10} {'masked ms':>9} {'grouped/masked':>14}")
    for T in (1, 2, 4, 8, 16, 32):
        Lt = per_media * T + 4  # make_ids puts a 4-token prefix before the first image
        phi = compute_phi(make_ids(B, Lt, T, cfg), cfg.image_id)
        q = torch.randn(B, Lt, nh, hs, requires_grad=True)
        k, v = (torch.randn(B, T, nh, R, hs, requires_grad=True) for _ in range(2))
        w = torch.randn(B, Lt, nh * hs)

        def run(attend, q=q, k=k, v=v, phi=phi, w=w):
            def go():
                for t in (q, k, v):
                    t.grad = None
                (attend(q, k, v, phi) * w).sum().backward()
            return go

        case = {"grouped": run(attend_own_media), "masked": run(attend_own_media_masked)}
        torch.testing.assert_close(attend_own_media(q, k, v, phi), attend_own_media_masked(q, k, v, phi),
                                   atol=1e-5, rtol=1e-5)
        res = bench({T: case}, repeats)[T]
        g, m = res["grouped"][0], res["masked"][0]
        print(f"{T:>7} {T * R:>8} {1e3 * g:>10.2f} {1e3 * m:>9.2f} {g / m:>13.2f}x")
    print(f"xattn.MASKED_MAX_KEYS in the code: {MASKED_DEFAULT} (masked up to there)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="widths to use (default small)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    ap.add_argument("--batch", type=int, default=4, help="rows for the training shape")
    ap.add_argument("--keys", action="store_true", help="only the grouped vs masked sweep over media counts")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = mf.FlamingoConfig.preset(args.preset)
    if args.keys:
        for preset in ("tiny", "small"):
            keys_sweep(mf.FlamingoConfig.preset(preset), args.repeats)
        return 0
    layer, resampler = setup(cfg)
    train, ev, ev_attn = (f"train: resampler + layer, B={args.batch}, T=5, L=256, fwd+bwd",
                          "eval32: layer, T=32, L=2048, fwd", "eval32: masked xattn alone, fwd")
    cases = {train: train_case(cfg, layer, resampler, args.batch), ev: eval_case(cfg, layer, False),
             ev_attn: eval_case(cfg, layer, True)}
    check_agreement(cases)
    print(f"preset {args.preset}: LM width {cfg.lm.d_model}, xattn {cfg.xattn.n_head} heads of "
          f"{cfg.xattn.d_head}, R={cfg.resampler.num_latents} latents of width {cfg.resampler.d_model}; "
          f"float32, {args.threads} thread(s), median of {args.repeats}")
    results = bench(cases, args.repeats)
    print(f"{'shape':<46} {'variant':<16} {'median ms':>9} {'peak MB':>8} {'baseline/this: time':>20} mem")
    for shape, res in results.items():
        base_t, base_m = res[BASE]
        for v, (t, m) in res.items():
            row = f"{shape:<46} {v:<16} {1e3 * t:>9.1f} {m / 2**20:>8.1f}"
            print(f"{row} {base_t / t:>19.2f}x {base_m / m:.2f}x")
    r = {shape: (res[BASE][0] / res[OURS][0], res[OURS][1] / res[BASE][1]) for shape, res in results.items()}
    print(f"train: ours runs at {r[train][0]:.2f}x the baseline's speed (target >= 1)")
    for shape in (ev, ev_attn):
        print(f"{shape}: ours is {r[shape][0]:.2f}x faster (target >= 3) with {r[shape][1]:.3f} of the "
              f"baseline's peak memory (target < 1/3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
