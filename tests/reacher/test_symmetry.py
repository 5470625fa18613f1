"""The C2 mirror symmetry of Reacher-v5: the representations, checked against the simulator itself."""

import numpy as np
import pytest

from streamtx.symmetry import cyclic, dihedral
from streamtx.tasks.reacher.expert import ReacherExpert
from streamtx.tasks.reacher.symmetry import (
    action_rep,
    observation_rep,
    reflect_action,
    reflect_observation,
    reflect_state,
)

gym = pytest.importorskip("gymnasium")
from streamtx.tasks.reacher.env import make_env, reset_episode  # noqa: E402


def test_representations_are_the_sign_flips():
    obs, act = observation_rep(), action_rep()
    assert obs.group.order == 2 and act.group == obs.group
    np.testing.assert_array_equal(obs(0), np.eye(10))
    # the mirror about the x-axis, written out: cos q stays, sin q flips, target y and velocities flip
    np.testing.assert_array_equal(obs(1), np.diag([1, 1, -1, -1, 1, -1, -1, -1, 1, -1]))
    np.testing.assert_array_equal(act(1), -np.eye(2))
    x = np.random.default_rng(0).standard_normal((5, 10))
    np.testing.assert_array_equal(reflect_observation(x), x @ obs(1).T)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="group"):
        observation_rep(dihedral(2))
    with pytest.raises(ValueError, match="obs"):
        reflect_observation(np.zeros(9))
    with pytest.raises(ValueError, match="qpos"):
        reflect_state(np.zeros(3), np.zeros(4))
    assert observation_rep(cyclic(2)) == observation_rep()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulator_commutes_with_the_reflection(seed):
    """Reflect a state, step both copies with mirrored random torques: the observations stay mirror images."""
    rng = np.random.default_rng(seed)
    env, mirror = make_env(), make_env()
    obs = reset_episode(env, seed)
    mirror.reset(seed=seed)
    qpos, qvel = reflect_state(env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy())
    mirror.unwrapped.set_state(qpos, qvel)
    mirrored = mirror.unwrapped._get_obs()
    np.testing.assert_allclose(mirrored, reflect_observation(obs), atol=1e-12)
    for _ in range(30):
        a = rng.uniform(-1, 1, size=2).astype(np.float32)
        obs, reward, *_ = env.step(a)
        mirrored, mirrored_reward, *_ = mirror.step(reflect_action(a))
        np.testing.assert_allclose(mirrored, reflect_observation(obs), atol=1e-9)
        assert mirrored_reward == pytest.approx(reward, abs=1e-9)
    assert np.abs(obs[[2, 3, 5, 6, 7, 9]]).max() > 1e-3  # the test saw non-trivial mirrored coordinates


def test_half_plane_resets_are_mirror_images():
    env = make_env()
    for seed in range(20):
        upper = reset_episode(env, seed, "upper")
        lower = reset_episode(env, seed, "lower")
        assert upper[5] > 0 > lower[5]
        np.testing.assert_allclose(lower, reflect_observation(upper), atol=1e-12)
    with pytest.raises(ValueError, match="half"):
        reset_episode(env, 0, "left")


def test_expert_is_equivariant():
    env = make_env()
    expert = ReacherExpert()
    obs = []
    for seed in range(10):
        o = reset_episode(env, seed)
        for _ in range(10):
            obs.append(o)
            o, *_ = env.step(expert(o).astype(np.float32))
    obs = np.array(obs)
    np.testing.assert_allclose(expert(reflect_observation(obs)), reflect_action(expert(obs)), atol=1e-12)
