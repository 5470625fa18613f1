"""``eLinear``: the equivariant linear map between two orthogonal representations, with exactly ``dim Hom_G`` free
parameters, in closed form (DESIGN.md section 2) and a dense weight cached for inference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import Representation

__all__ = ["eLinear", "WeightCache", "check_same_group"]


def check_same_group(**reps: Representation) -> None:
    """Raise ``ValueError`` naming the argument whose representation is of another group than the first one."""
    items = list(reps.items())
    name0, rep0 = items[0]
    for name, rep in items[1:]:
        if rep.group != rep0.group:
            raise ValueError(
                f"{name}: expected a representation of {rep0.group.name} (the group of {name0}), "
                f"got one of {rep.group.name}"
            )


class WeightCache:
    """Remembers tensors derived from a module's parameters until a parameter changes.

    A parameter "changes" when its storage, version counter (bumped by every in-place update: optimizer steps,
    ``load_state_dict``), dtype or device changes. The cache is used only when no gradient is needed, so training
    always differentiates through the expansion, while ``eval()`` under ``torch.no_grad()`` runs plain dense layers.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[Tensor | None, ...] | None = None

    @staticmethod
    def _state(tensors: list[Tensor]) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def get(self, modules: nn.Module | Sequence[nn.Module], build) -> tuple[Tensor | None, ...]:
        """``build()``'s result, rebuilt when a direct parameter or buffer of ``modules`` changed."""
        # direct dict access: this runs on every forward, and nn.Module.parameters() is a slow generator walk
        tensors = [
            t
            for m in ((modules,) if isinstance(modules, nn.Module) else modules)
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        ]
        if torch.is_grad_enabled() and any(p.requires_grad for p in tensors):
            self._key = self._value = None  # do not keep a graph-less copy around while training
            return build()
        key = (self._state(tensors), torch.is_inference_mode_enabled())
        if key != self._key:
            with torch.no_grad():
                self._value = build()
            self._key = key
        return self._value  # type: ignore[return-value]


class eLinear(nn.Module):
    r"""Linear map ``y = W x + b`` with ``W rho_in(g) = rho_out(g) W`` and ``rho_out(g) b = b`` for all ``g``.

    Shapes: ``x (..., in_rep.size) -> y (..., out_rep.size)``. Equivariance: ``f(rho_in(g) x) = rho_out(g) f(x)``.

    The parametrization is chosen from the representations (``N = |G|``; ``reg^m``: ``m`` regular copies):

    ========================  ====================================  =================================
    map                       free parameters                        dense weight
    ========================  ====================================  =================================
    ``reg^m -> reg^n``        ``w (n, m, N)``: group convolution      ``W[(c,a),(c',b)] = w[c,c',a^-1 b]``
    ``rho_in -> reg^n``       ``F (n, d_in)``: lift                   ``W[(c,h),:] = F[c] rho_in(h)^T``
    ``reg^m -> rho_out``      ``F (d_out, m)``: projection            ``W[:,(c,h)] = rho_out(h) F[:,c]``
    ``rho_in -> rho_out``     ``theta (K,)``: Hom_G basis              ``W = sum_k theta_k B_k``
    ========================  ====================================  =================================

    Each uses exactly ``dim Hom_G(rho_in, rho_out)`` parameters. The bias is one value per output copy for a regular
    output, else coefficients on an orthonormal basis of ``rho_out``'s fixed vectors (no bias if there are none).
    Initialization matches ``torch.nn.Linear``'s entry variance, so swapping layers keeps activations' scale.
    """

    def __init__(
        self,
        in_rep: Representation,
        out_rep: Representation,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_same_group(in_rep=in_rep, out_rep=out_rep)
        # Structural constants stay float64 numpy (exact) and are converted per dtype/device on use: as buffers they
        # would be rounded for good by a float32 -> float64 round trip of the module.
        self._consts: dict[str, np.ndarray] = {}
        self._const_cache: dict[tuple, Tensor] = {}
        fk = {"device": device, "dtype": dtype}
        self.in_rep, self.out_rep = in_rep, out_rep
        self.in_features, self.out_features = in_rep.size, out_rep.size
        group = in_rep.group
        n_g = group.order
        m_in, m_out = in_rep.regular_copies, out_rep.regular_copies
        if m_in is not None and m_out is not None:
            self.kind = "conv"
            idx = group.mul[group.inv[:, None], np.arange(n_g)[None, :]]  # idx[a, b] = a^-1 b
            self.register_buffer("index", torch.as_tensor(idx, dtype=torch.long, device=device), persistent=False)
            self.weight = nn.Parameter(torch.empty(m_out, m_in, n_g, **fk))
        elif m_out is not None:
            self.kind = "lift"
            self._consts["rho"] = in_rep.matrices
            self.weight = nn.Parameter(torch.empty(m_out, in_rep.size, **fk))
        elif m_in is not None:
            self.kind = "project"
            self._consts["rho"] = out_rep.matrices
            self.weight = nn.Parameter(torch.empty(out_rep.size, m_in, **fk))
        else:
            self.kind = "basis"
            self._consts["basis"] = _hom_basis(in_rep, out_rep)
            self.weight = nn.Parameter(torch.empty(self._consts["basis"].shape[0], **fk))
        if bias and m_out is None:
            self._consts["bias_basis"] = out_rep.invariant_basis
            bias = self._consts["bias_basis"].shape[1] > 0
        if bias:
            n_bias = m_out if m_out is not None else self._consts["bias_basis"].shape[1]
            self.bias = nn.Parameter(torch.empty(n_bias, **fk))
        else:
            self.register_parameter("bias", None)
        self._cache = WeightCache()
        self.reset_parameters()

    def _const(self, name: str, like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._const_cache:
            self._const_cache[key] = torch.as_tensor(self._consts[name], dtype=like.dtype, device=like.device)
        return self._const_cache[key]

    @property
    def num_free_parameters(self) -> int:
        """``dim Hom_G(rho_in, rho_out)`` plus the bias's free parameters."""
        return sum(p.numel() for p in self.parameters())

    def reset_parameters(self) -> None:
        d_in, d_out = self.in_features, self.out_features
        bound = 1.0 / math.sqrt(d_in)
        if self.kind == "basis":
            # orthonormal basis: Var(W_ij) averages to K Var(theta) / (d_out d_in); match nn.Linear's 1 / (3 d_in)
            a = math.sqrt(d_out / max(self.weight.numel(), 1))
            nn.init.uniform_(self.weight, -a, a)
        else:
            nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            b = bound if self.out_rep.regular_copies is not None else bound * math.sqrt(d_out / self.bias.numel())
            nn.init.uniform_(self.bias, -b, b)

    # ---------------------------------------------------------------- dense form
    def _expand(self) -> tuple[Tensor, Tensor | None]:
        w = self.weight
        if self.kind == "conv":
            n, m, g = w.shape
            dense = w[:, :, self.index].permute(0, 2, 1, 3).reshape(n * g, m * g)
        elif self.kind == "lift":
            dense = torch.einsum("cj,hij->chi", w, self._const("rho", w)).reshape(-1, self.in_features)
        elif self.kind == "project":
            dense = torch.einsum("hij,jc->ich", self._const("rho", w), w).reshape(self.out_features, -1)
        else:
            dense = torch.einsum("k,kij->ij", w, self._const("basis", w))
        if self.bias is None:
            return dense, None
        if self.out_rep.regular_copies is not None:
            bias = self.bias.repeat_interleave(self.out_rep.group.order)
        else:
            bias = self._const("bias_basis", w) @ self.bias
        return dense, bias

    def dense(self) -> tuple[Tensor, Tensor | None]:
        """The dense ``(W (d_out, d_in), b (d_out,) | None)``; cached while parameters are unchanged and no gradient
        is needed."""
        return self._cache.get(self, self._expand)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features} ({self.in_rep.name}), got {x.shape[-1]}")
        weight, bias = self.dense()
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def load_dense_(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Set the parameters to the orthogonal projection of a dense ``(d_out, d_in)`` weight (and bias) onto the
        equivariant maps: exact for an already equivariant weight (e.g. any weight when ``G`` is trivial)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight: expected shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        w = weight.to(self.weight)
        n_g = self.in_rep.group.order
        if self.kind == "conv":
            n, m = self.weight.shape[:2]
            blocks = w.reshape(n, n_g, m, n_g).permute(0, 2, 1, 3)  # [c, c', a, b]
            flat = torch.zeros_like(self.weight).index_add_(2, self.index.flatten(), blocks.reshape(n, m, n_g * n_g))
            self.weight.copy_(flat / n_g)  # every a^-1 b value occurs N times
        elif self.kind == "lift":
            self.weight.copy_(
                torch.einsum("chi,hij->cj", w.reshape(-1, n_g, self.in_features), self._const("rho", w)) / n_g
            )
        elif self.kind == "project":
            self.weight.copy_(
                torch.einsum("ich,hij->jc", w.reshape(self.out_features, -1, n_g), self._const("rho", w)) / n_g
            )
        else:
            self.weight.copy_(torch.einsum("kij,ij->k", self._const("basis", w), w))
        if self.bias is not None:
            if bias is None:
                raise ValueError("bias: this layer has a bias, expected a tensor, got None")
            b = bias.to(self.bias)
            if self.out_rep.regular_copies is not None:
                self.bias.copy_(b.reshape(-1, n_g).mean(-1))
            else:
                self.bias.copy_(self._const("bias_basis", b).T @ b)

    def extra_repr(self) -> str:
        return (
            f"{self.in_rep.name} ({self.in_features}) -> {self.out_rep.name} ({self.out_features}), "
            f"group={self.in_rep.group.name}, kind={self.kind}, bias={self.bias is not None}"
        )


def _hom_basis(in_rep: Representation, out_rep: Representation) -> np.ndarray:
    """Orthonormal (Frobenius) basis ``(K, d_out, d_in)`` of ``Hom_G(rho_in, rho_out)``.

    ``K`` is known exactly from the characters, ``K = 1/N sum_g chi_out(g) chi_in(g)``; the basis is the orthonormalized
    image of ``K`` seeded random matrices under the projector ``X -> 1/N sum_g rho_out(g) X rho_in(g)^T``.
    """
    a, b = in_rep.matrices, out_rep.matrices
    k = int(round(float(np.mean(np.trace(b, axis1=1, axis2=2) * np.trace(a, axis1=1, axis2=2)))))
    d_out, d_in = b.shape[1], a.shape[1]
    if k == 0:
        return np.zeros((0, d_out, d_in))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k + 4, d_out, d_in))  # a few spare samples guard against an unlucky rank deficit
    proj = np.einsum("gij,sjk,glk->sil", b, x, a) / len(a)
    u, _, _ = np.linalg.svd(proj.reshape(k + 4, -1).T, full_matrices=False)
    return _canonical_signs(u[:, :k].T).reshape(k, d_out, d_in)


def _canonical_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-magnitude entry is positive: the basis (and so the meaning of trained
    coefficients) must not depend on the sign conventions of the LAPACK build."""
    if vectors.size == 0:
        return vectors
    idx = np.argmax(np.abs(vectors), axis=1)
    return vectors * np.sign(vectors[np.arange(len(vectors)), idx])[:, None]
