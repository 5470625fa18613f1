"""Training of denoising (flow-matching / diffusion) policies on action chunks: the examples of episodes
(:class:`ChunkDataset`; the episodes themselves and their file formats are :mod:`streamtx.data`), equivariant input
normalisation, EMA, the trainer (devices, DDP, resume) and its metrics file. The ``streamtx train`` command is
:mod:`streamtx.apps.train`."""

from .chunks import ChunkBatch, ChunkDataset
from .ema import EMA
from .metrics import MetricsLog
from .normalize import fold_input_normalization, observation_normalizer, orbit_blocks
from .trainer import TrainConfig, TrainResult, TrainState, train

__all__ = [
    "ChunkBatch",
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
