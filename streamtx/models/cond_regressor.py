"""The denoiser ``V = f(X_k, k, Z)`` of a diffusion / flow-matching action policy, equivariant and streamable."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.activation import ePointwise
from ..nn.attention import causal_window_mask
from ..nn.equivariance import equivariance_error
from ..nn.kernels import attention, fused_kernels_available
from ..nn.linear import check_init_scheme, check_same_group, eLinear
from ..nn.lowered import MLP, Affine, Decoder, Encoder, lowered
from ..nn.state import RingCache, Rows, StreamState, additive_mask, band_mask
from ..nn.transformer import (
    EncoderState,
    eTransformerDecoder,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
    make_norm,
)
from ..symmetry import Representation, trivial_group

__all__ = [
    "eCondTransformerRegressor",
    "CondTransformerRegressor",
    "RegressorConfig",
    "RegressorState",
    "RegressorPlan",
    "PlanCaches",
    "ActWorkspace",
    "StepSampler",
    "sampler_schedule",
    "COMPUTE_DTYPES",
    "get_optim_groups",
    "sinusoidal_embedding",
]

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes a :class:`RegressorPlan` computes in."""

log = logging.getLogger(__name__)


def _window_positions(
    lengths: Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token positions ``(B, T)`` of left-padded windows counted from each window's first real token (padding
    negative), the newest token's position ``(B,)``, and the padding ``(B, T)`` (True = padding; None without
    ``lengths``: every window is whole)."""
    pos = torch.arange(length, device=device).expand(batch, length)
    if lengths is None:
        return pos, pos[:, -1], None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,) or lengths.is_floating_point():
        raise ValueError(f"cond_lengths: expected integer lengths of shape ({batch},), got {tuple(lengths.shape)}")
    if bool(((lengths < 1) | (lengths > length)).any()):
        raise ValueError(f"cond_lengths: expected lengths in 1..{length} (the window's T), got {lengths.tolist()}")
    pos = pos - (length - lengths)[:, None]
    return pos, lengths - 1, pos < 0


def sinusoidal_embedding(k: Tensor, dim: int) -> Tensor:
    """``(B,)`` steps -> ``(B, dim)`` sinusoidal embedding (diffusion-model convention)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=k.device, dtype=torch.float64) / max(half - 1, 1))
    arg = k.to(torch.float64)[:, None] * freq[None]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


@dataclass(frozen=True)
class RegressorConfig:
    """Every architecture choice of an :class:`eCondTransformerRegressor` besides its representations: the one place
    for these names (the constructor, checkpoints, the trainer CLI and tests read them from here).

    ``cond_horizon`` is the memory horizon (newest encoder outputs the decoder cross-attends to), ``cond_window`` the
    encoder's causal attention window (``None``: ``cond_horizon``); ``in_horizon`` is the action chunk length.
    ``norm_first``: pre-norm (default) or post-norm layers. Positional backends (``None``, ``"absolute"``: recycling
    ids ``pos mod M``, ``"relative"``, ``"rope"``) of the encoder's self-attention (``cond_positional``), the
    decoder's self-attention over the action tokens (``self_positional``) and its cross-attention to the memory
    (``cross_positional``). ``token_levels``: each action token also gets an invariant embedding of its own noise
    level (``opt_step (B, Tx)``), beside the shared step token, which then carries the mean level: what a streaming
    sampler whose buffer holds actions at levels increasing along the horizon needs (off: the shared step token
    alone, the architecture of checkpoints that predate the option). ``anticausal_attn``: each action token
    self-attends to itself and the *later* ones only, so a streaming buffer's chunk never reads an older chunk and
    the buffer depends on its last few control steps only (an exact finite replay).
    """

    in_horizon: int
    cond_horizon: int
    num_layers: int = 4
    num_attention_heads: int = 4
    embedding_dim: int = 128
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.0
    causal_attn: bool = False
    num_cond_layers: int = 2
    norm_module: str = "layernorm"
    dim_feedforward: int | None = None
    activation: str = "gelu"
    cond_window: int | None = None
    norm_first: bool = True
    cond_positional: str | None = "rope"
    self_positional: str | None = None
    cross_positional: str | None = "rope"
    token_levels: bool = False
    anticausal_attn: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what a checkpoint stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RegressorConfig:
        """From :meth:`to_dict` or an older checkpoint's config; unknown names are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown eCondTransformerRegressor options {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_row(row: int, batch_size: int) -> list[int]:
    if not isinstance(row, int) or not 0 <= row < batch_size:
        raise ValueError(f"row: expected a row index in 0..{batch_size - 1}, got {row!r}")
    return [row]


def _check_session(mine: Mapping[str, Tensor], snapshot: Mapping[str, Tensor]) -> None:
    """``snapshot`` has the keys and shapes of ``mine`` (this state's own session snapshot)."""
    missing, unexpected = sorted(set(mine) - set(snapshot)), sorted(set(snapshot) - set(mine))
    if missing or unexpected:
        raise ValueError(f"session state: missing keys {missing}, unexpected keys {unexpected}")
    for name, t in mine.items():
        if tuple(snapshot[name].shape) != tuple(t.shape):
            raise ValueError(
                f"session state[{name!r}]: expected shape {tuple(t.shape)}, got {tuple(snapshot[name].shape)}"
            )


def _window(snapshot: Mapping[str, Tensor], name: str, layer: int | None) -> dict[str, Tensor]:
    """One ring's :meth:`~streamtx.nn.state.RingCache.load_window` input for one row from the session layout: layer
    ``layer``'s slice (``None``: every layer, for a ring that stacks them)."""
    pick = slice(None) if layer is None else layer
    window = {f: snapshot[f"{name}.{f}"][None, :, pick] for f in ("k", "v")}
    return {**window, "next_pos": snapshot["observed"].reshape(1)}


@dataclass
class RegressorState(StreamState):
    """Streaming state of the regressor: the conditioning encoder's caches and, per decoder layer, the ring of
    cross-attention keys/values of the memory (observation tokens) plus one pinned slot for the step token."""

    encoder: EncoderState | None
    memory: list

    def session_state_dict(self, row: int) -> dict[str, Tensor]:
        """The past of batch row ``row`` in the *session layout*, the one :class:`PlanCaches` shares (copies, on
        this state's device and in its dtype):

        * ``"encoder.k"``, ``"encoder.v"``: ``(cond_window - 1, Le, H, hd)``, every encoder layer's self-attention
          keys (encoded at their position) and values of the newest tokens a new token attends to, oldest first
          (absent without an encoder);
        * ``"memory.k"``, ``"memory.v"``: ``(cond_horizon, L, H, hd)``, every decoder layer's cross-attention keys
          (encoded at their position) and values of the memory tokens, oldest first;
        * ``"observed"``: ``()`` int64, observation tokens since the row's reset (token ``i`` of a window of ``T``
          is number ``observed - T + i``; slots before the first token are zeros).

        Independent of the ring sizes (``max_tokens_per_step``), the batch size and the path that computes: load it
        with :meth:`load_session_state_dict` into any row of a module-path state or of a plan's caches, on any
        device."""
        rows = _check_row(row, self.memory[0].cache.batch_size)
        out: dict[str, Tensor] = {}
        if self.encoder is not None:
            attn = [layer.self_attn for layer in self.encoder.layers]
            windows = [a.cache.export_window(a.window - 1, rows) for a in attn]
            out.update({f"encoder.{f}": torch.stack([w[f][0] for w in windows], dim=1) for f in ("k", "v")})
        windows = [m.cache.export_window(m.window, rows) for m in self.memory]
        out.update({f"memory.{f}": torch.stack([w[f][0] for w in windows], dim=1) for f in ("k", "v")})
        out["observed"] = windows[0]["next_pos"][0]
        return out

    def load_session_state_dict(self, row: int, snapshot: Mapping[str, Tensor]) -> None:
        """Replace batch row ``row`` by a :meth:`session_state_dict` (of this path or a plan's, any device); other
        rows are untouched."""
        _check_session(self.session_state_dict(row), snapshot)
        rows = [row]
        if self.encoder is not None:
            for i, layer in enumerate(self.encoder.layers):
                layer.self_attn.cache.load_window(_window(snapshot, "encoder", i), rows)
        for i, m in enumerate(self.memory):
            m.cache.load_window(_window(snapshot, "memory", i), rows)


class eCondTransformerRegressor(nn.Module):
    r"""Conditional transformer regressor ``V = f(X, k, Z)``: action tokens ``X (B, Tx, in_rep.size)``, a diffusion
    step / flow time ``k (B,)``, observation tokens ``Z (B, Tz, cond_rep.size)`` (oldest first) ->
    ``V (B, Tx, out_rep.size)``. Equivariant: ``f(rho_in(g) X, k, rho_cond(g) Z) = rho_out(g) f(X, k, Z)``.

    Architecture (designed for streaming, DESIGN.md section 3):

    * tokens are lifted to ``m = embedding_dim / |G|`` regular copies; action tokens get a learned invariant position
      table; the step ``k`` is an invariant sinusoidal embedding through a small equivariant MLP; with
      ``token_levels``, ``k (B, Tx)`` gives each action token its own level, embedded alike and added to the token
      (equivariant: the embedding is invariant), and the step token gets the mean level;
    * the conditioning encoder (``num_cond_layers`` encoder layers, or a per-token equivariant MLP when 0) runs
      *causally* over a window of ``cond_window`` tokens, by default with equivariant RoPE, so each new observation
      token costs one ``forward_step`` and outputs never depend on the absolute time;
    * the memory is the ``cond_horizon`` newest encoder outputs plus the step token, which joins *after* the encoder:
      the encoder output does not depend on ``k`` and is computed once per control step, not per denoising step;
    * decoder layers self-attend over the action tokens (causally if ``causal_attn``) and cross-attend to the memory,
      by default with RoPE between "now" and each memory token's time (recency is relative);
    * layers are pre-norm by default (``norm_first``); :class:`RegressorConfig` names every option.
    * a final norm and an equivariant head to ``out_rep``.

    ``Z`` may hold more than ``cond_horizon`` tokens: the encoder then sees that history (its receptive field is
    ``num_cond_layers * (cond_window - 1) + 1`` tokens) and the memory keeps the newest ``cond_horizon`` outputs.
    This is the batch reference of the streaming methods :meth:`init_state`, :meth:`observe` and :meth:`denoise`.
    """

    def __init__(
        self,
        in_rep: Representation,
        cond_rep: Representation,
        out_rep: Representation,
        in_horizon: int,
        cond_horizon: int,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        embedding_dim: int = 128,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.0,
        causal_attn: bool = False,
        num_cond_layers: int = 2,
        norm_module: str = "layernorm",
        dim_feedforward: int | None = None,
        activation: str = "gelu",
        cond_window: int | None = None,
        norm_first: bool = True,
        cond_positional: str | None = "rope",
        self_positional: str | None = None,
        cross_positional: str | None = "rope",
        token_levels: bool = False,
        anticausal_attn: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = None,
    ) -> None:
        super().__init__()
        check_same_group(in_rep=in_rep, cond_rep=cond_rep, out_rep=out_rep)
        self.init_scheme = check_init_scheme(init_scheme)
        group = in_rep.group
        n = group.order
        if embedding_dim % n:
            raise ValueError(f"embedding_dim: expected a multiple of the group order {n}, got {embedding_dim}")
        m = embedding_dim // n
        if num_attention_heads < 1 or m % num_attention_heads or (m // num_attention_heads) % 2:
            raise ValueError(
                f"num_attention_heads: the {m} regular copies (embedding_dim / |G|) must split into heads "
                f"of an even number of copies (for equivariant RoPE), got {num_attention_heads} heads"
            )
        for name, value in (("in_horizon", in_horizon), ("cond_horizon", cond_horizon), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if num_cond_layers < 0:
            raise ValueError(f"num_cond_layers: expected >= 0, got {num_cond_layers}")
        if causal_attn and anticausal_attn:
            raise ValueError("causal_attn, anticausal_attn: expected at most one of them")
        self.config = RegressorConfig(
            in_horizon=in_horizon,
            cond_horizon=cond_horizon,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            embedding_dim=embedding_dim,
            p_drop_emb=p_drop_emb,
            p_drop_attn=p_drop_attn,
            causal_attn=causal_attn,
            num_cond_layers=num_cond_layers,
            norm_module=norm_module,
            dim_feedforward=dim_feedforward,
            activation=activation,
            cond_window=cond_window,
            norm_first=norm_first,
            cond_positional=cond_positional,
            self_positional=self_positional,
            cross_positional=cross_positional,
            token_levels=token_levels,
            anticausal_attn=anticausal_attn,
        )
        self.in_rep, self.cond_rep, self.out_rep = in_rep, cond_rep, out_rep
        self.in_horizon, self.cond_horizon = in_horizon, cond_horizon
        self.cond_window = cond_window or cond_horizon
        self.causal_attn, self.embedding_dim = causal_attn, embedding_dim
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden = Representation.regular(group, m)
        wide = Representation.regular(group, 4 * m)
        self.hidden_rep = hidden
        dff = dim_feedforward or 4 * embedding_dim

        self.input_emb = eLinear(in_rep, hidden, **fk)
        self.pos_emb = nn.Parameter(torch.zeros(in_horizon, m, **fk))  # invariant: one value per copy
        self.cond_obs_emb = eLinear(cond_rep, hidden, **fk)
        self.time_mlp = nn.Sequential(
            eLinear(hidden, wide, **fk), ePointwise(wide, "mish"), eLinear(wide, hidden, **fk)
        )
        self.drop = nn.Dropout(p_drop_emb)
        self.encoder: eTransformerEncoder | None
        self.cond_mlp: nn.Module  # the per-token encoder when num_cond_layers == 0 (identity, unused, otherwise)
        if num_cond_layers > 0:
            enc_layer = eTransformerEncoderLayer(
                hidden,
                num_attention_heads,
                dff,
                p_drop_attn,
                activation,
                batch_first=True,
                norm_first=norm_first,
                norm_module=norm_module,
                positional=cond_positional,
                **fk,
            )
            self.encoder = eTransformerEncoder(
                enc_layer, num_cond_layers, norm=make_norm(norm_module, hidden, 1e-5, **fk)
            )
            self.cond_mlp = nn.Identity()
        else:
            self.encoder = None
            self.cond_mlp = nn.Sequential(
                eLinear(hidden, wide, **fk), ePointwise(wide, "mish"), eLinear(wide, hidden, **fk)
            )
        dec_layer = eTransformerDecoderLayer(
            hidden,
            num_attention_heads,
            dff,
            p_drop_attn,
            activation,
            batch_first=True,
            norm_first=norm_first,
            norm_module=norm_module,
            positional=self_positional,
            cross_positional=cross_positional,
            **fk,
        )
        self.decoder = eTransformerDecoder(dec_layer, num_layers)
        self.ln_f = make_norm(norm_module, hidden, 1e-5, **fk)
        self.head = eLinear(hidden, out_rep, **fk)
        self.reset_parameters()
        # made last, so that the other weights of a seeded model do not depend on the option
        self.level_mlp: nn.Sequential | None = None
        if token_levels:
            self.level_mlp = nn.Sequential(
                eLinear(hidden, wide, **fk), ePointwise(wide, "mish"), eLinear(wide, hidden, **fk)
            )

    @classmethod
    def from_config(
        cls,
        in_rep: Representation,
        cond_rep: Representation,
        out_rep: Representation,
        config: RegressorConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> eCondTransformerRegressor:
        """The model of ``config`` over these representations."""
        return cls(in_rep, cond_rep, out_rep, **config.to_dict(), device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = None) -> None:
        """The position table ``N(0, 0.02^2)``; with ``scheme`` (or the constructor's ``init_scheme``; one of
        :data:`~streamtx.nn.linear.INIT_SCHEMES`) every equivariant linear map re-drawn so its dense weight has the
        scheme's variance (``None``: as built, torch's defaults)."""
        nn.init.normal_(self.pos_emb, std=0.02)
        scheme = check_init_scheme(scheme, "scheme") or self.init_scheme
        if scheme is not None:
            for module in self.modules():
                if isinstance(module, eLinear):
                    module.reset_parameters(scheme)

    # ---------------------------------------------------------------- pieces shared by batch and streaming paths
    def _step_token(self, k: Tensor | float, batch: int, ref: Tensor) -> Tensor:
        k = torch.as_tensor(k, device=ref.device)
        if k.dim() == 0:
            k = k.expand(batch)
        if k.shape != (batch,):
            raise ValueError(f"opt_step: expected a scalar or shape ({batch},), got {tuple(k.shape)}")
        emb = sinusoidal_embedding(k, self.hidden_rep.size // self.in_rep.group.order).to(
            ref.dtype
        )  # one invariant value per copy
        return self.time_mlp(emb.repeat_interleave(self.in_rep.group.order, dim=-1))[:, None]  # (B, 1, D)

    def _levels(self, k: Tensor | float, batch: int, horizon: int, ref: Tensor) -> tuple[Tensor | float, Tensor | None]:
        """The shared step token's step, and with ``token_levels`` the per-action-token level embedding
        ``(B, Tx, D)`` (invariant: one value per copy) of steps ``k`` (scalar, ``(B,)`` or ``(B, Tx)``); a step
        shared by the chunk is every token's level."""
        k = torch.as_tensor(k, device=ref.device)
        if self.level_mlp is None:
            if k.dim() > 1:
                raise ValueError(
                    f"opt_step: per-token steps {tuple(k.shape)} need a model with token_levels=True (this one has "
                    "one step token shared by the chunk); pass a scalar or shape (B,)"
                )
            return k, None
        k = k.to(torch.float64)
        if k.dim() < 2:
            k = (k.expand(batch) if k.dim() == 0 else k)[:, None].expand(-1, horizon)
        if k.shape != (batch, horizon):
            raise ValueError(f"opt_step: expected a scalar, ({batch},) or ({batch}, {horizon}), got {tuple(k.shape)}")
        n = self.in_rep.group.order
        emb = sinusoidal_embedding(k.reshape(-1), self.hidden_rep.size // n).to(ref.dtype).repeat_interleave(n, dim=-1)
        return k.mean(dim=1), self.level_mlp(emb).view(batch, horizon, -1)

    def _action_tokens(self, x: Tensor, levels: Tensor | None = None) -> Tensor:
        tx = x.shape[1]
        pos = self.pos_emb[:tx].repeat_interleave(self.in_rep.group.order, dim=-1)
        h = self.input_emb(x) + pos
        return self.drop(h if levels is None else h + levels)

    def _tgt_mask(self, tx: int, ref: Tensor) -> Tensor | None:
        if self.config.anticausal_attn:  # token i sees i .. tx - 1
            return causal_window_mask(tx, None, device=ref.device, dtype=ref.dtype).T.contiguous()
        return causal_window_mask(tx, None, device=ref.device, dtype=ref.dtype) if self.causal_attn else None

    def _check(self, name: str, t: Tensor, rep: Representation, max_len: int | None = None) -> None:
        if t.dim() != 3 or t.shape[-1] != rep.size or (max_len is not None and t.shape[1] > max_len) or t.shape[1] < 1:
            limit = f"1..{max_len}" if max_len is not None else ">= 1"
            raise ValueError(f"{name}: expected (B, T, {rep.size}) with T in {limit}, got {tuple(t.shape)}")

    # ---------------------------------------------------------------- batch forward
    def forward(self, X: Tensor, opt_step: Tensor | float, Z: Tensor, *, cond_lengths: Tensor | None = None) -> Tensor:
        """``V (B, Tx, out)`` for noisy actions ``X (B, Tx, in)`` at denoising step ``opt_step`` (scalar, ``(B,)``,
        or ``(B, Tx)`` per action token with ``token_levels``) given the observation window ``Z (B, Tz, cond)``,
        oldest first, its last token the newest.

        ``cond_lengths (B,)``: example ``b``'s window is only its last ``cond_lengths[b]`` tokens (the rest is left
        padding, never attended to), so windows of different lengths share one forward; the result equals running
        each example alone on ``Z[b:b+1, Tz - cond_lengths[b]:]`` (every positional backend: positions are counted
        from each window's own start). Equivariant: ``f(rho_in(g) X, k, rho_cond(g) Z) = rho_out(g) f(X, k, Z)``.
        """
        self._check("X", X, self.in_rep, self.in_horizon)
        self._check("Z", Z, self.cond_rep)
        if X.shape[0] != Z.shape[0]:
            raise ValueError(f"Z: expected batch size {X.shape[0]} (that of X), got {Z.shape[0]}")
        b, th = Z.shape[:2]
        # per example: positions from its window's start (padding negative), the newest token's position `now`
        pos, now, padding = _window_positions(cond_lengths, b, th, Z.device)
        z = self.drop(self.cond_obs_emb(Z))
        if self.encoder is not None:
            z = self.encoder(z, mask=self._cond_mask(pos, padding, z), src_pos=pos.clamp(min=0))
        else:
            z = self.cond_mlp(z)
        keep = min(th, self.cond_horizon)
        step, levels = self._levels(opt_step, b, X.shape[1], z)
        memory = torch.cat((self._step_token(step, b, z), z[:, th - keep :]), dim=1)
        memory_pos = torch.cat((now[:, None], pos[:, th - keep :].clamp(min=0)), dim=1)
        memory_padding = None if padding is None else F.pad(padding[:, th - keep :], (1, 0), value=False)
        x = self._action_tokens(X, levels)
        x = self.decoder(
            x,
            memory,
            tgt_mask=self._tgt_mask(x.shape[1], x),
            memory_key_padding_mask=memory_padding,
            tgt_pos=now[:, None].expand(b, x.shape[1]),
            memory_pos=memory_pos,
        )
        return self.head(self.ln_f(x))

    def _cond_mask(self, pos: Tensor, padding: Tensor | None, ref: Tensor) -> Tensor:
        """The encoder's band-causal window mask: ``(Tz, Tz)`` over whole windows, else ``(B * H, Tz, Tz)`` over the
        per-example positions, where a padding token sees itself only (its output is never read, but a row
        without any key would be NaN)."""
        if padding is None:
            return causal_window_mask(pos.shape[1], self.cond_window, device=ref.device, dtype=ref.dtype)
        allowed = band_mask(pos, pos, self.cond_window) | torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
        return additive_mask(allowed, ref.dtype).repeat_interleave(self.config.num_attention_heads, dim=0)

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> RegressorState:
        """Empty caches for ``batch_size`` independent observation streams, taking up to ``max_tokens_per_step``
        observation tokens per step."""
        enc = (
            None
            if self.encoder is None
            else self.encoder.init_state(
                batch_size,
                window=self.cond_window,
                max_tokens_per_step=max_tokens_per_step,
                dtype=dtype,
                device=device,
            )
        )
        memory = [
            layer.multihead_attn.init_state(
                batch_size,
                window=self.cond_horizon,
                max_tokens_per_step=max_tokens_per_step,
                extra_slots=1,
                dtype=dtype,
                device=device,
            )
            for layer in self.decoder.layer_list
        ]
        return RegressorState(enc, memory)

    def forward_step(
        self, x: Tensor, state: RegressorState, /, *, rows: Rows = None, actions: Tensor, opt_step: Tensor | float
    ) -> tuple[Tensor, RegressorState]:
        """The streaming contract's step: new observation tokens ``x (b, S, cond_rep.size)`` (or ``(b, cond_rep.size)``)
        enter the caches (:meth:`observe`), then one denoiser evaluation of ``actions (b, Tx, in_rep.size)`` at step
        ``opt_step`` (:meth:`denoise`). Equal to ``forward(actions, opt_step, Z)`` on the whole observed stream."""
        self.observe(x[:, None] if x.dim() == 2 else x, state, rows)
        return self.denoise(actions, opt_step, state, rows), state

    def forward_steps(
        self, x: Tensor, state: RegressorState, /, *, rows: Rows = None, actions: Tensor, opt_step: Tensor | float
    ) -> tuple[Tensor, RegressorState]:
        """``T`` steps of one observation token each, ``x (b, T, cond_rep.size)``, step ``t`` denoising
        ``actions[:, t] (b, Tx, in_rep.size)`` at ``opt_step`` (a scalar, ``(b,)``, or ``(b, T)`` per step) ->
        ``(b, T, Tx, out_rep.size)``."""
        self._check("x", x, self.cond_rep)
        if actions.dim() != 4 or actions.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"actions: expected (b, T, Tx, {self.in_rep.size}) with b, T = {tuple(x.shape[:2])}, "
                f"got {tuple(actions.shape)}"
            )
        k = torch.as_tensor(opt_step, device=x.device)
        outs = []
        for t in range(x.shape[1]):
            k_t = k[:, t] if k.dim() == 2 else k
            outs.append(self.forward_step(x[:, t], state, rows=rows, actions=actions[:, t], opt_step=k_t)[0])
        return torch.stack(outs, dim=1), state

    def observe(self, Z: Tensor, state: RegressorState, rows: Rows = None) -> None:
        """New observation tokens ``Z (b, S, cond_rep.size)`` enter the encoder caches and every decoder layer's
        memory ring (one encoder ``forward_step`` and one K/V projection per decoder layer)."""
        self._check("Z", Z, self.cond_rep)
        z = self.drop(self.cond_obs_emb(Z))
        if self.encoder is not None and state.encoder is not None:
            z = self.encoder.forward_step(z, state.encoder, rows=rows)[0]
        else:
            z = self.cond_mlp(z)
        for layer, mem in zip(self.decoder.layer_list, state.memory):
            layer.append_memory(z, mem, rows)

    def num_observed(self, state: RegressorState, rows: Rows = None) -> Tensor:
        """Observation tokens seen by each row since its reset, ``(b,)``."""
        return state.memory[0].cache.positions(rows)

    def denoise(self, X: Tensor, opt_step: Tensor | float, state: RegressorState, rows: Rows = None) -> Tensor:
        """One denoiser evaluation against the cached memory: equal to :meth:`forward` on the observed stream.
        Only the ``Tx`` action tokens and the step token are computed."""
        self._check("X", X, self.in_rep, self.in_horizon)
        now = (self.num_observed(state, rows) - 1)[:, None]  # (b, 1)
        shared, levels = self._levels(opt_step, X.shape[0], X.shape[1], X)
        step = self._step_token(shared, X.shape[0], X)
        for layer, mem in zip(self.decoder.layer_list, state.memory):
            layer.multihead_attn.write_extra(step, mem, now, rows)
        x = self._action_tokens(X, levels)
        mask = self._tgt_mask(x.shape[1], x)
        query_pos = now.expand(-1, x.shape[1])
        # every layer's memory ring holds the same positions: one band mask serves them all
        memory_mask = self.decoder.layer_list[0].multihead_attn.cached_mask(
            state.memory[0], query_pos, rows, dtype=x.dtype
        )
        for layer, mem in zip(self.decoder.layer_list, state.memory):
            # every action token sits at `now`, in self- as in cross-attention (the positions forward() gives them)
            x = layer.forward_cached_memory(
                x, mem, query_pos, rows, tgt_mask=mask, tgt_pos=query_pos, memory_mask=memory_mask
            )
        return self.head(self.ln_f(x))

    # ---------------------------------------------------------------- lowering
    @torch.no_grad()
    def lower(
        self,
        sampler: StepSampler | None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        fused_kernels: bool = True,
        token_steps: Tensor | None = None,
    ) -> RegressorPlan:
        """The streaming control step with ``sampler`` as a static program (:class:`RegressorPlan`) assembled from
        the parts every sub-module lowers itself into: the observation embedding, the encoder (or the per-token
        MLP), the memory keys/values of *all* decoder layers fused into one matrix, the decoder layers, the final
        norm and head, and the step tokens of the sampler's schedule (data-independent, checked) with their
        keys/values per decoder layer, precomputed; with ``token_levels``, each evaluation's per-token level
        embeddings too (added to the action bias: one table per evaluation).

        ``token_steps (E, Tx)``: instead of a sampler's schedule, the per-action-token steps of ``E`` evaluations
        (a streaming buffer's levels; needs ``token_levels``; ``sampler`` may then be ``None``): the plan then runs
        them through :meth:`RegressorPlan.denoiser`, and has no sampler program (:meth:`RegressorPlan.act`).
        ``anticausal_attn`` lowers as causal self-attention over the reversed action tokens (every action token
        sits at one position, so the order is all that the mask sees).

        ``dtype``: compute dtype (``None``: the model's; one of :data:`COMPUTE_DTYPES`); ``device``: the plan's
        (``None``: the model's). The model is read once: later changes to its weights are not seen. Raises
        ``ValueError`` for a data-dependent sampler and ``NotImplementedError`` naming a sub-module that has no
        lowering."""
        ref = self.input_emb.weight
        dtype = dtype or ref.dtype
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected one of {[str(d) for d in COMPUTE_DTYPES]}, got {dtype}")
        device = torch.device(device) if device is not None else ref.device
        n = self.in_rep.group.order
        encoder, cond_mlp = None, None
        if self.encoder is not None:
            encoder = self.encoder.lower(dtype, device, window=self.cond_window)
        else:
            # nn.Sequential(eLinear, ePointwise, eLinear)
            fc1, act, fc2 = cast("tuple[eLinear, ePointwise, eLinear]", tuple(self.cond_mlp.children()))
            cond_mlp = MLP(fc1.lower(dtype, device), act.lower(), fc2.lower(dtype, device))
        layers = self.decoder.layer_list
        reverse = self.config.anticausal_attn  # token i sees i .. Tx - 1: causal over the reversed tokens
        decoder = self.decoder.lower(dtype, device, causal=self.causal_attn or reverse)  # ln_f reads its output
        decoder = dataclasses.replace(decoder, norm=self.ln_f.lower(dtype, device))
        emb = self.input_emb.lower(dtype, device)
        table = lowered(self.pos_emb.repeat_interleave(n, dim=-1), dtype, device)  # (Tx, D), invariant per copy
        action_bias = table if emb.bias is None else emb.bias + table
        schedule: list[float] | None = None
        if token_steps is None:
            if sampler is None:
                raise ValueError("sampler: expected a sampler (or token_steps), got None")
            schedule = sampler_schedule(
                sampler, self.in_horizon, self.out_rep.size, torch.promote_types(dtype, torch.float32)
            )
            steps = torch.tensor(schedule, dtype=torch.float64, device=ref.device)[:, None].expand(-1, self.in_horizon)
        else:
            steps = torch.as_tensor(token_steps, dtype=torch.float64).to(ref.device)
            if self.level_mlp is None:
                raise ValueError("token_steps: per-token steps need a model with token_levels=True")
            if steps.dim() != 2 or steps.shape[0] < 1 or steps.shape[1] != self.in_horizon:
                raise ValueError(f"token_steps: expected (E, {self.in_horizon}), got {tuple(steps.shape)}")
        # step tokens of the schedule and their raw keys/values in every decoder layer, in the model's precision:
        # (E, L, 2, H, hd); with token_levels the step token carries the mean level and each action token its own
        # (the module path's _levels). The step token sits at `now`, where the queries are (Positional.frame_keys).
        token_bias = None
        shared: Tensor | float = steps[:, 0]
        if self.level_mlp is not None:
            shared, levels = self._levels(steps, steps.shape[0], self.in_horizon, ref)
            assert levels is not None  # a model with level_mlp embeds every token's level
            token_bias = lowered(levels, dtype, device) + action_bias  # (E, Tx, D)
        step = self._step_token(shared, steps.shape[0], ref)[:, 0]  # (E, D)
        heads = decoder.layers[0].cross_attn.num_heads
        step_kv = torch.stack(
            [
                torch.stack((a.k(step), a.v(step)), dim=1).view(steps.shape[0], 2, heads, -1)
                for a in (layer.multihead_attn.lower() for layer in layers)
            ],
            dim=1,
        )
        return RegressorPlan(
            sampler=sampler,
            schedule=schedule,
            obs_emb=self.cond_obs_emb.lower(dtype, device),
            encoder=encoder,
            cond_mlp=cond_mlp,
            decoder=decoder,
            # keys and values of every decoder layer's memory from one matrix: output (.., L, 2, H, hd)
            memory_kv=Affine.cat([p for layer in decoder.layers for p in (layer.cross_attn.k, layer.cross_attn.v)]),
            action_weight=emb.weight,
            action_bias=action_bias.flip(0) if reverse else action_bias,
            head=self.head.lower(dtype, device),
            step_kv=lowered(step_kv, dtype, device),
            token_bias=None if token_bias is None else (token_bias.flip(1) if reverse else token_bias),
            reverse=reverse,
            cond_window=self.cond_window,
            cond_horizon=self.cond_horizon,
            dtype=dtype,
            device=device,
            fused_kernels=fused_kernels,
        )

    def receptive_field(self) -> int:
        """Observation tokens that can influence the output: the batch reference needs no longer history."""
        layers = 0 if self.encoder is None else self.encoder.num_layers
        return self.cond_horizon + layers * (self.cond_window - 1)

    def check_equivariance(
        self,
        batch_size: int = 2,
        history: int | None = None,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> float:
        """Max relative equivariance error of :meth:`forward` over all group elements on random inputs."""
        x = torch.randn(batch_size, self.in_horizon, self.in_rep.size, generator=generator, dtype=dtype)
        z = torch.randn(batch_size, history or self.cond_horizon, self.cond_rep.size, generator=generator, dtype=dtype)
        # with token_levels, one level per action token
        shape = (batch_size, self.in_horizon) if self.level_mlp is not None else (batch_size,)
        k = torch.rand(shape, generator=generator, dtype=dtype) * 100
        return equivariance_error(
            self, lambda m, xs: m(xs[0], k, xs[1]), [(x, self.in_rep), (z, self.cond_rep)], self.out_rep, dtype
        )


class CondTransformerRegressor(eCondTransformerRegressor):
    """The same architecture without symmetry constraints (the baseline): dimensions instead of representations.

    It is :class:`eCondTransformerRegressor` over the trivial group, whose equivariant maps are unconstrained: every
    ``eLinear`` is a dense ``nn.Linear`` (group convolution with ``|G| = 1``), norms are per-feature, and in ``eval()``
    the forward pass runs exactly the kernels of plain torch layers. Sharing the code keeps the equivariance
    experiments fair (same streaming, positions, parameter budget per feature) and gives the baseline streaming too.
    """

    def __init__(self, in_dim: int, cond_dim: int, out_dim: int, in_horizon: int, cond_horizon: int, **kwargs):
        for name, dim in (("in_dim", in_dim), ("cond_dim", cond_dim), ("out_dim", out_dim)):
            if dim < 1:
                raise ValueError(f"{name}: expected >= 1, got {dim}")
        group = trivial_group()
        super().__init__(
            Representation.trivial(group, in_dim),
            Representation.trivial(group, cond_dim),
            Representation.trivial(group, out_dim),
            in_horizon,
            cond_horizon,
            **kwargs,
        )

    @classmethod
    def from_dims(cls, in_dim: int, cond_dim: int, out_dim: int, config: RegressorConfig) -> CondTransformerRegressor:
        """The plain model of ``config`` over these dimensions."""
        return cls(in_dim, cond_dim, out_dim, **config.to_dict())


def get_optim_groups(model: nn.Module, weight_decay: float = 1e-3) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW``: weight decay on the weights of ``eLinear`` / ``nn.Linear`` maps,
    none on biases, norms, position tables and embeddings (as in minGPT / Diffusion Policy)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_map = isinstance(module, (eLinear, nn.Linear)) and name == "weight"
            (decay if is_map else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------- the plan
class StepSampler(Protocol):
    """What the plan needs of a sampler (``streamtx.policy.Sampler`` is one): its denoiser calls per sample and
    ``sample(denoise, noise)``."""

    @property
    def num_evaluations(self) -> int: ...

    def sample(self, denoise: Callable[[Tensor, Tensor], Tensor], noise: Tensor) -> Tensor: ...


def sampler_schedule(sampler: StepSampler, horizon: int, action_dim: int, dtype: torch.dtype) -> list[float]:
    """The step values ``k`` that ``sampler.sample`` passes to its denoiser, in call order, for a sampler state of
    ``dtype``. Raises ``ValueError`` unless they are the same for every row and any noise and denoiser output: the
    plan precomputes the step tokens from them."""

    def record(batch: int, seed: int, output: str) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, horizon, action_dim, generator=gen, dtype=torch.float64).to(dtype)
        calls: list[Tensor] = []

        def denoise(x: Tensor, k: Tensor) -> Tensor:
            calls.append(torch.as_tensor(k, dtype=torch.float64).expand(batch).clone())
            return torch.zeros_like(x) if output == "zeros" else torch.randn(x.shape, generator=gen).to(x.dtype)

        sampler.sample(denoise, noise)
        return calls

    first, second = record(1, 0, "zeros"), record(3, 1, "random")
    same = len(first) == len(second) and all(bool((b == a[0]).all()) for a, b in zip(first, second))
    if not same or len(first) != sampler.num_evaluations:
        raise ValueError(
            f"sampler: {sampler!r} does not pass the same denoiser steps for every row and input; the "
            "static plan needs a data-independent step schedule"
        )
    return [float(k[0]) for k in first]


@dataclass
class PlanCaches(StreamState):
    """Per-row caches of a :class:`RegressorPlan`, counted in observation tokens since the row's reset.

    ``encoder``: keys/values ``(Le, H, hd)`` per token of every encoder layer (encoded at their position), holding
    the ``cond_window - 1`` newest tokens a new token can attend to (``None`` without an encoder).
    ``memory``: keys (encoded at their position, as the module path caches them) and values ``(L, H, hd)`` per
    token of every decoder layer's cross-attention, holding the ``cond_horizon`` newest tokens; the keys are moved
    into the queries' frame once per control step.
    """

    encoder: RingCache | None
    memory: RingCache
    encoder_tokens: int
    """Tokens of a row's past a new token attends to in the encoder (``cond_window - 1``)."""
    memory_tokens: int
    """Memory tokens a control step reads (``cond_horizon``)."""

    def session_state_dict(self, row: int) -> dict[str, Tensor]:
        """The past of batch row ``row`` in the session layout of :meth:`RegressorState.session_state_dict` (copies),
        which a module-path state loads as well."""
        rows = _check_row(row, self.memory.batch_size)
        out: dict[str, Tensor] = {}
        if self.encoder is not None:
            window = self.encoder.export_window(self.encoder_tokens, rows)
            out.update({f"encoder.{f}": window[f][0] for f in ("k", "v")})
        window = self.memory.export_window(self.memory_tokens, rows)
        out.update({f"memory.{f}": window[f][0] for f in ("k", "v")})
        out["observed"] = window["next_pos"][0]
        return out

    def load_session_state_dict(self, row: int, snapshot: Mapping[str, Tensor]) -> None:
        """Replace batch row ``row`` by a session snapshot (of this path or the module path's, any device); other
        rows are untouched."""
        _check_session(self.session_state_dict(row), snapshot)
        if self.encoder is not None:
            self.encoder.load_window(_window(snapshot, "encoder", None), [row])
        self.memory.load_window(_window(snapshot, "memory", None), [row])


@dataclass
class ActWorkspace:
    """Static buffers of one :meth:`RegressorPlan.act` bucket of ``b`` rows.

    ``kv (L, 2, b, H, M + 1, hd)``: per decoder layer, the memory keys (in the queries' frame) and values followed
    by the step token's slot; ``mask (Lm, b, Hm, 1, M + 1)``: the additive band mask, with each layer's relative
    bias where a layer has one (then ``Lm = L``, ``Hm = H``; else one mask serves all, ``Lm = Hm = 1``), a view into
    rows padded to 16 elements (the alignment the memory-efficient attention kernels want); ``action_bias
    (b, Tx, D)``: the action embedding's bias plus position table, added to the embedded action tokens by the first
    norm's kernel; ``token_bias (E, b, Tx, D)``: with per-token levels, per evaluation the action bias plus each
    token's level embedding, in its place (``None`` without).
    """

    kv: Tensor
    mask: Tensor
    action_bias: Tensor
    token_bias: Tensor | None = None

    def rows(self, b: int) -> ActWorkspace:
        """The workspace of the first ``b`` rows (views)."""
        bias = None if self.token_bias is None else self.token_bias[:, :b]
        return ActWorkspace(self.kv[:, :, :b], self.mask[:, :b], self.action_bias[:b], bias)


class RegressorPlan:
    """The streaming control step of an :class:`eCondTransformerRegressor` with a sampler as a fixed sequence of
    lowered blocks (:mod:`streamtx.nn.lowered`) over preallocated buffers, ready for CUDA-graph capture and
    ``torch.compile``; built by :meth:`eCondTransformerRegressor.lower`.

    Per control step: :meth:`observe` embeds the new observation tokens, runs the encoder over its ring (or the
    per-token MLP) and appends every decoder layer's memory keys/values (one matmul; keys encoded at their position,
    as the module path caches them); :meth:`act` moves the memory keys into the frame of the queries (all action
    tokens sit at ``now``, so RoPE reduces to a rotation by ``-now``, an absolute table to a query offset, a relative
    bias to a row of the mask), builds the band
    mask once, then runs the sampler, each denoiser evaluation copying its precomputed step token into the memory
    (and, with per-token levels, adding its precomputed level embeddings to the action tokens). :meth:`denoiser`
    exposes those evaluations to a control step of another shape (the streaming buffer of
    :mod:`streamtx.policy.streaming_denoise`).
    On CUDA, attention and every residual add + norm pair run as the Triton kernels of :mod:`streamtx.nn.kernels`,
    checked against the torch path on the plan's shapes when it is built.

    Everything :meth:`observe` and :meth:`act` read or write is a preallocated tensor (caches, workspace, inputs),
    every shape is fixed by the bucket, and no value travels back to the host, which is what capture needs. The
    sampler integrates in ``state_dtype = promote(dtype, float32)``: reduced-precision plans keep float32 actions.
    """

    def __init__(
        self,
        *,
        sampler: StepSampler | None,
        schedule: list[float] | None,
        obs_emb: Affine,
        encoder: Encoder | None,
        cond_mlp: MLP | None,
        decoder: Decoder,
        memory_kv: Affine,
        action_weight: Tensor,
        action_bias: Tensor,
        head: Affine,
        step_kv: Tensor,
        cond_window: int,
        cond_horizon: int,
        dtype: torch.dtype,
        device: torch.device,
        fused_kernels: bool = True,
        token_bias: Tensor | None = None,
        reverse: bool = False,
    ) -> None:
        if (encoder is None) == (cond_mlp is None):
            raise ValueError("encoder, cond_mlp: expected exactly one of them")
        if (sampler is None) != (schedule is None):
            raise ValueError("sampler, schedule: expected both (a sampler program) or neither")
        self.sampler, self.schedule = sampler, schedule
        self.token_bias, self.reverse = token_bias, reverse
        self.num_evaluations = step_kv.shape[0]
        self.obs_emb, self.encoder, self.cond_mlp, self.decoder = obs_emb, encoder, cond_mlp, decoder
        self.memory_kv = memory_kv
        self.action_weight, self.action_bias = action_weight, action_bias
        self.head, self.step_kv = head, step_kv
        self.cond_window, self.cond_horizon = cond_window, cond_horizon
        self.dtype, self.device = dtype, device
        self.state_dtype = torch.promote_types(dtype, torch.float32)
        self.horizon, self.dim = action_bias.shape
        self.action_dim = head.weight.shape[0]
        cross = decoder.layers[0].cross_attn
        self.num_layers, self.num_heads, self.head_dim = len(decoder.layers), cross.num_heads, cross.head_dim
        self._frames = frames = [layer.cross_attn.positional for layer in decoder.layers]
        self._shared_frame = all(f.equivalent(frames[0]) for f in frames)  # one call moves every layer's keys
        self._biased = any(f.has_score_bias for f in frames)  # then one mask per layer and head
        self.fused_reason: str | None
        self.fused, self.fused_reason = False, "fused_kernels=False"
        if fused_kernels:
            self.fused_reason = self._probe_fused_kernels()
            self.fused = self.fused_reason is None
            if not self.fused and fused_kernels_available(self.device):
                log.warning("plan uses the torch kernels: %s", self.fused_reason)

    def _probe_fused_kernels(self) -> str | None:
        """Why the fused kernels cannot serve this plan (``None``: they can): unavailable here, or failing to build
        or to match the torch path on the plan's own shapes."""
        if not fused_kernels_available(self.device):
            return "Triton kernels need CUDA and the triton package"
        gen = torch.Generator(self.device).manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, device=self.device).to(self.dtype)

        heads, hd, t, keys = self.num_heads, self.head_dim, self.horizon, self.cond_horizon + 1
        (q, k, v), mem = rand(2, t, 3, heads, hd).transpose(1, 3).unbind(2), rand(2, 2, heads, keys, hd)
        mask = rand(2, heads if self._biased else 1, 1, keys)
        mask[0, ..., :3] = float("-inf")
        x, y = rand(2, t, self.dim), rand(2, t, self.dim)
        first = self.decoder.layers[0]
        checks = {
            "self-attention": lambda f: attention(q, k, v, causal=first.causal, fused=f),
            "cross-attention": lambda f: attention(q, mem[0], mem[1], mask, fused=f),
            "add+norm": lambda f: torch.cat(first.norm2.add(x, y, f)),
        }
        tolerance = 1e-5 if self.dtype in (torch.float32, torch.float64) else 2e-2
        try:
            for name, check in checks.items():
                fused, reference = check(True), check(False)
                err = float((fused - reference).abs().max() / reference.abs().max())
                if not err <= tolerance:
                    return f"{name} differs from the torch path by {err:.1e} (> {tolerance:.0e})"
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile or launch here must not stop serving
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None

    # ---------------------------------------------------------------- buffers
    def caches(self, num_rows: int, max_tokens_per_step: int) -> PlanCaches:
        """Empty caches for ``num_rows`` rows taking up to ``max_tokens_per_step`` observation tokens per call."""
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected >= 1, got {max_tokens_per_step}")
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}

        def per_token(layers: int) -> dict[str, tuple[int, ...]]:
            return {"k": (layers, self.num_heads, self.head_dim), "v": (layers, self.num_heads, self.head_dim)}

        encoder = None
        if self.encoder is not None:
            # new tokens attend to the ring *before* it takes them, so it needs the cond_window - 1 older ones
            encoder = RingCache(
                num_rows, max(self.cond_window - 1, max_tokens_per_step), per_token(len(self.encoder.layers)), **kw
            )
        memory = RingCache(num_rows, max(self.cond_horizon, max_tokens_per_step), per_token(self.num_layers), **kw)
        return PlanCaches(encoder, memory, self.cond_window - 1, self.cond_horizon)

    def act_workspace(self, caches: PlanCaches, batch: int) -> ActWorkspace:
        """The static buffers of :meth:`act` for ``batch`` rows of ``caches``."""
        slots = caches.memory.capacity + 1
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        kv = torch.zeros(self.num_layers, 2, batch, self.num_heads, slots, self.head_dim, **kw)
        padded = -(-slots // 16) * 16
        layers, heads = (self.num_layers, self.num_heads) if self._biased else (1, 1)
        mask = torch.zeros(layers, batch, heads, 1, padded, **kw)[..., :slots]
        token_bias = None
        if self.token_bias is not None:
            token_bias = self.token_bias[:, None].expand(-1, batch, -1, -1).contiguous()
        return ActWorkspace(kv, mask, self.action_bias.expand(batch, -1, -1).contiguous(), token_bias)

    # ---------------------------------------------------------------- the control step
    def observe(self, obs: Tensor, caches: PlanCaches, rows: Tensor) -> None:
        """New observation tokens ``obs (b, S, obs_dim)`` of rows ``rows (b,)`` (a device index) enter the encoder
        and every decoder layer's memory."""
        b, s, _ = obs.shape
        pos = caches.memory.positions(rows)[:, None] + torch.arange(s, device=self.device)  # (b, S)
        z = self.obs_emb(obs.to(self.dtype))
        if self.encoder is not None:
            assert caches.encoder is not None  # caches() makes the encoder ring of a plan with an encoder
            ring, ring_pos = caches.encoder.read(rows)  # k, v: (b, C, Le, H, hd)
            z, k, v = self.encoder(z, pos, ring["k"], ring["v"], ring_pos)
            caches.encoder.append({"k": k, "v": v}, rows)
        else:
            assert self.cond_mlp is not None  # a plan without an encoder has the per-token MLP
            z = self.cond_mlp(z)
        kv = self.memory_kv(z).view(b, s, self.num_layers, 2, self.num_heads, self.head_dim)
        if self._shared_frame:
            keys = self._frames[0].encode(kv[:, :, :, 0], pos)
        else:
            keys = torch.stack([frame.encode(kv[:, :, i, 0], pos) for i, frame in enumerate(self._frames)], dim=2)
        caches.memory.append({"k": keys, "v": kv[:, :, :, 1]}, rows)

    def act(self, noise: Tensor, caches: PlanCaches, rows: Tensor, workspace: ActWorkspace) -> Tensor:
        """The action chunk ``(b, Tx, action_dim)`` of rows ``rows (b,)`` from their initial ``noise`` (both in
        ``state_dtype``): the sampler's evaluations against the cached memory. Every row needs an observation."""
        if self.sampler is None:
            raise ValueError(
                "act: this plan was lowered for per-token steps (token_steps) and has no sampler program; "
                "run its evaluations through denoiser()"
            )
        evaluate, calls = self.denoiser(caches, rows, workspace), count()
        # `k` is the recorded schedule's entry (checked at build): its step token's keys/values are precomputed
        return self.sampler.sample(lambda x, k: evaluate(x, next(calls)), noise)

    def denoiser(self, caches: PlanCaches, rows: Tensor, workspace: ActWorkspace) -> Callable[[Tensor, int], Tensor]:
        """``evaluate(x, i)``: the denoiser output ``(b, Tx, action_dim)`` for actions ``x (b, Tx, action_dim)``
        (``state_dtype``) of rows ``rows (b,)`` at the plan's evaluation ``i`` (step ``i`` of the sampler's
        schedule, or row ``i`` of ``token_steps``), against the cached memory. The memory's keys are moved into the
        queries' frame and the band mask is built once, here, for every evaluation of the control step."""
        now = caches.memory.positions(rows) - 1  # (b,)
        data, key_pos = caches.memory.read(rows)  # k, v: (b, M, L, H, hd)
        m = key_pos.shape[1]
        if self._shared_frame:
            keys = self._frames[0].frame_keys(data["k"], now)
        else:
            keys = torch.stack(
                [frame.frame_keys(data["k"][:, :, i], now) for i, frame in enumerate(self._frames)], dim=2
            )
        kv = workspace.kv
        kv[:, 0, :, :, :m] = keys.permute(2, 0, 3, 1, 4)
        kv[:, 1, :, :, :m] = data["v"].permute(2, 0, 3, 1, 4)
        band = additive_mask(band_mask(now[:, None], key_pos, self.cond_horizon), self.dtype)  # (b, 1, M)
        mask = workspace.mask
        mask[..., :m] = band[:, None]
        if self._biased:  # per layer and head; the step token's slot sits at distance 0
            mask[..., m] = 0
            slot_pos = torch.cat((key_pos, now[:, None]), dim=1)
            for i, frame in enumerate(self._frames):
                bias = frame.score_bias(now[:, None], slot_pos)
                if bias is not None:
                    mask[i] += bias.to(self.dtype)
        masks = [mask[i if self._biased else 0] for i in range(self.num_layers)]
        self_offsets = [layer.self_attn.positional.query_offset(now) for layer in self.decoder.layers]
        cross_offsets = [frame.query_offset(now) for frame in self._frames]

        def evaluate(x: Tensor, i: int) -> Tensor:
            kv[:, :, :, :, m] = self.step_kv[i][:, :, None]
            for layer, offset in enumerate(cross_offsets):
                if offset is not None:  # a key at `now` gets the query's offset (Positional.frame_keys)
                    kv[layer, 0, :, :, m] += offset[:, 0]
            h = F.linear((x.flip(1) if self.reverse else x).to(self.dtype), self.action_weight)
            residual = workspace.action_bias if workspace.token_bias is None else workspace.token_bias[i]
            y = self.decoder(h, residual, kv[:, 0], kv[:, 1], masks, self_offsets, cross_offsets, self.fused)
            out = self.head(y)
            return (out.flip(1) if self.reverse else out).to(x.dtype)

        return evaluate

    def __repr__(self) -> str:
        encoder = 0 if self.encoder is None else len(self.encoder.layers)
        return (
            f"RegressorPlan(dim={self.dim}, heads={self.num_heads}, encoder_layers={encoder}, "
            f"decoder_layers={self.num_layers}, evaluations={self.num_evaluations}, dtype={self.dtype}, "
            f"device={self.device}, fused_kernels={self.fused})"
        )
