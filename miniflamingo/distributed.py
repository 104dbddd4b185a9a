"""Training across processes (DESIGN.md 7): DistributedDataParallel helpers, and FSDP for presets that
do not fit one device.

    torchrun --nproc_per_node=2 -m miniflamingo train --run-dir runs/ddp           # DDP: replicated
    torchrun --nproc_per_node=8 -m miniflamingo train --preset flamingo-9b --fsdp  # FSDP: sharded

Notable features
- torchrun sets RANK / WORLD_SIZE; gloo on CPU, nccl on GPU (`setup_distributed`). Token counts and
  losses are summed over ranks (`global_count`) so the loss is normalised by the global batch.
- DDP keeps every rank's copy identical; `check_ranks_agree` verifies it at the end of a run.
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

import os

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- DDP and common helpers


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); torchrun sets RANK/WORLD_SIZE. gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if world_size == 1:
        return 0, 1, torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world_size, torch.device("cuda", local)
    return rank, world_size, torch.device("cpu")


def global_count(n: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum over ranks (token counts, summed losses)."""
    if world_size > 1:
        n = n.clone()
        dist.all_reduce(n)
    return n


def check_ranks_agree(model, world_size: int) -> float:
    """DDP keeps every rank's copy identical; check it: max |param - rank 0's param| over all ranks."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise SystemExit(f"train: ranks disagree after training (max parameter difference {diff.item()})")
    return diff.item()


# ----------------------------------------------------------------------------- FSDP


def shard(model) -> None:
    """Apply FSDP2 in place, innermost units first (a parent's unit holds what its children do not)."""
    from torch.distributed.fsdp import fully_shard  # imported only when used: _state_dict_api says why

    for block in model.lm.blocks:
        fully_shard(block)
    for layer in model.xattn:
        fully_shard(layer)
    fully_shard(model.resampler)
    fully_shard(model, ignored_params=set(model.vision.parameters()))  # the frozen encoder stays whole


def full_tensor(x):
    """A DTensor's full value (a collective: every rank must call it); plain tensors pass through."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _state_dict_api():
    """torch.distributed.checkpoint, imported only under --fsdp. Measured: importing it and fsdp at module
    level made 2-process gloo DDP runs hang at exit, after training (4 of 10 runs; 0 of 6 without)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def state_dicts(model, opt) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU. A collective: every rank must call it."""
    sd = _state_dict_api()
    full = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return sd.get_model_state_dict(model, options=full), sd.get_optimizer_state_dict(model, opt, options=full)


def load_state_dicts(model, opt, model_state: dict, opt_state: dict) -> None:
    """Load full state dicts (the same on every rank) into a sharded model and its optimizer."""
    sd = _state_dict_api()
    options = sd.StateDictOptions(full_state_dict=True)
    sd.set_model_state_dict(model, model_state, options=options)
    sd.set_optimizer_state_dict(model, opt, opt_state, options=options)


def gate_values(model) -> list[torch.Tensor]:
    """Every xattn gate as a plain scalar tensor (a collective when sharded)."""
    return [full_tensor(g).detach() for layer in model.xattn for g in (layer.attn_gate, layer.ff_gate)]
