"""The responsiveness measure of the streaming-vs-K-step comparison (streamtx.tasks.reacher.responsiveness): the
target really moves, the scripted expert turns toward it within a few control steps and reaches it, and a controller
that ignores it never covers a quarter of the way (counted as never, not as fast)."""

import numpy as np
import pytest

from streamtx.tasks.reacher.evaluate import ExpertController
from streamtx.tasks.reacher.responsiveness import moved_target, run_moved_target

pytest.importorskip("gymnasium")


class Still:
    """Zero torque: the arm coasts, whatever the target does."""

    def reset(self, seed: int) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(2)


def test_the_expert_turns_toward_a_moved_target_and_a_still_arm_does_not():
    seeds = list(range(2_000_000, 2_000_006))
    expert = run_moved_target(ExpertController(), seeds, half="upper", progress=False)
    assert bool((expert.target[:, 1] > 0).all())  # the new targets stay in the requested half-plane
    assert float(np.median(expert.turn)) <= 3 and expert.reached.mean() >= 5 / 6
    still = run_moved_target(Still(), seeds, half="upper", progress=False)
    after = still.path.shape[1] - 1
    assert bool((still.quarter == after + 1).all()) and not still.reached.any() and still.never >= len(seeds)


def test_moved_targets_are_seeded_reachable_and_far_enough():
    old = np.array([0.1, 0.05])
    targets = np.stack([moved_target(s, old, "lower") for s in range(50)])
    assert np.array_equal(targets[3], moved_target(3, old, "lower"))
    assert bool((np.linalg.norm(targets - old, axis=1) >= 0.1).all() and (targets[:, 1] < 0).all())
    assert bool((np.linalg.norm(targets, axis=1) < 0.2).all())
