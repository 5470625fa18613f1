"""Full-window (retroactive) streaming of an encoder layer: every token of the last ``n`` attends to all ``n``, and a
step returns the updated outputs of the whole window (continual-inference's ``RetroactiveTransformerEncoderLayer``
semantics), with O(n d) attention work per step and no overflow or cancellation blow-up for any logit scale.

Why the update is stable. Each query row ``i`` of the window keeps, per head, a shift ``m_i``, the shifted softmax
denominator ``l_i = sum_j exp(s_ij - m_i)`` and numerator ``acc_i = sum_j exp(s_ij - m_i) v_j`` over the keys ``j`` in
the window, and ``r_i``: the mass removed from ``l_i`` since the row was last computed exactly. A step

* subtracts the terms of the keys that leave (``l_i -= exp(s_i,old - m_i)``, ``r_i += exp(s_i,old - m_i)``),
* adds the keys that arrive with the online-softmax rescale (``m_i' = max(m_i, s_i,new)``, everything times
  ``exp(m_i - m_i')``),
* computes the rows of the new tokens exactly, and recomputes exactly every row whose removed mass exceeds
  ``recompute_threshold`` times its remaining mass (subtraction loses accuracy in proportion to ``r_i / l_i``).

Invariants after every step (``t = recompute_threshold``): ``m_i >= s_ij`` for every key in the window, so no ``exp``
argument is positive and nothing overflows, in float16 either; ``l_i >= 1`` while the key that set ``m_i`` is in the
window, else ``l_i >= r_i / t >= 1 / t`` by the guard, so ``l_i`` never underflows; and the rounding error of ``l_i``,
proportional to all the mass ever added and removed, ``l_i + 2 r_i <= (1 + 2t) l_i``, stays within ``1 + 2t`` times
that of a sum without cancellation.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from .linear import WeightCache
from .lowered import (
    UPDATES,
    RetroactiveEncoderLayer,
    RetroactiveState,
    retroactive_attention,
    retroactive_enter,
    retroactive_recompute,
    window_order,
)
from .state import RingCache, Rows
from .transformer import EncoderLayerState, eTransformerEncoderLayer

__all__ = ["eRetroactiveEncoderLayer", "RetroactiveState", "accumulator_dtype", "choose_update", "WINDOW_UPDATE_WORK"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the retroactive bookkeeping for a model running in ``dtype``: float32 for float16/bfloat16 (a row's
    sums take up to ``2n`` additions and subtractions; in 8 or 11 mantissa bits they would drift by percents, as in
    flash attention, softmax statistics are kept in float32), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


WINDOW_UPDATE_WORK = 2**22
"""The crossover of :func:`choose_update`: the window update is taken while ``n^2 D <= WINDOW_UPDATE_WORK``.
Measured with ``benchmarks/bench_retroactive.py`` (D = 64, 4 heads, batch 1, one thread, CPU): the window update
costs less than the incremental one at n = 64 and 256 and more from n = 384 (n^2 D = 2^23.2) on."""


def choose_update(window: int, d_model: int) -> tuple[str, str]:
    """Which exact update of a full window of ``n = window`` tokens of ``D = d_model`` features costs less per step,
    and why: ``("window", reason)`` or ``("incremental", reason)``.

    Both updates share the outputs (out-projection, norms and feed-forward of all ``n`` tokens, O(n D^2)); they
    differ in the attention. The incremental update does O(n D) work in about sixty small kernels (so its cost is
    launches, about constant in ``n``); the window recompute does O(n^2 D) work in a handful (one flash-attention
    call). The crossover is where the recompute's ``n^2 D`` outgrows the incremental update's fixed launch cost:
    :data:`WINDOW_UPDATE_WORK`."""
    work = window * window * d_model
    if work <= WINDOW_UPDATE_WORK:
        return "window", (
            f"n^2 D = {work} <= {WINDOW_UPDATE_WORK}: recomputing the window's attention in one block costs less "
            "than the incremental update's ~60 small kernels"
        )
    return "incremental", f"n^2 D = {work} > {WINDOW_UPDATE_WORK}: the O(n D) incremental update costs less"


class eRetroactiveEncoderLayer(nn.Module):
    r"""Full-window streaming of an :class:`eTransformerEncoderLayer` (sharing its weights): after each step, the
    outputs of all ``window`` newest tokens, each attending to all of them.

    Reference: with ``x_w (B, n, D)`` the last ``n`` tokens at stream positions ``p_w``, a step returns
    ``layer(x_w, src_pos=p_w)`` (batch-first), i.e. the batch forward with no mask. With no positional backend, RoPE
    or a relative bias, scores depend only on position differences, so this equals ``layer(x_w)``.
    Equivariant like the layer: streaming ``rho(g) x_t`` gives ``rho(g) y`` for every output of every step (scores,
    hence attention weights and recompute decisions, are invariant).

    Warm-up: before ``n`` tokens have arrived, the ``t`` tokens seen so far attend to each other only and the output is
    left-padded with zeros; :meth:`RetroactiveState.window_positions` gives the position of each output (``-1`` =
    padding).

    Two exact updates of the attention keep one state (a state may take either at any step), chosen by ``update``:
    ``"incremental"`` (the update above, :func:`~streamtx.nn.lowered.retroactive_enter`) and ``"window"`` (every
    query row's bookkeeping recomputed as one block, :func:`~streamtx.nn.lowered.retroactive_recompute`: O(n^2 d)
    work in a few kernels, which costs less for small ``n``); ``"auto"`` picks from the shapes
    (:func:`choose_update`, :meth:`update_choice` says which and why).

    Cost per step: the incremental attention update is O(n d) per new token plus O(n d) per row the guard
    recomputes. On generic data that is O(1) rows per step on average (per head: about 0.2-0.3 on random inputs,
    about 1 when logits of ~100 make every row peaked; measured in the tests and ``benchmarks/bench_retroactive.py``),
    so the amortized cost is O(n d). Worst case (scores where every step removes the dominant key of every row) every
    row is recomputed: O(n^2 d), the cost of the batch attention. Out projection,
    residual, norms and feed-forward depend on the updated attention of every token, so they run on all ``n`` outputs
    each step (O(n d^2), as in continual-inference). Only a first layer can stream this way: a deeper layer's inputs
    all change every step, so it needs a recompute.

    Fast path: at inference (the layer in ``eval()``, no gradient needed) a step runs through the lowered block of
    :meth:`lower` (dense weights, one fused q/k/v matmul, no module dispatch; rebuilt when a parameter changes), over
    the same state; :meth:`why_not_fast_path` says why not otherwise. Both run the same updates
    (:mod:`streamtx.nn.lowered`).

    ``single_output=True``: a step returns only the new tokens' outputs ``(B, D)``, which equal the last row of the
    full-window output, and are exactly the causal-window streaming of :meth:`eTransformerEncoderLayer.forward_step`
    with ``window = n`` (each new query attends to the ``n`` newest keys, computed exactly, O(n d) per token with only
    a key/value ring); this mode delegates to it, so both modes of a model share one API.

    Args:
        layer: the encoder layer whose weights are used (not copied: training the layer updates this module).
        window: ``n``, the number of tokens attending to each other.
        single_output: return only the newest token's output.
        recompute_threshold: recompute a query row exactly when the softmax mass removed from it since its last exact
            computation exceeds this times its remaining mass (``inf``: only once cancellation has left no positive
            mass; accurate only for data without dominant keys). Smaller is more accurate and costs more recomputes.
        update: ``"incremental"``, ``"window"`` or ``"auto"`` (the cheaper for ``window`` and ``D``, see
            :func:`choose_update`); the results agree to rounding.
    """

    def __init__(
        self,
        layer: eTransformerEncoderLayer,
        window: int,
        *,
        single_output: bool = False,
        recompute_threshold: float = 1.0,
        update: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(layer, eTransformerEncoderLayer):
            raise TypeError(f"layer: expected an eTransformerEncoderLayer, got {type(layer).__name__}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive int, got {window!r}")
        if not recompute_threshold > 0:  # also rejects NaN
            raise ValueError(
                f"recompute_threshold: expected a positive number (inf allowed), got {recompute_threshold}"
            )
        if update not in ("auto", *UPDATES):
            raise ValueError(f"update: expected 'auto' or one of {UPDATES}, got {update!r}")
        self.layer, self.window, self._update = layer, window, update
        self.single_output, self.recompute_threshold = bool(single_output), float(recompute_threshold)
        self._layer_modules = tuple(layer.modules())  # what the lowered block is built from (fixed structure)
        self._lowered = WeightCache()

    def forward(self, src: Tensor, src_pos: Tensor | None = None) -> Tensor:
        """The batch reference: the layer's forward with full attention over ``src`` (the layer's batch convention).
        A step's output equals this applied to the window (its last row in single-output mode)."""
        return self.layer(src, src_pos=src_pos)

    # ---------------------------------------------------------------- streaming
    def init_state(
        self, batch_size: int, /, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> RetroactiveState | EncoderLayerState:
        """An empty window for ``batch_size`` streams; ``dtype``/``device`` default to the layer's parameters'.
        Single-output mode returns the layer's own causal-window state."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        ref = self.layer.linear1.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        if self.single_output:
            return self.layer.init_state(batch_size, window=self.window, dtype=dtype, device=device)
        attn = self.layer.self_attn
        head = (attn.num_heads, attn.head_dim)
        fk: dict[str, Any] = {"dtype": accumulator_dtype(dtype), "device": device}
        cache = RingCache(batch_size, self.window, {"x": (attn.embed_dim,), "q": head, "k": head, "v": head}, **fk)
        m, l, r = (torch.zeros(batch_size, self.window, attn.num_heads, **fk) for _ in range(3))
        return RetroactiveState(
            cache,
            m,
            l,
            r,
            torch.zeros(batch_size, self.window, *head, **fk),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def forward_step(
        self, x: Tensor, state: RetroactiveState | EncoderLayerState, /, *, rows: Rows = None
    ) -> tuple[Tensor, RetroactiveState | EncoderLayerState]:
        """Enter new tokens ``x (b, D)`` or ``(b, S, D)`` (batch-first; ``b`` = all rows or ``len(rows)``).

        Returns the outputs of the window after the last of them, ``(b, n, D)`` oldest first, or in single-output
        mode the new tokens' outputs ``(b, D)`` / ``(b, S, D)``; and the state, updated in place."""
        xs = self._check_step(x, state)
        if self.single_output:
            assert isinstance(state, EncoderLayerState)  # checked by _check_step
            return self.layer.forward_step(x, state, rows=rows)
        assert isinstance(state, RetroactiveState)
        if self.training and self.layer.self_attn.dropout > 0:
            raise RuntimeError(
                "forward_step: the retroactive update never forms attention weights, so attention "
                "dropout cannot be applied; call .eval() (or use dropout=0)"
            )
        index = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=state.m.device)
        if not self.why_not_fast_path():
            block = cast(RetroactiveEncoderLayer, self._lowered.get(self._layer_modules, lambda: (self.lower(),))[0])
            return block.step(xs, state, index), state
        for start in range(0, xs.shape[1], self.window):
            self._enter(xs[:, start : start + self.window], state, index)
        return self._window_outputs(state, index), state

    def forward_steps(
        self, x: Tensor, state: RetroactiveState | EncoderLayerState, /, *, rows: Rows = None
    ) -> tuple[Tensor, RetroactiveState | EncoderLayerState]:
        """Stream ``x (b, T, D)`` one token per step; returns every step's output stacked: ``(b, T, n, D)``, or
        ``(b, T, D)`` in single-output mode."""
        if x.dim() != 3:
            raise ValueError(f"x: expected a stream (B, T, {self.layer.in_rep.size}), got shape {tuple(x.shape)}")
        if self.single_output:
            return self.forward_step(x, state, rows=rows)
        steps = [self.forward_step(x[:, t], state, rows=rows)[0] for t in range(x.shape[1])]
        return torch.stack(steps, dim=1), state

    # ---------------------------------------------------------------- internals
    def _check_step(self, x: Tensor, state: RetroactiveState | EncoderLayerState) -> Tensor:
        d = self.layer.in_rep.size
        if not isinstance(x, Tensor) or x.dim() not in (2, 3) or x.shape[-1] != d:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected (B, {d}) or (B, S, {d}), got {shape}")
        ref = self.layer.linear1.weight.dtype
        if x.dtype != ref:
            raise TypeError(f"x: expected dtype {ref} (the layer's), got {x.dtype}")
        expected = EncoderLayerState if self.single_output else RetroactiveState
        if not isinstance(state, expected):
            raise TypeError(
                f"state: expected a {expected.__name__} from this module's init_state, got {type(state).__name__}"
            )
        if self.single_output:
            assert isinstance(state, EncoderLayerState)
            if state.self_attn.window != self.window:
                raise ValueError(f"state: expected a window of {self.window}, got {state.self_attn.window}")
        else:
            assert isinstance(state, RetroactiveState)
            if state.window != self.window:
                raise ValueError(f"state: expected a window of {self.window}, got {state.window}")
            acc = state.m.dtype
            if acc != accumulator_dtype(x.dtype):
                raise TypeError(f"state: expected dtype {accumulator_dtype(x.dtype)} for {x.dtype} inputs, got {acc}")
        return x[:, None] if x.dim() == 2 else x

    def _enter(self, x: Tensor, state: RetroactiveState, rows: Tensor | None) -> None:
        """Enter ``S <= n`` tokens ``x (b, S, D)`` through the module's own projections (differentiable)."""
        attn = self.layer.self_attn
        pos = state.cache.positions(rows)[:, None] + torch.arange(x.shape[1], device=x.device)
        h = cast(nn.Module, self.layer.norm1)(x) if self.layer.norm_first else x  # the attention block's input
        q = attn.project_query(h, pos).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in attn.project_kv(h, h, pos))  # (b, S, H, hd)
        if self.update_choice()[0] == "window":
            retroactive_recompute(state, x, q, k, v, rows, attn.positional.score_bias)
        else:
            retroactive_enter(state, x, q, k, v, pos, rows, attn.positional.score_bias, self.recompute_threshold)

    def _window_outputs(self, state: RetroactiveState, rows: Tensor | None) -> Tensor:
        """Layer outputs of the window, oldest first ``(b, n, D)``, zeros where no token is yet."""
        layer, dtype = self.layer, self.layer.linear1.weight.dtype
        att, x = retroactive_attention(state, rows)
        att = layer.self_attn.out_proj(att.to(dtype))
        # The attention block's input (x or norm1(x)) was used when each token arrived; plug in its output here.
        return window_order(layer.residual(x.to(dtype), [lambda _: att, layer.feed_forward]), state, rows)

    # ---------------------------------------------------------------- fast path and lowering
    def why_not_fast_path(self) -> str:
        """Why :meth:`forward_step` runs module by module rather than through the lowered block (:meth:`lower`,
        built once and rebuilt when a parameter changes); ``""``: it takes the lowered block. The two compute the
        same update (:func:`~streamtx.nn.lowered.retroactive_enter`); only the module path differentiates."""
        if self.layer.training:
            return "the layer is in training mode (the lowered block is for inference: call .eval())"
        if torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for m in self._layer_modules for p in m._parameters.values()
        ):
            return "gradients are enabled and the layer's parameters require them (use torch.no_grad())"
        return ""

    @torch.no_grad()
    def lower(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> RetroactiveEncoderLayer:
        """The full-window step as a lowered block over the same :class:`RetroactiveState` (dense weights, one fused
        q/k/v matmul), for inference; its ``step(x (b, S, D), state, rows)`` returns what :meth:`forward_step`
        does."""
        return RetroactiveEncoderLayer(
            self.layer.lower(dtype, device), self.window, self.recompute_threshold, self.update_choice()[0]
        )

    @property
    def update(self) -> str:
        """The ``update`` argument (``"auto"``, ``"incremental"`` or ``"window"``); fixed at construction."""
        return self._update

    def update_choice(self) -> tuple[str, str]:
        """The update a step takes, ``"incremental"`` or ``"window"``, and why (see :func:`choose_update`)."""
        if self._update != "auto":
            return self._update, f"update={self._update!r} was asked for"
        return choose_update(self.window, self.layer.in_rep.size)

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, single_output={self.single_output}, recompute_threshold={self.recompute_threshold}"
            f", update={self._update!r}"
        )
