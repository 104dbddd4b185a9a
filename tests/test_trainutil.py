"""Training helpers: schedule values, weight-decay groups, atomic checkpoints, clear load errors, logging."""

import io
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from miniflamingo import trainutil
from miniflamingo.config import LMConfig
from miniflamingo.lm import GPT
from miniflamingo.trainutil import (
    CheckpointError,
    JsonlLogger,
    Progress,
    configure_optimizer,
    get_lr,
    load_checkpoint,
    resume_mismatches,
    save_checkpoint,
    seed_everything,
    write_json,
)


def test_get_lr_warmup_then_cosine():
    lr = lambda s, **kw: get_lr(s, max_lr=1.0, warmup=10, total=110, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert lr(60, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr(3, schedule="constant") == pytest.approx(0.4) and lr(100, schedule="constant") == 1.0
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine phase must not increase"
    with pytest.raises(ValueError, match="schedule"):
        lr(0, schedule="linear")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.latents = nn.Parameter(torch.zeros(3, 4))  # Perceiver-style learned queries: 2-D, no decay
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_optimizer_decays_exactly_the_matrices():
    opt = configure_optimizer(Toy(), lr=1e-3, weight_decay=0.1)
    decay, keep = opt.param_groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert decay["names"] == ["proj.weight"]
    assert sorted(keep["names"]) == ["attn_gate", "latents", "ln.bias", "ln.weight", "proj.bias"]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_optimizer_lr_mult_moves_parameters_to_their_own_group():
    opt = configure_optimizer(Toy(), lr=1e-3, weight_decay=0.1, lr_mult={"_gate": 20.0})
    decay, keep, gates = opt.param_groups
    assert gates["names"] == ["attn_gate"] and gates["lr_mult"] == 20.0 and gates["weight_decay"] == 0.0
    assert "attn_gate" not in keep["names"] and "lr_mult" not in keep
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in Toy().parameters() if p.requires_grad)  # nothing lost or doubled


def test_optimizer_no_decay_names_and_tied_gpt():
    gpt = GPT(LMConfig(n_layer=2, n_head=2, d_model=8, vocab_size=11, context_length=8))
    opt = configure_optimizer(gpt, lr=1e-3, weight_decay=0.1)
    decay, keep = opt.param_groups
    # tied lm_head/wte appear once; every Linear weight decays, no bias or LayerNorm does
    expected = {"wte.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(decay["names"]) == expected
    assert all(n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f") for n in keep["names"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == gpt.num_params()
    # the Flamingo stage exempts the whole resampler (paper App. B.1.2)
    opt = configure_optimizer(gpt, lr=1e-3, weight_decay=0.1, no_decay=("blocks.1",))
    assert not any(n.startswith("blocks.1") for n in opt.param_groups[0]["names"])


def test_optimizer_accepts_bare_params():
    lin = nn.Linear(3, 2)
    opt = configure_optimizer(lin.parameters(), lr=1e-3, weight_decay=0.1)
    assert [p.shape for p in opt.param_groups[0]["params"]] == [(2, 3)]
    assert [p.shape for p in opt.param_groups[1]["params"]] == [(2,)]


def test_checkpoint_roundtrip(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "config": {"n_layer": 2, "pos": "rope"}, "step": 7}
    save_checkpoint(tmp_path / "sub" / "x.pt", state)
    back = load_checkpoint(tmp_path / "sub" / "x.pt")
    assert back["step"] == 7 and back["config"] == state["config"]
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.pt"], "temp file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sub" / "x.pt").stat().st_mode & 0o777 == 0o666 & ~umask, "not the usual permissions"
    # a temp file left by a writer killed mid-save goes with the next save of the same checkpoint
    stale = tmp_path / "sub" / ".x.pt.123.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "sub" / "x.pt", state)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.pt"], "stale temp file kept"


def test_time_embeddings_are_among_the_no_decay_names():
    """The resampler's temporal embeddings are positions, not weights (trainutil.NO_DECAY_NAMES): the
    name must match the parameter's, or the 2-D table would decay."""
    from miniflamingo.config import ResamplerConfig
    from miniflamingo.resampler import PerceiverResampler
    from miniflamingo.trainutil import decay_split

    r = PerceiverResampler(ResamplerConfig(n_layer=1, n_head=2, d_head=4, d_model=8, num_latents=2), 8)
    decay, keep = decay_split(r.named_parameters())
    assert {"latents", "time_embeddings"} <= set(keep) and not {"latents", "time_embeddings"} & set(decay)


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "lm.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file, then the crash
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["lm.pt"], "partial temp file left behind"
    old = load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))


def test_write_json_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    """eval.json, vision_eval.json and the demo's stages.json: a writer killed mid-write leaves the old
    file whole and no temp file."""
    path = tmp_path / "stages.json"
    write_json({"vision": {"seconds": 1.0}}, path)

    def dying_fsync(fd):  # the bytes are in the temp file, not yet renamed: the crash comes here
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(trainutil.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_json({"vision": {"seconds": 1.0}, "lm": {"seconds": 2.0}}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"], "partial temp file left behind"
    assert json.loads(path.read_text()) == {"vision": {"seconds": 1.0}}
    (tmp_path / ".stages.json.99999.tmp").write_text('{"half')  # a writer killed by SIGKILL leaves this
    write_json({"lm": 2}, path)
    assert json.loads(path.read_text()) == {"lm": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"], "stale temp files are removed"


def test_resume_mismatches_names_options_and_takes_new_options_at_their_default():
    """A checkpoint written before an option existed resumes when the option is at its default (the demo
    rerun over an older run), and not when it is set to something else."""
    import argparse

    now = argparse.Namespace(data="d", batch_size=8, skip_bad=False)
    names = ("data", "batch_size", "skip_bad")
    assert resume_mismatches({"data": "d", "batch_size": 8}, now, names, {"skip_bad": False}) == []
    assert resume_mismatches({"data": "d", "batch_size": 4}, now, names, {"skip_bad": False}) == [
        "--batch-size (4 != 8)"]
    assert resume_mismatches({"data": "d", "batch_size": 8}, now, names) == ["--skip-bad (None != False)"]
    now.skip_bad = True
    assert resume_mismatches({"data": "d", "batch_size": 8}, now, names, {"skip_bad": False}) == [
        "--skip-bad (False != True)"]


def test_missing_truncated_corrupt_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "lm.pt"
    save_checkpoint(path, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"lm\.pt is truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"lm\.pt is truncated or corrupt"):
        load_checkpoint(path)
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match=r"lm\.pt holds a Tensor, expected a dict"):
        load_checkpoint(path)


def test_jsonl_logger_appends(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    with JsonlLogger(path) as log:
        log.log(step=1, loss=torch.tensor(2.5).item())
        log.log({"step": 2}, lr=0.1)
    with JsonlLogger(path) as log:  # a resumed run appends
        log.log(step=3, loss=1.0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "lr": 0.1}, {"step": 3, "loss": 1.0}]


def test_progress_prints_every_n_steps_when_not_a_tty():
    out = io.StringIO()
    p = Progress(total=10, every=4, stream=out)
    for step in range(1, 11):
        line = p.update(step, loss=1.0 / step, tokens=100)
    p.close()
    printed = out.getvalue().splitlines()
    assert [s.split(" | ")[0] for s in printed] == ["step 1/10", "step 4/10", "step 8/10", "step 10/10"]
    assert "loss 0.1000" in line and "tok/s" in line and "ETA" in line and "\r" not in out.getvalue()


def test_seed_everything_repeats():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_avoid_cudnn_attention_switches_only_on_a_gpu():
    """SDPA's cuDNN kernel cost 1.8 ms of host time per call on an H200 (issue 6): off for CUDA devices,
    untouched on a CPU. The switch is a process-wide flag; restored after the test."""
    from miniflamingo.trainutil import avoid_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_release_freed_memory_returns_freed_small_arrays_to_the_os():
    """Many small arrays freed stay resident under glibc (the demo's rendered pixels did, ~1.5 GB); the
    trim hands them back. Skipped where there is no malloc_trim or no /proc."""
    import gc
    from pathlib import Path

    import numpy as np

    from miniflamingo.trainutil import release_freed_memory

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc to read the resident memory")

    def rss_mib() -> float:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    arrays = [np.ones(3000) for _ in range(20000)]  # 24 KB each, 460 MiB in all: heap, not mmap
    held = rss_mib()
    del arrays
    gc.collect()
    if not release_freed_memory():
        pytest.skip("no malloc_trim in this C library")
    assert rss_mib() < held - 300, (held, rss_mib())
