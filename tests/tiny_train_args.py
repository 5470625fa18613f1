"""The architecture flags of the tiny `streamtx train` runs that several tests make (one layer of each kind, one head,
a short action horizon, two sampling steps): each test adds its own data, output and schedule flags."""

from __future__ import annotations


def tiny_model_args(dim: int, action_horizon: int = 4, sampling_steps: int = 2) -> list[str]:
    return [
        "--dim",
        str(dim),
        "--layers",
        "1",
        "--cond-layers",
        "1",
        "--heads",
        "1",
        "--action-horizon",
        str(action_horizon),
        "--sampling-steps",
        str(sampling_steps),
    ]
