"""``O3CondDenoiser``: the denoiser ``V = f(X_k, k, Z)`` of an action policy over 3-D tokens, O(3)-equivariant,
translation-invariant and streamable (the O(3) counterpart of :class:`~.cond_regressor.eCondTransformerRegressor`).

Observation: per control step ``E`` entity tokens, each a position ``p (3,)`` and irreps features ``z (P_o, C_o,
F_o)`` (velocities, orientations as vectors/tensors, invariant attributes). Actions: ``Tx`` future steps, one polar
vector each (a velocity or displacement command), in order. Output: a polar vector per future step.

Symmetry: for every ``g`` in O(3) and translation ``t``, with ``pi`` a permutation of the entities (the same at
every step) and no gravity,

    f(X R_g^T, k, g . Z, p R_g^T + t) = f(X, k, Z, p) R_g^T,     f(X, k, pi Z, pi p) = f(X, k, Z, p).

With ``gravity`` (a fixed direction fed as one constant polar-vector token per step) the first identity holds for
the ``g`` that fix the direction: rotations about the vertical axis and reflections through vertical planes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..nn.o3 import (
    Dense,
    GatedMLP,
    IrrepsLayout,
    O3EncoderState,
    O3LayerNorm,
    O3MemoryState,
    O3MultiheadAttention,
    O3TransformerEncoder,
    change_layout,
    layout_index,
)
from ..nn.state import Rows, StreamState
from .cond_regressor import sinusoidal_embedding

__all__ = ["O3CondDenoiser", "O3DenoiserConfig", "O3DenoiserState", "O3DecoderBlock"]

_VECTOR = IrrepsLayout(1)
"""One polar vector: degree 1 of natural parity (odd), components ``(x, y, z)`` (Cartesian order)."""


def _describe(t: object) -> str:
    """A tensor's shape, or the type of what came instead (for error messages)."""
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


@dataclass(frozen=True)
class O3DenoiserConfig:
    """Every choice of an :class:`O3CondDenoiser`: the one place for these names (constructor, checkpoints, CLI).

    Observation layout: ``num_entities`` tokens ``E`` per control step with ``obs_features`` channels of degrees
    ``0..obs_max_degree`` (both parities with ``obs_pseudotensors``). ``in_horizon``: action tokens ``Tx``.
    ``cond_horizon``: control steps of encoder outputs the decoder cross-attends to; ``cond_window``: control steps
    each encoder block attends to (``None``: ``cond_horizon``). Hidden tokens: ``features`` channels of degrees
    ``0..max_degree`` (``include_pseudotensors``: both parities), ``num_attention_heads`` heads, ``num_basis`` radial
    functions vanishing at ``cutoff`` (position units). ``reference_entity``: the entity whose position is the
    actions' reference point (the robot base; ``None``: the centroid of the step's entities, which keeps them a
    set). ``gravity``: a direction fed as a constant token (``None``: full O(3) symmetry).
    """

    num_entities: int
    obs_features: int
    in_horizon: int
    cond_horizon: int
    obs_max_degree: int = 1
    obs_pseudotensors: bool = False
    cond_window: int | None = None
    features: int = 32
    max_degree: int = 2
    include_pseudotensors: bool = False
    num_attention_heads: int = 4
    num_layers: int = 2
    num_cond_layers: int = 2
    num_basis: int = 8
    cutoff: float = 2.0
    reference_entity: int | None = None
    gravity: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("num_entities", "obs_features", "in_horizon", "cond_horizon", "features", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.cond_window is not None and (isinstance(self.cond_window, bool) or self.cond_window < 1):
            raise ValueError(f"cond_window: expected an integer >= 1 or None, got {self.cond_window!r}")
        if isinstance(self.num_cond_layers, bool) or self.num_cond_layers < 0:
            raise ValueError(f"num_cond_layers: expected an integer >= 0, got {self.num_cond_layers!r}")
        ref = self.reference_entity
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < self.num_entities):
            raise ValueError(f"reference_entity: expected None or an entity in 0..{self.num_entities - 1}, got {ref!r}")
        if self.gravity is not None:
            g = torch.as_tensor(self.gravity, dtype=torch.float64)
            if g.shape != (3,) or not bool(torch.isfinite(g).all()) or float(g.norm()) == 0:
                raise ValueError(f"gravity: expected None or a nonzero finite 3-vector, got {self.gravity!r}")
            object.__setattr__(self, "gravity", tuple(float(v) for v in self.gravity))

    @property
    def tokens_per_step(self) -> int:
        """Encoder tokens per control step: the entities, plus the gravity token."""
        return self.num_entities + (self.gravity is not None)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what a checkpoint stores)."""
        values = dataclasses.asdict(self)
        values["gravity"] = None if self.gravity is None else list(self.gravity)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> O3DenoiserConfig:
        """From :meth:`to_dict`; unknown names are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown O3CondDenoiser options {unknown}; known: {sorted(known)}")
        values = dict(values)
        if values.get("gravity") is not None:
            values["gravity"] = tuple(values["gravity"])
        return cls(**values)


@dataclass
class O3DenoiserState(StreamState):
    """Streaming state of an :class:`O3CondDenoiser`: the encoder's whole-step rings (``None`` without encoder
    blocks), per decoder block the ring of cross-attention keys/values/positions of the memory, each row's
    newest reference point ``(b, 3)``, and the most control steps one :meth:`O3CondDenoiser.observe` may bring."""

    encoder: O3EncoderState | None
    memory: list[O3MemoryState]
    reference: Tensor
    max_tokens_per_step: int

    def session_state_dict(self, row: int) -> dict[str, Tensor]:
        """The past of batch row ``row`` (copies): every tensor of the state, batch dimension first, at that row,
        by its dotted name. :meth:`load_session_state_dict` puts it into any row of a state of the same model."""
        b = self.reference.shape[0]
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < b:
            raise ValueError(f"row: expected a row in 0..{b - 1}, got {row!r}")
        return {name: t[row].clone() for name, t in self.tensors().items()}

    def load_session_state_dict(self, row: int, snapshot: Mapping[str, Tensor]) -> None:
        """Replace batch row ``row`` by a :meth:`session_state_dict` (any device); other rows are untouched."""
        own = self.session_state_dict(row)
        missing, unexpected = sorted(set(own) - set(snapshot)), sorted(set(snapshot) - set(own))
        if missing or unexpected:
            raise ValueError(f"session state: missing keys {missing}, unexpected keys {unexpected}")
        for name, t in self.tensors().items():
            if tuple(snapshot[name].shape) != tuple(t.shape[1:]):
                raise ValueError(
                    f"session state[{name!r}]: expected shape {tuple(t.shape[1:])}, got {tuple(snapshot[name].shape)}"
                )
            t[row] = snapshot[name].to(t.device, t.dtype)


class O3DecoderBlock(nn.Module):
    r"""``x = x + self_attn(norm1(x)); x = x + cross_attn(norm2(x), q_pos, memory, m_pos); x = x + mlp(norm3(x))``.

    The self-attention over the action tokens reads no positions (they all sit at the reference point; their order
    comes from invariant per-index embeddings); the cross-attention sees each memory token through ``r = m_pos -
    q_pos``. Equivariant: ``block(g . x, g q + t, g . m, g p + t) = g . block(x, q, m, p)``.

    Shapes: ``x (B, N, P, C, F)``, ``q_pos (B, N, 3)``, ``memory (B, M, P, C, F)``, ``m_pos (B, M, 3)`` -> like ``x``.
    """

    def __init__(
        self,
        features: int,
        max_degree: int,
        num_heads: int,
        *,
        include_pseudotensors: bool = False,
        num_basis: int = 8,
        cutoff: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        common: dict[str, Any] = {"include_pseudotensors": include_pseudotensors, **fk}
        self.self_attn = O3MultiheadAttention(
            features,
            max_degree,
            num_heads,
            use_relative_positional_encoding_qk=False,
            use_relative_positional_encoding_v=False,
            **common,
        )
        self.cross_attn = O3MultiheadAttention(
            features, max_degree, num_heads, num_basis=num_basis, cutoff=cutoff, **common
        )
        layout = self.self_attn.layout
        self.norm1, self.norm2, self.norm3 = (O3LayerNorm(layout, features, **fk) for _ in range(3))
        self.mlp = GatedMLP(layout, features, 2 * features, **fk)

    def forward(self, x: Tensor, q_pos: Tensor, memory: Tensor, m_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask (B, N, M)``: True where an action token may read a memory token (``None``: all)."""
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), q_pos, mask, kv=memory, kv_positions=m_pos)
        return x + self.mlp(self.norm3(x))

    def forward_cached_memory(self, x: Tensor, q_pos: Tensor, memory: O3MemoryState, rows: Rows = None) -> Tensor:
        """:meth:`forward` with the memory held in ``memory`` (the cross-attention's ring; :meth:`forward` with
        the ring's tokens as ``memory``)."""
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn.forward_step(self.norm2(x), memory, rows=rows, positions=q_pos)[0]
        return x + self.mlp(self.norm3(x))


class O3CondDenoiser(nn.Module):
    r"""O(3)-equivariant conditional denoiser ``V = f(X, k, Z, p)``: action vectors ``X (B, Tx, 3)``, a diffusion step
    / flow time ``k`` (scalar or ``(B,)``), observation entity tokens ``Z (B, T, E, P_o, C_o, F_o)`` at positions
    ``p (B, T, E, 3)`` over ``T`` control steps (oldest first) -> ``V (B, Tx, 3)``. Equivariance: see the module
    docstring (O(3), translations, permutations of the entities; the action tokens are ordered, not a set).

    Architecture (the streaming design of :class:`~.cond_regressor.eCondTransformerRegressor`):

    * entity features are embedded per irrep block (:class:`~streamtx.nn.o3.Dense`) into ``F`` channels of degrees
      ``0..L``; with ``gravity`` a constant polar-vector token joins each step at its reference point;
    * an :class:`~streamtx.nn.o3.O3TransformerEncoder` runs over whole control steps: every token of step ``s``
      attends to all tokens of steps ``s - cond_window + 1 .. s`` (its own step included, so the entities of a step
      are a set), with relative-position bases, so a new step costs one encoder step;
    * the memory is the encoder output of the ``cond_horizon`` newest steps; the step ``k`` does not enter it;
    * action tokens: the vector ``X[:, i]`` embedded per channel, plus an invariant embedding of its index ``i`` and
      of ``k`` in the ``0+`` channels; they sit at the newest step's reference point (the entities' centroid or
      ``reference_entity``), so the relative vectors to the memory are translation invariant;
    * :class:`O3DecoderBlock` s (self-attention over the action tokens, cross-attention to the memory), a final
      norm and a head to one polar vector per action token.

    :meth:`forward` is the batch reference of the streaming methods :meth:`init_state`, :meth:`observe` and
    :meth:`denoise` (equal on the newest :meth:`receptive_field` steps).
    """

    gravity: Tensor | None
    obs_index: Tensor
    vector_index: Tensor
    head_index: Tensor

    def __init__(
        self,
        config: O3DenoiserConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, O3DenoiserConfig):
            raise TypeError(f"config: expected an O3DenoiserConfig, got {type(config).__name__}")
        c = self.config = config
        if c.features % c.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: expected a divisor of features={c.features}, got {c.num_attention_heads}"
            )
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_horizon, self.cond_horizon = c.in_horizon, c.cond_horizon
        self.cond_window = c.cond_window or c.cond_horizon
        self.obs_layout = IrrepsLayout(c.obs_max_degree, c.obs_pseudotensors)
        self.layout = layout = IrrepsLayout(c.max_degree, c.include_pseudotensors)
        self.features = f = c.features
        self.register_buffer("obs_index", layout_index(self.obs_layout, layout).to(device), persistent=False)
        self.register_buffer("vector_index", layout_index(_VECTOR, layout).to(device), persistent=False)
        self.register_buffer("head_index", layout_index(layout, _VECTOR).to(device), persistent=False)
        self.obs_emb = Dense(layout, c.obs_features, f, **fk)
        self.input_emb = Dense(layout, 1, f, bias=False, **fk)  # an action vector, scaled per channel
        self.pos_emb = nn.Parameter(torch.empty(c.in_horizon, f, **fk))  # invariant: in the 0+ channels
        self.time_mlp = nn.Sequential(nn.Linear(f, 4 * f, **fk), nn.Mish(), nn.Linear(4 * f, f, **fk))
        if c.gravity is not None:
            g = torch.as_tensor(c.gravity, dtype=torch.float64)
            unit = (g / g.norm()).to(device=device, dtype=dtype or torch.get_default_dtype())  # the weights' dtype
            self.register_buffer("gravity", unit, persistent=False)
            self.gravity_emb: Dense | None = Dense(layout, 1, f, **fk)  # its 0+ bias marks the token's kind
        else:
            self.register_buffer("gravity", None, persistent=False)
            self.gravity_emb = None
        attn: dict[str, Any] = {"num_basis": c.num_basis, "cutoff": c.cutoff}
        self.encoder = (
            O3TransformerEncoder(
                c.num_cond_layers,
                f,
                c.max_degree,
                c.num_attention_heads,
                include_pseudotensors=c.include_pseudotensors,
                **attn,
                **fk,
            )
            if c.num_cond_layers > 0
            else None
        )
        self.decoder = nn.ModuleList(
            O3DecoderBlock(
                f, c.max_degree, c.num_attention_heads, include_pseudotensors=c.include_pseudotensors, **attn, **fk
            )
            for _ in range(c.num_layers)
        )
        self.ln_f = O3LayerNorm(layout, f, **fk)
        self.head = Dense(layout, f, 1, bias=False, **fk)
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, config: O3DenoiserConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> O3CondDenoiser:
        """The model of ``config`` (the checkpoint loader's entry point, as ``eCondTransformerRegressor``'s)."""
        return cls(config, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_emb, std=0.02)

    # ---------------------------------------------------------------- description
    @property
    def action_dim(self) -> int:
        """Components of an action token: one 3-vector."""
        return 3

    @property
    def obs_shape(self) -> tuple[int, int, int, int]:
        """Trailing shape of one control step's observation features: ``(E, P_o, C_o, F_o)``."""
        return (self.config.num_entities, *self.obs_layout.shape(self.config.obs_features))

    @property
    def token_dim(self) -> int:
        """Size of one control step as a flat token (the wire's ``obs_dim``): the entity features ``(E, P_o, C_o,
        F_o)`` then their positions ``(E, 3)``, each flattened in C order (:meth:`join_tokens`)."""
        return math.prod(self.obs_shape) + 3 * self.config.num_entities

    def split_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Flat tokens ``(..., token_dim)`` -> ``(features (..., E, P_o, C_o, F_o), positions (..., E, 3))``."""
        if not isinstance(tokens, Tensor) or tokens.dim() < 1 or tokens.shape[-1] != self.token_dim:
            raise ValueError(
                f"tokens: expected (..., {self.token_dim}) (the features {self.obs_shape} then the positions "
                f"({self.config.num_entities}, 3) of one control step), got {_describe(tokens)}"
            )
        n, lead = math.prod(self.obs_shape), tokens.shape[:-1]
        return tokens[..., :n].reshape(*lead, *self.obs_shape), tokens[..., n:].reshape(*lead, -1, 3)

    def join_tokens(self, features: Tensor, positions: Tensor) -> Tensor:
        """``features (..., E, P_o, C_o, F_o)`` and ``positions (..., E, 3)`` -> flat tokens ``(..., token_dim)``
        (the inverse of :meth:`split_tokens`)."""
        if not isinstance(features, Tensor) or tuple(features.shape[-4:]) != self.obs_shape:
            raise ValueError(
                f"features: expected (..., {', '.join(map(str, self.obs_shape))}), got {_describe(features)}"
            )
        lead = features.shape[:-4]
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (*lead, self.config.num_entities, 3):
            expected = (*lead, self.config.num_entities, 3)
            raise ValueError(f"positions: expected shape {expected} (one per entity token), got {_describe(positions)}")
        return torch.cat((features.reshape(*lead, -1), positions.reshape(*lead, -1)), dim=-1)

    def token_layout(self) -> dict[str, Any]:
        """The layout of one flat token in plain values (what the daemon's ``hello`` declares, docs/protocol.md)."""
        e, (p, c, f) = self.config.num_entities, self.obs_layout.shape(self.config.obs_features)
        n = e * p * c * f
        return {
            "entities": e,
            "features": {"offset": 0, "size": n, "shape": [e, p, c, f]},
            "positions": {"offset": n, "size": 3 * e, "shape": [e, 3]},
            "irreps": [[self.obs_layout.label(q, l) for l in range(self.obs_layout.max_degree + 1)] for q in range(p)],
            "component_order": "degree l at components l**2..(l+1)**2-1, m = +l, -l, ..., +1, -1, 0 (l = 1: x, y, z)",
            "action": "one polar vector (x, y, z) per future step",
            "gravity": None if self.config.gravity is None else list(self.config.gravity),
        }

    def symmetry(self) -> str:
        """The symmetry group of the policy, in words (for descriptions)."""
        if self.config.gravity is None:
            return "O(3) x translations x entity permutations"
        return "O(2) about gravity x translations x entity permutations"

    def receptive_field(self) -> int:
        """Control steps that can influence the output: the batch reference needs no longer history."""
        layers = 0 if self.encoder is None else len(self.encoder.layers)
        return self.cond_horizon + layers * (self.cond_window - 1)

    def _blocks(self) -> list[O3DecoderBlock]:
        return [cast(O3DecoderBlock, block) for block in self.decoder]

    # ---------------------------------------------------------------- pieces shared by batch and streaming paths
    def _check_obs(self, Z: Tensor, positions: Tensor | None, batch: int | None) -> None:
        """``Z (B, T, E, P_o, C_o, F_o)``, ``positions (B, T, E, 3)``, finite, in the model's dtype."""
        if not isinstance(Z, Tensor) or Z.dim() != 6 or tuple(Z.shape[2:]) != self.obs_shape or Z.shape[1] < 1:
            shape = _describe(Z)
            raise ValueError(f"Z: expected (B, T, {', '.join(map(str, self.obs_shape))}) with T >= 1, got {shape}")
        if batch is not None and Z.shape[0] != batch:
            raise ValueError(f"Z: expected batch size {batch}, got {Z.shape[0]}")
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (*Z.shape[:3], 3):
            shape = _describe(positions)
            raise ValueError(f"positions: expected shape {(*Z.shape[:3], 3)} (one per entity token), got {shape}")
        for name, t in (("Z", Z), ("positions", positions)):
            if t.dtype != self.pos_emb.dtype:
                raise TypeError(f"{name}: expected dtype {self.pos_emb.dtype} (the model's), got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values (got NaN/Inf)")

    def _step_tokens(self, Z: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedded tokens ``(B, T, E', P, C, F)`` (the gravity token last), their positions ``(B, T, E', 3)`` and
        each step's reference point ``(B, T, 3)``."""
        z = self.obs_emb(change_layout(Z, self.obs_index, self.layout))
        ref = (
            positions.mean(2) if self.config.reference_entity is None else positions[:, :, self.config.reference_entity]
        )
        if self.gravity is not None and self.gravity_emb is not None:
            g = self.gravity_emb(change_layout(self._vector_features(self.gravity), self.vector_index, self.layout))
            z = torch.cat((z, g.expand(*z.shape[:2], 1, *g.shape)), dim=2)
            positions = torch.cat((positions, ref[:, :, None]), dim=2)
        return z, positions, ref

    @staticmethod
    def _vector_features(v: Tensor) -> Tensor:
        """Vectors ``(..., 3)`` as one-channel polar-vector features ``(..., 1, 4, 1)`` (:data:`_VECTOR`)."""
        return torch.cat((torch.zeros_like(v[..., :1]), v), dim=-1)[..., None, :, None]

    def _check_actions(self, X: Tensor, batch: int | None) -> None:
        if not isinstance(X, Tensor) or X.dim() != 3 or X.shape[-1] != 3 or not 1 <= X.shape[1] <= self.in_horizon:
            shape = _describe(X)
            raise ValueError(f"X: expected (B, Tx, 3) with Tx in 1..{self.in_horizon}, got {shape}")
        if batch is not None and X.shape[0] != batch:
            raise ValueError(f"X: expected batch size {batch} (that of the observations), got {X.shape[0]}")
        if X.dtype != self.pos_emb.dtype:
            raise TypeError(f"X: expected dtype {self.pos_emb.dtype} (the model's), got {X.dtype}")

    def _action_tokens(self, X: Tensor, opt_step: Tensor | float) -> Tensor:
        """Action tokens ``(B, Tx, P, C, F)``: each vector per channel, plus the invariant index and step
        embeddings in the ``0+`` channels."""
        b, tx = X.shape[:2]
        k = torch.as_tensor(opt_step, device=X.device)
        if k.dim() == 0:
            k = k.expand(b)
        if k.shape != (b,) or not bool(torch.isfinite(k.double()).all()):
            raise ValueError(f"opt_step: expected a finite scalar or shape ({b},), got {tuple(k.shape)}")
        x = self.input_emb(change_layout(self._vector_features(X), self.vector_index, self.layout))
        scalars = self.pos_emb[:tx] + self.time_mlp(sinusoidal_embedding(k, self.features).to(X.dtype))[:, None]
        x[..., 0, 0, :] += scalars  # a fresh Dense output (no bias): in place is safe for autograd
        return x

    def _head(self, x: Tensor) -> Tensor:
        """Final norm and head: one polar vector ``(B, Tx, 3)`` per action token."""
        return change_layout(self.head(self.ln_f(x)), self.head_index, _VECTOR)[..., 0, 1:, 0]

    # ---------------------------------------------------------------- batch forward
    def forward(
        self,
        X: Tensor,
        opt_step: Tensor | float,
        Z: Tensor,
        *,
        positions: Tensor | None = None,
        cond_lengths: Tensor | None = None,
    ) -> Tensor:
        """``V (B, Tx, 3)`` for noisy action vectors ``X (B, Tx, 3)`` at step ``opt_step`` given the observation
        window ``Z (B, T, E, P_o, C_o, F_o)`` at ``positions (B, T, E, 3)``, oldest step first; or, with
        ``positions=None``, the window as flat tokens ``Z (B, T, token_dim)`` (:meth:`split_tokens`: what the wire
        and the trainer's datasets carry). ``cond_lengths (B,)``: example ``b``'s window is its last
        ``cond_lengths[b]`` steps, the steps before are padding that nothing attends to (the trainer's left-padded
        batches, :class:`~streamtx.train.ChunkBatch`)."""
        if positions is None:
            if not isinstance(Z, Tensor) or Z.dim() != 3:
                raise ValueError(
                    f"Z: expected flat tokens (B, T, {self.token_dim}) without positions, or (B, T, "
                    f"{', '.join(map(str, self.obs_shape))}) with positions, got {_describe(Z)}"
                )
            Z, positions = self.split_tokens(Z)
        self._check_obs(Z, positions, None)
        self._check_actions(X, Z.shape[0])
        b, t = Z.shape[:2]
        z, pos, ref = self._step_tokens(Z, positions)
        e = z.shape[2]
        z, pos = z.flatten(1, 2), pos.flatten(1, 2)
        real = self._real_tokens(cond_lengths, b, t, e, Z.device)  # (B, T E) or None
        if self.encoder is not None:
            step = torch.arange(t, device=Z.device).repeat_interleave(e)
            lag = step[:, None] - step[None, :]
            mask = (lag >= 0) & (lag < self.cond_window)  # whole-step causal window
            if real is not None:  # real queries read real keys only; padding reads padding (no empty row)
                mask = mask & (real[:, None, :] | ~real[:, :, None])
            z = self.encoder(z, pos, mask)
        keep = min(t, self.cond_horizon) * e
        memory, memory_pos = z[:, -keep:], pos[:, -keep:]
        x = self._action_tokens(X, opt_step)
        q_pos = ref[:, -1:].expand(b, x.shape[1], 3)
        memory_mask = None if real is None else real[:, None, -keep:].expand(b, x.shape[1], keep)
        for block in self._blocks():
            x = block(x, q_pos, memory, memory_pos, memory_mask)
        return self._head(x)

    @staticmethod
    def _real_tokens(lengths: Tensor | None, b: int, t: int, e: int, device: torch.device) -> Tensor | None:
        """``(B, T E)`` True on the tokens of the last ``lengths[b]`` steps (``None``: every window is full)."""
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.shape != (b,) or bool(((lengths < 1) | (lengths > t)).any()):
            raise ValueError(f"cond_lengths: expected ({b},) window lengths in 1..{t}, got {lengths.tolist()}")
        real = torch.arange(t, device=device)[None, :] >= t - lengths[:, None]
        return real.repeat_interleave(e, dim=1)

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3DenoiserState:
        """Empty caches for ``batch_size`` independent streams. ``max_tokens_per_step``: control steps one
        :meth:`observe` call may bring (they run one after another; the rings hold whole steps)."""
        if isinstance(max_tokens_per_step, bool) or not isinstance(max_tokens_per_step, int) or max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected an integer >= 1, got {max_tokens_per_step!r}")
        e = self.config.tokens_per_step
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        encoder = (
            None
            if self.encoder is None
            else self.encoder.init_state(batch_size, memory_window=self.cond_window * e, **kw)
        )
        memory = [
            block.cross_attn.init_state(batch_size, memory_window=self.cond_horizon * e, **kw)
            for block in self._blocks()
        ]
        ref = self.pos_emb
        reference = torch.zeros(batch_size, 3, dtype=dtype or ref.dtype, device=device or ref.device)
        return O3DenoiserState(encoder, memory, reference, max_tokens_per_step)

    def _check_state(self, state: O3DenoiserState) -> None:
        if (
            not isinstance(state, O3DenoiserState)
            or len(state.memory) != len(self.decoder)
            or (state.encoder is None) != (self.encoder is None)
        ):
            raise TypeError(
                f"state: expected the O3DenoiserState of this model's init_state, got {type(state).__name__}"
            )

    def num_observed(self, state: O3DenoiserState, rows: Rows = None) -> Tensor:
        """Control steps seen by each row since its reset, ``(b,)``."""
        self._check_state(state)
        return state.memory[0].cache.positions(rows) // self.config.tokens_per_step

    def observe(self, Z: Tensor, state: O3DenoiserState, rows: Rows = None, *, positions: Tensor | None = None) -> None:
        """New control steps ``Z (b, S, E, P_o, C_o, F_o)`` (or one, ``(b, E, P_o, C_o, F_o)``) at ``positions
        (b, S, E, 3)`` (or ``(b, E, 3)``), ``S <= max_tokens_per_step``; or, with ``positions=None``, flat tokens
        ``Z (b, S, token_dim)`` (or ``(b, token_dim)``, :meth:`split_tokens`). Each step runs one encoder step and
        appends its tokens to every decoder block's memory ring."""
        self._check_state(state)
        if positions is None:
            if not isinstance(Z, Tensor) or Z.dim() not in (2, 3):
                raise ValueError(
                    f"Z: expected flat tokens (b, [S,] {self.token_dim}) without positions, or (b, [S,] "
                    f"{', '.join(map(str, self.obs_shape))}) with positions, got {_describe(Z)}"
                )
            Z, positions = self.split_tokens(Z)
        if isinstance(Z, Tensor) and Z.dim() == 5:
            Z = Z[:, None]
            positions = positions[:, None] if isinstance(positions, Tensor) else positions
        b = state.reference.shape[0] if rows is None else len(torch.as_tensor(rows))
        self._check_obs(Z, positions, b)
        if Z.shape[1] > state.max_tokens_per_step:
            raise ValueError(
                f"Z: expected at most max_tokens_per_step={state.max_tokens_per_step} control steps, got {Z.shape[1]}"
            )
        z, pos, ref = self._step_tokens(Z, positions)
        for s in range(z.shape[1]):
            h = z[:, s]
            if self.encoder is not None and state.encoder is not None:
                h = self.encoder.forward_step(h, state.encoder, rows=rows, positions=pos[:, s])[0]
            for block, memory in zip(self._blocks(), state.memory):
                block.cross_attn.append_memory(h, memory, rows=rows, kv_positions=pos[:, s])
        state.reference[slice(None) if rows is None else torch.as_tensor(rows, device=ref.device)] = ref[:, -1]

    def denoise(self, X: Tensor, opt_step: Tensor | float, state: O3DenoiserState, rows: Rows = None) -> Tensor:
        """One denoiser evaluation ``(b, Tx, 3)`` against the cached memory: equal to :meth:`forward` on the
        observed stream. Only the ``Tx`` action tokens are computed; every row needs an observation."""
        self._check_state(state)
        b = state.reference.shape[0] if rows is None else len(torch.as_tensor(rows))
        self._check_actions(X, b)
        empty = self.num_observed(state, rows) == 0
        if bool(empty.any()):
            raise ValueError(f"rows: {empty.nonzero().flatten().tolist()} (of this call) have no observation yet")
        reference = state.reference if rows is None else state.reference[torch.as_tensor(rows, device=X.device)]
        x = self._action_tokens(X, opt_step)
        q_pos = reference[:, None].expand(b, x.shape[1], 3)
        for block, memory in zip(self._blocks(), state.memory):
            x = block.forward_cached_memory(x, q_pos, memory, rows)
        return self._head(x)

    def forward_step(
        self,
        x: Tensor,
        state: O3DenoiserState,
        /,
        *,
        rows: Rows = None,
        positions: Tensor,
        actions: Tensor,
        opt_step: Tensor | float,
    ) -> tuple[Tensor, O3DenoiserState]:
        """The streaming contract's step: new control steps ``x (b, [S,] E, P_o, C_o, F_o)`` at ``positions``
        enter the caches (:meth:`observe`), then one evaluation of ``actions (b, Tx, 3)`` at ``opt_step``
        (:meth:`denoise`). Equal to ``forward(actions, opt_step, Z, positions=p)`` on the observed stream."""
        self.observe(x, state, rows, positions=positions)
        return self.denoise(actions, opt_step, state, rows), state

    def forward_steps(
        self,
        x: Tensor,
        state: O3DenoiserState,
        /,
        *,
        rows: Rows = None,
        positions: Tensor,
        actions: Tensor,
        opt_step: Tensor | float,
    ) -> tuple[Tensor, O3DenoiserState]:
        """``T`` control steps ``x (b, T, E, P_o, C_o, F_o)`` at ``positions (b, T, E, 3)``, step ``t`` denoising
        ``actions[:, t] (b, Tx, 3)`` at ``opt_step`` (a scalar, ``(b,)`` or ``(b, T)``) -> ``(b, T, Tx, 3)``."""
        if not isinstance(x, Tensor) or x.dim() != 6:
            raise ValueError(
                f"x: expected a stream (b, T, {', '.join(map(str, self.obs_shape))}), got {tuple(x.shape)}"
            )
        if not isinstance(actions, Tensor) or actions.dim() != 4 or actions.shape[:2] != x.shape[:2]:
            shape = _describe(actions)
            raise ValueError(f"actions: expected (b, T, Tx, 3) with b, T = {tuple(x.shape[:2])}, got {shape}")
        k = torch.as_tensor(opt_step, device=x.device)
        outs = []
        for t in range(x.shape[1]):
            k_t = k[:, t] if k.dim() == 2 else k
            step = self.forward_step(
                x[:, t], state, rows=rows, positions=positions[:, t], actions=actions[:, t], opt_step=k_t
            )
            outs.append(step[0])
        return torch.stack(outs, dim=1), state

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"entities={c.num_entities}, obs=({self.obs_layout}, F={c.obs_features}), hidden=({self.layout}, "
            f"F={c.features}), in_horizon={c.in_horizon}, cond_horizon={c.cond_horizon}, "
            f"cond_window={self.cond_window}, gravity={c.gravity}"
        )
