"""The streaming denoising policy: a persistent per-row action buffer, one (or a few) denoiser evaluations per
control step. Reference equivalence with the explicit definition on the batch model over >= 500 control steps, and
the semantics the K-step sampler has none of: initialisation, observe-only ticks, execute > 1, per-row phases in one
batch, snapshots, resets and replay."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from streaming_denoise_testing import ReferenceRow, close, tiny_model

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.policy import DDIMSampler, FlowMatchingSampler
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy

CASES = {
    "flow-e1-n1": (FlowMatchingSampler(4, noise_chunk=1), 1, 1),
    "flow-e2-n2": (FlowMatchingSampler(4, noise_chunk=2), 2, 2),
    "ddim-e1-n2": (DDIMSampler(40, 4, noise_chunk=1), 1, 2),
    "ddim-e2-n1": (DDIMSampler(40, 4, noise_chunk=2), 2, 1),
}


def _policy(case: str, horizon: int = 4, **model) -> StreamingDenoisePolicy:
    sampler, execute, substeps = CASES[case]
    return StreamingDenoisePolicy(tiny_model(horizon, **model), sampler, execute=execute, substeps=substeps)


def _stream(steps: int, rows: int, seed: int = 0):
    """Observation tokens ``(steps, rows, 4)``, whether each row acts, and whether it is reset, per step."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(steps, rows, 4, generator=g, dtype=torch.float64)
    acts = torch.rand(steps, rows, generator=g) < 0.7  # observe-only ticks in between
    resets = torch.rand(steps, rows, generator=g) < 0.01  # rows reset at different times: phases differ
    return obs, acts, resets


def _reference_equivalence(case: str, steps: int) -> None:
    policy = _policy(case)
    rows = 3
    seeds = [11, 12, 13]
    state = policy.init_state(rows)
    policy.reset(state, seed=seeds)
    refs = [ReferenceRow(policy.model, policy.sampler, policy.execute, policy.substeps, s) for s in seeds]
    obs, acts, resets = _stream(steps, rows)
    compared = 0
    for t in range(steps):
        for r in torch.nonzero(resets[t])[:, 0].tolist():
            policy.reset(state, rows=[r], seed=seeds[r] + t)
            refs[r].reset(seeds[r] + t)
        policy.observe(state, obs[t][:, None])
        for r in range(rows):
            refs[r].observe(obs[t, r])
        acting = torch.nonzero(acts[t])[:, 0].tolist()
        if not acting:
            continue
        chunk = policy.act(state, rows=acting)
        for i, r in enumerate(acting):
            want_chunk, want_buffer = refs[r].act()
            assert close(chunk[i], want_chunk), (t, r)
            assert close(state.buffer[r], want_buffer), (t, r)
            compared += 1
    assert compared >= steps  # >= `steps` control steps compared (rows act on ~70% of the ticks)


def test_streamed_buffer_equals_the_reference_over_500_control_steps():
    _reference_equivalence("flow-e1-n1", 500)


@pytest.mark.parametrize("case, steps", [("ddim-e2-n1", 100), ("flow-e2-n2", 60), ("ddim-e1-n2", 60)])
def test_streamed_buffer_equals_the_reference_with_ddim_substeps_and_chunks(case, steps):
    _reference_equivalence(case, steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_buffer_equals_the_reference_over_600_control_steps_every_case(case):
    _reference_equivalence(case, 600)


def _count_evaluations(policy, state, rows=None) -> int:
    with mock.patch.object(policy.model, "denoise", wraps=policy.model.denoise) as spy:
        policy.act(state, rows)
    return spy.call_count


def test_one_evaluation_per_control_step_after_an_initialising_full_denoise():
    policy = _policy("flow-e1-n1")
    state = policy.init_state(2)
    policy.observe(state, torch.randn(2, 4, dtype=torch.float64))
    assert _count_evaluations(policy, state) == 4  # L = Tx / e * n levels
    for _ in range(3):
        policy.observe(state, torch.randn(2, 4, dtype=torch.float64))
        assert _count_evaluations(policy, state) == 1
    policy.reset(state, rows=[1])  # row 1 initialises again, row 0 does not: two phases in one call
    policy.observe(state, torch.randn(2, 4, dtype=torch.float64))
    assert _count_evaluations(policy, state) == 4 + 1
    assert policy.metadata()["num_evaluations"] == 1 and policy.metadata()["streaming_denoise"]["buffer"] == 3


def test_observe_only_ticks_leave_the_buffer_and_the_counter_alone():
    policy = _policy("flow-e2-n2")
    state = policy.init_state(1)
    policy.step(state, torch.randn(1, 4, dtype=torch.float64))
    buffer, steps = state.buffer.clone(), state.steps.clone()
    for _ in range(3):
        policy.observe(state, torch.randn(1, 4, dtype=torch.float64))
    assert torch.equal(state.buffer, buffer) and torch.equal(state.steps, steps)
    assert state.buffer.shape == (1, 2, 2)  # Tx - e carried actions


def test_execute_counts_acts_and_must_divide_the_horizon():
    """Chunks of ``e = 2``: the reference tests check the values; here the counter and the arguments."""
    policy = _policy("flow-e2-n2")
    state = policy.init_state(1)
    chunks = [policy.step(state, torch.randn(1, 4, dtype=torch.float64))[0] for _ in range(3)]
    assert all(c.shape == (4, 2) for c in chunks)
    assert state.steps.tolist() == [3]
    with pytest.raises(ValueError, match="execute: expected a divisor of the action horizon 4 below it"):
        StreamingDenoisePolicy(tiny_model(), FlowMatchingSampler(4), execute=3)
    with pytest.raises(ValueError, match="execute: expected a divisor of the action horizon 4 below it"):
        StreamingDenoisePolicy(tiny_model(), FlowMatchingSampler(4), execute=4)


def test_batching_and_row_order_change_nothing():
    policy = _policy("ddim-e1-n2")
    obs, acts, _ = _stream(30, 3, seed=5)
    together, alone = policy.init_state(3), policy.init_state(1)
    policy.reset(together, seed=[1, 2, 3])
    policy.reset(alone, seed=2)
    for t in range(30):
        policy.observe(together, obs[t][[2, 0, 1]][:, None], rows=[2, 0, 1])  # any order of rows
        policy.observe(alone, obs[t][1:2][:, None])
        if acts[t, 1]:
            rows = [r for r in (2, 1, 0) if r == 1 or acts[t, r]]
            got = policy.act(together, rows=rows)[rows.index(1)]
            assert close(got, policy.act(alone)[0], 1e-12)


def test_snapshots_and_resets_restore_the_buffer():
    policy = _policy("flow-e1-n1")
    state = policy.init_state(2)
    policy.reset(state, seed=[4, 5])
    obs = torch.randn(20, 2, 4, dtype=torch.float64)
    for t in range(8):
        policy.step(state, obs[t])
    snapshot = state.state_dict()
    assert "buffer" in snapshot and "filled" in snapshot
    first = [policy.step(state, obs[t]) for t in range(8, 14)]
    state.load_state_dict(snapshot)
    again = [policy.step(state, obs[t]) for t in range(8, 14)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # a reset row is a fresh stream of its new seed
    policy.reset(state, rows=[0], seed=9)
    fresh = policy.init_state(1)
    policy.reset(fresh, seed=9)
    for t in range(5):
        got = policy.step(state, obs[t])[0]
        assert close(got, policy.step(fresh, obs[t, :1])[0], 1e-12)


@pytest.mark.parametrize("case", ["flow-e1-n1", "ddim-e2-n1"])
def test_replay_of_the_receptive_field_with_its_acts_rebuilds_the_buffer(case):
    """What a restarted daemon must do: reset with the step counter minus the replayed acts, replay the last
    ``receptive_field`` tokens, acting after each token whose step acted; the continuation then equals the
    uninterrupted run (a model whose actions attend to later ones only). Acts at most ``execute`` tokens apart; a
    window that misses the oldest act the buffer depends on breaks it, and so does full self-attention among the
    actions (the buffer then remembers every act)."""
    policy = _policy(case, anticausal_attn=True)
    assert policy.metadata()["streaming_denoise"]["exact_replay"]
    e, window = policy.execute, policy.receptive_field
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(60, 4, dtype=torch.float64, generator=g)
    acted = [t % e == e - 1 or bool(torch.rand(1, generator=g) < 0.3) for t in range(60)]
    state = policy.init_state(1)
    policy.reset(state, seed=21)
    cut = 41
    for t in range(cut):
        policy.observe(state, obs[t : t + 1])
        if acted[t]:
            policy.act(state)
    want = [policy.step(state, obs[t : t + 1]) for t in range(cut, 50)]

    def replayed(start: int) -> list[torch.Tensor]:
        fresh = policy.init_state(1)
        policy.reset(fresh, seed=21, steps=sum(acted[:start]))
        for t in range(start, cut):
            policy.observe(fresh, obs[t : t + 1])
            if acted[t]:
                policy.act(fresh)
        return [policy.step(fresh, obs[t : t + 1]) for t in range(cut, 50)]

    assert all(close(a, b) for a, b in zip(replayed(cut - window), want))
    too_short = cut - (policy.model.receptive_field() + policy.horizon - 2 * e - 1)
    assert not all(close(a, b) for a, b in zip(replayed(too_short), want))
    full = _policy(case)
    assert not full.metadata()["streaming_denoise"]["exact_replay"]


def test_bad_input():
    with pytest.raises(ValueError, match="token_levels=True"):
        StreamingDenoisePolicy(tiny_model(token_levels=False), FlowMatchingSampler(4))
    policy = _policy("flow-e1-n1")
    state = policy.init_state(2)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have no observation"):
        policy.act(state)
    static = StaticStreamingPolicy(policy)  # the plan's runner checks the same, from its host counters
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have no observation"):
        static.act(static.init_state(2))


def test_the_daemons_adapter_serves_it_on_row_ranges_and_scattered_rows():
    """TorchBatchPolicy steps a contiguous range of rows on a view of the state: the buffer written there is the
    state's, as it is through a row index."""
    policy = _policy("flow-e1-n1")
    served, direct = TorchBatchPolicy(policy), policy.init_state(4)
    state = served.init_state(4)
    assert served.receptive_field == policy.model.receptive_field() + 4
    served.reset(state, np.arange(4), np.array([1, 2, 3, 4]), np.zeros(4, np.int64))
    policy.reset(direct, seed=[1, 2, 3, 4])
    obs = np.random.default_rng(0).standard_normal((12, 4, 4))
    for t in range(12):
        rows = np.array([1, 2]) if t % 3 else np.array([3, 0])
        served.observe(state, obs[t, rows][:, None], rows)
        policy.observe(direct, torch.from_numpy(obs[t, rows][:, None]), rows=torch.from_numpy(rows))
        got = served.act(state, rows)
        want = policy.act(direct, rows=torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert torch.equal(state.inner.buffer, direct.buffer)
