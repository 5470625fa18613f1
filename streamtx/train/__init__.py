"""Training of denoising (flow-matching / diffusion) policies on action chunks: datasets, EMA, the trainer and the
``streamtx train`` command."""

from .chunks import ChunkDataset
from .ema import EMA
from .metrics import MetricsLog
from .normalize import fold_input_normalization, observation_normalizer, orbit_blocks
from .trainer import TrainConfig, TrainResult, TrainState, train

__all__ = [
    "ChunkDataset",
    "EMA",
    "TrainConfig",
    "MetricsLog",
    "TrainResult",
    "TrainState",
    "fold_input_normalization",
    "observation_normalizer",
    "orbit_blocks",
    "train",
]
