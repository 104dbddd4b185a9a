"""Helpers several test files share (tests/ is on sys.path when pytest runs them)."""

import dataclasses

import torch

import miniflamingo as mf

IMAGE_SIZE = 32  # the tiny encoder at 32x32: a 2x2 grid, fast


def tiny_model(open_gates: bool = True) -> mf.Flamingo:
    """The tiny preset at 32x32 with the default tokenizer's vocabulary; gates opened so media matter."""
    cfg = mf.FlamingoConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=IMAGE_SIZE))
    torch.manual_seed(0)
    model = mf.Flamingo(cfg)
    with torch.no_grad():
        if open_gates:
            for layer in model.xattn:
                layer.attn_gate.fill_(0.8)
                layer.ff_gate.fill_(0.5)
    return model.eval()
