"""FSDP: shard Flamingo across processes when a preset does not fit one device (DESIGN.md 7).

    torchrun --nproc_per_node=8 -m miniflamingo train --preset flamingo-9b --fsdp ...

Notable features
- torch's FSDP2 (`fully_shard`): every parameter becomes a DTensor split on its first dimension across
  the ranks, so each rank holds 1/N of the weights, gradients and AdamW moments. A unit's full weights
  are all-gathered just before its forward (and again for its backward), then freed; gradients are
  reduce-scattered and averaged over ranks, as DistributedDataParallel averages them.
- Units follow the model's structure: each frozen LM block, each GATED XATTN-DENSE layer, the Perceiver
  Resampler, then the root (embeddings, special tokens, final norm). Frozen LM parameters are sharded
  too: at the paper's sizes the frozen LM is most of the memory (80B: 70B frozen). The frozen vision
  encoder is left whole on every rank (FSDP ignores it): it is small next to the LM (NFNet-F6: 0.4B) and
  its NFNet skip gains are scalars, which FSDP cannot shard. (Our xattn gates are (1,) for that reason.)
- Checkpoints stay plain, full state dicts (DESIGN.md 7): every rank takes part in gathering them, rank 0
  writes; a resumed run loads the full dict on every rank and each keeps its shard.
- Works with gloo on CPU (the test runs 2 processes) and nccl on GPUs.

Shapes: a parameter (d0, ...) is held as (ceil(d0 / N), ...) on each of N ranks.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model) -> None:
    """Apply FSDP2 in place, innermost units first (a parent's unit holds what its children do not)."""
    for block in model.lm.blocks:
        fully_shard(block)
    for layer in model.xattn:
        fully_shard(layer)
    fully_shard(model.resampler)
    fully_shard(model, ignored_params=set(model.vision.parameters()))  # the frozen encoder stays whole


def full_tensor(x):
    """A DTensor's full value (a collective: every rank must call it); plain tensors pass through."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def state_dicts(model, opt) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU. A collective: every rank must call it."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)


def load_state_dicts(model, opt, model_state: dict, opt_state: dict) -> None:
    """Load full state dicts (the same on every rank) into a sharded model and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, opt, opt_state, options=options)


def is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def gate_values(model) -> list[torch.Tensor]:
    """Every xattn gate as a plain scalar tensor (a collective when sharded)."""
    return [full_tensor(g).detach() for layer in model.xattn for g in (layer.attn_gate, layer.ff_gate)]
