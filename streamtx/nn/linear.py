"""``eLinear``: the equivariant linear map between two orthogonal representations, with exactly ``dim Hom_G`` free
parameters, in closed form (DESIGN.md section 2) and a dense weight cached for inference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import Representation
from .lowered import Affine, lowered

__all__ = [
    "eLinear",
    "Parametrization",
    "GroupConvolution",
    "ConjugatedConvolution",
    "Lift",
    "Projection",
    "HomBasis",
    "make_parametrization",
    "WeightCache",
    "Constants",
    "check_same_group",
    "INIT_SCHEMES",
    "check_init_scheme",
    "scheme_variance",
]


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


class Constants:
    """Structural constants kept float64 numpy (exact) and converted per dtype/device on use: as buffers they would be
    rounded for good by a float32 -> float64 round trip of the module."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = arrays
        self._converted: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        key = (name, dtype or like.dtype, like.device)
        if key not in self._converted:
            self._converted[key] = torch.as_tensor(self.arrays[name], dtype=key[1], device=like.device)
        return self._converted[key]


class Parametrization:
    """How the free weight of an :class:`eLinear` maps to its dense ``(d_out, d_in)`` weight: one small class per
    case, one interface (``kind``, ``weight_shape``, ``expand``, ``project``, ``variance_gain``)."""

    kind: str
    weight_shape: tuple[int, ...]

    def expand(self, w: Tensor) -> Tensor:
        """The dense weight ``(d_out, d_in)`` of free parameters ``w``."""
        raise NotImplementedError

    def project(self, dense: Tensor) -> Tensor:
        """The free parameters of the orthogonal projection of ``dense`` onto the equivariant maps."""
        raise NotImplementedError

    def variance_gain(self, d_in: int, d_out: int) -> float:
        """Mean variance of the dense entries per unit variance of i.i.d. free parameters: 1 when every dense entry
        is one free parameter or an orthogonal mix of a row of them (convolution, lift, projection)."""
        return 1.0


class GroupConvolution(Parametrization):
    """``reg^m -> reg^n``: ``w (n, m, N)``, ``W[(c,a),(c',b)] = w[c,c',a^-1 b]``."""

    kind = "conv"

    def __init__(self, in_rep: Representation, out_rep: Representation) -> None:
        group, n_g = in_rep.group, in_rep.group.order
        self.n_g = n_g
        self.weight_shape = (out_rep.regular_copies or 0, in_rep.regular_copies or 0, n_g)
        index = group.mul[group.inv[:, None], np.arange(n_g)[None, :]]  # index[a, b] = a^-1 b
        self.consts = Constants(index=index)

    def expand(self, w: Tensor) -> Tensor:
        n, m, g = w.shape
        return w[:, :, self.consts.get("index", w, torch.long)].permute(0, 2, 1, 3).reshape(n * g, m * g)

    def project(self, dense: Tensor) -> Tensor:
        n, m, n_g = self.weight_shape
        blocks = dense.reshape(n, n_g, m, n_g).permute(0, 2, 1, 3)  # [c, c', a, b]
        index = self.consts.get("index", dense, torch.long).flatten()
        flat = dense.new_zeros(n, m, n_g).index_add_(2, index, blocks.reshape(n, m, n_g * n_g))
        return flat / n_g  # every a^-1 b value occurs N times


class Lift(Parametrization):
    """``rho_in -> reg^n``: ``F (n, d_in)``, ``W[(c,h),:] = F[c] rho_in(h)^T``."""

    kind = "lift"

    def __init__(self, in_rep: Representation, out_rep: Representation) -> None:
        self.n_g, self.d_in = in_rep.group.order, in_rep.size
        self.weight_shape = (out_rep.regular_copies or 0, in_rep.size)
        self.consts = Constants(rho=in_rep.matrices)

    def expand(self, w: Tensor) -> Tensor:
        return torch.einsum("cj,hij->chi", w, self.consts.get("rho", w)).reshape(-1, self.d_in)

    def project(self, dense: Tensor) -> Tensor:
        rho = self.consts.get("rho", dense)
        return torch.einsum("chi,hij->cj", dense.reshape(-1, self.n_g, self.d_in), rho) / self.n_g


class Projection(Parametrization):
    """``reg^m -> rho_out``: ``F (d_out, m)``, ``W[:,(c,h)] = rho_out(h) F[:,c]``."""

    kind = "project"

    def __init__(self, in_rep: Representation, out_rep: Representation) -> None:
        self.n_g, self.d_out = in_rep.group.order, out_rep.size
        self.weight_shape = (out_rep.size, in_rep.regular_copies or 0)
        self.consts = Constants(rho=out_rep.matrices)

    def expand(self, w: Tensor) -> Tensor:
        return torch.einsum("hij,jc->ich", self.consts.get("rho", w), w).reshape(self.d_out, -1)

    def project(self, dense: Tensor) -> Tensor:
        rho = self.consts.get("rho", dense)
        return torch.einsum("ich,hij->jc", dense.reshape(self.d_out, -1, self.n_g), rho) / self.n_g


class HomBasis(Parametrization):
    """``rho_in -> rho_out``: ``theta (K,)`` on an orthonormal basis of ``Hom_G``, ``W = sum_k theta_k B_k``."""

    kind = "basis"

    def __init__(self, in_rep: Representation, out_rep: Representation) -> None:
        basis = _hom_basis(in_rep, out_rep)
        self.weight_shape = (basis.shape[0],)
        self.consts = Constants(basis=basis)

    def expand(self, w: Tensor) -> Tensor:
        return torch.einsum("k,kij->ij", w, self.consts.get("basis", w))

    def project(self, dense: Tensor) -> Tensor:
        return torch.einsum("kij,ij->k", self.consts.get("basis", dense), dense)

    def variance_gain(self, d_in: int, d_out: int) -> float:
        # orthonormal basis: sum_ij W_ij^2 = sum_k theta_k^2, so Var(W_ij) averages to K Var(theta) / (d_out d_in)
        return max(self.weight_shape[0], 1) / (d_in * d_out)


INIT_SCHEMES = (
    "xavier_normal",
    "xavier_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "he_normal",
    "he_uniform",
    "identity",
)
"""The ``init_scheme`` names every equivariant layer accepts (symm_learning's ``InitScheme``); ``None`` is
``torch.nn.Linear``'s own initialization."""


def check_init_scheme(scheme: str | None, name: str = "init_scheme") -> str | None:
    """``scheme`` itself, or ``ValueError`` naming the accepted ones."""
    if scheme is not None and scheme not in INIT_SCHEMES:
        raise ValueError(f"{name}: expected one of {list(INIT_SCHEMES)} or None, got {scheme!r}")
    return scheme


def scheme_variance(scheme: str, d_in: int, d_out: int) -> tuple[str, float]:
    """The distribution (``"normal"``/``"uniform"``) and variance a scheme gives each entry of a dense
    ``(d_out, d_in)`` weight: Xavier/Glorot ``2 / (d_in + d_out)``, Kaiming/He ``2 / d_in`` (ReLU gain)."""
    kind = "normal" if scheme.endswith("normal") else "uniform"
    if scheme.startswith("xavier"):
        return kind, 2.0 / (d_in + d_out)
    return kind, 2.0 / d_in


class ConjugatedConvolution(GroupConvolution):
    """``Q_out reg^m Q_out^T -> Q_in reg^n Q_in^T`` (regular copies in other bases): the group convolution between the
    canonical copies, ``W = Q_out W_conv Q_in^T`` (``Representation.regular_basis``), so ``Hom_G`` needs no basis
    computation of its own."""

    def __init__(self, in_rep: Representation, out_rep: Representation) -> None:
        qa, qb = in_rep.regular_basis, out_rep.regular_basis
        super().__init__(
            Representation.regular(in_rep.group, qa.copies), Representation.regular(out_rep.group, qb.copies)
        )
        self.consts = Constants(index=self.consts.arrays["index"], q_in=qa.q, q_out=qb.q)

    def expand(self, w: Tensor) -> Tensor:
        return self.consts.get("q_out", w) @ super().expand(w) @ self.consts.get("q_in", w).T

    def project(self, dense: Tensor) -> Tensor:
        return super().project(self.consts.get("q_out", dense).T @ dense @ self.consts.get("q_in", dense))


def _regular_equivalent(rep: Representation) -> bool:
    try:
        return not rep.regular_basis.canonical
    except ValueError:
        return False


def make_parametrization(in_rep: Representation, out_rep: Representation) -> Parametrization:
    """The parametrization of ``Hom_G(in_rep, out_rep)`` that the representations allow (regular copies first, then
    regular copies in another basis, then any)."""
    regular_in, regular_out = in_rep.regular_copies is not None, out_rep.regular_copies is not None
    if regular_in and regular_out:
        return GroupConvolution(in_rep, out_rep)
    if not (regular_in or regular_out) and _regular_equivalent(in_rep) and _regular_equivalent(out_rep):
        return ConjugatedConvolution(in_rep, out_rep)
    if regular_out:
        return Lift(in_rep, out_rep)
    if regular_in:
        return Projection(in_rep, out_rep)
    return HomBasis(in_rep, out_rep)


class eLinear(nn.Module):
    r"""Linear map ``y = W x + b`` with ``W rho_in(g) = rho_out(g) W`` and ``rho_out(g) b = b`` for all ``g``.

    Shapes: ``x (..., in_rep.size) -> y (..., out_rep.size)``. Equivariance: ``f(rho_in(g) x) = rho_out(g) f(x)``.

    The parametrization (a :class:`Parametrization`) is chosen from the representations (``N = |G|``; ``reg^m``:
    ``m`` regular copies):

    ========================  ====================================  =================================
    map                       free parameters                        dense weight
    ========================  ====================================  =================================
    ``reg^m -> reg^n``        ``w (n, m, N)``: group convolution      ``W[(c,a),(c',b)] = w[c,c',a^-1 b]``
    same, other bases         ``w (n, m, N)``: conjugated             ``W = Q_out W_conv Q_in^T``
    ``rho_in -> reg^n``       ``F (n, d_in)``: lift                   ``W[(c,h),:] = F[c] rho_in(h)^T``
    ``reg^m -> rho_out``      ``F (d_out, m)``: projection            ``W[:,(c,h)] = rho_out(h) F[:,c]``
    ``rho_in -> rho_out``     ``theta (K,)``: Hom_G basis              ``W = sum_k theta_k B_k``
    ========================  ====================================  =================================

    Each uses exactly ``dim Hom_G(rho_in, rho_out)`` parameters. The bias is one value per output copy for a regular
    output, else coefficients on an orthonormal basis of ``rho_out``'s fixed vectors (no bias if there are none).
    Initialization matches ``torch.nn.Linear``'s entry variance (so swapping layers keeps activations' scale), or that
    of ``init_scheme`` (:data:`INIT_SCHEMES`, see :meth:`reset_parameters`).
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        in_rep: Representation,
        out_rep: Representation,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = None,
    ) -> None:
        super().__init__()
        check_same_group(in_rep=in_rep, out_rep=out_rep)
        self.init_scheme = check_init_scheme(init_scheme)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_rep, self.out_rep = in_rep, out_rep
        self.in_features, self.out_features = in_rep.size, out_rep.size
        self.parametrization = make_parametrization(in_rep, out_rep)
        self.weight = nn.Parameter(torch.empty(*self.parametrization.weight_shape, **fk))
        self._bias_basis = Constants(basis=out_rep.invariant_basis) if out_rep.regular_copies is None else None
        if bias and self._bias_basis is not None:
            bias = self._bias_basis.arrays["basis"].shape[1] > 0
        if bias:
            n_bias = out_rep.regular_copies or self._bias_basis.arrays["basis"].shape[1]  # type: ignore[union-attr]
            self.bias = nn.Parameter(torch.empty(n_bias, **fk))
        else:
            self.register_parameter("bias", None)
        self._cache = WeightCache()
        self.reset_parameters()

    @property
    def kind(self) -> str:
        """The parametrization's name: ``conv``, ``lift``, ``project`` or ``basis``."""
        return self.parametrization.kind

    @property
    def num_free_parameters(self) -> int:
        """``dim Hom_G(rho_in, rho_out)`` plus the bias's free parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = None) -> None:
        """Initialize with ``scheme`` (one of :data:`INIT_SCHEMES`; ``None``: the constructor's ``init_scheme``, and
        if that is ``None`` too, ``torch.nn.Linear``'s). The free parameters are drawn so that the *dense* weight's
        entries have the scheme's variance (``scheme_variance``) whatever the parametrization; ``"identity"`` is the
        orthogonal projection of the rectangular identity onto the equivariant maps, with a zero bias."""
        scheme = check_init_scheme(scheme, "scheme") or self.init_scheme
        d_in, d_out = self.in_features, self.out_features
        gain = self.parametrization.variance_gain(d_in, d_out)
        if scheme == "identity":
            self.load_dense_(torch.eye(d_out, d_in), None if self.bias is None else torch.zeros(d_out))
            return
        if scheme is None:
            kind, var = "uniform", 1.0 / (3 * d_in)
        else:
            kind, var = scheme_variance(scheme, d_in, d_out)
        std = math.sqrt(var / gain)
        if kind == "normal":
            nn.init.normal_(self.weight, 0.0, std)
        else:
            nn.init.uniform_(self.weight, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(d_in)
            b = bound if self._bias_basis is None else bound * math.sqrt(d_out / self.bias.numel())
            nn.init.uniform_(self.bias, -b, b)

    # ---------------------------------------------------------------- dense form
    def _expand(self) -> tuple[Tensor, Tensor | None]:
        dense = self.parametrization.expand(self.weight)
        if self.bias is None:
            return dense, None
        if self._bias_basis is None:
            return dense, self.bias.repeat_interleave(self.out_rep.group.order)
        return dense, self._bias_basis.get("basis", self.weight) @ self.bias

    def dense(self) -> tuple[Tensor, Tensor | None]:
        """The dense ``(W (d_out, d_in), b (d_out,) | None)``; cached while parameters are unchanged and no gradient
        is needed."""
        weight, bias = self._cache.get(self, self._expand)
        assert weight is not None  # the cache returns what _expand built
        return weight, bias

    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Affine:
        """The dense map as a lowered block (expanded in the parameters' dtype, then cast to ``dtype``; ``None``
        keeps it) on ``device`` (``None``: the parameters')."""
        weight, bias = self._expand()
        return Affine(lowered(weight, dtype, device), lowered(bias, dtype, device))

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
        self.weight.copy_(self.parametrization.project(weight.to(self.weight)))
        if self.bias is not None:
            if bias is None:
                raise ValueError("bias: this layer has a bias, expected a tensor, got None")
            b = bias.to(self.bias)
            if self._bias_basis is None:
                self.bias.copy_(b.reshape(-1, self.out_rep.group.order).mean(-1))
            else:
                self.bias.copy_(self._bias_basis.get("basis", b).T @ b)

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
    proj = sum(b[g] @ x @ a[g].T for g in range(len(a))) / len(a)  # batched matmuls (BLAS), not einsum loops
    u, _, _ = np.linalg.svd(proj.reshape(k + 4, -1).T, full_matrices=False)
    return _canonical_signs(u[:, :k].T).reshape(k, d_out, d_in)


def _canonical_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-magnitude entry is positive: the basis (and so the meaning of trained
    coefficients) must not depend on the sign conventions of the LAPACK build."""
    if vectors.size == 0:
        return vectors
    idx = np.argmax(np.abs(vectors), axis=1)
    return vectors * np.sign(vectors[np.arange(len(vectors)), idx])[:, None]
