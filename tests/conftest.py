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


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A labelled synthetic data folder (`bwssl synth`) at the tiny preset's clip size: 40 + 16 clips."""
    from bwssl_core.cli import main

    data = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(data), "--n-train", "40", "--n-val", "16", "--size", "32", "--frames", "4",
                 "--workers", "1"]) == 0
    return data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
