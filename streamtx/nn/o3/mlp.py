"""Gated nonlinearity and the equivariant MLP built from it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dense import Dense
from .irreps import IrrepsLayout

__all__ = ["gated_silu", "GatedMLP"]


def gated_silu(x: Tensor) -> Tensor:
    """``sigmoid(x[0+]) * x``: every block of channel ``f`` is scaled by a gate computed from the channel's invariant
    even scalar, so the map commutes with O(3); on the scalars themselves this is SiLU (e3x's ``silu``).

    Shapes: ``(..., P, (L+1)**2, F)`` -> same.
    """
    return torch.sigmoid(x[..., 0:1, 0:1, :]) * x


class GatedMLP(nn.Module):
    """``Dense(F -> H) -> gated_silu -> Dense(H -> F_out)``; equivariant: ``mlp(g . x) = g . mlp(x)``.

    Args:
        layout: degrees and parities of the features.
        features: input channels ``F``.
        hidden_features: channels ``H`` of the hidden layer.
        out_features: output channels (default ``F``).
        bias: ``0+`` biases of both layers.

    Shapes: ``(..., P, (L+1)**2, F)`` -> ``(..., P, (L+1)**2, F_out)``.
    """

    def __init__(
        self,
        layout: IrrepsLayout,
        features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = Dense(layout, features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = Dense(layout, hidden_features, out_features or features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gated_silu(self.fc1(x)))
