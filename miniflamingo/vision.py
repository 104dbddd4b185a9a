"""The vision encoder: an NFNet-style normalizer-free ResNet (Brock et al. 2021, "High-Performance
Large-Scale Image Recognition Without Normalization"), as Flamingo uses NFNet-F6 (paper App. B.1.3).

Notable features
- No normalization layers. Convolutions standardize their own weights (`WSConv2d`, scaled weight
  standardization), and each residual block scales its branch input by beta = 1 / expected_std and its
  output by alpha, so the variance of the residual stream at init is known analytically through depth
  (NFNet paper sec. 3, following Brock et al. 2021a "Characterizing signal propagation").
- A learnable skip gain initialised to zero: every residual block is the identity at init.
- Grouped bottleneck blocks (1x1, 3x3 grouped, 3x3 grouped, 1x1), squeeze-excite scaled by 2,
  GELU scaled by gamma ~ 1.7015 so a unit-Gaussian input keeps unit variance.
- The NFNet stem (3x3 convs, strides 2, 1, 1, 2) and transition blocks (avg-pool + 1x1 conv shortcut).
- Output: the last feature map flattened to (N, S, Dv) with no pooling, for the Perceiver Resampler.
- `VisionConfig.nfnet("f0")` ... `("f6")`: the paper's variants; F6 has about 435M parameters without
  its classifier (438.4M with the 1000-way head) and builds on the meta device.

Shapes: N images, C channels, H x W pixels, h x w = (H / stride) x (W / stride) output grid,
S = h * w grid cells, Dv = cfg.d_out = cfg.final_width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miniflamingo.config import VisionConfig
from miniflamingo.trainutil import load_checkpoint

# Var(gelu(z)) for z ~ N(0, 1) is 1 / gamma**2; multiplying by gamma keeps unit variance (NFNet App. D).
GELU_GAMMA = 1.7015043497085571
# ImageNet channel statistics: inputs arrive in [0, 1] and are normalised inside the encoder.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def scaled_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) * GELU_GAMMA


class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization (NFNet paper eq. 2):
    W_hat = gain * (W - mean(W)) / (std(W) * sqrt(fan_in)), statistics per output channel, so every
    output unit's weights have zero mean and variance 1 / fan_in: a unit-variance input gives a
    unit-variance output (before the nonlinearity), with no batch statistics involved."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 eps: float = 1e-4):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                         groups=groups, bias=True)
        self.gain = nn.Parameter(torch.ones(out_ch, 1, 1, 1))  # learnable, per output channel
        self.eps = eps  # floor on var * fan_in, so an all-constant filter does not divide by zero
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight  # (out, in / groups, k, k)
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * self.gain
        return (w - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, 1, self.groups)


class SqueezeExcite(nn.Module):
    """Channel gates from the globally pooled features (Hu et al. 2018). NFNets multiply the sigmoid
    gate by 2 so that, with gates ~0.5 at init, the branch keeps its variance (NFNet sec. 4.1)."""

    def __init__(self, ch: int, ratio: float):
        super().__init__()
        hidden = max(1, int(ch * ratio))
        self.fc0 = nn.Linear(ch, hidden)
        self.fc1 = nn.Linear(hidden, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean(dim=(2, 3))  # (N, C)
        gate = torch.sigmoid(self.fc1(F.relu(self.fc0(h))))  # (N, C)
        return 2.0 * gate[:, :, None, None] * x


class NFBlock(nn.Module):
    """Normalizer-free bottleneck residual block (NFNet Fig. 5):
        out = x + skip_gain * alpha * f(act(x) * beta)
    beta = 1 / expected_std of x, so f sees a unit-variance input and (with WS convs, scaled GELU and SE x2)
    returns roughly unit variance; the stream's variance then grows by alpha**2 per block. A transition block
    (stride > 1 or width change) instead takes its shortcut from the normalised input act(x) * beta, through
    avg-pool and a 1x1 conv, which resets the variance to ~1 at the start of each stage."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, beta: float, alpha: float, group_width: int,
                 bottleneck_ratio: float, se_ratio: float, drop_rate: float = 0.0):
        super().__init__()
        mid = int(out_ch * bottleneck_ratio)
        if group_width > mid:
            raise ValueError(f"vision.group_width={group_width} exceeds the bottleneck width {mid} "
                             f"(= {out_ch} * bottleneck_ratio)")
        groups = mid // group_width
        mid = groups * group_width  # round the bottleneck down to whole groups, as NFNets do
        self.beta, self.alpha, self.stride, self.drop_rate = beta, alpha, stride, drop_rate
        self.conv0 = WSConv2d(in_ch, mid, 1)
        self.conv1 = WSConv2d(mid, mid, 3, stride=stride, groups=groups)
        self.conv1b = WSConv2d(mid, mid, 3, groups=groups)
        self.conv2 = WSConv2d(mid, out_ch, 1)
        self.se = SqueezeExcite(out_ch, se_ratio)
        self.transition = stride > 1 or in_ch != out_ch
        self.shortcut = WSConv2d(in_ch, out_ch, 1) if self.transition else None
        self.skip_gain = nn.Parameter(torch.zeros(()))  # zero init: the block starts as the identity

    def branch_and_shortcut(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual branch f(act(x) * beta), ~unit variance at init, and the shortcut."""
        out = scaled_gelu(x) * self.beta
        if self.transition:
            short = F.avg_pool2d(out, self.stride) if self.stride > 1 else out
            short = self.shortcut(short)
        else:
            short = x
        out = self.conv0(out)
        out = self.conv1(scaled_gelu(out))
        out = self.conv1b(scaled_gelu(out))
        out = self.conv2(scaled_gelu(out))
        return self.se(out), short

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, short = self.branch_and_shortcut(x)
        if self.training and self.drop_rate > 0:
            # stochastic depth: drop the whole branch per sample, rescale the survivors
            keep = torch.rand(branch.shape[0], 1, 1, 1, device=branch.device) >= self.drop_rate
            branch = branch * keep / (1.0 - self.drop_rate)
        return short + branch * self.skip_gain * self.alpha


class VisionEncoder(nn.Module):
    """images (N, 3, H, W) in [0, 1] -> features (N, S, Dv); any H, W divisible by cfg.stride."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

        # stem: 3x3 convs with strides 2, 1, 1, 2 (NFNet sec. 4.1); activations between, none after the
        # last, because every block starts with its own activation.
        s = cfg.stem_widths
        self.stem = nn.ModuleList([
            WSConv2d(3, s[0], 3, stride=2), WSConv2d(s[0], s[1], 3),
            WSConv2d(s[1], s[2], 3), WSConv2d(s[2], s[3], 3, stride=2),
        ])

        # Residual stages. expected_std tracks the stream's std analytically: each block adds a branch of
        # variance alpha**2, and a transition block resets it to 1 (its shortcut sees a normalised input).
        blocks, in_ch, expected_std = [], s[3], 1.0
        n_blocks, index = sum(cfg.depths), 0
        for width, depth, stride in zip(cfg.widths, cfg.depths, cfg.strides):
            for i in range(depth):
                blocks.append(NFBlock(
                    in_ch, width, stride if i == 0 else 1, beta=1.0 / expected_std, alpha=cfg.alpha,
                    group_width=cfg.group_width, bottleneck_ratio=cfg.bottleneck_ratio,
                    se_ratio=cfg.se_ratio, drop_rate=cfg.stochdepth_rate * index / n_blocks,
                ))
                if i == 0:
                    expected_std = 1.0
                expected_std = (expected_std**2 + cfg.alpha**2) ** 0.5
                in_ch, index = width, index + 1
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = WSConv2d(in_ch, cfg.final_width, 1)
        # The ImageNet classifier exists only to compare parameter counts with the NFNet paper;
        # Flamingo drops it (num_classes = 0) and keeps the grid of features.
        self.head = nn.Linear(cfg.final_width, cfg.num_classes) if cfg.num_classes > 0 else None
        # Channels-last (NHWC) weights and activations: oneDNN's CPU convolutions run faster on them
        # (tiny encoder, batch 128, forward + backward: 1.15-1.26x on 1 and 2 threads;
        # benchmarks/vision_step.py), as cuDNN's do with tensor cores. Same function up to rounding; the
        # benchmark sets it back to torch.contiguous_format (weights and self.memory_format) to compare.
        self.memory_format = torch.channels_last
        self.to(memory_format=self.memory_format)

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the final feature map (N, Dv, h, w)."""
        st = self.cfg.stride
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % st or images.shape[3] % st:
            raise ValueError(f"expected images (N, 3, H, W) with H and W divisible by the encoder stride "
                             f"{st}, got {tuple(images.shape)}")
        x = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        for i, conv in enumerate(self.stem):
            x = conv(scaled_gelu(x) if i > 0 else x)
        for block in self.blocks:
            x = block(x)
        return scaled_gelu(self.final_conv(x))  # (N, Dv, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_map(images)
        N, D, h, w = x.shape
        # (N, S, Dv), S = h * w, row-major over the grid; a channels-last map makes this contiguous
        return x.reshape(N, D, h * w).transpose(1, 2)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-style logits (N, num_classes): global average pool then the linear head."""
        if self.head is None:
            raise ValueError("classify needs vision.num_classes > 0")
        return self.head(self.forward_map(images).mean(dim=(2, 3)))


def load_pretrained(path, device: str | torch.device = "cpu") -> VisionEncoder:
    """The encoder saved by `python -m miniflamingo pretrain-vision` (RUN/vision.pt), in eval mode."""
    ckpt = load_checkpoint(path, map_location=device)  # names the file when it is missing or corrupt
    enc = VisionEncoder(VisionConfig(**ckpt["config"])).to(device)
    enc.load_state_dict(ckpt["model"])
    return enc.eval()
