"""``TensorProduct``: learned, channel-wise Clebsch-Gordan coupling of two irreps features (e3x's ``Tensor``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..linear import WeightCache
from .clebsch_gordan import clebsch_gordan
from .irreps import IrrepsLayout

__all__ = ["TensorProduct"]

Path = tuple[int, int, int, int, int, int]
"""``(p1, l1, p2, l2, p3, l3)``: irrep ``(p1, l1)`` of the first input times ``(p2, l2)`` of the second into
``(p3, l3)`` of the output."""


def coupling_paths(layout1: IrrepsLayout, layout2: IrrepsLayout, layout_out: IrrepsLayout) -> list[Path]:
    """Every path allowed by the triangle rule ``|l1 - l2| <= l3 <= l1 + l2`` and by parity
    ``parity(p1, l1) * parity(p2, l2) == parity(p3, l3)``."""
    return [
        (p1, l1, p2, l2, p3, l3)
        for p1, l1 in layout1.irreps()
        for p2, l2 in layout2.irreps()
        for p3, l3 in layout_out.irreps()
        if abs(l1 - l2) <= l3 <= l1 + l2
        and layout1.parity(p1, l1) * layout2.parity(p2, l2) == layout_out.parity(p3, l3)
    ]


class TensorProduct(nn.Module):
    r"""``z[p3, l3] = sum_paths w_path * CG_{l1 l2 l3}(x[p1, l1], y[p2, l2])``, channel by channel.

    Each allowed path (see :func:`coupling_paths`) has one weight per channel ``f``, and the coupling of channel ``f``
    of ``x`` with channel ``f`` of ``y`` uses the real Clebsch-Gordan coefficients. For every ``g`` in O(3):
    ``TP(g . x, g . y) = g . TP(x, y)``.

    Args:
        layout1, layout2: layouts of the two inputs.
        layout_out: layout of the output (paths to degrees or parities it lacks are not computed).
        features: channels ``F`` of inputs and output.

    Shapes: ``x (..., P1, (L1+1)**2, F)``, ``y (..., P2, (L2+1)**2, F)`` (batch dimensions broadcast) ->
    ``(..., P3, (L3+1)**2, F)``.
    """

    path_index: Tensor

    def __init__(
        self,
        layout1: IrrepsLayout,
        layout2: IrrepsLayout,
        layout_out: IrrepsLayout,
        features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("layout1", layout1), ("layout2", layout2), ("layout_out", layout_out)):
            if not isinstance(value, IrrepsLayout):
                raise TypeError(f"{name}: expected an IrrepsLayout, got {type(value).__name__}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features: expected an integer >= 1, got {features!r}")
        self.paths = coupling_paths(layout1, layout2, layout_out)  # never empty: 0+ x 0+ -> 0+ always exists
        self.layout1, self.layout2, self.layout_out, self.features = layout1, layout2, layout_out, features
        self.weight = nn.Parameter(torch.empty(len(self.paths), features, device=device, dtype=dtype))
        # Dense coefficient table over the flattened (parity, component) axes and, per entry, its path.
        c1, c2, c3 = layout1.num_components, layout2.num_components, layout_out.num_components
        cg = torch.zeros(
            layout1.num_parities * c1, layout2.num_parities * c2, layout_out.num_parities * c3, dtype=torch.float64
        )
        path_index = torch.zeros(cg.shape, dtype=torch.long)
        for i, (p1, l1, p2, l2, p3, l3) in enumerate(self.paths):
            block = tuple(
                slice(p * c + l**2, p * c + (l + 1) ** 2) for p, l, c in ((p1, l1, c1), (p2, l2, c2), (p3, l3, c3))
            )
            cg[block] = clebsch_gordan(l1, l2, l3)
            path_index[block] = i
        # Kept in float64 and cast on use (cached per dtype/device): a float32 module moved to float64 must not
        # carry float32-rounded coefficients, which would break equivariance at the 1e-8 level.
        self._cg64 = cg
        self._cg_cast = cg
        self.register_buffer("path_index", path_index.to(device), persistent=False)
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal weights with variance ``1 / (number of paths into the output block)``, so that unit-variance
        inputs give outputs of unit variance (the coefficients are orthonormal)."""
        fan: dict[tuple[int, int], int] = {}
        for *_, p3, l3 in self.paths:
            fan[p3, l3] = fan.get((p3, l3), 0) + 1
        std = torch.tensor(
            [1 / math.sqrt(fan[p3, l3]) for *_, p3, l3 in self.paths],
            dtype=self.weight.dtype,
            device=self.weight.device,
        )
        with torch.no_grad():
            self.weight.normal_().mul_(std[:, None])

    def coupling(self) -> Tensor:
        """The weighted coefficients ``(P1 C1, P2 C2, P3 C3, F)``: ``z = einsum("if,jf,ijkf->kf", x, y, coupling)``.
        Built once and reused while no gradient is needed and the weights are unchanged."""
        coupling = self._cache.get(self, self._build_coupling)[0]
        assert coupling is not None  # built by _build_coupling, never None
        return coupling

    def _build_coupling(self) -> tuple[Tensor]:
        if self._cg_cast.dtype != self.weight.dtype or self._cg_cast.device != self.weight.device:
            self._cg_cast = self._cg64.to(device=self.weight.device, dtype=self.weight.dtype)
        return (self._cg_cast[..., None] * self.weight[self.path_index],)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        self.layout1.check(x, self.features, "x")
        self.layout2.check(y, self.features, "y")
        for name, t in (("x", x), ("y", y)):
            if t.dtype != self.weight.dtype:
                raise TypeError(f"{name}: expected dtype {self.weight.dtype} (the layer's), got {t.dtype}")
        xy = torch.einsum("...if,ijkf->...jkf", x.flatten(-3, -2), self.coupling())
        z = torch.einsum("...jkf,...jf->...kf", xy, y.flatten(-3, -2))
        return z.unflatten(-2, self.layout_out.shape(self.features)[:2])

    @torch.no_grad()
    def load_e3x_(self, kernel: Any) -> TensorProduct:
        """Copy the weights of an e3x ``Tensor`` layer: its ``kernel (P1, L1+1, P2, L2+1, P3, L3+1, F)`` (entries of
        parity-forbidden paths, which e3x masks, are ignored)."""
        kernel = torch.as_tensor(kernel)
        expected = (
            self.layout1.num_parities,
            self.layout1.max_degree + 1,
            self.layout2.num_parities,
            self.layout2.max_degree + 1,
            self.layout_out.num_parities,
            self.layout_out.max_degree + 1,
            self.features,
        )
        if tuple(kernel.shape) != expected:
            raise ValueError(f"kernel: expected shape {expected}, got {tuple(kernel.shape)}")
        self.weight.copy_(torch.stack([kernel[path] for path in self.paths]))
        return self

    def extra_repr(self) -> str:
        return (
            f"({self.layout1}) x ({self.layout2}) -> ({self.layout_out}), features={self.features}, "
            f"paths={len(self.paths)}"
        )
