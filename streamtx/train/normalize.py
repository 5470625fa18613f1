"""Equivariant input normalization, folded into the model's first layer after training.

Observation coordinates live on very different scales (Reacher: cosines ~1, joint velocities ~3, fingertip-to-target
offsets ~0.05), which slows training and costs precision. The trainer therefore learns on
``z' = scale * (z - shift)`` and afterwards folds the affine map into the observation embedding
``W z' + b = (W diag(scale)) z + (b - W diag(scale) shift)``, so the shipped checkpoint takes raw observations.

Equivariance is kept exactly, for any orthogonal representation ``rho``: ``shift`` is the data mean projected onto
the fixed vectors of ``rho`` (so ``rho(g) shift = shift``), and ``scale`` is shared along orbits: one value per
connected block of coordinates, two coordinates being connected when some ``rho(g)`` maps one onto the other
(``rho(g)[i, j] != 0``). Every ``rho(g)`` is block diagonal over those blocks and ``diag(scale)`` is a multiple of
the identity on each, so ``diag(scale)`` commutes with every ``rho(g)`` (for signed permutations the blocks are the
orbits of coordinates); ``W diag(scale)`` is then equivariant and loads exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from streamtx.nn.linear import eLinear
from streamtx.symmetry import Representation

__all__ = ["fold_input_normalization", "observation_normalizer", "orbit_blocks"]


def orbit_blocks(rep: Representation, tol: float = 1e-9) -> np.ndarray:
    """``(d,)`` the block of each coordinate: coordinates ``i``, ``j`` share a block when some chain of group
    elements maps one onto the other (``|rho(g)[i, j]| > tol``); blocks are numbered ``0, 1, ...`` by first
    coordinate."""
    linked = (np.abs(rep.matrices) > tol).any(0)
    linked = linked | linked.T
    block = np.full(rep.size, -1)
    for i in range(rep.size):
        if block[i] >= 0:
            continue
        block[i] = next_id = block.max() + 1
        frontier = [i]
        while frontier:
            j = frontier.pop()
            for k in np.flatnonzero(linked[j] & (block < 0)):
                block[k] = next_id
                frontier.append(int(k))
    return block


def observation_normalizer(
    observations: np.ndarray, rep: Representation, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale (d,), shift (d,))`` for observations ``(..., d)`` of the orthogonal representation ``rep`` such that
    ``z' = scale * (z - shift)`` is equivariant: ``scale * (rho(g) z - shift) = rho(g) (scale * (z - shift))``.

    ``shift`` is the mean projected onto the invariant subspace, ``scale`` the inverse root mean square deviation
    over each block of :func:`orbit_blocks`."""
    x = np.asarray(observations, dtype=np.float64).reshape(-1, rep.size)
    if len(x) == 0:
        raise ValueError("observations: expected at least one observation, got none")
    shift = rep.invariant_basis @ (rep.invariant_basis.T @ x.mean(0))
    var = ((x - shift) ** 2).mean(0)
    block = orbit_blocks(rep)
    shared = np.bincount(block, weights=var) / np.bincount(block)
    return 1.0 / np.sqrt(shared[block] + eps), shift


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
