"""``O3LayerNorm``: layer normalization of irreps features that commutes with O(3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .irreps import IrrepsLayout

__all__ = ["O3LayerNorm"]


class O3LayerNorm(nn.Module):
    r"""Per irrep block ``(p, l)``: ``y = x / sqrt(mean(x**2) + eps) * w[p, l]``, the mean over the block's ``2l+1``
    components and ``F`` channels; the even scalars ``0+`` are first centred over the channels and get a bias, so on
    them this is ``torch.nn.LayerNorm``. The mean square of a block is invariant and every operation is per block and
    shared by its components, hence ``norm(g . x) = g . norm(x)`` for every ``g`` in O(3).

    Args:
        layout: degrees and parities of the features.
        features: channels ``F``.
        eps: added to the mean square.
        elementwise_affine: learn the per-block, per-channel scales ``w (P, L+1, F)`` and the ``0+`` bias ``(F,)``.

    Shapes: ``(..., P, (L+1)**2, F)`` -> same.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    degree_index: Tensor
    scalar_mask: Tensor
    block_size: Tensor

    def __init__(
        self,
        layout: IrrepsLayout,
        features: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layout, IrrepsLayout):
            raise TypeError(f"layout: expected an IrrepsLayout, got {type(layout).__name__}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features: expected an integer >= 1, got {features!r}")
        if not eps > 0:
            raise ValueError(f"eps: expected > 0, got {eps!r}")
        self.layout, self.features, self.eps = layout, features, float(eps)
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(layout.num_parities, layout.max_degree + 1, features, device=device, dtype=dtype)
            )
            self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("degree_index", layout.degree_index(device), persistent=False)
        scalar_mask = torch.zeros(*layout.shape(1), device=device, dtype=dtype)
        scalar_mask[0, 0] = 1
        self.register_buffer("scalar_mask", scalar_mask, persistent=False)
        self.register_buffer(
            "block_size", (2 * torch.arange(layout.max_degree + 1, device=device) + 1), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None and self.bias is not None:  # both or neither (elementwise_affine)
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.layout.check(x, self.features)
        x = x - self.scalar_mask * x[..., 0, 0, :].mean(-1)[..., None, None, None]  # centre the 0+ block only
        sq = (x * x).mean(-1)  # (..., P, C)
        per_degree = torch.zeros(*sq.shape[:-1], self.layout.max_degree + 1, dtype=sq.dtype, device=sq.device)
        per_degree = per_degree.index_add(-1, self.degree_index, sq) / self.block_size.to(sq.dtype)
        scale = torch.rsqrt(per_degree + self.eps)  # (..., P, L+1)
        if self.weight is not None and self.bias is not None:
            scale = scale[..., None] * self.weight
            y = x * scale[..., self.degree_index, :]
            y[..., 0, 0, :] += self.bias
            return y
        return x * scale[..., self.degree_index, None]

    def extra_repr(self) -> str:
        return f"{self.layout}, features={self.features}, eps={self.eps}, elementwise_affine={self.weight is not None}"
