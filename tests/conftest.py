"""Shared test options. `pytest --preset NAME` runs the shape and invariant tests that take the
`preset_cfg` fixture at a real preset's dimensions (default: tiny). Tests for presets too large
for memory build the model on the meta device (`big_preset` tells them to)."""

import pytest
import torch
from helpers import IMAGE_SIZE  # tests/ is on sys.path

import miniflamingo as mf
from miniflamingo.world import World

BIG_PRESETS = ("flamingo-3b", "flamingo-9b", "flamingo-80b")


def pytest_configure(config):
    # The tests use tiny tensors, where a second thread costs more in hand-offs than it gains; on a
    # busy 2-core machine two threads made the model tests 8x slower.
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--preset", default="tiny", help="preset for shape/invariant tests (default tiny)")


@pytest.fixture
def preset(request) -> str:
    return request.config.getoption("--preset")


@pytest.fixture
def preset_cfg(preset) -> mf.FlamingoConfig:
    return mf.FlamingoConfig.preset(preset)


@pytest.fixture
def big_preset(preset) -> bool:
    """True when the preset is too large for real tensors here: use the meta device."""
    return preset in BIG_PRESETS


@pytest.fixture(scope="module")
def tok() -> mf.Tokenizer:
    return mf.Tokenizer.default()


@pytest.fixture(scope="module")
def world() -> World:
    """The small world the prompt and evaluation tests share: 32x32 images, 3-frame videos."""
    return World(image_size=IMAGE_SIZE, video_frames=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
