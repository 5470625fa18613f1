"""The robot-sized denoiser of the CPU benchmarks: D4 acting on a planar robot's vectors, embedding 128, 4 decoder +
2 encoder layers, Tx = 16 actions, a memory of 32 observation tokens (seeded weights, eval mode)."""

from __future__ import annotations

import torch

from streamtx.models import eCondTransformerRegressor
from streamtx.symmetry import Representation, dihedral


def robot_model(**options: bool) -> eCondTransformerRegressor:
    """``options``: further ``eCondTransformerRegressor`` flags (e.g. ``token_levels=True``)."""
    group = dihedral(4)
    vec = Representation.from_generators(group, [group.matrices[g] for g in group.generators])
    action = vec + Representation.trivial(group, 1)
    obs = vec + vec + Representation.trivial(group, 2) + Representation.regular(group, 1)
    torch.manual_seed(0)
    return eCondTransformerRegressor(
        action,
        obs,
        action,
        in_horizon=16,
        cond_horizon=32,
        num_layers=4,
        num_attention_heads=4,
        embedding_dim=128,
        num_cond_layers=2,
        **options,
    ).eval()
