"""Adaptive gradient clipping (AGC), NFNet paper sec. 4.1 (Brock et al. 2021).

Notable features
- Unit-wise: each output unit (a row of a linear weight, an output channel of a conv weight) is clipped
  on its own, when its gradient norm is large relative to its weight norm:
      G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i    if ||G_i|| / max(||W_i||, eps) > lambda
- Units under the threshold are left bit-identical.
- The paper does not clip the final linear layer; the caller leaves those parameters out of `params`.

Shapes: a parameter's first dimension indexes output units (PyTorch layouts: Linear (out, in), Conv
(out, in / groups, k, k)); scalars and vectors count as a single unit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit, broadcastable against x: (out, 1, ..., 1); one norm for 0-d/1-d tensors."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)  # biases, gains, scalars: one unit (as the paper's code does)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)  # (out, 1, ..., 1)


@torch.no_grad()
def adaptive_grad_clip(params: Iterable[torch.nn.Parameter], clip: float = 0.01, eps: float = 1e-3) -> int:
    """Clip gradients in place, unit-wise; returns how many units were clipped (for the log).

    `clip` is lambda (the paper uses 0.01 at batch 4096 and larger values for smaller batches); `eps`
    keeps zero-initialised weights (e.g. the NFBlock skip gains) from freezing: their gradient may still
    reach clip * eps."""
    n_clipped = 0
    for p in params:
        if p.grad is None:
            continue
        w_norm = unitwise_norm(p).clamp(min=eps)
        g_norm = unitwise_norm(p.grad)
        max_norm = clip * w_norm
        trigger = g_norm > max_norm
        if trigger.any():
            scale = max_norm / g_norm.clamp(min=1e-6)
            p.grad.copy_(torch.where(trigger, p.grad * scale, p.grad))
            n_clipped += int(trigger.sum())
    return n_clipped
