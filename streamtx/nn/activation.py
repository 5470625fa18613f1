"""Pointwise nonlinearities, allowed only where they commute with the group action."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import Representation

__all__ = ["ePointwise", "get_activation"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "tanh": F.tanh,
    "elu": F.elu,
}


def get_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A pointwise function from its name (``relu``, ``gelu``, ``silu``, ``mish``, ``tanh``, ``elu``) or itself."""
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}")
    return _ACTIVATIONS[activation]


class ePointwise(nn.Module):
    """``y_i = sigma(x_i)`` on a permutation representation. Shapes ``(..., D) -> (..., D)``.

    Equivariant, ``sigma(rho(g) x) = rho(g) sigma(x)``, exactly when every ``rho(g)`` permutes coordinates; on any
    other representation (rotations, sign flips) it would silently break the symmetry, so construction raises.
    """

    def __init__(self, rep: Representation, activation: str | Callable[[Tensor], Tensor] = "gelu") -> None:
        super().__init__()
        if not rep.is_permutation:
            raise ValueError(
                f"rep: a pointwise nonlinearity needs a permutation representation (e.g. regular copies), "
                f"got {rep.name}, whose matrices are not all permutations"
            )
        self.rep, self.fn = rep, get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def lower(self) -> Callable[[Tensor], Tensor]:
        """The pointwise function itself: it acts on dense features as it acts here."""
        return self.fn

    def extra_repr(self) -> str:
        return f"{self.rep.name}, {getattr(self.fn, '__name__', self.fn)}"
