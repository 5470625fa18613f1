"""Streaming state: ring buffers of per-token tensors and the state containers built from them.

Every streaming module keeps what it must remember of the past in a :class:`RingCache` (keys and values of attention,
or any other per-token tensors) and groups its caches in a :class:`StreamState` dataclass. States are updated in place
by ``forward_step`` (no per-step copy of a whole cache: a step writes ``S`` slots and reads the ring through a mask),
and every state supports the same operations, walked recursively over its fields:

* ``reset(rows)``: forget the past of some batch rows (a robot session restarts) without touching the others,
* ``clone()``, ``to(device/dtype)``,
* ``state_dict()`` / ``load_state_dict()``: a snapshot of a session, e.g. to move it to another process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Self  # typing.Self is 3.11+; torch depends on typing_extensions

__all__ = ["RingCache", "StreamState", "Rows", "band_mask", "additive_mask"]

Rows = Tensor | Sequence[int] | None
"""Batch rows a streaming call touches: ``None`` for all rows, else a 1-D index of distinct rows."""


def _as_rows(rows: Rows, device: torch.device) -> Tensor | None:
    if rows is None:
        return None
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    if rows.dim() != 1:
        raise ValueError(f"rows: expected a 1-D index of batch rows, got shape {tuple(rows.shape)}")
    return rows


class RingCache:
    """The last ``capacity`` tokens of each batch row, for any number of named per-token tensors.

    ``data[name]`` has shape ``(B, capacity, *shape)``; token number ``p`` of a row (counted from the row's last reset)
    lives in slot ``p % capacity`` and ``pos[b, slot]`` holds ``p`` (``-1``: empty). Readers mask by ``pos``, so the
    ring never needs to be rolled or concatenated.

    Args:
        batch_size: number of independent streams ``B``.
        capacity: slots per row.
        fields: name -> per-token shape, e.g. ``{"k": (H, hd), "v": (H, hd)}``.
        extra_slots: pinned slots after the ring, written only by :meth:`write_extra` (tokens that are replaced
            rather than appended, e.g. the diffusion-step token that joins a cached memory); ``read`` returns ring and
            pinned slots together, so attention over both needs no concatenation.
        dtype, device: of the data tensors (positions are int64).
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        fields: Mapping[str, tuple[int, ...]],
        *,
        extra_slots: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        if extra_slots < 0:
            raise ValueError(f"extra_slots: expected >= 0, got {extra_slots}")
        self.capacity, self.extra_slots = int(capacity), int(extra_slots)
        total = self.capacity + self.extra_slots
        self.data = {
            name: torch.zeros(batch_size, total, *shape, dtype=dtype, device=device) for name, shape in fields.items()
        }
        self.pos = torch.full((batch_size, total), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def append(self, values: Mapping[str, Tensor], rows: Rows = None) -> Tensor:
        """Write ``S`` new tokens per row (``values[name]``: ``(b, S, *shape)``); returns their positions ``(b, S)``."""
        rows_t = _as_rows(rows, self.device)
        if set(values) != set(self.data):
            raise ValueError(f"values: expected fields {sorted(self.data)}, got {sorted(values)}")
        first = next(iter(values.values()))
        b, s = first.shape[:2]
        expected_b = self.batch_size if rows_t is None else rows_t.numel()
        if b != expected_b:
            raise ValueError(f"values: expected {expected_b} batch rows, got {b}")
        if s > self.capacity:
            raise ValueError(f"values: {s} tokens do not fit a ring of capacity {self.capacity}")
        base = self.next_pos if rows_t is None else self.next_pos[rows_t]
        positions = base[:, None] + torch.arange(s, device=self.device)
        slots = positions % self.capacity
        row_idx = (torch.arange(b, device=self.device) if rows_t is None else rows_t)[:, None].expand(b, s)
        for name, buf in self.data.items():
            buf[row_idx, slots] = values[name].to(buf.dtype)
        self.pos[row_idx, slots] = positions
        if rows_t is None:
            self.next_pos += s
        else:
            self.next_pos[rows_t] = base + s
        return positions

    def write_extra(self, values: Mapping[str, Tensor], pos: Tensor, rows: Rows = None) -> None:
        """Overwrite the pinned slots with ``values[name] (b, extra_slots, *shape)`` at positions ``pos (b, E)``."""
        rows_t = _as_rows(rows, self.device)
        if pos.shape[-1] != self.extra_slots:
            raise ValueError(f"pos: expected {self.extra_slots} pinned tokens per row, got {pos.shape[-1]}")
        index = slice(None) if rows_t is None else rows_t
        for name, buf in self.data.items():
            buf[index, self.capacity :] = values[name].to(buf.dtype)
        self.pos[index, self.capacity :] = pos

    def read(self, rows: Rows = None) -> tuple[dict[str, Tensor], Tensor]:
        """Ring and pinned slots of the given rows: ``({name: (b, C, *shape)}, pos (b, C))``, ``C = capacity +
        extra_slots`` (views when all rows)."""
        rows_t = _as_rows(rows, self.device)
        if rows_t is None:
            return self.data, self.pos
        return {name: buf[rows_t] for name, buf in self.data.items()}, self.pos[rows_t]

    def positions(self, rows: Rows = None) -> Tensor:
        """Position the next token of each row will get, ``(b,)``."""
        rows_t = _as_rows(rows, self.device)
        return self.next_pos if rows_t is None else self.next_pos[rows_t]

    def reset(self, rows: Rows = None) -> None:
        """Empty the given rows (all rows if ``None``); other rows are untouched."""
        rows_t = _as_rows(rows, self.device)
        index = slice(None) if rows_t is None else rows_t
        for buf in self.data.values():
            buf[index] = 0  # zeros, not garbage: masked slots must never inject NaN into 0 * value
        self.pos[index] = -1
        self.next_pos[index] = 0

    def export_window(self, last: int, rows: Rows = None) -> dict[str, Tensor]:
        """The ``last`` newest tokens of each row in a layout that does not depend on the ring's capacity (copies):
        ``{field: (b, last, *shape)}``, oldest first and the newest last (slots before a row's first token hold
        zeros), and ``"next_pos": (b,)``, the tokens the row has taken since its reset. :meth:`load_window` writes it
        into a ring of any capacity ``>= last``: the past a stream still reads moves between rings of other sizes
        (e.g. sized for more tokens per step), rows and devices."""
        if not 0 <= last <= self.capacity:
            raise ValueError(f"last: expected 0..{self.capacity} tokens (the ring's capacity), got {last}")
        rows_t = _as_rows(rows, self.device)
        next_pos = self.positions(rows_t).clone()
        p = next_pos[:, None] - last + torch.arange(last, device=self.device)  # (b, last) positions, oldest first
        row_idx = (torch.arange(self.batch_size, device=self.device) if rows_t is None else rows_t)[:, None]
        valid = p >= 0
        out = {}
        for name, buf in self.data.items():
            x = buf[row_idx.expand_as(p), p % self.capacity]
            out[name] = x.masked_fill(~valid.view(*valid.shape, *(1,) * (x.dim() - 2)), 0)
        out["next_pos"] = next_pos
        return out

    def load_window(self, window: Mapping[str, Tensor], rows: Rows = None) -> None:
        """Replace the given rows by an :meth:`export_window` of any ring with the same fields (on any device, in
        any dtype: values are cast to this ring's); the pinned slots are emptied (writers refill them)."""
        expected = {*self.data, "next_pos"}
        if set(window) != expected:
            raise ValueError(f"window: expected keys {sorted(expected)}, got {sorted(window)}")
        rows_t = _as_rows(rows, self.device)
        b = self.batch_size if rows_t is None else rows_t.numel()
        next_pos = window["next_pos"].to(self.device, torch.long)
        if next_pos.shape != (b,) or bool((next_pos < 0).any()):
            raise ValueError(f"window['next_pos']: expected ({b},) token counts >= 0, got {window['next_pos']!r}")
        last = window[next(iter(self.data))].shape[1] if self.data else 0
        if last > self.capacity:
            raise ValueError(f"window: {last} tokens do not fit a ring of capacity {self.capacity}")
        for name, buf in self.data.items():
            shape = (b, last, *buf.shape[2:])
            if tuple(window[name].shape) != shape:
                raise ValueError(f"window[{name!r}]: expected shape {shape}, got {tuple(window[name].shape)}")
        self.reset(rows_t)
        p = next_pos[:, None] - last + torch.arange(last, device=self.device)
        row_idx = (torch.arange(self.batch_size, device=self.device) if rows_t is None else rows_t)[:, None]
        valid = p >= 0
        r, slots = row_idx.expand_as(p)[valid], (p % self.capacity)[valid]
        for name, buf in self.data.items():
            buf[r, slots] = window[name].to(buf.device, buf.dtype)[valid]
        self.pos[r, slots] = p[valid]
        self.next_pos[slice(None) if rows_t is None else rows_t] = next_pos

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the ring by name (``data.<field>``, ``pos``, ``next_pos``), not copied."""
        return {**{f"data.{k}": v for k, v in self.data.items()}, "pos": self.pos, "next_pos": self.next_pos}

    def apply(self, fn: Callable[[Tensor], Tensor]) -> RingCache:
        """A ring of the same geometry whose tensors are ``fn`` of these (a copy, a move to another device)."""
        new = object.__new__(RingCache)
        new.capacity, new.extra_slots = self.capacity, self.extra_slots
        new.data = {k: fn(v) for k, v in self.data.items()}
        new.pos, new.next_pos = fn(self.pos), fn(self.next_pos)
        return new

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={tuple(v.shape[2:])}" for k, v in self.data.items())
        return f"RingCache(batch_size={self.batch_size}, capacity={self.capacity}, {fields})"


def band_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, *, causal: bool = True) -> Tensor:
    """Boolean attention mask (True = attend) from token positions: key ``j`` is visible to query ``i`` iff it exists
    (``k_pos >= 0``), is not in the future (``k_pos <= q_pos`` when ``causal``) and is within the window
    (``q_pos - k_pos < window``).

    Shapes: ``q_pos (..., Lq)``, ``k_pos (..., Lk)`` -> ``(..., Lq, Lk)``. This one function defines the streaming
    contract: the batch reference and ``forward_step`` both call it.
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    ok = k_pos[..., None, :] >= 0
    if causal:
        ok = ok & (diff >= 0)
    if window is not None:
        ok = ok & (diff < window)
    return ok


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = attend) as an additive one: 0 where allowed, ``-inf`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


class StreamState:
    """Base of the state dataclasses of streaming modules; operations walk the fields recursively.

    Fields may be :class:`RingCache`, :class:`StreamState`, tensors with the batch dimension first, lists of these, or
    plain Python values (copied as they are).
    """

    def reset(self, rows: Rows = None) -> None:
        """Forget the past of the given batch rows (all if ``None``), in place."""
        for _, value in _fields(self):
            _reset(value, rows)

    def clone(self) -> Self:
        """A deep copy: stepping the clone leaves this state unchanged."""
        return _map(self, lambda t: t.clone())

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """Like ``Tensor.to``; floating tensors change dtype, integer positions keep theirs."""

        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
            return t.to(device) if device is not None else t

        return _map(self, move)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """A state of the same structure whose tensors are ``fn`` of these (e.g. a view of a range of rows:
        ``state.apply(lambda t: t[a:b])``, which steps rows ``a..b-1`` in place)."""
        return _map(self, fn)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by its dotted name, in one fixed walk order, not copied (:meth:`state_dict` copies)."""
        out: dict[str, Tensor] = {}
        _flatten(self, "", out, copy=False)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{dotted.name: tensor}`` snapshot (tensors are copies)."""
        out: dict[str, Tensor] = {}
        _flatten(self, "", out)
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a snapshot taken from a state of the same structure, in place."""
        mine = self.state_dict()
        missing, unexpected = set(mine) - set(state), set(state) - set(mine)
        if missing or unexpected:
            raise ValueError(f"state: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        targets: dict[str, Tensor] = {}
        _flatten(self, "", targets, copy=False)
        for name, t in targets.items():
            if t.shape != state[name].shape:
                raise ValueError(f"state[{name!r}]: expected shape {tuple(t.shape)}, got {tuple(state[name].shape)}")
            t.copy_(state[name])


def _reset(value: Any, rows: Rows) -> None:
    if isinstance(value, (RingCache, StreamState)):
        value.reset(rows)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _reset(v, rows)
    elif isinstance(value, Tensor):
        rows_t = _as_rows(rows, value.device)
        value[slice(None) if rows_t is None else rows_t] = 0


def _fields(state: StreamState) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(state):  # type: ignore[arg-type]
        yield f.name, getattr(state, f.name)


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, RingCache):
        return value.apply(fn)
    if isinstance(value, StreamState):
        return dataclasses.replace(value, **{name: _map(v, fn) for name, v in _fields(value)})  # type: ignore
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, Tensor):
        return fn(value)
    return value


def _flatten(value: Any, prefix: str, out: dict[str, Tensor], copy: bool = True) -> None:
    if isinstance(value, StreamState):
        for name, v in _fields(value):
            _flatten(v, f"{prefix}{name}.", out, copy)
    elif isinstance(value, RingCache):
        for name, t in value.tensors().items():
            out[f"{prefix}{name}"] = t.clone() if copy else t
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}{i}.", out, copy)
    elif isinstance(value, Tensor):
        out[prefix.rstrip(".")] = value.clone() if copy else value
