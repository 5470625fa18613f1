"""``StreamingPolicy``: observation tokens in, action chunks out, for many independent streams at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ..models.cond_regressor import RegressorState, eCondTransformerRegressor
from ..models.o3_denoiser import O3CondDenoiser, O3DenoiserState
from ..nn.state import Rows, StreamState
from .samplers import Sampler

__all__ = ["Denoiser", "StreamingPolicy", "PolicyState", "step_noise"]


class Denoiser(Protocol):
    """The streaming denoiser contract a :class:`StreamingPolicy` runs (``eCondTransformerRegressor``,
    ``O3CondDenoiser``): ``init_state(b, max_tokens_per_step=S)``, ``observe`` of flat observation tokens
    ``(b, S, obs_dim)``, ``denoise`` of ``(b, Tx, action_dim)`` against the caches, ``num_observed`` per row and the
    ``receptive_field`` in control steps; ``in_horizon`` (``Tx``), ``cond_window``, ``cond_horizon``."""

    in_horizon: int
    cond_window: int
    cond_horizon: int

    def init_state(self, batch_size: int, /, *, max_tokens_per_step: int = 1) -> Any: ...
    def observe(self, Z: Tensor, state: Any, rows: Rows = None) -> None: ...
    def denoise(self, X: Tensor, opt_step: Tensor | float, state: Any, rows: Rows = None) -> Tensor: ...
    def num_observed(self, state: Any, rows: Rows = None) -> Tensor: ...
    def receptive_field(self) -> int: ...
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


D = TypeVar("D", bound=Denoiser)

_MASK63 = (1 << 63) - 1


def _noise_seed(seed: int, step: int) -> int:
    # splitmix-style mixing: nearby (seed, step) pairs give unrelated generator seeds
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 31)) * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return (z ^ (z >> 29)) & _MASK63


def step_noise(seed: int, step: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """The initial sampling noise of control step ``step`` of a stream seeded ``seed``: float32 on the CPU, so a
    replayed stream gets the same noise on any device and whatever else shares its batch."""
    gen = generator if generator is not None else torch.Generator()
    return torch.randn(*shape, generator=gen.manual_seed(_noise_seed(seed, step)))


def _index(state: PolicyState, rows: Tensor | None) -> Tensor | slice:
    return slice(None) if rows is None else rows.to(state.seed.device)


@dataclass
class PolicyState(StreamState):
    """Per-row caches of the model, noise seed, and control steps taken since the row's reset.

    Every field but ``model`` is a per-row tensor (batch dimension first): :meth:`session_state_dict` carries each
    one by its field name, so a buffer added to the state moves with a session without more code."""

    model: RegressorState | O3DenoiserState
    seed: Tensor
    steps: Tensor

    def session_state_dict(self, row: int) -> dict[str, Tensor]:
        """One session's state (batch row ``row``), copied: the model's past in the session layout of
        :meth:`~streamtx.models.cond_regressor.RegressorState.session_state_dict` (an O(3) model's: every tensor's
        row, :meth:`~streamtx.models.o3_denoiser.O3DenoiserState.session_state_dict`) and, by field name, every per-row
        tensor of this state (``"seed"``, ``"steps"``: ``()`` int64). The static plan's state
        (:meth:`~streamtx.policy.static.StaticPolicyState.session_state_dict`) has the same layout: a session moves
        between the module path and the plan, between rows, and between devices, in either direction."""
        out = self.model.session_state_dict(row)
        out.update({name: value[row].clone() for name, value in self._row_tensors().items()})
        return out

    def load_session_state_dict(self, row: int, snapshot: Mapping[str, Tensor]) -> None:
        """Replace batch row ``row`` by a :meth:`session_state_dict` (of either path, from any device); the other
        rows are untouched. The row's next action chunk is the one the snapshotted session would have computed."""
        own = self._row_tensors()
        missing = sorted(set(own) - set(snapshot))
        if missing:
            raise ValueError(f"session state: missing keys {missing}")
        for name, value in own.items():
            if tuple(snapshot[name].shape) != tuple(value.shape[1:]):
                raise ValueError(
                    f"session state[{name!r}]: expected shape {tuple(value.shape[1:])}, "
                    f"got {tuple(snapshot[name].shape)}"
                )
        self.model.load_session_state_dict(row, {k: v for k, v in snapshot.items() if k not in own})
        for name, value in own.items():
            value[row] = snapshot[name].to(value.device, value.dtype)

    def _row_tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "model" and isinstance(getattr(self, f.name), Tensor)
        }


class StreamingPolicy(nn.Module, Generic[D]):
    """Runs a streaming denoiser (:class:`Denoiser`: an ``eCondTransformerRegressor``, or an ``O3CondDenoiser`` over
    3-D entity tokens) with a sampler over streams of observation tokens.

    Each batch row is an independent stream (a robot session). Per control step: :meth:`observe` feeds the new
    observation tokens through the conditioning encoder and appends one K/V row per decoder layer (the caches), then
    :meth:`act` runs the sampler's denoising iterations, each recomputing only the ``Tx`` action tokens against the
    cached memory. ``rows`` selects a subset of rows (``None``: all), so a server can keep one state with a row per
    session and batch whichever sessions have work.

    The sampling noise of a row is drawn from its seed and its control-step counter, so a row's actions never depend
    on which other rows share the batch, and a replayed stream reproduces its actions exactly.

    An ``O3CondDenoiser``'s observation token is one control step's entities as one flat vector (its
    ``token_dim`` = ``obs_dim``: the features, then the positions, :meth:`~.O3CondDenoiser.split_tokens`), the
    layout the wire carries; :meth:`observe` and :meth:`step` also take them apart, ``obs (b, [S,] E, P, C, F)``
    with ``positions=(b, [S,] E, 3)``. Its actions are one 3-vector per future step: ``action_dim`` 3.
    """

    model: D

    def __init__(self, model: D, sampler: Sampler, max_tokens_per_step: int = 1) -> None:
        super().__init__()
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected >= 1, got {max_tokens_per_step}")
        self.model, self.sampler, self.max_tokens_per_step = model, sampler, max_tokens_per_step
        if isinstance(model, O3CondDenoiser):
            self.obs_dim, self.action_dim = model.token_dim, model.action_dim
        elif isinstance(model, eCondTransformerRegressor):
            self.obs_dim, self.action_dim = model.cond_rep.size, model.out_rep.size
        else:
            raise TypeError(f"model: expected an eCondTransformerRegressor or an O3CondDenoiser, got {type(model)}")
        self.horizon = model.in_horizon
        # two names, two meanings: the encoder's causal attention window, and the memory horizon (newest encoder
        # outputs the decoder cross-attends to)
        self.cond_window, self.cond_horizon = model.cond_window, model.cond_horizon

    @property
    def receptive_field(self) -> int:
        """Observation tokens a row's state depends on: replaying this many rebuilds a session exactly."""
        return self.model.receptive_field()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- state
    def init_state(
        self, batch_size: int, /, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> PolicyState:
        """All rows empty, seed 0. ``dtype``/``device`` (the streaming contract's) must be the policy's own, if given:
        a policy computes in the dtype and on the device of its weights."""
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"dtype: this policy's state lives in {self.dtype} (its weights'), got {dtype}")
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"device: this policy's state lives on {self.device} (its weights'), got {device}")
        return PolicyState(
            self.model.init_state(batch_size, max_tokens_per_step=self.max_tokens_per_step),
            torch.zeros(batch_size, dtype=torch.long),
            torch.zeros(batch_size, dtype=torch.long),
        )

    def _rows(self, state: PolicyState, rows: Rows) -> Tensor | None:
        if rows is None:
            return None
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        b = state.seed.shape[0]
        if rows_t.dim() != 1 or rows_t.numel() == 0:
            raise ValueError(f"rows: expected a non-empty 1-D index of rows, got shape {tuple(rows_t.shape)}")
        if int(rows_t.min()) < 0 or int(rows_t.max()) >= b:
            raise ValueError(f"rows: expected indices in 0..{b - 1}, got {rows_t.tolist()}")
        if rows_t.unique().numel() != rows_t.numel():
            raise ValueError(f"rows: expected distinct rows, got {rows_t.tolist()}")
        return rows_t.to(self.device)

    def reset(
        self,
        state: PolicyState,
        rows: Rows = None,
        seed: int | Sequence[int] | None = None,
        steps: int | Sequence[int] = 0,
    ) -> None:
        """Forget the past of ``rows`` (all if ``None``) and set their noise seed (``None``: 0) and control-step
        counter (nonzero to resume a session elsewhere: its noise sequence continues where it was)."""
        rows_t = self._rows(state, rows)
        state.model.reset(rows_t)
        index = _index(state, rows_t)
        state.seed[index] = torch.as_tensor(0 if seed is None else seed, dtype=torch.long)
        state.steps[index] = torch.as_tensor(steps, dtype=torch.long)

    # ---------------------------------------------------------------- control step
    @torch.no_grad()
    def observe(self, state: PolicyState, obs: Tensor, rows: Rows = None, *, positions: Tensor | None = None) -> None:
        """New observation tokens ``obs (b, S, obs_dim)`` (or ``(b, obs_dim)``), ``S <= max_tokens_per_step``. For
        an ``O3CondDenoiser`` also the entities' features ``obs (b, [S,] E, P, C, F)`` with their ``positions (b,
        [S,] E, 3)`` (joined into the flat tokens; ``positions`` is refused for any other model)."""
        rows_t = self._rows(state, rows)
        obs = torch.as_tensor(obs)
        if positions is not None:
            if not isinstance(self.model, O3CondDenoiser):
                raise ValueError(f"positions: this policy's {type(self.model).__name__} takes no positions")
            obs = self.model.join_tokens(obs, torch.as_tensor(positions, dtype=obs.dtype, device=obs.device))
        if obs.dim() == 2:
            obs = obs[:, None]
        b = state.seed.shape[0] if rows_t is None else rows_t.numel()
        if (
            obs.dim() != 3
            or obs.shape[0] != b
            or obs.shape[2] != self.obs_dim
            or not 1 <= obs.shape[1] <= self.max_tokens_per_step
        ):
            raise ValueError(
                f"obs: expected ({b}, S, {self.obs_dim}) with 1 <= S <= {self.max_tokens_per_step}, "
                f"got {tuple(obs.shape)}"
            )
        if not obs.is_floating_point() or not bool(torch.isfinite(obs).all()):
            raise ValueError("obs: expected finite floating-point values (got NaN/Inf or a non-float dtype)")
        self.model.observe(obs.to(self.device, self.dtype), state.model, rows_t)

    def noise(self, state: PolicyState, rows: Rows = None) -> Tensor:
        """The initial noise ``(b, Tx, action_dim)`` of each row's next control step (from seed and step counter)."""
        index = _index(state, self._rows(state, rows))
        seeds, steps = state.seed[index].tolist(), state.steps[index].tolist()
        gen = torch.Generator()
        out = torch.stack([step_noise(s, k, (self.horizon, self.action_dim), gen) for s, k in zip(seeds, steps)])
        return out.to(self.device, self.dtype)

    def _require_observed(self, state: PolicyState, rows_t: Tensor | None) -> None:
        empty = self.model.num_observed(state.model, rows_t) == 0
        if bool(empty.any()):
            all_rows = torch.arange(state.seed.shape[0]) if rows_t is None else rows_t.cpu()
            raise ValueError(
                f"rows: rows {all_rows[empty.cpu()].tolist()} have no observation since their reset; call observe first"
            )

    @torch.no_grad()
    def act(self, state: PolicyState, rows: Rows = None) -> Tensor:
        """One control step's action chunk ``(b, Tx, action_dim)``: the sampler's iterations against the caches."""
        rows_t = self._rows(state, rows)
        self._require_observed(state, rows_t)
        noise = self.noise(state, rows_t)
        actions = self.sampler.sample(lambda x, k: self.model.denoise(x, k, state.model, rows_t), noise)
        state.steps[_index(state, rows_t)] += 1
        return actions

    def step(self, state: PolicyState, obs: Tensor, rows: Rows = None, *, positions: Tensor | None = None) -> Tensor:
        """:meth:`observe` then :meth:`act`."""
        self.observe(state, obs, rows, positions=positions)
        return self.act(state, rows)

    def forward_step(self, x: Tensor, state: PolicyState, /, *, rows: Rows = None) -> tuple[Tensor, PolicyState]:
        """The streaming contract's step: :meth:`step` with observation tokens ``x (b, S, obs_dim)`` -> the action
        chunk ``(b, Tx, action_dim)``."""
        return self.step(state, x, rows), state

    def forward_steps(self, x: Tensor, state: PolicyState, /, *, rows: Rows = None) -> tuple[Tensor, PolicyState]:
        """``T`` control steps of one observation token each, ``x (b, T, obs_dim)`` -> the action chunks
        ``(b, T, Tx, action_dim)``."""
        if x.dim() != 3:
            raise ValueError(f"x: expected a stream (b, T, {self.obs_dim}), got shape {tuple(x.shape)}")
        return torch.stack([self.step(state, x[:, t], rows) for t in range(x.shape[1])], dim=1), state

    # ---------------------------------------------------------------- description
    def metadata(self) -> dict[str, Any]:
        """A plain (msgpack-able) description: model, dimensions, horizons, group and representations (an O(3)
        model: its symmetry and the layout of its 3-D tokens, ``tokens``), sampler."""
        m = self.model
        described: dict[str, Any]
        if isinstance(m, O3CondDenoiser):
            described = {
                "config": m.config.to_dict(),
                "group": {"name": m.symmetry(), "order": None},
                "tokens": m.token_layout(),
            }
        else:
            assert isinstance(m, eCondTransformerRegressor)  # the constructor admits these two
            group = m.in_rep.group

            def rep(r) -> dict[str, Any]:
                return {
                    "name": r.name,
                    "size": r.size,
                    "generators": [r.matrices[g].tolist() for g in group.generators],
                }

            described = {
                "config": m.config.to_dict(),
                "group": {"name": group.name, "order": group.order},
                "representations": {"obs": rep(m.cond_rep), "action": rep(m.out_rep)},
            }
        return {
            "model": type(m).__name__,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "cond_window": self.cond_window,
            "cond_horizon": self.cond_horizon,
            "max_tokens_per_step": self.max_tokens_per_step,
            **described,
            "sampler": self.sampler.config(),
            "num_evaluations": self.sampler.num_evaluations,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "num_parameters": sum(p.numel() for p in m.parameters()),
        }

    def extra_repr(self) -> str:
        return f"sampler={self.sampler}, max_tokens_per_step={self.max_tokens_per_step}"
