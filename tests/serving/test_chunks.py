"""ActionChunkBuffer: execute-n playback and temporal ensembling, with explicit expected actions."""

from __future__ import annotations

import numpy as np
import pytest

from streamtx_client import ActionChunkBuffer


def chunk(start: float, horizon: int = 4) -> np.ndarray:
    """Chunk whose i-th action is ``[start + i, -(start + i)]``."""
    a = start + np.arange(horizon, dtype=np.float64)
    return np.stack([a, -a], axis=1)


def test_execute_n_plays_each_chunk_prefix() -> None:
    buf = ActionChunkBuffer(horizon=4, execute=2)
    played = []
    for t in range(6):
        if buf.needs_chunk:
            buf.add(chunk(100.0 * t))
        played.append(buf.pop()[0])
    assert played == [0.0, 1.0, 200.0, 201.0, 400.0, 401.0]


def test_temporal_ensembling_weights_older_chunks_exponentially() -> None:
    m = 0.5
    buf = ActionChunkBuffer(horizon=4, execute=1, ensemble_decay=m)
    out = []
    for t in range(3):
        buf.add(chunk(10.0 * t))
        out.append(buf.pop()[0])
    # tick 2 sees predictions 2 (chunk 0), 11 (chunk 1), 20 (chunk 2), oldest first with weights exp(-m i)
    w = np.exp(-m * np.arange(3))
    assert out[0] == 0.0
    np.testing.assert_allclose(out[1], (w[:2] @ [1.0, 10.0]) / w[:2].sum(), rtol=1e-12)
    np.testing.assert_allclose(out[2], (w @ [2.0, 11.0, 20.0]) / w.sum(), rtol=1e-12)


def test_zero_decay_is_the_plain_mean_and_expired_chunks_drop_out() -> None:
    buf = ActionChunkBuffer(horizon=2, execute=1, ensemble_decay=0.0)
    buf.add(chunk(0.0, 2))
    buf.pop()
    buf.add(chunk(10.0, 2))
    assert buf.pop()[0] == pytest.approx((1.0 + 10.0) / 2)
    buf.add(chunk(20.0, 2))
    assert buf.pop()[0] == pytest.approx((11.0 + 20.0) / 2)  # chunk 0 (ticks 0..1) no longer covers tick 2


def test_popped_actions_are_copies() -> None:
    buf = ActionChunkBuffer(horizon=2, execute=2)
    buf.add(chunk(0.0, 2))
    buf.pop()[:] = 99.0
    assert buf.pop()[0] == 1.0


def test_running_dry_and_bad_chunks_raise() -> None:
    buf = ActionChunkBuffer(horizon=2, execute=2)
    with pytest.raises(RuntimeError, match="add one first"):
        buf.pop()
    with pytest.raises(ValueError, match=r"shape \(2, action_dim\)"):
        buf.add(np.zeros((3, 2)))
    with pytest.raises(TypeError, match="numpy array"):
        buf.add(None)  # type: ignore[arg-type]
    buf.add(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="like the previous one"):
        buf.add(np.zeros((2, 3)))
    buf.clear()
    assert buf.tick == 0 and buf.needs_chunk


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(horizon=0, execute=1),
        dict(horizon=4, execute=5),
        dict(horizon=4, execute=0),
        dict(horizon=4, execute=1, ensemble_decay=np.nan),
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ActionChunkBuffer(**kwargs)
