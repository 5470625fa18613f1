"""Numerical equivariance check shared by every layer's ``check_equivariance``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..symmetry import Representation

__all__ = ["equivariance_error", "act"]


def act(rep: Representation, g: int, x: Tensor) -> Tensor:
    """``rho(g) x`` on the last dimension of ``x``."""
    return x @ torch.as_tensor(rep.matrices[g], dtype=x.dtype, device=x.device).T


def equivariance_error(
    module: nn.Module,
    fn: Callable[[nn.Module, Sequence[Tensor]], Tensor],
    inputs: Sequence[tuple[Tensor, Representation]],
    out_rep: Representation,
    dtype: torch.dtype = torch.float64,
) -> float:
    """``max_g |f(rho_in(g) x) - rho_out(g) f(x)| / max |f(x)|`` over all group elements, run on an ``eval()`` copy of
    ``module`` in ``dtype`` (the module itself is untouched)."""
    m = copy.deepcopy(module).to(dtype).eval()
    xs = [x.to(dtype) for x, _ in inputs]
    with torch.no_grad():
        y = fn(m, xs)
        scale = y.abs().max().clamp_min(torch.finfo(dtype).tiny)
        err = torch.zeros((), dtype=dtype)
        for g in range(out_rep.group.order):
            yg = fn(m, [act(rep, g, x) for x, (_, rep) in zip(xs, inputs)])
            err = torch.maximum(err, (yg - act(out_rep, g, y)).abs().max())
    return float(err / scale)
