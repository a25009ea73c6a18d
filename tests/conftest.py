import pytest
import torch

from bwssl_core import model_config
from bwssl_core.batches import MovingShapes


@pytest.fixture
def tiny():
    """Factory for the tiny test preset with overrides."""
    return lambda **kw: model_config("tiny", **kw)


@pytest.fixture
def clips():
    """Normalised clips (B, C, T, H, W) for the tiny preset."""
    def make(batch=4, seed=0, cfg=None):
        return MovingShapes(cfg or model_config("tiny"), batch, seed).batch(0)
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
