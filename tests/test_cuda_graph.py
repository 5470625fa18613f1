"""The static-shape streaming policy and its CUDA-graph capture.

On the CPU (CI): the static plan gives StreamingPolicy's actions (float64 <= 1e-10, float32 <= 1e-5, bf16 <= 2e-2,
fp16 <= 2e-3, relative to the action scale), its programs are static (the same ops on the same shapes whatever the
rows and inputs, no device value read on the host: what capture needs), padding never touches other sessions, bad
input raises, and the eager fallback says why. On a GPU, also: every program is captured, replays equal the eager
path and the reference, the step never synchronizes, and a failed capture falls back with a logged reason.
"""

from __future__ import annotations

import gc
import logging

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_testing import faithful_rep, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from streamtx.checkpoint import load_policy, load_static_policy, make_random_checkpoint
from streamtx.models import CondTransformerRegressor, cond_regressor, eCondTransformerRegressor
from streamtx.nn.kernels import add_norm, attention, fused_kernels_available
from streamtx.policy import DDIMSampler, FlowMatchingSampler, Sampler, StreamingPolicy
from streamtx.policy.cuda_graph import CapturedProgram, capture_unavailable
from streamtx.policy.static import StaticStreamingPolicy, default_buckets
from streamtx.symmetry import Representation, dihedral

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SLOTS = 5  # buckets 1, 2, 4, 5: calls of 3 rows run padded


def make_policy(
    variant: str = "encoder",
    sampler: Sampler | None = None,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    max_tokens_per_step: int = 2,
    seed: int = 0,
) -> StreamingPolicy:
    """Small policies over D4 (planar vectors observed and commanded) covering the plan's branches."""
    g = dihedral(4)
    plane = faithful_rep(g)
    obs, act = plane + plane + Representation.trivial(g, 2), plane
    kw = dict(
        in_horizon=4,
        cond_horizon=5,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=32,
        cond_window=3,
        num_cond_layers=2,
        dtype=dtype,
    )
    if variant == "mlp":  # no encoder: the per-token conditioning MLP
        kw.update(num_cond_layers=0)
    elif variant == "rms_causal":
        kw.update(norm_module="rmsnorm", causal_attn=True, activation="silu", num_cond_layers=1)
    elif variant == "post_tables":  # post-norm; per-head memory masks (relative bias), query offsets (absolute)
        kw.update(norm_first=False, cond_positional="relative", self_positional="absolute", cross_positional="relative")
    torch.manual_seed(seed)
    if variant == "plain":  # the trivial group: dense layers
        model = CondTransformerRegressor(act.size, obs.size, act.size, **kw)
    else:
        model = eCondTransformerRegressor(act, obs, act, **kw)
    if variant == "post_tables":
        with torch.no_grad():  # relative biases start at zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith("positional.bias"):
                    p.normal_()
    return StreamingPolicy(model.to(device).eval(), sampler or FlowMatchingSampler(num_steps=3), max_tokens_per_step)


def run_both(
    reference: StreamingPolicy,
    static: StaticStreamingPolicy,
    calls: list[tuple],
    slots: int = SLOTS,
    acts: list[int] | None = None,
) -> float:
    """Apply the same calls to both; the max relative difference of all actions. ``acts``, if given, gets the number
    of compared act calls appended."""
    ref_state, state = reference.init_state(slots), static.init_state(slots)
    err, compared = 0.0, 0
    for kind, rows, arg in calls:
        if kind == "reset":
            reference.reset(ref_state, rows, seed=arg)
            static.reset(state, rows, seed=arg)
        elif kind == "observe":
            reference.observe(ref_state, arg, rows)
            static.observe(state, arg, rows)
        else:
            a = reference.act(ref_state, rows).cpu()
            b = static.act(state, rows)
            assert b.shape == a.shape and b.device.type == "cpu"
            err = max(err, rel_err(b.to(a.dtype), a))
            compared += 1
    if acts is not None:
        acts.append(compared)
    return err


def stream_calls(
    obs_dim: int, num_steps: int, dtype: torch.dtype, seed: int = 0, slots: int = SLOTS, max_tokens: int = 2
) -> list[tuple]:
    """A busy stream: random row subsets (every bucket, padded ones too), 1..max_tokens tokens per call, resets,
    long enough to wrap every ring several times."""
    gen = torch.Generator().manual_seed(seed)
    calls: list[tuple] = [
        ("reset", None, [11 * i + seed for i in range(slots)]),
        ("observe", None, torch.randn(slots, obs_dim, generator=gen, dtype=dtype)),
    ]
    for t in range(num_steps):
        rows = torch.randperm(slots, generator=gen)[: 1 + t % slots].tolist()
        s = 1 + t % max_tokens
        calls.append(("observe", rows, torch.randn(len(rows), s, obs_dim, generator=gen, dtype=dtype)))
        if t % 7 == 3:
            calls += [
                ("reset", rows[:1], 100 + t),
                ("observe", rows[:1], torch.randn(1, obs_dim, generator=gen, dtype=dtype)),
            ]
        calls.append(("act", rows, None))
    return calls


# ---------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("variant", ["encoder", "mlp", "rms_causal", "plain", "post_tables"])
@pytest.mark.parametrize(
    "sampler",
    [FlowMatchingSampler(3), FlowMatchingSampler(2, "heun"), DDIMSampler(50, 3, clip_sample=1.0)],
    ids=["euler", "heun", "ddim"],
)
def test_static_plan_equals_streaming_policy_float64(variant, sampler):
    reference = make_policy(variant, sampler)
    calls = stream_calls(reference.obs_dim, 16, torch.float64)
    assert run_both(reference, StaticStreamingPolicy(reference), calls) <= 1e-10


def test_static_plan_equals_streaming_policy_float32():
    reference = make_policy(dtype=torch.float32)
    static = StaticStreamingPolicy(reference)
    assert static.io_dtype == torch.float32
    assert run_both(reference, static, stream_calls(reference.obs_dim, 16, torch.float32)) <= 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_reduced_precision_within_stated_tolerance(dtype, tolerance):
    """bf16 / fp16 compute (caches, weights, activations); noise, sampler state and actions stay float32."""
    reference = make_policy(dtype=torch.float32)
    static = StaticStreamingPolicy(reference, dtype=dtype)
    assert static.dtype == dtype and static.io_dtype == torch.float32
    err = run_both(reference, static, stream_calls(reference.obs_dim, 10, torch.float32))
    assert 0 < err <= tolerance  # > 0: the reduced precision is really used


_HYPO_POLICY = make_policy("encoder", FlowMatchingSampler(2), max_tokens_per_step=3, seed=1)
_HYPO_STATIC = StaticStreamingPolicy(_HYPO_POLICY, buckets=[2, 4], bucketed=True)  # padded programs, eagerly


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["observe", "act", "reset"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
            st.integers(1, 3),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_any_call_sequence_equals_streaming_policy(ops):
    """Any interleaving of row subsets, token counts, resets and acts (custom buckets 2 and 4)."""
    gen = torch.Generator().manual_seed(len(ops))
    observed, calls = set(), [("reset", None, [3, 1, 4, 1])]
    for kind, rows, s in ops:
        if kind == "observe":
            calls.append(
                ("observe", rows, torch.randn(len(rows), s, _HYPO_POLICY.obs_dim, generator=gen, dtype=torch.float64))
            )
            observed |= set(rows)
        elif kind == "reset":
            calls.append(("reset", rows, s))
            observed -= set(rows)
        elif set(rows) <= observed:
            calls.append(("act", rows, None))
    # every example ends with an act of all rows, so none compares nothing
    every = [0, 1, 2, 3]
    calls += [
        ("observe", every, torch.randn(4, 1, _HYPO_POLICY.obs_dim, generator=gen, dtype=torch.float64)),
        ("act", every, None),
    ]
    acts: list[int] = []
    assert run_both(_HYPO_POLICY, _HYPO_STATIC, calls, slots=4, acts=acts) <= 1e-10
    assert acts[0] > 0


class _Trace(TorchDispatchMode):
    """Every aten op with the shapes, dtypes and devices of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sig = tuple((tuple(a.shape), a.dtype, a.device.type) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), sig))
        return func(*args, **(kwargs or {}))


HOST_READS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "tolist")


def test_programs_are_static():
    """What a graph replays: the same op sequence on the same shapes for any rows and inputs of a bucket, and no op
    that reads a device value on the host."""
    policy = StaticStreamingPolicy(make_policy(max_tokens_per_step=1), bucketed=True)
    state = policy.init_state(SLOTS)
    policy.reset(state, seed=[1, 2, 3, 4, 5])
    gen = torch.Generator().manual_seed(0)
    traces = []
    for rows in ([0, 1, 2], [4, 2, 3]):  # bucket 4, padded
        for name, program, fill in (
            ("observe", state.observe_programs[4, 1], "obs"),
            ("act", state.act_programs[4], "noise"),
        ):
            inputs = program.staging.write()
            inputs["rows"][:3] = rows
            inputs[fill][:] = torch.randn(inputs[fill].shape, generator=gen, dtype=torch.float64).numpy()
            with torch.no_grad(), _Trace() as trace:
                program.program.body()
            traces.append((name, trace.ops))
    assert traces[0] == traces[2] and traces[1] == traces[3]
    ops = [op for _, trace in traces for op, _ in trace]
    assert len(ops) > 100 and not [op for op in ops if any(f"aten.{r}." in op for r in HOST_READS)]


def test_padding_and_other_sessions_untouched():
    """A call of 3 rows runs the bucket of 4; the spare row is the scratch slot: the two idle slots keep their
    caches bit for bit, and a session's actions do not depend on who shares its call."""
    policy = StaticStreamingPolicy(make_policy(), bucketed=True)
    state = policy.init_state(SLOTS)
    policy.reset(state, seed=[7, 7, 7, 7, 7])
    obs = torch.randn(SLOTS, policy.obs_dim, dtype=torch.float64)
    policy.observe(state, obs)
    before = state.caches.state_dict()
    policy.observe(state, obs[[0, 2, 4]], [0, 2, 4])
    together = policy.act(state, [0, 2, 4])
    after = state.caches.state_dict()
    for name, t in before.items():
        idle = [1, 3] if t.shape[0] == SLOTS + 1 else None  # per-row tensors (rows + scratch)
        assert idle is not None and torch.equal(t[idle], after[name][idle]), name
    alone = StaticStreamingPolicy(policy.policy)
    solo = alone.init_state(SLOTS)
    alone.reset(solo, seed=[7, 7, 7, 7, 7])
    alone.observe(solo, obs)
    alone.observe(solo, obs[[2]], [2])
    assert rel_err(alone.act(solo, [2])[0], together[1]) <= 1e-12


def test_bad_input_raises_clear_errors():
    policy = StaticStreamingPolicy(make_policy(), buckets=[1, 2, 4], bucketed=True)
    state = policy.init_state(SLOTS)
    obs = torch.zeros(2, policy.obs_dim, dtype=torch.float64)
    cases = [
        (lambda: policy.observe(state, obs, [0, 5]), "rows: expected indices in 0..4"),
        (lambda: policy.observe(state, obs, [1, 1]), "rows: expected distinct rows"),
        (lambda: policy.observe(state, obs[:0], []), "rows: expected a non-empty 1-D index"),
        (lambda: policy.observe(state, obs, [[0, 1]]), "rows: expected a non-empty 1-D index"),
        (lambda: policy.observe(state, torch.zeros(5, policy.obs_dim)), "rows: at most 4 rows per call"),
        (lambda: policy.observe(state, obs[:, :3], [0, 1]), "obs: expected (2, S, 6)"),
        (lambda: policy.observe(state, torch.zeros(2, 3, 6), [0, 1]), "obs: expected (2, S, 6) with 1 <= S <= 2"),
        (lambda: policy.observe(state, torch.full_like(obs, float("nan")), [0, 1]), "obs: expected finite"),
        (lambda: policy.observe(state, obs.long(), [0, 1]), "obs: expected finite floating-point"),
        (lambda: policy.act(state, [0, 1]), "rows: rows [0, 1] have no observation"),
        (lambda: policy.reset(state, [0, 1], seed=[1, 2, 3]), "seed: expected an integer or one integer per row"),
        (lambda: policy.reset(state, [0], seed=0.5), "seed: expected an integer"),
        (lambda: policy.init_state(0), "batch_size: expected >= 1"),
        (lambda: policy.init_state(3), "buckets: expected sizes <= batch_size=3"),
        (lambda: StaticStreamingPolicy(policy.policy, buckets=[0, 2]), "buckets: expected positive"),
        (lambda: StaticStreamingPolicy(policy.policy, dtype=torch.int32), "dtype: expected one of"),
    ]
    for call, message in cases:
        with pytest.raises(
            ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
        ):
            call()
    with pytest.raises(TypeError, match="policy: expected a StreamingPolicy"):
        StaticStreamingPolicy(policy.policy.model)


class _DataDependentSampler(FlowMatchingSampler):
    def sample(self, denoise, noise):  # the step depends on the noise: cannot be precomputed
        return denoise(noise, noise.flatten(1)[:, 0] * 100)


def test_data_dependent_sampler_rejected():
    with pytest.raises(ValueError, match="sampler: .* data-independent step schedule"):
        StaticStreamingPolicy(make_policy(sampler=_DataDependentSampler(1)))


def test_eager_fallback_says_why(caplog):
    caplog.set_level(logging.INFO, logger="streamtx.policy.static")
    policy = StaticStreamingPolicy(make_policy())
    state = policy.init_state(2)
    assert not state.bucketed and not state.captured and state.programs() == {}  # exact rows, nothing to capture
    assert policy.bucketed_reason == "exact rows per call: eager (device is cpu: CUDA graphs need a CUDA device)"
    assert "static policy: exact rows per call: eager (device is cpu" in caplog.text
    bucketed = StaticStreamingPolicy(policy.policy, bucketed=True).init_state(2)
    assert not bucketed.captured and len(bucketed.programs()) == 2 * 2 + 2  # buckets 1, 2 x (S = 1, 2) + act each
    reason = "device is cpu: CUDA graphs need a CUDA device"
    assert all(p.fallback_reason == reason for p in bucketed.programs().values())
    assert "static policy runs eagerly: device is cpu" in caplog.text
    off = StaticStreamingPolicy(policy.policy, cuda_graph=False, bucketed=True).init_state(1)
    assert all(p.fallback_reason == "capture disabled" for p in off.programs().values())
    assert capture_unavailable("cpu") is not None
    with pytest.raises(ValueError, match="warmup: expected >= 1"):
        CapturedProgram(lambda: None, "cpu", warmup=0)


def test_failing_fused_kernel_check_falls_back(monkeypatch, caplog):
    """A fused kernel that does not reproduce the torch path on the plan's shapes is not used, and the log says
    why (here a broken attention stands in for a miscompiled kernel)."""
    monkeypatch.setattr(cond_regressor, "fused_kernels_available", lambda device: True)

    def broken(q, k, v, mask=None, causal=False, fused=False):
        return attention(q, k, v, mask, causal) * (2.0 if fused else 1.0)

    monkeypatch.setattr(cond_regressor, "attention", broken)
    plan = StaticStreamingPolicy(make_policy()).plan
    assert not plan.fused and plan.fused_reason.startswith("self-attention differs from the torch path by 1.0e+00")
    assert "plan uses the torch kernels: self-attention differs" in caplog.text
    assert StaticStreamingPolicy(make_policy(), fused_kernels=False).plan.fused_reason == "fused_kernels=False"


def test_load_static_policy_and_metadata(tmp_path):
    path = make_random_checkpoint(tmp_path / "policy.pt", seed=3)
    reference = load_policy(path)
    static = load_static_policy(path, device="cpu", buckets=[1, 2])
    assert (
        run_both(reference, static, stream_calls(reference.obs_dim, 6, torch.float32, slots=2, max_tokens=1), slots=2)
        <= 1e-5
    )
    meta = msgpack.unpackb(msgpack.packb(static.metadata()))
    assert meta["runner"] == {
        "type": "static",
        "cuda_graph": False,  # asked for (the default), but a CPU policy runs eagerly
        "compiled": False,
        "compile_reason": "compile=False",
        "fused_kernels": False,
        "io_dtype": "float32",
        "buckets": [1, 2],
        "bucketed": False,  # eager: every call computes exactly its rows
        "bucketed_reason": "exact rows per call: eager (device is cpu: CUDA graphs need a CUDA device)",
    }
    assert meta["dtype"] == "float32" and meta["obs_dim"] == reference.obs_dim


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(5) == [1, 2, 4, 5]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


# ---------------------------------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernels_match_torch_path(dtype, tolerance, causal):
    if not fused_kernels_available("cuda"):
        pytest.skip("needs triton")
    gen = torch.Generator("cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q, k, v = rand(3, 16, 3, 4, 32).transpose(1, 3).unbind(2)  # strided views, as the plan passes them
    memory = rand(2, 3, 4, 33, 32)
    mask = torch.zeros(3, 1, 1, 48, dtype=dtype, device="cuda")[..., :33]
    mask[0, ..., :9] = float("-inf")
    per_head = torch.randn(3, 4, 1, 48, generator=gen, device="cuda").to(dtype)[..., :33]  # a relative bias
    per_head[1, 2, :, :5] = float("-inf")
    for args in ((q, k, v, None, causal), (q, memory[0], memory[1], mask, False), (q, *memory[:2], per_head, False)):
        assert rel_err(attention(*args, fused=True).float(), attention(*args, fused=False).float()) <= tolerance
    x, y, w, b = rand(3, 16, 128), rand(3, 16, 128), rand(128), rand(128)
    for fused, ref in zip(
        add_norm(x, y, w, None if causal else b, 1e-5, causal, fused=True),
        add_norm(x, y, w, None if causal else b, 1e-5, causal, fused=False),
    ):
        assert rel_err(fused.float(), ref.float()) <= tolerance


@cuda
@pytest.mark.parametrize(
    "variant, sampler",
    [
        ("encoder", FlowMatchingSampler(3)),
        ("rms_causal", DDIMSampler(50, 3)),
        ("mlp", FlowMatchingSampler(2, "heun")),
        ("post_tables", FlowMatchingSampler(3)),
    ],
    ids=["euler", "ddim", "heun", "post_tables"],
)
def test_graph_replay_equals_eager_and_reference(variant, sampler):
    reference = make_policy(variant, sampler, dtype=torch.float32, device="cuda")
    graphed = StaticStreamingPolicy(reference)
    assert graphed.plan.fused == fused_kernels_available("cuda"), graphed.plan.fused_reason
    eager = StaticStreamingPolicy(reference, cuda_graph=False, fused_kernels=False)
    calls = stream_calls(reference.obs_dim, 16, torch.float32)
    states = [graphed.init_state(SLOTS), eager.init_state(SLOTS)]
    assert states[0].captured and not states[1].captured
    for kind, rows, arg in calls:
        if kind == "reset":
            for p, s in zip((graphed, eager), states):
                p.reset(s, rows, seed=arg)
        elif kind == "observe":
            for p, s in zip((graphed, eager), states):
                p.observe(s, arg, rows)
        else:
            a, b = graphed.act(states[0], rows), eager.act(states[1], rows)
            assert rel_err(a, b) <= 1e-5
    assert run_both(reference, graphed, calls) <= 1e-5


@cuda
def test_step_never_synchronizes():
    # the bucketed programs, run eagerly: the bodies that CUDA graphs capture
    policy = StaticStreamingPolicy(make_policy(dtype=torch.float32, device="cuda"), cuda_graph=False, bucketed=True)
    state = policy.init_state(SLOTS)
    policy.observe(state, torch.zeros(SLOTS, policy.obs_dim))
    policy.act(state)  # first calls: kernel compilation, lazy caches
    programs = [state.observe_programs[4, 1], state.act_programs[4]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        with torch.no_grad():
            for p in programs:
                p.staging.upload()
                p.program.body()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_failed_capture_falls_back_with_logged_reason(caplog):
    x = torch.ones(4, device="cuda")
    out = []
    program = CapturedProgram(lambda: out.append(float(x.sum())), "cuda")  # .item() syncs: not capturable
    assert not program.captured and program.fallback_reason.startswith("capture failed")
    assert "runs eagerly: capture failed" in caplog.text
    out.clear()
    program()
    assert out == [4.0]
    y = torch.zeros(4, device="cuda")
    ok = CapturedProgram(lambda: y.add_(x), "cuda")
    y.zero_()
    ok()
    ok()
    assert ok.captured and torch.equal(y, torch.full_like(y, 2.0))


@cuda
def test_capture_survives_garbage_holding_graphs():
    """Seen on the H100: the cycle collector freed an unreachable state's CUDA graphs in the middle of another
    capture, which invalidated it. Captures now run with the collector paused."""
    x = torch.zeros(4, device="cuda")
    cycle: list = [CapturedProgram(lambda: x.add_(1), "cuda")]
    cycle.append(cycle)  # only the cycle collector can free this graph
    del cycle
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # collect at (nearly) every allocation
    try:
        program = CapturedProgram(lambda: x.add_(torch.ones(4, device="cuda")), "cuda")
    finally:
        gc.set_threshold(*threshold)
    assert program.captured, program.fallback_reason
    x.zero_()
    program()
    assert torch.equal(x, torch.ones_like(x))


@cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_reduced_precision_graphs_within_stated_tolerance(dtype, tolerance):
    reference = make_policy(dtype=torch.float32, device="cuda")
    static = StaticStreamingPolicy(reference, dtype=dtype)
    err = run_both(reference, static, stream_calls(reference.obs_dim, 10, torch.float32))
    assert 0 < err <= tolerance
