"""Configuration: one dataclass per box of the data-flow diagram, and presets by name.

Notable features
- `FlamingoConfig.preset(name)` for "tiny" (the CPU demo), "small" (one GPU) and the
  paper's "flamingo-3b", "flamingo-9b", "flamingo-80b" (paper Tables 4 and 5).
- Command-line overrides on dotted fields: `cfg.override(["--lm.n_layer=6"])`, type-checked;
  an unknown key is an error that lists the valid keys.
- Invariants are asserted in `__post_init__`, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- components


@dataclass
class VisionConfig:
    """NFNet-style normalizer-free conv net (Brock et al. 2021), frozen inside Flamingo.

    The stem downsamples by 4 and each stage by its stride, so the output grid is
    image_size / (4 * prod(strides)) on a side; the final 1x1 conv widens to `final_width`,
    which is the feature width Dv seen by the Perceiver Resampler.
    """

    image_size: int = 64  # square input side in pixels
    stem_widths: tuple[int, ...] = (16, 32, 64, 128)  # NFNet stem: 3x3 convs, strides 2,1,1,2
    widths: tuple[int, ...] = (256, 512, 1536, 1536)  # output width of each stage
    depths: tuple[int, ...] = (1, 2, 6, 3)  # residual blocks per stage (F0)
    strides: tuple[int, ...] = (1, 2, 2, 2)  # first block of each stage
    group_width: int = 128  # channels per group in the grouped 3x3 convs
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5  # squeeze-excite hidden width = se_ratio * block width
    final_width: int = 3072  # final 1x1 conv (NFNet: 2 * widths[-1])
    alpha: float = 0.2  # residual branch scale (signal propagation)
    stochdepth_rate: float = 0.0
    num_classes: int = 0  # 0: no classifier head (Flamingo drops it)

    def __post_init__(self):
        n = len(self.widths)
        assert len(self.depths) == n and len(self.strides) == n, (
            f"vision: widths, depths and strides need one entry per stage, got "
            f"{len(self.widths)}, {len(self.depths)}, {len(self.strides)}"
        )
        assert self.image_size % self.stride == 0, (
            f"vision.image_size={self.image_size} must be divisible by the total stride {self.stride}"
        )

    @classmethod
    def nfnet(cls, variant: str = "f0", **overrides) -> VisionConfig:
        """NFNet-F0 ... F6 (Brock et al. 2021, Table 1): the depths grow as (1, 2, 6, 3) * (k + 1); widths,
        group width 128 and final width 3072 are shared. Image size is each variant's training resolution
        unless overridden (Flamingo trains F6 at 288 contrastively and 320 inside Flamingo)."""
        sizes = {"f0": 192, "f1": 224, "f2": 256, "f3": 320, "f4": 384, "f5": 416, "f6": 448}
        if variant not in sizes:
            raise ValueError(f"unknown NFNet variant {variant!r}; choose one of {sorted(sizes)}")
        k = int(variant[1]) + 1
        base = dict(image_size=sizes[variant], depths=(1 * k, 2 * k, 6 * k, 3 * k))
        return cls(**{**base, **overrides})

    @property
    def stride(self) -> int:
        s = 4  # the stem's two stride-2 convs
        for t in self.strides:
            s *= t
        return s

    @property
    def grid_size(self) -> int:
        """Side of the output feature grid: S = grid_size**2 cells per image."""
        return self.image_size // self.stride

    @property
    def d_out(self) -> int:
        """Dv, the width of the features handed to the resampler."""
        return self.final_width


@dataclass
class ResamplerConfig:
    """Perceiver Resampler (paper 2.1, App. A.1.1): R learned latents cross-attend to the visual
    features of one media (all frames), giving a fixed number of visual tokens."""

    n_layer: int = 6
    n_head: int = 16
    d_head: int = 128
    d_model: int = 1536  # Dr, the latents' width
    num_latents: int = 64  # R
    max_frames: int = 8  # temporal embeddings learned; more at inference by interpolation
    ff_mult: int = 4
    kind: str = "perceiver"  # "mlp": the Table 3 ablation (vi), a plain MLP in its place (resampler.py)

    def __post_init__(self):
        assert self.n_layer >= 1, f"resampler.n_layer must be >= 1, got {self.n_layer}"
        assert self.kind in ("perceiver", "mlp"), f"resampler.kind: perceiver or mlp, got {self.kind!r}"
        assert self.num_latents >= 1, f"resampler.num_latents must be >= 1, got {self.num_latents}"
        assert self.max_frames >= 1, "resampler.max_frames must be >= 1"


@dataclass
class LMConfig:
    """The small GPT: pre-LN decoder with relative positions (ALiBi) so it can copy in context."""

    n_layer: int = 24
    n_head: int = 16
    d_model: int = 2048
    vocab_size: int = 32000
    context_length: int = 2048
    ff_mult: int = 4
    pos: str = "alibi"  # "alibi" or "rope"
    tie_weights: bool = True
    dropout: float = 0.0
    # Smeared keys (Olsson et al. 2022, "In-context learning and induction heads"): in every layer but the
    # first, each head's key at j mixes in the key at j-1 with a learned weight. A deviation, on in the
    # tiny preset only (the paper's LM has plain keys): see lm.CausalSelfAttention for why.
    smear_keys: bool = False

    def __post_init__(self):
        assert self.d_model % self.n_head == 0, (
            f"lm.d_model={self.d_model} must be divisible by lm.n_head={self.n_head}"
        )
        assert self.pos in ("alibi", "rope"), f"lm.pos must be 'alibi' or 'rope', got {self.pos!r}"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


@dataclass
class XAttnConfig:
    """GATED XATTN-DENSE layers (paper 2.2, App. A.1.2). Their width is the LM's d_model."""

    every: int = 1  # insert before LM blocks 0, every, 2*every, ...
    n_head: int = 16
    d_head: int = 128
    ff_mult: int = 4
    only_immediate_media: bool = True  # paper default; False attends to all previous media
    gated: bool = True  # tanh gating; False is the paper's "no gating" ablation (Table 3)
    after_last: bool = False  # one more layer after the last LM block (a deviation: see Flamingo)

    def __post_init__(self):
        assert self.every >= 1, f"xattn.every must be >= 1, got {self.every}"


# ----------------------------------------------------------------------------- the whole model


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    max_media: int = 5  # T: media slots per row (paper: the first 5 images of a sequence)

    # Token ids of the two tokens Flamingo adds (paper 2.3): every tokenizer of ours puts its special
    # tokens last, in the order <|endoftext|>, <image>, <|endofchunk|> (see tokenizer.py), so the model
    # knows them from the vocabulary size alone.
    @property
    def eot_id(self) -> int:
        return self.lm.vocab_size - 3

    @property
    def image_id(self) -> int:
        return self.lm.vocab_size - 2

    @property
    def eoc_id(self) -> int:
        return self.lm.vocab_size - 1

    @property
    def n_xattn(self) -> int:
        """Number of xattn layers: one before blocks 0, every, 2*every, ... < n_layer (and one after the
        last block with xattn.after_last)."""
        return len(range(0, self.lm.n_layer, self.xattn.every)) + self.xattn.after_last

    @classmethod
    def preset(cls, name: str) -> FlamingoConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlamingoConfig:
        parts = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            if f.name in _PARTS:
                sub = {k: tuple(v) if isinstance(v, list) else v for k, v in d[f.name].items()}
                parts[f.name] = _PARTS[f.name](**sub)
            else:
                parts[f.name] = d[f.name]
        return cls(**parts)

    def override(self, args: list[str]) -> FlamingoConfig:
        """Apply `--part.field=value` overrides, type-checked, returning a new config."""
        return apply_overrides(self, args)


_PARTS = {"vision": VisionConfig, "resampler": ResamplerConfig, "lm": LMConfig, "xattn": XAttnConfig}


# ----------------------------------------------------------------------------- overrides


def _valid_keys(cfg) -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(v)]
        else:
            keys.append(f.name)
    return keys


def _parse(key: str, text: str, current):
    """Parse `text` to the type of the field's current value; errors name the key."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError("expected true/false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            return tuple(int(x) for x in text.strip("()[] ").split(",") if x.strip())
        return text
    except ValueError as e:
        raise ValueError(
            f"--{key}={text}: expected {type(current).__name__} like {current!r} ({e})"
        ) from None


def apply_overrides(cfg, args: list[str]):
    """`--lm.n_layer=6` style overrides on a (nested) dataclass config. Returns a new config."""
    valid = _valid_keys(cfg)
    cfg = dataclasses.replace(cfg)  # copy; sub-dataclasses replaced below as needed
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --part.field=value")
        key, text = arg[2:].split("=", 1)
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if "." in key:
            part, name = key.split(".", 1)
            sub = getattr(cfg, part)
            setattr(cfg, part, dataclasses.replace(sub, **{name: _parse(key, text, getattr(sub, name))}))
        else:
            cfg = dataclasses.replace(cfg, **{key: _parse(key, text, getattr(cfg, key))})
    return cfg


# ----------------------------------------------------------------------------- presets


def _tiny() -> FlamingoConfig:
    # The CPU demo: 64x64 images, a model of a few million parameters. Few-shot binding rests on the
    # 2-layer ALiBi GPT binding words in context (DESIGN.md 5): with 8 heads of 16 (more ALiBi slopes)
    # its text-only 5-way binding probe left chance a few hundred steps sooner than with 4 heads of 32
    # (at step 1500 of 32 x 128 tokens: 0.65 vs 0.49, one run each on the world's corpus). Smeared keys
    # in its second layer brought the jump from steps 900-1200 to about 500 (lm.CausalSelfAttention).
    return FlamingoConfig(
        vision=VisionConfig(
            image_size=64, stem_widths=(8, 16, 16, 32), widths=(32, 64, 96, 128), depths=(1, 1, 1, 1),
            strides=(1, 2, 2, 1), group_width=16, final_width=128,
        ),  # 64 / (4*4) = 4x4 grid, S = 16
        # max_frames 8, while the world's videos have 6 frames (World.video_frames): temporal embeddings 6
        # and 7 are never trained, so a longer video (7-8 frames, or more, interpolated: paper App. B.1.2)
        # would read untrained ones. No command feeds one; kept at 8 because every measured demo ran with
        # it (their initialisation draws this table before the layers'), and 6 would change them all.
        resampler=ResamplerConfig(n_layer=1, n_head=4, d_head=32, d_model=128, num_latents=8, max_frames=8),
        lm=LMConfig(n_layer=2, n_head=8, d_model=128, vocab_size=1024, context_length=256, smear_keys=True),
        xattn=XAttnConfig(every=1, n_head=4, d_head=32),
        max_media=8,
    )


def _small() -> FlamingoConfig:
    # One GPU: 128x128 images, NFNet-F0 stages at half width, a 12-layer 512-wide GPT.
    return FlamingoConfig(
        vision=VisionConfig(
            image_size=128, widths=(128, 256, 768, 768), depths=(1, 2, 6, 3), group_width=64,
            final_width=1536,
        ),
        resampler=ResamplerConfig(n_layer=2, n_head=8, d_head=64, d_model=512, num_latents=32),
        lm=LMConfig(n_layer=12, n_head=8, d_model=512, vocab_size=8192, context_length=1024),
        xattn=XAttnConfig(every=2, n_head=8, d_head=64),
        max_media=8,
    )


def _nfnet_f6() -> VisionConfig:
    # NFNet-F6 (Brock et al. 2021, Table 1): depths (7, 14, 42, 21), widths (256, 512, 1536, 1536),
    # final conv to 2 * 1536 = 3072, group width 128. Flamingo trains it at 320x320 (App. B.1.3).
    return VisionConfig(image_size=320, depths=(7, 14, 42, 21))


def _paper(n_layer: int, d_model: int, n_head: int, every: int) -> FlamingoConfig:
    # Paper Table 4: resampler 6 layers, width 1536, 16 heads, 64 latents; xattn width is the LM's,
    # heads of 128 as in Chinchilla; Chinchilla's 32k SentencePiece vocabulary and 2048 context.
    return FlamingoConfig(
        vision=_nfnet_f6(),
        resampler=ResamplerConfig(n_layer=6, n_head=16, d_head=128, d_model=1536, num_latents=64),
        lm=LMConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, vocab_size=32000, context_length=2048,
                    tie_weights=False),
        xattn=XAttnConfig(every=every, n_head=n_head, d_head=d_model // n_head),
        max_media=5,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "flamingo-3b": lambda: _paper(24, 2048, 16, 1),
    "flamingo-9b": lambda: _paper(40, 4096, 32, 4),
    "flamingo-80b": lambda: _paper(80, 8192, 64, 7),
}
