"""``Dense``: per-degree, per-parity linear mixing of feature channels (e3x's ``Dense``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..linear import WeightCache
from .irreps import IrrepsLayout

__all__ = ["Dense"]


class Dense(nn.Module):
    r"""``y[p, l] = x[p, l] W[p, l] (+ b if (p, l) is 0+)``: one ``in x out`` matrix per irrep block, shared by the
    ``2l+1`` components of the block, so for every ``g`` in O(3): ``Dense(g . x) = g . Dense(x)``. The bias only
    enters the even scalars (``0+``), the one block on which a constant is invariant.

    Args:
        layout: degrees and parities of input and output.
        in_features, out_features: channels ``F_in``, ``F_out``.
        bias: learn the ``0+`` bias.

    Shapes: ``(..., P, (L+1)**2, F_in) -> (..., P, (L+1)**2, F_out)``.
    """

    bias: nn.Parameter | None
    degree_index: Tensor

    def __init__(
        self,
        layout: IrrepsLayout,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layout, IrrepsLayout):
            raise TypeError(f"layout: expected an IrrepsLayout, got {type(layout).__name__}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        self.layout, self.in_features, self.out_features = layout, in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(
                layout.num_parities, layout.max_degree + 1, in_features, out_features, device=device, dtype=dtype
            )
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("degree_index", layout.degree_index(device), persistent=False)
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every block like a fresh ``torch.nn.Linear``: uniform in ``+-1/sqrt(in_features)``."""
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        self.layout.check(x, self.in_features)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x: expected dtype {self.weight.dtype} (the layer's), got {x.dtype}")
        y = torch.einsum("...pci,pcio->...pco", x, self._cache.get(self, self._per_component)[0])
        if self.bias is not None:
            y[..., 0, 0, :] += self.bias  # fresh einsum output: in place is safe for autograd
        return y

    def _per_component(self) -> tuple[Tensor]:
        """The weights expanded over the components of each degree, ``(P, (L+1)**2, F_in, F_out)``."""
        return (self.weight[:, self.degree_index],)

    def profiles(self, s: Tensor) -> Tensor:
        """The per-degree outputs for a feature ``s`` shared by all components: ``s (..., F_in)`` ->
        ``(..., P, L+1, F_out)`` with ``[p, l] = s W[p, l] (+ b at 0+)``.

        ``Dense(Y[p, c] * s) == Y[p, c] * profiles(s)[p, l(c)]`` for any per-component factor ``Y`` with
        ``Y[0+] = 1`` (as spherical harmonics; any ``Y`` without bias), so a Dense layer applied to a separable input
        (angular part times radial features, as a relative-position basis) costs one matrix per degree instead of
        one per component.
        """
        if s.shape[-1:] != (self.in_features,):
            raise ValueError(f"s: expected shape (..., {self.in_features}), got {tuple(s.shape)}")
        out = torch.einsum("...i,plio->...plo", s, self.weight)
        if self.bias is not None:
            out[..., 0, 0, :] += self.bias
        return out

    @torch.no_grad()
    def load_e3x_(self, params: Mapping[str, Mapping[str, Any]]) -> Dense:
        """Copy the parameters of an e3x ``Dense`` of the same layout: its flax parameter tree
        ``{"0+": {"kernel": (F_in, F_out), "bias": (F_out,)}, "1-": {"kernel": ...}, ...}`` (arrays or tensors).
        A missing e3x bias zeroes this layer's bias."""
        expected = {self.layout.label(p, l) for p, l in self.layout.irreps()}
        if set(params) != expected:
            raise ValueError(f"params: expected blocks {sorted(expected)}, got {sorted(params)}")
        for p, l in self.layout.irreps():
            kernel = torch.as_tensor(params[self.layout.label(p, l)]["kernel"])
            if kernel.shape != self.weight.shape[2:]:
                raise ValueError(
                    f"params[{self.layout.label(p, l)!r}]['kernel']: expected shape "
                    f"{tuple(self.weight.shape[2:])}, got {tuple(kernel.shape)}"
                )
            self.weight[p, l] = kernel
        bias = params[self.layout.label(0, 0)].get("bias")
        if bias is not None and self.bias is None:
            raise ValueError("params: has a bias but this layer was built with bias=False")
        if self.bias is not None:
            self.bias.copy_(torch.as_tensor(bias) if bias is not None else torch.zeros_like(self.bias))
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.layout}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
