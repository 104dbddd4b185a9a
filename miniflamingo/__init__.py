"""miniflamingo: a small, readable, from-scratch PyTorch reimplementation of Flamingo
(Alayrac et al., 2022, arXiv 2204.14198). See README.md and lessons/."""

from miniflamingo import metrics
from miniflamingo.config import (
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
    XAttnConfig,
)
from miniflamingo.flamingo import Flamingo
from miniflamingo.tokenizer import Tokenizer

__all__ = [
    "metrics", "Flamingo", "Tokenizer",
    "FlamingoConfig", "LMConfig", "ResamplerConfig", "VisionConfig", "XAttnConfig",
]
__version__ = "0.1.0"
