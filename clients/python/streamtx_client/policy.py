"""The one policy interface of the serving boundary, numpy in and numpy out, and the in-process session over it.

:class:`BatchPolicy` is what the daemon serves (``streamtx.apps.served_policy`` adapts the torch policy to it): a
batched streaming state with one row per session, driven row-indexed. :class:`PolicySession` is what a robot holds:
the SDK's :class:`~streamtx_client.Session` (over the wire), and :class:`LocalSession` (in-process, over any
:class:`BatchPolicy`) have it, so code written against one runs against the other, as openpi's ``BasePolicy`` serves
both its client and its server.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

import numpy as np

__all__ = ["BatchPolicy", "PolicySession", "LocalSession", "MAX_SEED", "check_seed"]

MAX_SEED = 2**63 - 1


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``seed`` as an int in ``[0, 2**63 - 1]`` (what the wire carries), or None; ValueError naming it otherwise."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{name}: expected an int in [0, 2**63 - 1] or None, got {seed!r}")
    return int(seed)


class BatchPolicy(Protocol):
    """A streaming policy over a batched state of ``b`` rows, numpy in and numpy out.

    ``reset(state, rows, seeds, steps)`` empties rows and sets each one's seed and control-step counter (a row's next
    action chunk's noise is drawn from both); ``observe`` feeds ``(n, S, obs_dim)`` tokens to ``n`` rows; ``act``
    returns ``(n, horizon, action_dim)`` chunks. ``rows`` is an int64 array of distinct row indices. A row's results
    depend only on its own calls, never on which rows share a call. ``receptive_field``: the number of observation
    tokens a row's state depends on (a client replays that many to rebuild a session). ``dtype``: the numpy dtype
    inputs are cast to before the model sees them (where the daemon checks them for finiteness).
    """

    obs_dim: int
    action_dim: int
    horizon: int
    max_tokens_per_step: int
    receptive_field: int
    dtype: np.dtype[Any]

    def metadata(self) -> dict[str, Any]: ...
    def init_state(self, batch_size: int) -> Any: ...
    def reset(self, state: Any, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None: ...
    def observe(self, state: Any, obs: np.ndarray, rows: np.ndarray) -> None: ...
    def act(self, state: Any, rows: np.ndarray) -> np.ndarray: ...


class PolicySession(Protocol):
    """One robot stream: feed observation tokens ``(obs_dim,)`` or ``(S, obs_dim)``, get action chunks
    ``(horizon, action_dim)``."""

    @property
    def id(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def horizon(self) -> int: ...
    def step(self, obs: Any) -> np.ndarray | None: ...
    def observe(self, obs: Any) -> None: ...
    def reset(self, seed: int | None = None) -> int: ...
    def close(self) -> None: ...


class LocalSession:
    """A :class:`PolicySession` run in-process on a one-row state of ``policy`` (the reference a served session must
    equal, and a robot's loop without a daemon)."""

    def __init__(self, policy: BatchPolicy, seed: int | None = None, session_id: str = "local") -> None:
        self.policy = policy
        self._id = session_id
        self._state = policy.init_state(1)
        self._row = np.zeros(1, np.int64)
        self._seed = 0
        self.reset(seed)

    @property
    def id(self) -> str:
        return self._id

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def horizon(self) -> int:
        return self.policy.horizon

    def _tokens(self, obs: Any) -> np.ndarray:
        tokens = np.asarray(obs, dtype=self.policy.dtype)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or tokens.shape[1] != self.policy.obs_dim:
            raise ValueError(
                f"obs: expected shape ({self.policy.obs_dim},) or (S, {self.policy.obs_dim}), got {np.shape(obs)}"
            )
        return tokens[None]

    def observe(self, obs: Any) -> None:
        self.policy.observe(self._state, self._tokens(obs), self._row)

    def step(self, obs: Any) -> np.ndarray:
        self.observe(obs)
        return self.policy.act(self._state, self._row)[0]

    def reset(self, seed: int | None = None) -> int:
        checked = check_seed(seed)
        self._seed = secrets.randbelow(MAX_SEED) if checked is None else checked
        self.policy.reset(self._state, self._row, np.array([self._seed], np.int64), np.zeros(1, np.int64))
        return self._seed

    def close(self) -> None:
        self._state = None

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalSession(id={self._id!r}, seed={self._seed})"
