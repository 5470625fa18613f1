"""Helpers of the `streamtx train` tests: a tiny LeRobot dataset of Reacher-shaped data and the command line of a
tiny float64 run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from tiny_train_args import tiny_model_args

from streamtx.checkpoint import load_checkpoint
from streamtx.data import Episodes, write_lerobot

REACHER_SYMMETRY = Path(__file__).parents[2] / "examples" / "reacher" / "symmetry.toml"


def tiny_lerobot(root: Path, lengths: tuple[int, ...] = (9, 6, 11, 7), seed: int = 0) -> Path:
    """Episodes of different lengths; the action is a smooth function of the observation (learnable)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(sum(lengths), 10)).astype(np.float32)
    act = np.tanh(obs[:, 2:4] - 0.5 * obs[:, 6:8]).astype(np.float32)
    return write_lerobot(root, Episodes(obs, act, np.array(lengths)), fps=50, task="reach")


def tiny_args(data: Path, out: Path, steps: int = 20) -> list[str]:
    return [
        str(data),
        "--out",
        str(out),
        "--symmetry",
        str(REACHER_SYMMETRY),
        "--dtype",
        "float64",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        *tiny_model_args(dim=8),
        "--warmup-steps",
        "5",
        "--eval-every",
        "10",
        "--val-fraction",
        "0.25",
        "--log-every",
        "1",
        "--quiet",
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
