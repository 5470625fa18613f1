"""Training of denoising (flow-matching / diffusion) policies on action chunks: datasets, EMA, the trainer and the
``streamtx train`` command."""

from .chunks import ChunkDataset
from .ema import EMA
from .normalize import fold_input_normalization, observation_normalizer
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "ChunkDataset",
    "EMA",
    "TrainConfig",
    "TrainResult",
    "fold_input_normalization",
    "observation_normalizer",
    "train",
]
