"""The scripted expert: exact inverse kinematics, and it reaches the target."""

import numpy as np
import pytest

from streamtx.tasks.reacher.expert import LINK1, LINK2, ReacherExpert, inverse_kinematics


def _forward_kinematics(q: np.ndarray) -> np.ndarray:
    q1, q12 = q[..., 0], q[..., 0] + q[..., 1]
    return np.stack([LINK1 * np.cos(q1) + LINK2 * np.cos(q12), LINK1 * np.sin(q1) + LINK2 * np.sin(q12)], -1)


def test_inverse_kinematics_reaches_reachable_targets():
    rng = np.random.default_rng(0)
    r = rng.uniform(0.02, 0.2, 200)
    phi = rng.uniform(-np.pi, np.pi, 200)
    target = np.stack([r * np.cos(phi), r * np.sin(phi)], -1)
    sols = inverse_kinematics(target)
    assert sols.shape == (2, 200, 2)
    for q in sols:
        np.testing.assert_allclose(_forward_kinematics(q), target, atol=1e-12)
    np.testing.assert_allclose(sols[0, :, 1], -sols[1, :, 1])  # the two elbows


def test_expert_rejects_bad_input():
    with pytest.raises(ValueError, match="obs"):
        ReacherExpert()(np.zeros(8))
    with pytest.raises(ValueError, match="kp"):
        ReacherExpert(kp=0.0)


def test_expert_reaches_the_target():
    pytest.importorskip("gymnasium")
    from streamtx.tasks.reacher.collect import collect_demonstrations

    data = collect_demonstrations(40, seed=123, progress=False)
    assert (data["final_distance"] < 0.02).mean() >= 0.95
    assert np.abs(data["actions"]).max() <= 1.0
