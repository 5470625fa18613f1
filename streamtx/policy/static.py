"""``StaticStreamingPolicy``: :class:`~streamtx.policy.StreamingPolicy`'s interface over a fixed number of session
slots, with every control step a static program that is captured once per batch-size bucket in a CUDA graph.

Per call the host does only bookkeeping and copies: it validates ``rows`` and checks that they have observations from
its own counters (no device read), writes the rows' indices, observations or noise into one pinned buffer, uploads it
with one asynchronous copy, replays the bucket's graph, and (``act``) downloads the actions. The noise of a row's
next control step is drawn on the host from its seed and step counter (exactly as ``StreamingPolicy`` draws it)
while the GPU runs the current one. Calls of ``b`` rows run the smallest bucket ``>= b``; the spare rows point at a
scratch slot whose results are discarded, so sessions never see each other.

Where nothing is captured or compiled (the CPU's eager plan), buckets buy nothing: each call then computes exactly
its rows (padding 9 sessions to 16 would cost the daemon's other sessions their latency).

A :class:`~streamtx.policy.streaming_denoise.StreamingDenoisePolicy` runs as its
:class:`~streamtx.policy.streaming_denoise.BufferPlan`: the rows' action buffers live on the device beside the
caches, whether a row is filled on the host beside its counters, and an ``act`` whose rows include initialising ones
first launches the "prime" program on those, then the steady program on all.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch._dynamo import config as dynamo_config
from torch._inductor import config as inductor_config

from ..models.cond_regressor import ActWorkspace, PlanCaches
from ..nn.state import Rows
from .cuda_graph import CapturedProgram, capture_unavailable
from .streaming import StreamingPolicy, step_noise
from .streaming_denoise import BufferPlan, StreamingDenoisePolicy

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

__all__ = ["StaticStreamingPolicy", "StaticPolicyState", "default_buckets"]

log = logging.getLogger(__name__)

_MAX_COMPILED_PROGRAMS = 256
"""Compiled program bodies a process may hold (dynamo's recompile limit for their shared code object)."""


def default_buckets(num_slots: int) -> list[int]:
    """Powers of two below ``num_slots``, then ``num_slots``: padding wastes at most half a bucket."""
    sizes, b = [], 1
    while b < num_slots:
        sizes.append(b)
        b *= 2
    return sizes + [num_slots]


class _Staging:
    """A program's inputs: typed views into one host block (pinned on CUDA) and its device twin, uploaded with one
    asynchronous copy. The host side is written through numpy views (a microsecond per write, where a torch op on
    a small CPU tensor costs several). Writing waits until the previous upload has left the host block."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> None:
        cuda = device.type == "cuda"
        offsets, total = {}, 0
        for name, (shape, dtype) in fields.items():
            offsets[name] = total
            total += -(-int(np.prod(shape)) * dtype.itemsize // 16) * 16  # 16-byte aligned views
        self._host = torch.zeros(total, dtype=torch.uint8, pin_memory=cuda)
        self._device = torch.zeros(total, dtype=torch.uint8, device=device) if cuda else self._host

        def views(block: Tensor) -> dict[str, Tensor]:
            return {
                name: block[offsets[name] : offsets[name] + int(np.prod(shape)) * dtype.itemsize]
                .view(dtype)
                .view(shape)
                for name, (shape, dtype) in fields.items()
            }

        self.device = views(self._device)
        self.host = {name: view.numpy() for name, view in views(self._host).items()}
        self._uploaded = torch.cuda.Event() if cuda else None
        self._pending = False

    def write(self) -> dict[str, np.ndarray]:
        if self._pending:
            assert self._uploaded is not None  # only an upload sets _pending
            self._uploaded.synchronize()  # the last upload of this block (long done, in practice)
            self._pending = False
        return self.host

    def upload(self) -> None:
        if self._uploaded is not None:
            self._device.copy_(self._host, non_blocking=True)
            self._uploaded.record()
            self._pending = True


class _Program:
    """One bucket's static call: staged inputs, a body captured once (or run eagerly), and an optional output
    downloaded into a pinned host buffer."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
        body: Callable[[dict[str, Tensor]], Tensor | None],
        scratch_row: int,
        *,
        capture: bool,
        pool: _POOL_HANDLE | None,
        out: tuple[tuple[int, ...], torch.dtype] | None = None,
        compiler: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
    ) -> None:
        self.staging = _Staging(fields, device)
        self.staging.host["rows"][:] = scratch_row
        self.staging.upload()
        cuda = device.type == "cuda"
        self.out = output = None if out is None else torch.zeros(*out[0], dtype=out[1], device=device)
        self.out_host = (
            None if out is None else (torch.zeros(*out[0], dtype=out[1], pin_memory=True) if cuda else self.out)
        )
        self._downloaded = torch.cuda.Event() if cuda and out is not None else None
        inputs = self.staging.device

        def run() -> None:  # refers to no object that refers back to it: states are freed as soon as dropped
            result = body(inputs)
            if output is not None:
                assert result is not None  # a body with an output returns it
                output.copy_(result)

        self.program = CapturedProgram(
            run if compiler is None else compiler(run), device, enabled=capture, pool=pool, name=name
        )

    def launch(self) -> None:
        """Upload the staged inputs, run (replay) the body and start downloading its output."""
        self.staging.upload()
        self.program()
        if self._downloaded is not None:
            assert self.out_host is not None and self.out is not None  # _downloaded exists only with an output
            self.out_host.copy_(self.out, non_blocking=True)
            self._downloaded.record()

    def result(self, b: int) -> Tensor:
        """The first ``b`` output rows on the host (waits for the download)."""
        if self._downloaded is not None:
            self._downloaded.synchronize()
        assert self.out_host is not None, "result: this program has no output"
        return self.out_host[:b].clone()


class StaticPolicyState:
    """The state of a :class:`StaticStreamingPolicy`: ``num_slots`` session slots.

    Device side: the plan's caches with one extra scratch row that absorbs the padding of partly filled buckets.
    Host side: per slot the noise seed, control steps and observation tokens since reset (the bookkeeping that
    validates calls without reading the device) and the noise of its next control step. Plus one program per
    ``observe`` bucket and token count, and one per ``act`` bucket, bound to these buffers: a state is not copied or
    moved, its graphs would still point at the original.

    For the streaming sampler also ``buffer`` (device, ``(num_slots + 1, Tx - e, action_dim)``: each slot's carried
    actions, as :class:`~streamtx.policy.streaming_denoise.StreamingDenoiseState` holds them), ``filled`` (host:
    whether it holds them) and one "prime" program per bucket; both ``None`` (and no prime programs) otherwise.
    """

    def __init__(
        self,
        caches: PlanCaches,
        num_slots: int,
        horizon: int,
        action_dim: int,
        bucketed: bool,
        buffer: Tensor | None = None,
    ) -> None:
        self.caches, self.num_slots, self.bucketed = caches, num_slots, bucketed
        self.buffer = buffer
        self.filled = None if buffer is None else np.zeros(num_slots, dtype=bool)
        self.prime_programs: dict[int, _Program] = {}
        self.seed = np.zeros(num_slots, dtype=np.int64)
        self.steps = np.zeros(num_slots, dtype=np.int64)
        self.observed = np.zeros(num_slots, dtype=np.int64)
        self.next_noise = np.zeros((num_slots, horizon, action_dim), dtype=np.float32)
        self.observe_programs: dict[tuple[int, int], _Program] = {}
        self.act_programs: dict[int, _Program] = {}
        self.workspaces: dict[int, ActWorkspace] = {}  # unbucketed: views of one workspace of every slot, by rows

    @property
    def scratch_row(self) -> int:
        return self.num_slots

    def session_state_dict(self, row: int) -> dict[str, Tensor]:
        """Slot ``row``'s session, copied, in the layout of :meth:`PolicyState.session_state_dict
        <streamtx.policy.streaming.PolicyState.session_state_dict>` (the plan's caches on its device, ``"seed"`` and
        ``"steps"`` as ``()`` int64 CPU tensors): it loads into either path, on any device."""
        row = self._check_slot(row)
        out = self.caches.session_state_dict(row)
        out["seed"] = torch.tensor(int(self.seed[row]))
        out["steps"] = torch.tensor(int(self.steps[row]))
        if self.buffer is not None and self.filled is not None:
            out["buffer"] = self.buffer[row].clone()
            out["filled"] = torch.tensor(bool(self.filled[row]))
        return out

    def load_session_state_dict(self, row: int, snapshot: Mapping[str, Tensor]) -> None:
        """Replace slot ``row`` by a session snapshot of either path (any device); other slots are untouched. Its
        next action chunk is the one the snapshotted session would have computed (same noise)."""
        row = self._check_slot(row)
        own = ("seed", "steps") if self.buffer is None else ("seed", "steps", "buffer", "filled")
        missing = sorted(set(own) - set(snapshot))
        if missing:
            raise ValueError(f"session state: missing keys {missing}")
        if self.buffer is not None and tuple(snapshot["buffer"].shape) != tuple(self.buffer.shape[1:]):
            raise ValueError(
                f"session state['buffer']: expected shape {tuple(self.buffer.shape[1:])}, "
                f"got {tuple(snapshot['buffer'].shape)}"
            )
        self.caches.load_session_state_dict(row, {k: v for k, v in snapshot.items() if k not in own})
        self.seed[row], self.steps[row] = int(snapshot["seed"]), int(snapshot["steps"])
        if self.buffer is not None and self.filled is not None:
            self.buffer[row] = snapshot["buffer"].to(self.buffer.device, self.buffer.dtype)
            self.filled[row] = bool(snapshot["filled"])
        self.observed[row] = int(snapshot["observed"])
        self.next_noise[row] = step_noise(int(self.seed[row]), int(self.steps[row]), self.next_noise.shape[1:]).numpy()

    def _check_slot(self, row: int) -> int:
        if not isinstance(row, (int, np.integer)) or not 0 <= row < self.num_slots:
            raise ValueError(f"row: expected a session slot in 0..{self.num_slots - 1}, got {row!r}")
        return int(row)

    @property
    def buckets(self) -> list[int]:
        return sorted(self.act_programs)

    def programs(self) -> dict[str, CapturedProgram]:
        """Every program by name, e.g. ``{"observe[b=8,S=1]": ..., "act[b=8]": ...}``."""
        named = {f"observe[b={b},S={s}]": p.program for (b, s), p in self.observe_programs.items()}
        named.update({f"prime[b={b}]": p.program for b, p in self.prime_programs.items()})
        named.update({f"act[b={b}]": p.program for b, p in self.act_programs.items()})
        return named

    @property
    def captured(self) -> bool:
        """Whether every call replays a CUDA graph."""
        programs = self.programs().values()
        return bool(programs) and all(p.captured for p in programs)

    def __repr__(self) -> str:
        graphs = sum(p.captured for p in self.programs().values())
        return (
            f"StaticPolicyState(num_slots={self.num_slots}, bucketed={self.bucketed}, buckets={self.buckets}, "
            f"graphs={graphs}/{len(self.programs())})"
        )


class StaticStreamingPolicy:
    """:class:`~streamtx.policy.StreamingPolicy`'s methods (``init_state``, ``reset``, ``observe``, ``act``,
    ``step``, ``metadata``) over static buffers, for serving on a GPU.

    The math is the :class:`~streamtx.models.cond_regressor.RegressorPlan` that the policy's model lowers itself into
    (:meth:`~streamtx.models.eCondTransformerRegressor.lower`): the same actions as
    ``policy`` for the same calls (same noise; float32 agreement ~1e-6 relative). ``init_state(num_slots)``
    preallocates every buffer and captures one CUDA graph per program (``observe`` per bucket and token count,
    ``act`` per bucket), so calls never allocate, never re-capture and synchronize only to hand back actions.

    Args:
        policy: the reference policy (model in eval mode, sampler, ``max_tokens_per_step``); a
            :class:`~streamtx.policy.streaming_denoise.StreamingDenoisePolicy` runs as its ``BufferPlan``
            (:attr:`buffer_plan`; module docstring).
        dtype: compute dtype (``None``: the model's, normally float32; ``torch.bfloat16`` / ``torch.float16`` for
            reduced precision, see the tests for the tolerance). Observations, noise and actions stay float32.
        cuda_graph: capture the programs (on CUDA; elsewhere, or if capture fails, they run eagerly and the reason is
            logged).
        buckets: batch sizes to prepare (``None``: :func:`default_buckets` of the slot count); a call takes at most
            the largest.
        fused_kernels: use the plan's Triton kernels where they run and pass their build-time check (CUDA).
        compile: compile the programs with inductor (CPU only).
        bucketed: run each call as its bucket's static program, rows padded to the bucket size, as CUDA graphs and
            compiled programs need. ``None``: only where the programs are captured or compiled; elsewhere each call
            computes exactly its rows (``bucketed_reason`` says which and why). ``True`` also runs the programs
            eagerly, e.g. to check on a CPU the logic that a GPU captures.

    Pass observations as host arrays or CPU tensors: they go through the pinned buffer. ``act`` returns a CPU tensor.
    """

    def __init__(
        self,
        policy: StreamingPolicy,
        *,
        dtype: torch.dtype | None = None,
        cuda_graph: bool = True,
        buckets: Sequence[int] | None = None,
        fused_kernels: bool = True,
        compile: bool = False,
        bucketed: bool | None = None,
    ) -> None:
        if not isinstance(policy, StreamingPolicy):
            raise TypeError(f"policy: expected a StreamingPolicy, got {type(policy).__name__}")
        if buckets is not None and (len(buckets) == 0 or any(int(b) < 1 for b in buckets)):
            raise ValueError(f"buckets: expected positive batch sizes, got {list(buckets)}")
        self.policy, self.cuda_graph = policy, cuda_graph
        self.compiled, self.compile_reason = _compile_choice(compile, policy.device)
        self.buffer_plan = None  # the streaming sampler's program, for a StreamingDenoisePolicy
        if isinstance(policy, StreamingDenoisePolicy):
            self.buffer_plan = BufferPlan(policy, dtype, fused_kernels=fused_kernels)
            self.plan = self.buffer_plan.plan
        else:
            self.plan = policy.model.lower(policy.sampler, dtype, fused_kernels=fused_kernels)
        self._buckets = None if buckets is None else sorted({int(b) for b in buckets})
        unavailable = capture_unavailable(self.device) or (None if cuda_graph else "cuda_graph=False")
        self.bucketed_reason: str
        if bucketed is not None:
            self.bucketed, self.bucketed_reason = bucketed, f"bucketed={bucketed}"
        elif self.compiled or unavailable is None:
            why = "compiled" if self.compiled else "captured as CUDA graphs"
            self.bucketed, self.bucketed_reason = True, f"bucketed: the programs are {why}"
        else:
            self.bucketed, self.bucketed_reason = False, f"exact rows per call: eager ({unavailable})"
        self.obs_dim, self.action_dim = policy.obs_dim, policy.action_dim
        self.horizon, self.cond_window, self.cond_horizon = policy.horizon, policy.cond_window, policy.cond_horizon
        self.max_tokens_per_step = policy.max_tokens_per_step
        self.receptive_field = policy.receptive_field

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype."""
        return self.plan.dtype

    @property
    def io_dtype(self) -> torch.dtype:
        """Dtype of observations, noise and actions (float32, or float64 for a float64 plan)."""
        return self.plan.state_dtype

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def _compiler(self) -> Callable[[Callable[[], None]], Callable[[], None]] | None:
        return _inductor_compile if self.compiled else None

    # ---------------------------------------------------------------- state
    @torch.no_grad()
    def init_state(self, batch_size: int) -> StaticPolicyState:
        """``batch_size`` empty session slots (seed 0), with every program warmed up and captured."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1 session slots, got {batch_size}")
        buckets = self._buckets or default_buckets(batch_size)
        if buckets[-1] > batch_size:
            raise ValueError(f"buckets: expected sizes <= batch_size={batch_size}, got {buckets}")
        buffer = None
        if self.buffer_plan is not None:
            shape = (batch_size + 1, *self.buffer_plan.buffer_shape)
            buffer = torch.zeros(shape, dtype=self.io_dtype, device=self.device)
        state = StaticPolicyState(
            self.plan.caches(batch_size + 1, self.max_tokens_per_step),
            batch_size,
            self.horizon,
            self.action_dim,
            self.bucketed,
            buffer,
        )
        self._draw_noise(state, range(batch_size))
        if not self.bucketed:
            log.info("static policy: %s", self.bucketed_reason)
            everything = self.plan.act_workspace(state.caches, batch_size)
            state.workspaces = {b: everything.rows(b) for b in range(1, batch_size + 1)}
            return state
        capture, unavailable = self.cuda_graph, capture_unavailable(self.device)
        capturing = capture and unavailable is None
        pool = torch.cuda.graph_pool_handle() if capturing else None
        io, long = self.io_dtype, torch.long
        plan, buffer_plan, caches, scratch = self.plan, self.buffer_plan, state.caches, state.scratch_row
        for b in reversed(buckets):  # largest first: smaller graphs reuse its pool memory
            programs = []
            for s in range(1, self.max_tokens_per_step + 1):
                programs.append(
                    _Program(
                        f"observe[b={b},S={s}]",
                        self.device,
                        {"rows": ((b,), long), "obs": ((b, s, self.obs_dim), io)},
                        lambda x: plan.observe(x["obs"], caches, x["rows"]),
                        scratch,
                        capture=capture,
                        pool=pool,
                        compiler=self._compiler(),
                    )
                )
                state.observe_programs[b, s] = programs[-1]
            # the scratch row must have observations before its act runs (warm-up) or pads a bucket
            state.observe_programs[b, 1].program.body()
            workspace = plan.act_workspace(caches, b)
            staged = {"rows": ((b,), long), "noise": ((b, self.horizon, self.action_dim), io)}
            if buffer_plan is not None:
                assert buffer is not None  # allocated above for the streaming sampler

                def prime_body(x: dict[str, Tensor], ws: ActWorkspace = workspace) -> None:
                    buffer_plan.prime(x["noise"], buffer, caches, x["rows"], ws)

                programs.append(
                    _Program(
                        f"prime[b={b}]",
                        self.device,
                        staged,
                        prime_body,
                        scratch,
                        capture=capture,
                        pool=pool,
                        compiler=self._compiler(),
                    )
                )
                state.prime_programs[b] = programs[-1]

            def act_body(x: dict[str, Tensor], ws: ActWorkspace = workspace) -> Tensor:
                if buffer_plan is not None:
                    assert buffer is not None
                    return buffer_plan.step(x["noise"], buffer, caches, x["rows"], ws)
                return plan.act(x["noise"], caches, x["rows"], ws)

            programs.append(
                _Program(
                    f"act[b={b}]",
                    self.device,
                    staged,
                    act_body,
                    scratch,
                    capture=capture,
                    pool=pool,
                    out=((b, self.horizon, self.action_dim), io),
                    compiler=self._compiler(),
                )
            )
            state.act_programs[b] = programs[-1]
            if capturing and not all(p.program.captured for p in programs):
                pool = torch.cuda.graph_pool_handle()  # a failed capture can leave its pool unusable
        if not self.cuda_graph:
            log.info("static policy runs eagerly: cuda_graph=False")
        elif unavailable is not None:
            log.warning("static policy runs eagerly: %s", unavailable)
        return state

    def reset(
        self,
        state: StaticPolicyState,
        rows: Rows = None,
        seed: int | Sequence[int] | None = None,
        steps: int | Sequence[int] = 0,
    ) -> None:
        """Forget the past of ``rows`` (all if ``None``) and set their noise seed (``None``: 0) and control-step
        counter (as :meth:`StreamingPolicy.reset`)."""
        index = self._rows(state, rows, limit=False)
        seeds = np.asarray(0 if seed is None else seed)
        if seeds.dtype.kind not in "iu" or seeds.ndim > 1 or (seeds.ndim == 1 and seeds.size != index.size):
            raise ValueError(f"seed: expected an integer or one integer per row ({index.size}), got {seed!r}")
        rows_t = torch.from_numpy(index).to(self.device)
        state.caches.reset(rows_t)
        if state.buffer is not None and state.filled is not None:
            state.buffer[rows_t] = 0  # as the module path's reset leaves it: snapshots of both paths agree
            state.filled[index] = False
        state.seed[index] = seeds
        state.steps[index] = steps
        state.observed[index] = 0
        self._draw_noise(state, index.tolist())

    # ---------------------------------------------------------------- control step
    def observe(self, state: StaticPolicyState, obs: Any, rows: Rows = None) -> None:
        """New observation tokens ``obs (b, S, obs_dim)`` (or ``(b, obs_dim)``), ``S <= max_tokens_per_step``, of
        ``rows`` (all slots if ``None``). Launches the work and returns without waiting for it."""
        index = self._rows(state, rows)
        obs = _host_array(obs)
        if obs.ndim == 2:
            obs = obs[:, None]
        b = len(index)
        if (
            obs.ndim != 3
            or obs.shape[0] != b
            or obs.shape[2] != self.obs_dim
            or not 1 <= obs.shape[1] <= self.max_tokens_per_step
        ):
            raise ValueError(
                f"obs: expected ({b}, S, {self.obs_dim}) with 1 <= S <= {self.max_tokens_per_step}, "
                f"got {tuple(obs.shape)}"
            )
        if obs.dtype.kind != "f" or not np.isfinite(obs).all():
            raise ValueError("obs: expected finite floating-point values (got NaN/Inf or a non-float dtype)")
        s = obs.shape[1]
        if not state.bucketed:
            rows_t = torch.from_numpy(index).to(self.device)
            self.plan.observe(torch.tensor(obs, dtype=self.io_dtype, device=self.device), state.caches, rows_t)
            state.observed[index] += s
            return
        program = state.observe_programs[self._bucket(state, b), s]
        host = program.staging.write()
        self._stage_rows(host["rows"], index, state.scratch_row)
        host["obs"][:b] = obs
        program.launch()
        state.observed[index] += s

    def act(self, state: StaticPolicyState, rows: Rows = None) -> Tensor:
        """One control step's action chunk ``(b, Tx, action_dim)`` (CPU, ``io_dtype``) of ``rows``."""
        index = self._rows(state, rows)
        empty = state.observed[index] == 0
        if empty.any():
            raise ValueError(
                f"rows: rows {index[empty].tolist()} have no observation since their reset; call observe first"
            )
        if state.filled is not None:
            fresh = index[~state.filled[index]]
            if fresh.size:  # initialising rows first: afterwards their buffers are in the steady form
                self._launch(state, fresh, prime=True)
                state.filled[fresh] = True
        actions = self._launch(state, index, prime=False)
        state.steps[index] += 1
        self._draw_noise(state, index.tolist())  # on the host while the GPU runs this step
        if actions is None:  # launched: wait for its download
            actions = state.act_programs[self._bucket(state, len(index))].result(len(index))
        return actions

    def _launch(self, state: StaticPolicyState, index: np.ndarray, prime: bool) -> Tensor | None:
        """Run the act (or, ``prime``, the streaming buffer's prime) of rows ``index`` on their noise: the actions
        (CPU) of an act that computed exactly its rows, else ``None`` (a launched program's result follows)."""
        b = len(index)
        if not state.bucketed:
            noise = torch.from_numpy(state.next_noise[index]).to(self.device, self.io_dtype)
            rows_t, ws = torch.from_numpy(index).to(self.device), state.workspaces[b]
            if self.buffer_plan is None:
                return self.plan.act(noise, state.caches, rows_t, ws).cpu()
            assert state.buffer is not None  # a streaming state has its buffer
            if prime:
                self.buffer_plan.prime(noise, state.buffer, state.caches, rows_t, ws)
                return None
            return self.buffer_plan.step(noise, state.buffer, state.caches, rows_t, ws).cpu()
        bucket = self._bucket(state, b)
        program = state.prime_programs[bucket] if prime else state.act_programs[bucket]
        host = program.staging.write()
        self._stage_rows(host["rows"], index, state.scratch_row)
        host["noise"][:b] = state.next_noise[index]
        program.launch()
        return None

    def step(self, state: StaticPolicyState, obs: Any, rows: Rows = None) -> Tensor:
        """:meth:`observe` then :meth:`act`."""
        self.observe(state, obs, rows)
        return self.act(state, rows)

    # ---------------------------------------------------------------- helpers
    def _rows(self, state: StaticPolicyState, rows: Rows, limit: bool = True) -> np.ndarray:
        n = state.num_slots
        if rows is None:
            index = np.arange(n)
        else:
            if isinstance(rows, Tensor) and rows.device.type != "cpu":
                rows = rows.cpu()  # a device tensor syncs: pass host rows
            index = np.asarray(rows)
            if index.ndim != 1 or index.size == 0 or index.dtype.kind not in "iu":
                raise ValueError(f"rows: expected a non-empty 1-D index of rows, got {index.dtype} shape {index.shape}")
            index = index.astype(np.int64)
            if index.min() < 0 or index.max() >= n:
                raise ValueError(f"rows: expected indices in 0..{n - 1}, got {index.tolist()}")
            if len(set(index.tolist())) != index.size:
                raise ValueError(f"rows: expected distinct rows, got {index.tolist()}")
        if limit and state.bucketed and index.size > state.buckets[-1]:
            raise ValueError(f"rows: at most {state.buckets[-1]} rows per call (the largest bucket), got {index.size}")
        return index

    @staticmethod
    def _bucket(state: StaticPolicyState, b: int) -> int:
        buckets = state.buckets
        return buckets[bisect.bisect_left(buckets, b)]

    @staticmethod
    def _stage_rows(staged: np.ndarray, index: np.ndarray, scratch: int) -> None:
        staged[: len(index)] = index
        staged[len(index) :] = scratch

    def _draw_noise(self, state: StaticPolicyState, rows: Sequence[int]) -> None:
        gen, shape = torch.Generator(), (self.horizon, self.action_dim)
        for r in rows:
            state.next_noise[r] = step_noise(int(state.seed[r]), int(state.steps[r]), shape, gen).numpy()

    # ---------------------------------------------------------------- description
    def metadata(self) -> dict[str, Any]:
        """The policy's :meth:`StreamingPolicy.metadata` with the runner's compute dtype and settings."""
        meta = self.policy.metadata()
        meta.update(
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            runner={
                "type": "static",
                "cuda_graph": self.cuda_graph and self.device.type == "cuda",  # requested and possible here
                "compiled": self.compiled,
                "compile_reason": self.compile_reason,
                "fused_kernels": self.plan.fused,
                "io_dtype": str(self.io_dtype).removeprefix("torch."),
                "buckets": self._buckets,
                "bucketed": self.bucketed,
                "bucketed_reason": self.bucketed_reason,
            },
        )
        return meta

    def __repr__(self) -> str:
        return (
            f"StaticStreamingPolicy({self.plan}, sampler={self.policy.sampler}, "
            f"max_tokens_per_step={self.max_tokens_per_step}, cuda_graph={self.cuda_graph})"
        )


def _compile_choice(requested: bool, device: torch.device) -> tuple[bool, str]:
    """Whether the programs are compiled with inductor, and why (logged): only on the CPU, where per-op dispatch
    bounds a small model; on CUDA the programs are captured as graphs instead."""
    if not requested:
        return False, "compile=False"
    if device.type != "cpu":
        return False, f"compile: only the CPU path compiles (device {device}: CUDA graphs instead)"
    return True, "inductor (C++ code generation, cpp_wrapper)"


def _inductor_compile(fn: Callable[[], None]) -> Callable[[], None]:
    """A program body compiled by inductor's C++ backend. Compiled artifacts go to inductor's on-disk caches
    (FX graph cache, on by default), so a restarted process with the same model and shapes does not recompile."""
    inductor_config.cpp_wrapper = True
    # every program body is the same Python function over other buffers, so dynamo keeps all their graphs under one
    # code object: its recompile limit (8) must cover every program of every policy, or the rest run eagerly
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _MAX_COMPILED_PROGRAMS)
    return torch.compile(fn, backend="inductor", dynamic=False, fullgraph=False)


def _host_array(obs: Any) -> np.ndarray:
    if isinstance(obs, Tensor):
        obs = obs.detach().cpu()  # a device tensor syncs here: pass host arrays
        if obs.is_floating_point() and obs.dtype != torch.float64:
            obs = obs.float()  # numpy has no bfloat16
        return obs.numpy()
    return np.asarray(obs)
