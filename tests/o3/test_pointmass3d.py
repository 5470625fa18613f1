"""The 3-D point-mass task and the O(3) path of ``streamtx train``: the expert and the dynamics commute with O(3) and
translations, targets fall in their regions, the expert solves held-out episodes of both regions, the tokens read
back, and a tiny ``streamtx train`` run on the task's demonstrations writes an O(3) policy (and, with
``--no-equivariance``, the plain regressor) that the daemon's loader serves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamtx.apps import o3_demo
from streamtx.apps.o3_demo import train_arguments
from streamtx.apps.serve import load_served_policy
from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.apps.train import main as train_main
from streamtx.checkpoint import load_policy
from streamtx.data import load_npz, save_npz
from streamtx.models import CondTransformerRegressor, O3CondDenoiser
from streamtx.tasks.pointmass3d import PointMassBatch, PointMassExpert, observation_tokens
from streamtx.tasks.pointmass3d.collect import SEEN_HALF_ANGLE, collect_demonstrations, episode_starts
from streamtx.tasks.pointmass3d.env import TOKEN_DIM, state_of_tokens
from streamtx.tasks.pointmass3d.evaluate import ExpertController, PolicyController, held_out_episodes, rollout
from streamtx_client import LocalSession


def _orthogonal(rng: np.random.Generator, improper: bool) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    return -q if improper else q


def test_expert_and_dynamics_commute_with_o3_and_translations() -> None:
    """``expert(g p + t, g v, g q + t) = g expert(p, v, q)`` and a step of the moved state is the moved step, for
    rotations and improper rotations, saturated commands included; float64 within 1e-12."""
    rng = np.random.default_rng(0)
    p, v, q = (rng.standard_normal((64, 3)) * s for s in (0.5, 1.0, 2.0))
    expert = PointMassExpert()
    u = expert(p, v, q)
    assert (np.linalg.norm(u, axis=1) > 0.999).any()  # some commands saturate
    for improper in (False, True):
        g, t = _orthogonal(rng, improper), rng.standard_normal(3)
        np.testing.assert_allclose(expert(p @ g.T + t, v @ g.T, q @ g.T + t), u @ g.T, rtol=0, atol=1e-12)
        sim, moved = PointMassBatch(p, v, q), PointMassBatch(p @ g.T + t, v @ g.T, q @ g.T + t)
        sim.step(u), moved.step(u @ g.T)
        np.testing.assert_allclose(moved.position, sim.position @ g.T + t, rtol=0, atol=1e-12)
        np.testing.assert_allclose(moved.velocity, sim.velocity @ g.T, rtol=0, atol=1e-12)


def test_regions_tokens_and_the_expert_solves_held_out_episodes() -> None:
    """Seen targets lie in the 60-degree cone about +z, unseen ones outside it; tokens read back to the state;
    the expert reaches every held-out target of both regions; episodes are reproducible from their seeds."""
    seen, unseen = held_out_episodes(20, 20)
    angle = lambda q: np.degrees(np.arccos(q[:, 2] / np.linalg.norm(q, axis=1)))  # noqa: E731
    assert angle(seen.target).max() <= math.degrees(SEEN_HALF_ANGLE) < angle(unseen.target).min()
    np.testing.assert_array_equal(episode_starts(seen.seeds, "seen").target, seen.target)
    tokens = observation_tokens(seen.position, seen.velocity, seen.target)
    assert tokens.shape == (20, TOKEN_DIM) and tokens.dtype == np.float32
    for got, want in zip(state_of_tokens(tokens), (seen.position, seen.velocity, seen.target)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for starts in (seen, unseen):
        assert rollout(ExpertController(), starts).success_rate == 1.0
    with pytest.raises(ValueError, match="region: expected 'seen', 'unseen' or 'all'"):
        episode_starts([0], "north")  # type: ignore[arg-type]


def test_streamtx_train_fits_both_policies_on_the_task(tmp_path) -> None:
    """The demo's ``streamtx train`` command lines, shortened to 3 steps on 6 episodes: the dataset's token layout
    makes an ``O3CondDenoiser`` (raw tokens, no normaliser), ``--no-equivariance`` the plain regressor of about the
    same size; both load as policies that the daemon's loader serves and that drive the task's rollout."""
    data = tmp_path / "demos.npz"
    save_npz(data, collect_demonstrations(6, seed=0))
    assert load_npz(data).meta["tokens_num_entities"] == 2
    sizes = {}
    for equivariant, cls in ((True, O3CondDenoiser), (False, CondTransformerRegressor)):
        out = tmp_path / f"{cls.__name__}.pt"
        args = train_arguments(data, out, equivariant=equivariant, steps=3)
        assert train_main([*args, "--val-fraction", "0", "--warmup-steps", "1", "--batch-size", "8"]) == 0
        policy = load_policy(out)
        assert type(policy.model) is cls and policy.obs_dim == TOKEN_DIM and policy.action_dim == 3
        sizes[equivariant] = sum(p.numel() for p in policy.model.parameters())
        served = load_served_policy(out, "cpu", None, 1)
        assert isinstance(served, TorchBatchPolicy) and served.obs_dim == TOKEN_DIM
        result = rollout(PolicyController(policy), episode_starts([5, 6], "unseen"), steps=3)
        assert np.isfinite(result.final_distance).all()
        chunk = LocalSession(served, seed=1).step(episode_starts([5], "all").batch().tokens()[0])
        assert chunk.shape == (4, 3) and np.isfinite(chunk).all()
    assert 0.8 < sizes[True] / sizes[False] < 1.2  # "a plain model of the same size"
    torch.manual_seed(0)  # the trainer seeded the global generator: leave it as the suite's fixture does


@pytest.mark.slow
def test_o3_demo_command_runs_end_to_end(tmp_path, capsys) -> None:
    """``streamtx o3-demo`` at toy sizes (2 training steps, 2 targets per region, 1 served episode each): collects,
    trains both policies, serves each by a daemon child process on 127.0.0.1 and prints the table."""
    args = ["--episodes", "4", "--steps", "2", "--targets", "2", "--served", "1", "--workdir", str(tmp_path), "--quiet"]
    assert o3_demo.main(args) == 0
    out = capsys.readouterr().out
    assert "O3CondDenoiser (equivariant)" in out and "CondTransformerRegressor (plain)" in out
    assert "daemon: 120 control steps per policy" in out
    assert (tmp_path / "o3.pt").is_file() and (tmp_path / "plain.pt").is_file()
    torch.manual_seed(0)


def test_o3_training_with_ddim_resumes_exactly_from_a_periodic_checkpoint(tmp_path) -> None:
    """``streamtx train`` of the O(3) policy with the DDIM sampler, resumed from a periodic checkpoint (by a run of
    another seed), ends with the weights of the uninterrupted run; resuming it into the plain model is refused."""
    data = tmp_path / "demos.npz"
    save_npz(data, collect_demonstrations(4, seed=1))
    tiny = ["--dim", "4", "--max-degree", "1", "--action-horizon", "2", "--obs-horizon", "1", "--cond-layers", "1"]
    tiny += ["--layers", "1", "--heads", "1", "--steps", "4", "--batch-size", "8", "--sampler", "ddim"]
    tiny += ["--val-fraction", "0", "--warmup-steps", "1", "--dtype", "float64", "--quiet"]
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    assert train_main([str(data), "--out", str(full), *tiny, "--checkpoint-every", "2"]) == 0
    midway = tmp_path / "full.step-2.pt"
    # another seed: only a real resume (weights, optimizer, batches and noise restored) gives the same end
    assert train_main([str(data), "--out", str(resumed), *tiny, "--seed", "5", "--resume", str(midway)]) == 0
    a, b = load_policy(full, dtype=torch.float64), load_policy(resumed, dtype=torch.float64)
    assert a.sampler.config()["type"] == "ddim"
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(SystemExit, match="is a O3CondDenoiser"):
        train_main([str(data), "--out", str(tmp_path / "x.pt"), *tiny, "--no-equivariance", "--resume", str(midway)])
    torch.manual_seed(0)
