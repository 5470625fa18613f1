"""Equivariant input normalization, folded into the model's first layer after training.

Observation coordinates live on very different scales (Reacher: cosines ~1, joint velocities ~3, fingertip-to-target
offsets ~0.05), which slows training and costs precision. The trainer therefore learns on
``z' = scale * (z - shift)`` and afterwards folds the affine map into the observation embedding
``W z' + b = (W diag(scale)) z + (b - W diag(scale) shift)``, so the shipped checkpoint takes raw observations.

Equivariance is kept exactly: ``shift`` is the data mean projected onto the fixed vectors of ``rho``, and ``scale`` is
one value per orbit of coordinates (averaged over the group), so ``diag(scale)`` commutes with every ``rho(g)`` of a
signed-permutation representation; ``W diag(scale)`` is then equivariant and loads exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from streamtx.nn.linear import eLinear
from streamtx.symmetry import Representation

__all__ = ["observation_normalizer", "fold_input_normalization"]


def observation_normalizer(
    observations: np.ndarray, rep: Representation, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale (d,), shift (d,))`` for observations ``(..., d)`` of the representation ``rep``, which must be a
    signed permutation representation (every ``|rho(g)|`` a permutation matrix)."""
    x = np.asarray(observations, dtype=np.float64).reshape(-1, rep.size)
    mats = rep.matrices
    magnitudes = np.abs(mats)
    if not (np.allclose(magnitudes.sum(-1), 1) and np.all((magnitudes < 1e-9) | (np.abs(magnitudes - 1) < 1e-9))):
        raise ValueError(f"rep: expected a signed permutation representation, got {rep.name}")
    shift = rep.invariant_basis @ (rep.invariant_basis.T @ x.mean(0))
    var = ((x - shift) ** 2).mean(0)
    var = np.mean(magnitudes @ var, axis=0)  # average over each orbit of coordinates
    return 1.0 / np.sqrt(var + eps), shift


@torch.no_grad()
def fold_input_normalization(layer: eLinear, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make ``layer(z)`` equal what ``layer(scale * (z - shift))`` was."""
    weight, bias = layer.dense()
    s = torch.as_tensor(scale, dtype=weight.dtype)
    weight = weight * s
    bias = (bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)) - weight @ torch.as_tensor(
        shift, dtype=weight.dtype
    )
    layer.load_dense_(weight, bias)
