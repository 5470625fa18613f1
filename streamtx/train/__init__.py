"""Training of denoising (flow-matching / diffusion) policies on action chunks: datasets, EMA, the trainer and the
``streamtx train`` command."""

from .data import ChunkDataset, load_dataset, save_dataset
from .ema import EMA
from .trainer import TrainConfig, TrainResult, train

__all__ = ["ChunkDataset", "EMA", "TrainConfig", "TrainResult", "load_dataset", "save_dataset", "train"]
