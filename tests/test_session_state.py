"""One session state: a session's ``session_state_dict`` moves between the module path and the plan, between batch
rows, between ring sizes and between devices, and the moved stream continues exactly as the uninterrupted one.

Each test streams one session of random observation chunks (1..S tokens per step) through a sequence of homes (a
path, a state, a row), moving it with ``load_session_state_dict(row, session_state_dict(row))`` between them; the
actions of every step equal those of the same session run uninterrupted in a one-row module-path state, float64
<= 1e-10 relative, with each home's rings wrapped several times. Rows that do not move keep their state bit for bit.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from layer_testing import rel_err
from plan_testing import HORIZON, WINDOW, make_policy

from streamtx.policy import StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy

CASES = {  # (norm_first, norm, encoder backend, self, cross, tokens per step, sampler) as in test_plan_matrix
    "rope-S2": (True, "layernorm", "rope", "rope", "rope", 2, "euler"),
    "absolute-S1": (False, "rmsnorm", "absolute", "absolute", "absolute", 1, "ddim"),
    "mlp_encoder-relative-S2": (True, "layernorm", "mlp", "relative", "relative", 2, "heun"),
}
SEED, PHASE = 11, 24  # the moving session's noise seed; control steps per home

Home = tuple[Any, Any, int]  # (policy, state, row)


def make_stream(policy: StreamingPolicy, steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, policy.max_tokens_per_step + 1, (steps,), generator=gen).tolist()
    return [torch.randn(1, s, policy.obs_dim, generator=gen, dtype=torch.float64) for s in sizes]


def uninterrupted(policy: StreamingPolicy, stream: list[torch.Tensor]) -> list[torch.Tensor]:
    state = policy.init_state(1)
    policy.reset(state, seed=SEED)
    return [policy.step(state, obs) for obs in stream]


def occupy(policy: Any, state: Any, rows: list[int], seed: int = 1) -> None:
    """Other sessions in ``rows``: a few steps of their own, so a move that touched them would show."""
    gen = torch.Generator().manual_seed(seed)
    policy.reset(state, rows, seed=[seed + r for r in rows])
    for _ in range(5):
        policy.step(state, torch.randn(len(rows), 1, policy.obs_dim, generator=gen, dtype=torch.float64), rows)


def run_through(homes: list[Home], stream: list[torch.Tensor]) -> list[torch.Tensor]:
    """The session's actions, ``PHASE`` steps in each home, moved from one to the next; checks on the way that a
    move leaves every other row of the target as it was and that the snapshot reads back unchanged."""
    policy, state, row = homes[0]
    policy.reset(state, [row], seed=SEED)
    actions = []
    for i, (policy, state, row) in enumerate(homes):
        if i > 0:
            snapshot = homes[i - 1][1].session_state_dict(homes[i - 1][2])
            others = [r for r in range(_num_rows(state)) if r != row]
            before = {r: state.session_state_dict(r) for r in others}
            state.load_session_state_dict(row, snapshot)
            _assert_equal(state.session_state_dict(row), snapshot)
            for r in others:
                _assert_equal(state.session_state_dict(r), before[r])
        for obs in stream[i * PHASE : (i + 1) * PHASE]:
            actions.append(policy.step(state, obs, [row]).cpu())
    return actions


def _num_rows(state: Any) -> int:
    return state.num_slots if hasattr(state, "num_slots") else state.seed.shape[0]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].cpu().to(b[name].dtype), b[name].cpu()), name


def _check(actions: list[torch.Tensor], reference: list[torch.Tensor], policy: StreamingPolicy) -> None:
    assert len(actions) == len(reference)
    err = max(rel_err(a.to(r.dtype), r) for a, r in zip(actions, reference))
    assert err <= 1e-10, err
    assert PHASE >= 5 * max(HORIZON, WINDOW, policy.max_tokens_per_step)  # each home wraps its rings 5+ times


@pytest.mark.parametrize("name", CASES)
def test_a_session_moves_module_to_plan_to_module(name):
    policy = make_policy(CASES[name])
    static = StaticStreamingPolicy(policy, buckets=[1, 3])
    stream = make_stream(policy, 3 * PHASE)
    first, plan, last = policy.init_state(2), static.init_state(3), policy.init_state(3)
    occupy(policy, first, [0])
    occupy(static, plan, [0, 1])
    occupy(policy, last, [1, 2])
    actions = run_through([(policy, first, 1), (static, plan, 2), (policy, last, 0)], stream)
    _check(actions, uninterrupted(policy, stream), policy)


@pytest.mark.parametrize("path", ["module", "plan", "plan_bucketed"])
def test_a_session_moves_between_rows_of_one_state(path):
    policy = make_policy(CASES["rope-S2"], seed=1)
    runner: Any = policy
    if path != "module":  # bucketed: one-row calls run padded to 2, as CUDA graphs replay them (eagerly here)
        runner = StaticStreamingPolicy(policy, buckets=[2], bucketed=path == "plan_bucketed")
    state = runner.init_state(3)
    occupy(runner, state, [1])
    stream = make_stream(policy, 2 * PHASE, seed=2)
    actions = run_through([(runner, state, 0), (runner, state, 2)], stream)
    _check(actions, uninterrupted(policy, stream), policy)


def test_a_session_moves_between_ring_sizes():
    """A snapshot does not depend on ``max_tokens_per_step`` (the rings' sizes): a session of a two-token policy
    continues in a one-token policy of the same model, and back."""
    two = make_policy(CASES["absolute-S1"][:5] + (2, "euler"), seed=3)
    one = StreamingPolicy(two.model, two.sampler, max_tokens_per_step=1)
    stream = make_stream(two, 3 * PHASE, seed=4)
    for i in range(PHASE, 2 * PHASE):  # the middle home takes one token per step
        stream[i] = stream[i][:, :1]
    actions = run_through(
        [(two, two.init_state(1), 0), (one, one.init_state(2), 1), (two, two.init_state(1), 0)], stream
    )
    _check(actions, uninterrupted(two, stream), two)


def test_a_snapshot_is_a_plain_tensor_dict():
    """``torch.save`` / ``torch.load(weights_only=True)`` carry it to another process."""
    policy = make_policy(CASES["absolute-S1"], seed=7)
    state = policy.init_state(1)
    policy.reset(state, seed=SEED)
    stream = make_stream(policy, 2 * PHASE, seed=8)
    for obs in stream[:PHASE]:
        policy.step(state, obs)
    buffer = io.BytesIO()
    torch.save(state.session_state_dict(0), buffer)
    buffer.seek(0)
    restored = policy.init_state(2)
    restored.load_session_state_dict(1, torch.load(buffer, weights_only=True))
    later = [policy.step(restored, obs, [1]) for obs in stream[PHASE:]]
    assert max(rel_err(a, b) for a, b in zip(later, uninterrupted(policy, stream)[PHASE:])) <= 1e-10


def test_bad_snapshots_are_refused_by_name():
    policy = make_policy(CASES["rope-S2"])
    static = StaticStreamingPolicy(policy, buckets=[1])
    state, plan = policy.init_state(2), static.init_state(2)
    snapshot = state.session_state_dict(0)
    for target in (state, plan):
        with pytest.raises(ValueError, match=r"row: expected"):
            target.session_state_dict(2)
        with pytest.raises(ValueError, match=r"missing keys \['seed'\]"):
            target.load_session_state_dict(0, {k: v for k, v in snapshot.items() if k != "seed"})
        with pytest.raises(ValueError, match=r"unexpected keys \['actions'\]"):
            target.load_session_state_dict(0, {**snapshot, "actions": torch.zeros(3)})
        with pytest.raises(ValueError, match=r"session state\['memory.k'\]: expected shape"):
            target.load_session_state_dict(0, {**snapshot, "memory.k": snapshot["memory.k"][1:]})
    other = make_policy((True, "layernorm", "mlp", "rope", "rope", 2, "euler"))  # no encoder: no encoder.* keys
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.k', 'encoder.v'\]"):
        other.init_state(1).load_session_state_dict(0, snapshot)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_session_moves_between_cpu_and_cuda():
    """CPU module path -> CUDA module path -> CPU -> CUDA plan (CUDA graphs, float64, torch kernels) -> CPU."""
    policy = make_policy(CASES["rope-S2"], seed=5)
    cuda = copy.deepcopy(policy).to("cuda")
    static = StaticStreamingPolicy(cuda, buckets=[1, 2], fused_kernels=False)
    plan = static.init_state(2)
    assert plan.captured
    occupy(static, plan, [0])
    homes = [
        (policy, policy.init_state(1), 0),
        (cuda, cuda.init_state(2), 1),
        (policy, policy.init_state(1), 0),
        (static, plan, 1),
        (policy, policy.init_state(2), 0),
    ]
    stream = make_stream(policy, len(homes) * PHASE, seed=6)
    _check(run_through(homes, stream), uninterrupted(policy, stream), policy)
