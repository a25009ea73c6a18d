"""bwssl_core: blockwise and end-to-end VideoMAE pretraining and depth-wise analysis of video ViTs."""
from .config import PRESETS, ConfigError, ModelConfig, TrainConfig, model_config
from .masking import Mask, tube_mask
from .model import VideoMAE

__version__ = "0.1.0"
__all__ = ["PRESETS", "ConfigError", "ModelConfig", "TrainConfig", "model_config", "Mask", "tube_mask", "VideoMAE"]
