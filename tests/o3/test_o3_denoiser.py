"""``O3CondDenoiser``: O(3) equivariance (rotations, reflections with and without pseudotensors), translation
invariance, invariance to permutations of the entity set (and not of the ordered action tokens), the gravity option
(symmetric under the vertical-axis subgroup only), streaming against the batch forward over ring wraps, snapshots and
bad input."""

import inspect
import math

import pytest
import torch
from o3_testing import TINY_DENOISER as BASE
from o3_testing import TX, B, E, act_on_features, assert_close, o3_element

from streamtx.models import O3CondDenoiser, O3DenoiserConfig, O3DenoiserState
from streamtx.nn import StreamingModule

# (hidden pseudotensors, observation degree, observation pseudotensors): polar-only, and axial observation features
# (e.g. angular velocities) carried by a hidden layout with both parities.
LAYOUTS = [(False, 2, False), (True, 1, True)]
LAYOUT_IDS = ["P1-obsL2P1", "P2-obsL1P2"]


def _model(dtype: torch.dtype = torch.float64, seed: int = 0, **options) -> O3CondDenoiser:
    torch.manual_seed(seed)
    return O3CondDenoiser(O3DenoiserConfig(**{**BASE, **options}), dtype=dtype)


def _inputs(model: O3CondDenoiser, steps: int, dtype: torch.dtype, seed: int = 0, batch: int = B):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, steps, *model.obs_shape, generator=gen, dtype=torch.float64).to(dtype)
    # entities drift through space (a random walk), so pairs near and beyond the cutoff both occur
    p = (0.8 * torch.randn(batch, steps, E, 3, generator=gen, dtype=torch.float64)).cumsum(1).to(dtype)
    x = torch.randn(batch, TX, 3, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype) * 50
    return x, k, z, p


def _rotation_about(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rodrigues: the rotation by ``angle`` about the unit ``axis``."""
    a = axis / axis.norm()
    k = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _act(model: O3CondDenoiser, g: torch.Tensor, t: torch.Tensor, x, k, z, p):
    """The inputs moved by ``x -> g x`` (actions, features) and ``p -> g p + t`` (positions)."""
    g_ = g.to(x.dtype)
    return x @ g_.T, k, act_on_features(g, z, model.obs_layout), p @ g_.T + t.to(p.dtype)


def _error(model: O3CondDenoiser, g: torch.Tensor, t: torch.Tensor, inputs) -> float:
    """Relative equivariance error of one group element and translation."""
    x, k, z, p = inputs
    gx, _, gz, gp = _act(model, g, t, *inputs)
    with torch.no_grad():
        y, y_g = model(x, k, z, positions=p), model(gx, k, gz, positions=gp)
    return float((y_g - y @ g.to(y.dtype).T).abs().max() / y.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pseudo,obs_degree,obs_pseudo", LAYOUTS, ids=LAYOUT_IDS)
def test_denoiser_is_o3_equivariant_and_translation_invariant(pseudo, obs_degree, obs_pseudo, dtype) -> None:
    """Rotations, rotoreflections and a mirror (det -1) with a translation: ``V(g X, g . Z, g p + t) = g V``."""
    model = _model(dtype, include_pseudotensors=pseudo, obs_max_degree=obs_degree, obs_pseudotensors=obs_pseudo)
    inputs = _inputs(model, 4, dtype)
    gen = torch.Generator().manual_seed(7)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    elements = [o3_element(gen, False), o3_element(gen, True), mirror @ o3_element(gen, False)]
    t = torch.randn(3, generator=gen, dtype=torch.float64) * 3
    for g in elements:
        assert _error(model, g, t, inputs) <= tol
    # the check can fail: a polar vector moved as an axial one under a reflection (not moved) breaks it
    x, k, z, p = inputs
    y_g = model(x @ mirror.T.to(dtype), k, z, positions=p @ mirror.T.to(dtype))
    assert float((y_g - model(x, k, z, positions=p) @ mirror.T.to(dtype)).abs().max().detach()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@torch.no_grad()
def test_entities_are_a_set_and_action_tokens_are_ordered(dtype) -> None:
    """Permuting the entities (the same way at every step) leaves the output unchanged, for the centroid reference
    with gravity too; permuting the action tokens does not permute the output (each index has its embedding)."""
    for options in ({}, {"gravity": (0.0, 0.0, -1.0)}):
        model = _model(dtype, **options)
        x, k, z, p = _inputs(model, 4, dtype)
        y = model(x, k, z, positions=p)
        perm = torch.tensor([2, 0, 1])
        assert_close(model(x, k, z[:, :, perm], positions=p[:, :, perm]), y, dtype)
    order = torch.tensor([1, 0, 3, 2])
    y_perm = model(x[:, order], k, z, positions=p)
    assert float((y_perm - y[:, order]).abs().max() / y.abs().max()) > 1e-4


@torch.no_grad()
def test_reference_entity_makes_the_base_distinct_and_keeps_translation_invariance() -> None:
    """With ``reference_entity=0`` (the robot base) a permutation moving the base changes the output; permuting the
    other entities and translating do not."""
    model = _model(reference_entity=0)
    x, k, z, p = _inputs(model, 3, torch.float64)
    y = model(x, k, z, positions=p)
    swap_others, move_base = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2])
    assert_close(model(x, k, z[:, :, swap_others], positions=p[:, :, swap_others]), y, torch.float64)
    assert_close(model(x, k, z, positions=p + torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)), y, torch.float64)
    moved = model(x, k, z[:, :, move_base], positions=p[:, :, move_base])
    assert float((moved - y).abs().max() / y.abs().max()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gravity_leaves_the_vertical_axis_subgroup(dtype) -> None:
    """With gravity along ``-z``: equivariant under rotations about ``z`` and reflections through vertical planes;
    not under a tilt nor the inversion (which flip the gravity token). Without gravity the same tilt is a symmetry."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    t = torch.randn(3, generator=gen, dtype=torch.float64) * 3
    spin = _rotation_about(up, 1.1)
    vertical_mirror = spin @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)) @ spin.T
    tilt = _rotation_about(torch.tensor([1.0, 0.3, 0.0], dtype=torch.float64), 0.7)
    model = _model(dtype, include_pseudotensors=True, obs_max_degree=1, obs_pseudotensors=True, gravity=(0, 0, -9.81))
    inputs = _inputs(model, 4, dtype)
    for g in (spin, vertical_mirror, vertical_mirror @ spin):
        assert _error(model, g, t, inputs) <= tol
    for g in (tilt, -torch.eye(3, dtype=torch.float64)):
        assert _error(model, g, t, inputs) > 1e-3
    free = _model(dtype, include_pseudotensors=True, obs_max_degree=1, obs_pseudotensors=True)
    assert _error(free, tilt, t, _inputs(free, 4, dtype)) <= tol


STREAM_CASES = {
    "centroid": {},
    "gravity-base-P2": {"gravity": (0.0, 0.0, -1.0), "reference_entity": 0, "include_pseudotensors": True},
    "no-encoder": {"num_cond_layers": 0, "cond_horizon": 3},
}


@pytest.mark.parametrize("options", list(STREAM_CASES.values()), ids=list(STREAM_CASES))
def test_streamed_denoiser_equals_the_batch_forward_over_ring_wraps(options) -> None:
    """210 control steps (the encoder rings of 2 steps and memory rings of 2-3 steps wrap 70-105 times): the
    streamed denoiser equals ``forward`` on the newest ``receptive_field()`` steps, including steps observed two at a
    time, a row advanced alone (``rows``) and a row reset mid-stream, float64 within 1e-10."""
    model = _model(**options).eval()
    steps = 210
    x, k, z, p = _inputs(model, steps + 5, torch.float64, seed=3)
    rf = model.receptive_field()
    state = model.init_state(B, max_tokens_per_step=2)
    start = [0, 0]  # each row's first step since its reset

    def check(t: int) -> None:
        """Both rows have observed steps start[row] .. t - 1."""
        got = model.denoise(x, k, state)
        for row in range(B):
            first = max(start[row], t - rf)
            one = slice(row, row + 1)
            expected = model(x[one], k[one], z[one, first:t], positions=p[one, first:t])
            assert_close(got[one], expected, torch.float64)

    t, restarted = 0, False
    while t < steps:
        if t >= 101 and not restarted:  # row 0 restarts, then each row advances alone by one step
            state.reset([0])
            start[0], restarted = t, True
            for row in range(B):
                model.observe(z[row : row + 1, t], state, [row], positions=p[row : row + 1, t])
            t += 1
        else:
            s = 2 if t % 37 == 5 else 1  # now and then two control steps in one call
            model.observe(z[:, t : t + s], state, positions=p[:, t : t + s])
            t += s
        if t % 7 == 0 or t > steps - 3:
            check(t)
    y, _ = model.forward_steps(
        z[:, t : t + 3], state, positions=p[:, t : t + 3], actions=x[:, None].expand(B, 3, TX, 3), opt_step=k
    )
    expected = model(x, k, z[:, t + 3 - rf : t + 3], positions=p[:, t + 3 - rf : t + 3])
    assert_close(y[:, -1], expected, torch.float64)


def test_streaming_contract_snapshot_and_model_state_dict_round_trip() -> None:
    """The contract's signatures; a state snapshot restored into a fresh state continues identically; the weights
    and the config round-trip into a new model with the same outputs."""
    model = _model(gravity=(0.0, 0.0, -1.0))
    assert isinstance(model, StreamingModule)
    for method in (model.forward_step, model.forward_steps):
        params = list(inspect.signature(method).parameters.values())
        assert [q.kind for q in params[:2]] == [inspect.Parameter.POSITIONAL_ONLY] * 2
        assert all(q.kind is inspect.Parameter.KEYWORD_ONLY for q in params[2:])
    x, k, z, p = _inputs(model, 12, torch.float64, seed=4)
    state = model.init_state(B)
    for t in range(8):
        model.observe(z[:, t], state, positions=p[:, t])
    snapshot = state.state_dict()
    restored = model.init_state(B)
    restored.load_state_dict(snapshot)
    assert isinstance(restored, O3DenoiserState)
    for t in range(8, 12):
        model.observe(z[:, t], state, positions=p[:, t])
        model.observe(z[:, t], restored, positions=p[:, t])
    assert torch.equal(model.denoise(x, k, restored), model.denoise(x, k, state))

    config = O3DenoiserConfig.from_dict(model.config.to_dict())
    assert config == model.config
    twin = O3CondDenoiser.from_config(config, dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(x, k, z, positions=p), model(x, k, z, positions=p))
    assert not torch.equal(_model(seed=1, gravity=(0.0, 0.0, -1.0))(x, k, z, positions=p), model(x, k, z, positions=p))


def test_bad_input_is_refused_naming_the_argument() -> None:
    model = _model()
    x, k, z, p = _inputs(model, 3, torch.float64)
    state = model.init_state(B)
    nan = z.clone()
    nan[0, 0, 0, 0, 0, 0] = float("nan")
    cases = [
        (ValueError, r"Z: expected \(B, T, 3, 1, 4, 2\)", lambda: model(x, k, z[..., :1], positions=p)),
        (ValueError, r"positions: expected shape \(2, 3, 3, 3\)", lambda: model(x, k, z, positions=p[:, :2])),
        (ValueError, r"Z: expected flat tokens \(B, T, 33\) without positions", lambda: model(x, k, z, positions=None)),
        (ValueError, r"tokens: expected \(\.\.\., 33\)", lambda: model(x, k, z.flatten(2)[..., :30])),
        (
            ValueError,
            r"cond_lengths: expected \(2,\) window lengths in 1..3",
            lambda: model(x, k, z, positions=p, cond_lengths=torch.tensor([0, 3])),
        ),
        (ValueError, r"X: expected \(B, Tx, 3\) with Tx in 1..4", lambda: model(x.repeat(1, 2, 1), k, z, positions=p)),
        (ValueError, "X: expected batch size 2", lambda: model(x[:1], k, z, positions=p)),
        (TypeError, "X: expected dtype torch.float64", lambda: model(x.float(), k, z, positions=p)),
        (TypeError, "Z: expected dtype torch.float64", lambda: model(x, k, z.float(), positions=p)),
        (ValueError, "Z: expected finite values", lambda: model(x, k, nan, positions=p)),
        (ValueError, r"opt_step: expected a finite scalar or shape \(2,\)", lambda: model(x, k[:1], z, positions=p)),
        (ValueError, "rows: .* have no observation", lambda: model.denoise(x, k, state)),
        (TypeError, "state: expected the O3DenoiserState", lambda: model.denoise(x, k, {})),
        (
            ValueError,
            "Z: expected at most max_tokens_per_step=1",
            lambda: model.observe(z[:, :2], state, positions=p[:, :2]),
        ),
        (ValueError, "Z: expected batch size 1", lambda: model.observe(z[:, 0], state, [0], positions=p[:, 0])),
        (ValueError, "max_tokens_per_step", lambda: model.init_state(B, max_tokens_per_step=0)),
        (ValueError, "num_entities: expected an integer >= 1", lambda: O3DenoiserConfig(**{**BASE, "num_entities": 0})),
        (ValueError, "reference_entity: expected None or an entity in 0..2", lambda: _model(reference_entity=3)),
        (ValueError, "gravity: expected None or a nonzero", lambda: _model(gravity=(0.0, 0.0, 0.0))),
        (ValueError, "num_attention_heads: expected a divisor", lambda: _model(num_attention_heads=3)),
        (
            ValueError,
            r"config: unknown O3CondDenoiser options \['horizon'\]",
            lambda: O3DenoiserConfig.from_dict({"horizon": 1}),
        ),
        (TypeError, "config: expected an O3DenoiserConfig", lambda: O3CondDenoiser(BASE)),  # type: ignore[arg-type]
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    assert int(model.num_observed(state).max()) == 0  # no refused call wrote to the state


def test_gravity_token_follows_the_weights_dtype() -> None:
    """Built in the default dtype, then moved with ``.double()``: the gravity direction is a buffer of the weights'
    dtype both times (a float64 buffer next to float32 weights was refused by the embedding)."""
    torch.manual_seed(0)
    model = O3CondDenoiser(O3DenoiserConfig(**{**BASE, "gravity": (0.0, 0.0, -1.0)}))
    for dtype in (torch.float32, torch.float64):
        model = model if dtype == torch.float32 else model.to(dtype)
        x, k, z, p = _inputs(model, 3, dtype)
        with torch.no_grad():
            assert model(x, k, z, positions=p).dtype == dtype


@pytest.mark.parametrize("options", [{}, {"num_cond_layers": 0, "cond_horizon": 3}], ids=["encoder", "no-encoder"])
@torch.no_grad()
def test_flat_tokens_and_padded_windows_equal_the_plain_forward(options) -> None:
    """The trainer's form of the input: flat tokens ``(B, T, token_dim)`` (features then positions) and left-padded
    windows with ``cond_lengths``; each example equals ``forward`` on its own unpadded window, float64 within 1e-10,
    whatever the padding holds."""
    model = _model(**options)
    x, k, z, p = _inputs(model, 4, torch.float64)
    tokens = model.join_tokens(z, p)
    assert tokens.shape == (B, 4, model.token_dim)
    back = model.split_tokens(tokens)
    assert torch.equal(back[0], z) and torch.equal(back[1], p)
    assert_close(model(x, k, tokens), model(x, k, z, positions=p), torch.float64)
    lengths = torch.tensor([2, 4])
    padded = tokens.clone()
    padded[0, :2] = 1e3 * torch.randn(2, model.token_dim, dtype=torch.float64)  # padding: anything
    y = model(x, k, padded, cond_lengths=lengths)
    for b in range(B):
        first = 4 - int(lengths[b])
        one = slice(b, b + 1)
        assert_close(y[one], model(x[one], k[one], z[one, first:], positions=p[one, first:]), torch.float64)
