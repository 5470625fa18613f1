"""Scripted robot streams and their uninterrupted reference, shared by the replay tests and the Ray scenarios."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from streamtx_client import LocalSession

OBS_DIM = 4  # the random checkpoint's observation width
Step = tuple[np.ndarray, bool]  # observation tokens (S, obs_dim), and whether actions are asked for


def script_step(rng: np.random.Generator, t: int, max_tokens: int) -> Step:
    """One control step: 1..max_tokens tokens; every third step only observes."""
    tokens = int(rng.integers(1, max_tokens + 1))
    return rng.standard_normal((tokens, OBS_DIM)).astype(np.float32), t % 3 != 2


def script(steps: int, seed: int, max_tokens: int) -> list[Step]:
    rng = np.random.default_rng(seed)
    return [script_step(rng, t, max_tokens) for t in range(steps)]


def endless(seed: int, max_tokens: int) -> Iterator[Step]:
    """The same stream as :func:`script`, as long as it is read (for scenarios whose length events decide)."""
    rng = np.random.default_rng(seed)
    t = 0
    while True:
        yield script_step(rng, t, max_tokens)
        t += 1


def reference_step(reference: LocalSession, step: Step) -> np.ndarray | None:
    obs, act = step
    return reference.step(obs) if act else reference.observe(obs)


def assert_same_action(got: np.ndarray | None, want: np.ndarray | None, where: Any) -> None:
    """float32 actions equal to the reference's within 1e-6 of their scale (the same computation, batched)."""
    assert (got is None) == (want is None), where
    if want is not None:
        assert got is not None
        np.testing.assert_allclose(
            got, want, rtol=0, atol=1e-6 * max(1.0, float(np.abs(want).max())), err_msg=f"{where}"
        )
