"""The streaming sampler lowered into the static plan (:class:`~streamtx.policy.streaming_denoise.BufferPlan` run by
:class:`~streamtx.policy.static.StaticStreamingPolicy`): equal to :class:`StreamingDenoisePolicy` over >= 500 control
steps with per-row resets (rows in different phases share calls), row subsets and observe-only ticks (float64 <=
1e-10, float32 <= 1e-5 relative); its session state has the module path's layout, so a session moves between the two
mid-stream; the daemon's loader serves it; and on a GPU its programs are CUDA graphs that equal the eager plan and
never synchronize."""

from __future__ import annotations

import logging

import pytest
import torch
from streaming_denoise_testing import tiny_model

from streamtx.checkpoint import load_fastest_policy, save_checkpoint
from streamtx.policy import DDIMSampler, FlowMatchingSampler, StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SLOTS = 4  # buckets 1, 2, 4: calls of 3 rows run padded when bucketed

CASES = {
    "flow-e1-n1-anticausal": (FlowMatchingSampler(4, noise_chunk=1), 1, 1, {"anticausal_attn": True}),
    "flow-e2-n2": (FlowMatchingSampler(4, noise_chunk=2), 2, 2, {}),
    "ddim-e1-n2-causal": (DDIMSampler(40, 4, noise_chunk=1), 1, 2, {"causal_attn": True}),
    "ddim-e2-n1-anticausal-mlp": (
        DDIMSampler(40, 4, noise_chunk=2),
        2,
        1,
        {"anticausal_attn": True, "num_cond_layers": 0},
    ),
}


def _policy(case: str, dtype: torch.dtype = torch.float64, device: str = "cpu") -> StreamingDenoisePolicy:
    sampler, execute, substeps, model = CASES[case]
    net = tiny_model(**model).to(device, dtype)
    with torch.no_grad():  # untouched level/position tables start at zero and would hide a missing term
        for p in net.parameters():
            p.add_(
                torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=dtype).to(device) * 0.1
            )
    return StreamingDenoisePolicy(net, sampler, execute=execute, substeps=substeps).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max()) / max(float(b.abs().max()), 1e-30)


def _calls(steps: int, obs_dim: int, dtype: torch.dtype, seed: int = 0):
    """A seeded call sequence of ``steps`` ticks: random row subsets observe, about 70% of those act, and now and
    then a row is reset with a new seed (rows then initialise while others are steady, in the same call)."""
    g = torch.Generator().manual_seed(seed)
    calls = [
        ("reset", None, [11, 12, 13, 14]),
        ("observe", list(range(SLOTS)), torch.randn(SLOTS, 1, obs_dim, generator=g, dtype=dtype)),
    ]
    for t in range(steps):
        if t % 37 == 20:
            row = int(torch.randint(SLOTS, (1,), generator=g))
            calls += [
                ("reset", [row], [100 + t]),
                ("observe", [row], torch.randn(1, 1, obs_dim, generator=g, dtype=dtype)),
            ]
        rows = sorted(torch.randperm(SLOTS, generator=g)[: 1 + t % SLOTS].tolist())
        calls.append(("observe", rows, torch.randn(len(rows), 1, obs_dim, generator=g, dtype=dtype)))
        acting = [r for r in rows if float(torch.rand(1, generator=g)) < 0.7]
        if acting:
            calls.append(("act", acting[::-1] if t % 2 else acting, None))  # any row order
    return calls


def _run(policies, states, calls) -> float:
    """Drive every policy through the same calls; the max relative difference of each one's chunks from the
    first's (the module path)."""
    err, acts = 0.0, 0
    for kind, rows, arg in calls:
        outs = []
        for policy, state in zip(policies, states):
            if kind == "reset":
                policy.reset(state, rows, seed=arg)
            elif kind == "observe":
                policy.observe(state, arg, rows)
            else:
                outs.append(policy.act(state, rows))
        if outs:
            acts += 1
            err = max(err, *(_rel(o, outs[0]) for o in outs[1:]))
    return err, acts


def test_plan_equals_the_module_path_over_500_control_steps():
    reference = _policy("flow-e1-n1-anticausal")
    exact = StaticStreamingPolicy(reference)  # eager on the CPU: each call computes exactly its rows
    bucketed = StaticStreamingPolicy(reference, bucketed=True)  # the programs a GPU captures, run eagerly
    assert exact.buffer_plan is not None and not exact.bucketed and bucketed.bucketed
    states = [p.init_state(SLOTS) for p in (reference, exact, bucketed)]
    assert set(states[2].programs()) >= {"prime[b=4]", "act[b=4]", "prime[b=1]"}
    err, acts = _run((reference, exact, bucketed), states, _calls(720, reference.obs_dim, torch.float64))
    assert acts >= 500
    assert err <= 1e-10
    assert _rel(states[1].buffer[:SLOTS], states[0].buffer) <= 1e-10  # the carried buffers too


@pytest.mark.parametrize("case", ["flow-e2-n2", "ddim-e1-n2-causal", "ddim-e2-n1-anticausal-mlp"])
def test_plan_equals_the_module_path_with_chunks_substeps_and_ddim(case):
    reference = _policy(case)
    policies = (reference, StaticStreamingPolicy(reference), StaticStreamingPolicy(reference, bucketed=True))
    err, acts = _run(policies, [p.init_state(SLOTS) for p in policies], _calls(90, reference.obs_dim, torch.float64, 1))
    assert acts >= 60 and err <= 1e-10


def test_float32_plan_within_1e_5():
    reference = _policy("flow-e1-n1-anticausal", dtype=torch.float32)
    static = StaticStreamingPolicy(reference)
    assert static.io_dtype == torch.float32
    err, acts = _run(
        (reference, static),
        [reference.init_state(SLOTS), static.init_state(SLOTS)],
        _calls(200, reference.obs_dim, torch.float32, 2),
    )
    assert acts >= 100 and err <= 1e-5


@pytest.mark.slow
def test_compiled_plan_equals_the_module_path():
    """The programs compiled by inductor (``--policy-path compiled``); minutes of compiling here, hence slow."""
    reference = _policy("ddim-e1-n2-causal")
    static = StaticStreamingPolicy(reference, compile=True, buckets=[2, 4])
    assert static.compiled
    policies = (reference, static)
    err, acts = _run(policies, [p.init_state(SLOTS) for p in policies], _calls(40, reference.obs_dim, torch.float64, 1))
    assert acts >= 25 and err <= 1e-10


def test_one_evaluation_per_steady_control_step():
    reference = _policy("flow-e1-n1-anticausal")
    static = StaticStreamingPolicy(reference)
    plan = static.plan
    calls: list[int] = []
    denoiser = plan.denoiser

    def counting(*args, **kwargs):
        evaluate = denoiser(*args, **kwargs)

        def wrapped(x, i):
            calls.append(i)
            return evaluate(x, i)

        return wrapped

    plan.denoiser = counting  # type: ignore[method-assign]
    state = static.init_state(2)
    static.observe(state, torch.randn(2, reference.obs_dim, dtype=torch.float64))
    static.act(state)
    assert calls == [0, 1, 2, 3]  # initialising: L = 4 levels (prime 0..2, then the steady evaluation 3)
    for _ in range(3):
        calls.clear()
        static.observe(state, torch.randn(2, reference.obs_dim, dtype=torch.float64))
        static.act(state)
        assert calls == [3]


def test_a_session_moves_between_the_module_path_and_the_plan_mid_stream():
    """Module path -> plan slot 2 -> module path row 1 -> plan slot 0, in float64; every chunk equals the
    uninterrupted module-path stream's, and the snapshots have one layout (keys and shapes)."""
    reference = _policy("ddim-e2-n1-anticausal-mlp")
    static = StaticStreamingPolicy(reference, bucketed=True)
    g = torch.Generator().manual_seed(4)
    obs = torch.randn(48, 1, reference.obs_dim, generator=g, dtype=torch.float64)
    alone = reference.init_state(1)
    reference.reset(alone, seed=7)
    want = [reference.step(alone, obs[t]) for t in range(len(obs))]
    homes = [(reference, reference.init_state(1), 0), (static, static.init_state(3), 2),
             (reference, reference.init_state(2), 1), (static, static.init_state(2), 0)]  # fmt: skip
    snapshot = None
    for i, (policy, state, row) in enumerate(homes):
        if snapshot is None:
            policy.reset(state, [row], seed=7)
        else:
            state.load_session_state_dict(row, snapshot)
        for t in range(12 * i, 12 * (i + 1)):
            got = policy.step(state, obs[t], [row])
            assert _rel(got[0], want[t][0]) <= 1e-10, (i, t)
        snapshot = state.session_state_dict(row)
        assert {"buffer", "filled", "seed", "steps", "observed"} <= set(snapshot)
    module_snapshot = alone.session_state_dict(0)
    assert {k: tuple(v.shape) for k, v in snapshot.items()} == {k: tuple(v.shape) for k, v in module_snapshot.items()}
    assert _rel(snapshot["buffer"], module_snapshot["buffer"]) <= 1e-10 and bool(snapshot["filled"])
    k_step = StaticStreamingPolicy(StreamingPolicy(reference.model, reference.sampler))
    with pytest.raises(ValueError, match=r"unexpected keys \['buffer', 'filled'\]"):
        k_step.init_state(1).load_session_state_dict(0, snapshot)
    with pytest.raises(ValueError, match=r"missing keys \['buffer', 'filled'\]"):
        static.init_state(1).load_session_state_dict(
            0, {k: v for k, v in snapshot.items() if k not in ("buffer", "filled")}
        )


def test_the_k_step_policy_of_a_streaming_checkpoint_lowers_too():
    """A model with per-token levels and anticausal actions under the K-step sampler: every token at the shared
    level (the plan's per-evaluation level tables), the actions reversed for causal attention."""
    reference = _policy("flow-e1-n1-anticausal")
    k_step = StreamingPolicy(reference.model, reference.sampler)
    policies = (k_step, StaticStreamingPolicy(k_step, buckets=[1, 2, 4]))
    err, acts = _run(policies, [p.init_state(SLOTS) for p in policies], _calls(60, k_step.obs_dim, torch.float64, 3))
    assert acts >= 40 and err <= 1e-10
    with pytest.raises(ValueError, match="act: this plan was lowered for per-token steps"):
        StaticStreamingPolicy(reference).plan.act(*[None] * 4)  # type: ignore[arg-type]


def test_the_daemons_loader_serves_the_plan(tmp_path, caplog):
    reference = _policy("flow-e1-n1-anticausal", dtype=torch.float32)
    path = save_checkpoint(tmp_path / "s.pt", reference.model, reference.sampler)
    with caplog.at_level(logging.INFO):
        served = load_fastest_policy(path, compile=False)
    assert isinstance(served, StaticStreamingPolicy) and served.buffer_plan is not None
    assert "serving the static plan" in caplog.text
    meta = served.metadata()
    assert (
        meta["acts_change_state"] and meta["streaming_denoise"]["exact_replay"] and meta["runner"]["type"] == "static"
    )
    assert served.receptive_field == reference.receptive_field


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", ["flow-e1-n1-anticausal", "ddim-e1-n2-causal"])
def test_cuda_graphs_equal_the_eager_plan_and_the_module_path(case):
    reference = _policy(case, dtype=torch.float32, device="cuda")
    graphed = StaticStreamingPolicy(reference)
    eager = StaticStreamingPolicy(reference, cuda_graph=False, fused_kernels=False)
    states = [reference.init_state(SLOTS), graphed.init_state(SLOTS), eager.init_state(SLOTS)]
    assert states[1].captured and "prime[b=2]" in states[1].programs() and not states[2].captured
    err, acts = _run((reference, graphed, eager), states, _calls(600, reference.obs_dim, torch.float32, 5))
    assert acts >= 500 and err <= 1e-5


@pytest.mark.gpu
@cuda
def test_the_streaming_programs_never_synchronize():
    reference = _policy("ddim-e1-n2-causal", dtype=torch.float32, device="cuda")
    policy = StaticStreamingPolicy(reference, cuda_graph=False, bucketed=True)
    state = policy.init_state(SLOTS)
    policy.observe(state, torch.zeros(SLOTS, policy.obs_dim))
    policy.act(state)  # first calls: kernel compilation, lazy caches (the DDIM table on the device)
    programs = [state.observe_programs[4, 1], state.prime_programs[4], state.act_programs[4]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        with torch.no_grad():
            for p in programs:
                p.staging.upload()
                p.program.body()
    finally:
        torch.cuda.set_sync_debug_mode("default")
