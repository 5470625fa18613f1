"""Streaming denoising: a persistent, partly denoised action buffer per stream, so that a control step costs one (or
a chosen few) denoiser evaluations instead of a sampler's ``K``.

After Streaming Diffusion Policy (Hoeg, Du, Egeland, arXiv 2406.04806) and Responsive Noise-Relaying Diffusion Policy
(Chen et al., arXiv 2502.12724). The ``Tx`` actions of the chunk form ``h = Tx / e`` chunks of ``e`` actions
(``e = execute``); with ``n = substeps`` evaluations per control step there are ``L = h n`` noise levels (level
``l`` is ``sigma = l / L``: 0 clean, ``L`` pure noise). Between control steps a row's buffer holds the ``h - 1``
newest chunks, chunk ``c`` (from the head) at level ``(c + 1) n``. A control step (:meth:`StreamingDenoisePolicy.act`):

1. fresh noise joins the tail as chunk ``h - 1`` (level ``L``): the last ``e`` actions of the row's seeded noise of
   this control step (:func:`~streamtx.policy.streaming.step_noise` of ``(seed, step)``, as the K-step policy draws);
2. ``n`` denoiser evaluations conditioned on the newest observation, each taking every chunk one level down with the
   sampler's per-token step (:meth:`~streamtx.policy.samplers.Sampler.level_step`): chunk ``c`` ends at ``c n``, so
   the head chunk is clean;
3. the head chunk is returned (executed) and the buffer shifts by one chunk.

The returned chunk ``(Tx, action_dim)`` is the head's ``e`` clean actions followed by the denoiser's clean estimate
of the rest of the buffer (what a robot-side chunk buffer can play if it executes more than ``e``).

Defined where the K-step sampler has nothing to define:

* **initialisation**: the first act after a reset starts from the row's full noise of that control step and runs
  the ``L`` evaluations of "offsets" ``o = L .. 1``, in which chunk ``c`` goes from level ``min(L, o + c n)`` to
  ``min(L, o - 1 + c n)``: the head is fully denoised while later chunks wait at pure noise until their turn, ending
  at the buffer's levels (a staggered full denoise; a steady control step is offsets ``n .. 1`` of the same rule);
* **observe-only ticks** and **superseded steps** (the daemon, overloaded, only observes a step that a newer acting
  step of the session follows): observations enter the caches, the buffer and the step counter are unchanged; the
  buffer advances once per computed act, and the next act sees every observation;
* **``execute > 1``**: the buffer shifts by ``e`` actions per act, and the step counter counts acts;
* **batching**: rows in different phases (initialising, steady) share a call; each row's noise comes from its own
  seed and step counter, so a row's actions never depend on which rows share the batch;
* **replay**: with a model whose action tokens attend only to themselves and later ones (``anticausal_attn``), a
  chunk never reads an older chunk, so the state after an act depends on the row's last ``h - 1`` acts (their noise
  and observations), one act before them (any: what it leaves is shifted out) and the model's receptive field
  before those. Replaying the last :attr:`receptive_field` tokens from a reset whose step counter is the session's
  minus the acts among them, acting after every token whose step acted, then rebuilds the buffer exactly when the
  acts were at most ``e`` tokens apart (or the tokens reach back to the session's reset). With full self-attention
  among the actions, every chunk reads the older ones: the buffer keeps a decaying memory of all its past acts, and
  only a replay since the reset is exact (``metadata()["streaming_denoise"]["exact_replay"]`` says which).

The buffer lives in the session state (:class:`StreamingDenoiseState`, snapshots and row views like every
:class:`~streamtx.nn.state.StreamState`). The model needs ``token_levels`` (its level embedding).

**The static plan** (:class:`BufferPlan`, run by :class:`~streamtx.policy.static.StaticStreamingPolicy`): between
control steps every filled row's buffer holds its chunks at the same levels (the shift makes the levels a function of
the position in the buffer, not of the row's age), so steady rows share one schedule whatever their resets: the
control step is one fixed program of ``n`` evaluations over the rows' buffers. The only per-row phase is whether a
row is filled, which the host knows from its own calls (no device read). An initialising row's staggered full denoise
is the offsets ``L .. n + 1`` (a second fixed program, "prime", on those rows only), after which its buffer is in
the steady form (the tail chunk still its pure noise) and it joins the steady program with the others: the same
evaluations, in the same order, as this module's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..models.cond_regressor import ActWorkspace, PlanCaches, RegressorPlan, eCondTransformerRegressor
from ..nn.state import Rows
from .samplers import Denoise, Sampler
from .streaming import PolicyState, StreamingPolicy

__all__ = ["StreamingDenoisePolicy", "StreamingDenoiseState", "BufferSchedule", "BufferPlan"]


@dataclass(frozen=True)
class BufferSchedule:
    """The level arithmetic of a streaming buffer of ``horizon`` actions in chunks of ``execute``, ``substeps``
    evaluations per control step (module docstring)."""

    horizon: int
    execute: int
    substeps: int

    def __post_init__(self) -> None:
        if not 1 <= self.execute < self.horizon or self.horizon % self.execute:
            raise ValueError(
                f"execute: expected a divisor of the action horizon {self.horizon} below it (the buffer keeps at "
                f"least one chunk), got {self.execute}"
            )
        if self.substeps < 1:
            raise ValueError(f"substeps: expected >= 1, got {self.substeps}")

    @property
    def chunks(self) -> int:
        return self.horizon // self.execute

    @property
    def num_levels(self) -> int:
        return self.chunks * self.substeps

    def offsets(self, initialise: bool) -> range:
        """The offsets of one control step's evaluations: ``L .. 1`` to initialise, else ``n .. 1``."""
        return range(self.num_levels if initialise else self.substeps, 0, -1)

    def levels(self, offset: int) -> tuple[Tensor, Tensor]:
        """Start and end level ``(Tx,)`` of every action of the evaluation at ``offset``."""
        ramp = torch.arange(self.horizon) // self.execute * self.substeps
        return (offset + ramp).clamp(max=self.num_levels), (offset - 1 + ramp).clamp(max=self.num_levels)


@dataclass
class StreamingDenoiseState(PolicyState):
    """:class:`~streamtx.policy.streaming.PolicyState` plus each row's carried actions ``buffer (B, Tx - e, A)``
    (chunk ``c`` at level ``(c + 1) n``) and ``filled (B,)``: whether it holds them (False after a reset: the next
    act initialises)."""

    buffer: Tensor
    filled: Tensor


class StreamingDenoisePolicy(StreamingPolicy):
    """:class:`~streamtx.policy.StreamingPolicy` with a persistent action buffer: ``substeps`` denoiser evaluations
    per control step (module docstring), ``execute`` actions executed and shifted out per act.

    Args:
        model: a denoiser with ``token_levels`` (trained with a chunk-wise schedule, e.g. ``sampler.noise_chunk``).
        sampler: whose convention the model was trained in (flow matching or DDIM); only its per-token steps are
            used (``level_input``, ``level_step``).
        max_tokens_per_step: as for the K-step policy.
        execute: actions per chunk, a divisor of ``Tx`` below it (``None``: ``sampler.noise_chunk``, else 1).
        substeps: denoiser evaluations per control step.
    """

    def __init__(
        self,
        model: eCondTransformerRegressor,
        sampler: Sampler,
        max_tokens_per_step: int = 1,
        *,
        execute: int | None = None,
        substeps: int = 1,
    ) -> None:
        super().__init__(model, sampler, max_tokens_per_step)
        if not model.config.token_levels:
            raise ValueError(
                "model: the streaming buffer holds actions at different noise levels; the model needs "
                "token_levels=True (and a chunk-wise training schedule)"
            )
        self.schedule = BufferSchedule(model.in_horizon, execute or sampler.noise_chunk or 1, substeps)
        self.execute, self.substeps = self.schedule.execute, substeps
        # (start, end, denoiser step) of every evaluation, data-independent: computed once, not per control step
        num_levels = self.schedule.num_levels
        self._evaluations = {
            initialise: [
                (start, end, sampler.level_input(start, num_levels))
                for start, end in map(self.schedule.levels, self.schedule.offsets(initialise))
            ]
            for initialise in (True, False)
        }

    @property
    def receptive_field(self) -> int:
        """Observation tokens a row's state depends on when it acts at least every ``execute`` tokens: the model's
        receptive field plus the buffer's horizon (module docstring, replay; exact with ``anticausal_attn``)."""
        return self.model.receptive_field() + self.horizon

    # ---------------------------------------------------------------- state
    def init_state(
        self, batch_size: int, /, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> StreamingDenoiseState:
        """All rows empty (to be initialised by their first act), seed 0."""
        base = super().init_state(batch_size, dtype=dtype, device=device)
        buffer = torch.zeros(
            batch_size, self.horizon - self.execute, self.action_dim, dtype=self.dtype, device=self.device
        )
        return StreamingDenoiseState(
            base.model, base.seed, base.steps, buffer, torch.zeros(batch_size, dtype=torch.bool)
        )

    def reset(
        self,
        state: PolicyState,
        rows: Rows = None,
        seed: int | Sequence[int] | None = None,
        steps: int | Sequence[int] = 0,
    ) -> None:
        """As :meth:`StreamingPolicy.reset`, and the rows' buffers are emptied (their next act initialises)."""
        super().reset(state, rows, seed, steps)
        assert isinstance(state, StreamingDenoiseState)
        rows_t = self._rows(state, rows)
        state.filled[slice(None) if rows_t is None else rows_t.cpu()] = False
        state.buffer[slice(None) if rows_t is None else rows_t] = 0

    # ---------------------------------------------------------------- control step
    def denoise_buffer(self, denoise: Denoise, x: Tensor, initialise: bool) -> tuple[Tensor, Tensor]:
        """The evaluations of one control step on a whole buffer ``x (b, Tx, A)`` (tail chunk at pure noise; all
        noise to initialise): ``(x, the clean estimate)`` after them, the head chunk clean in both."""
        estimate = x
        for start, end, k in self._evaluations[initialise]:
            start, end, k = start.to(x.device), end.to(x.device), k.to(x.device).expand(x.shape[0], -1)
            x, estimate = self.sampler.level_step(x, denoise(x, k), start, end, self.schedule.num_levels)
        return x, estimate

    @torch.no_grad()
    def act(self, state: PolicyState, rows: Rows = None) -> Tensor:
        """One control step's chunk ``(b, Tx, action_dim)``: the ``execute`` clean head actions, then the clean
        estimate of the rest of the buffer; the buffer advances one chunk."""
        assert isinstance(state, StreamingDenoiseState)
        rows_t = self._rows(state, rows)
        self._require_observed(state, rows_t)
        index = slice(None) if rows_t is None else rows_t.cpu()  # of the host-side counters
        noise = self.noise(state, rows_t)
        filled = state.filled[index]
        ids = torch.arange(state.seed.shape[0], device=self.device) if rows_t is None else rows_t
        chunk = torch.empty_like(noise)
        for initialise, members in ((True, ~filled), (False, filled)):
            if not bool(members.any()):
                continue
            whole = bool(members.all())
            sel = members.nonzero()[:, 0].to(self.device)
            sub = rows_t if whole else ids[sel]  # None: every row, in order (no gather)
            sub_index = slice(None) if sub is None else sub
            x = noise if whole else noise[sel]
            if not initialise:
                x = torch.cat((state.buffer[sub_index], x[:, self.horizon - self.execute :]), dim=1)
            x, estimate = self.denoise_buffer(partial(self.model.denoise, state=state.model, rows=sub), x, initialise)
            state.buffer[sub_index] = x[:, self.execute :]
            if whole:
                chunk = estimate
            else:
                chunk[sel] = estimate
        state.filled[index] = True
        state.steps[index] += 1
        return chunk

    # ---------------------------------------------------------------- description
    def metadata(self) -> dict[str, Any]:
        """:meth:`StreamingPolicy.metadata` with the buffer's schedule; ``num_evaluations`` per steady control step."""
        return {
            **super().metadata(),
            "num_evaluations": self.substeps,
            "acts_change_state": True,  # a replay must say which steps acted (the serving boundary reads this)
            "streaming_denoise": {
                "execute": self.execute,
                "substeps": self.substeps,
                "buffer": self.horizon - self.execute,
                "levels": self.schedule.num_levels,
                "init_evaluations": self.schedule.num_levels,
                "exact_replay": self.model.config.anticausal_attn,
            },
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, execute={self.execute}, substeps={self.substeps}"


class BufferPlan:
    """The control step of a :class:`StreamingDenoisePolicy` as static programs over the model's
    :class:`~streamtx.models.cond_regressor.RegressorPlan` (lowered with the buffer's per-token levels: evaluation
    ``i`` is the offset ``L - i``), for :class:`~streamtx.policy.static.StaticStreamingPolicy`.

    :meth:`step` is a steady control step (``n`` evaluations) of any rows whose buffer is filled; :meth:`prime` runs
    the first ``L - n`` evaluations of an initialisation on the noise of rows that are not, after which they take
    :meth:`step` like the others (module docstring). Both read and write only preallocated tensors, fixed shapes,
    no host sync: capturable in a CUDA graph.

    Args:
        policy: the module-path policy (model, sampler, ``execute``, ``substeps``).
        dtype: the plan's compute dtype (``None``: the model's).
        fused_kernels: as for :meth:`~streamtx.models.eCondTransformerRegressor.lower`.
    """

    def __init__(
        self, policy: StreamingDenoisePolicy, dtype: torch.dtype | None = None, *, fused_kernels: bool = True
    ) -> None:
        schedule = policy.schedule
        levels = [schedule.levels(offset) for offset in schedule.offsets(initialise=True)]  # offsets L .. 1
        start, end = torch.stack([a for a, _ in levels]), torch.stack([b for _, b in levels])  # (L, Tx)
        self.num_levels, self.substeps = schedule.num_levels, schedule.substeps
        self.horizon, self.execute = schedule.horizon, schedule.execute
        self.sampler = policy.sampler
        self.plan: RegressorPlan = policy.model.lower(
            None,
            dtype,
            fused_kernels=fused_kernels,
            token_steps=policy.sampler.level_input(start, self.num_levels),
        )
        # on the plan's device once: a host-to-device copy inside a control step would synchronize (and not capture)
        self.start, self.end = start.to(self.plan.device), end.to(self.plan.device)

    @property
    def buffer_shape(self) -> tuple[int, int]:
        """A row's carried actions ``(Tx - e, action_dim)``."""
        return self.horizon - self.execute, self.plan.action_dim

    def _evaluations(
        self, x: Tensor, evaluate: Callable[[Tensor, int], Tensor], evaluations: range
    ) -> tuple[Tensor, Tensor]:
        estimate = x
        for i in evaluations:
            x, estimate = self.sampler.level_step(x, evaluate(x, i), self.start[i], self.end[i], self.num_levels)
        return x, estimate

    def prime(self, noise: Tensor, buffer: Tensor, caches: PlanCaches, rows: Tensor, workspace: ActWorkspace) -> None:
        """Initialising rows ``rows (b,)``: the offsets ``L .. n + 1`` on their control step's ``noise (b, Tx, A)``
        (``state_dtype``) write their ``buffer`` rows (``(B, Tx - e, A)``) in the steady form."""
        evaluate = self.plan.denoiser(caches, rows, workspace)
        x, _ = self._evaluations(noise, evaluate, range(self.num_levels - self.substeps))
        buffer.index_copy_(0, rows, x[:, : self.horizon - self.execute])

    def step(self, noise: Tensor, buffer: Tensor, caches: PlanCaches, rows: Tensor, workspace: ActWorkspace) -> Tensor:
        """A steady control step of rows ``rows (b,)`` with filled buffers: the tail of this step's ``noise (b, Tx,
        A)`` joins each buffer, ``n`` evaluations, the buffer shifts by ``e``; returns the chunk ``(b, Tx, A)``
        (clean head, then the estimate of the rest), as :meth:`StreamingDenoisePolicy.act`."""
        x = torch.cat((buffer.index_select(0, rows), noise[:, self.horizon - self.execute :]), dim=1)
        evaluate = self.plan.denoiser(caches, rows, workspace)
        x, estimate = self._evaluations(x, evaluate, range(self.num_levels - self.substeps, self.num_levels))
        buffer.index_copy_(0, rows, x[:, self.execute :])
        return estimate

    def __repr__(self) -> str:
        return f"BufferPlan({self.plan}, execute={self.execute}, substeps={self.substeps}, levels={self.num_levels})"
