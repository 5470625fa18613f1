"""The small blocks: layout, radial basis, Dense, TensorProduct, O3LayerNorm, gated MLP."""

import pytest
import torch
from o3_testing import act_on_features, assert_close, o3_element

from streamtx.nn.o3 import (
    Dense,
    GatedMLP,
    IrrepsLayout,
    O3LayerNorm,
    RadialBasis,
    TensorProduct,
    clebsch_gordan,
    gated_silu,
    smooth_cutoff,
)

LAYOUTS = [IrrepsLayout(l, p) for l in (0, 1, 2) for p in (False, True)]
IDS = [f"L{lay.max_degree}P{lay.num_parities}" for lay in LAYOUTS]


def _features(layout: IrrepsLayout, f: int, gen: torch.Generator, lead=(4,), dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*lead, *layout.shape(f), generator=gen, dtype=dtype)


def _check_equivariant(fn, layout_in: IrrepsLayout, layout_out: IrrepsLayout, x: torch.Tensor, gen) -> None:
    for improper in (False, True):
        g = o3_element(gen, improper)
        assert_close(fn(act_on_features(g, x, layout_in)), act_on_features(g, fn(x), layout_out), x.dtype)


# ---------------------------------------------------------------- layout
def test_layout_shapes_parities_and_labels() -> None:
    lay = IrrepsLayout(2, True)
    assert lay.shape(5) == (2, 9, 5)
    assert lay.degree_index().tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [lay.label(p, l) for p, l in lay.irreps()] == ["0+", "1+", "2+", "0-", "1-", "2-"]
    natural = IrrepsLayout(2)
    assert [natural.label(p, l) for p, l in natural.irreps()] == ["0+", "1-", "2+"]
    assert natural.parity_signs().tolist() == [[1, -1, -1, -1, 1, 1, 1, 1, 1]]
    assert IrrepsLayout.of(torch.zeros(3, 2, 4, 7)) == IrrepsLayout(1, True)


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="max_degree"):
        IrrepsLayout(-1)
    with pytest.raises(TypeError, match="pseudotensors"):
        IrrepsLayout(1, 1)
    with pytest.raises(ValueError, match="x: axis -2"):
        IrrepsLayout.of(torch.zeros(2, 1, 5, 3))
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 1, 4, 3\)"):
        IrrepsLayout(1).check(torch.zeros(2, 1, 4, 2), 3)
    with pytest.raises(TypeError, match="floating-point"):
        IrrepsLayout(1).check(torch.zeros(2, 1, 4, 3, dtype=torch.long), 3)


# ---------------------------------------------------------------- radial basis
@pytest.mark.parametrize("kind", ["sinc", "gaussian"])
def test_radial_basis_vanishes_smoothly_at_the_cutoff(kind: str) -> None:
    basis = RadialBasis(6, cutoff=2.0, kind=kind)
    d = torch.tensor([0.0, 0.5, 1.999999, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    phi = basis(d)
    assert phi.shape == (5, 6)
    assert phi[0].abs().max() > 0.1 and phi[1].abs().max() > 0.1
    assert phi[2].abs().max() < 1e-100 and not phi[3:].any()
    phi.sum().backward()
    assert torch.isfinite(d.grad).all() and d.grad[3:].abs().max() == 0
    if kind == "sinc":  # e3x's sinc: sin(pi (k+1) d / c) / (pi (k+1) d / c), times the cutoff
        k = torch.arange(1, 7, dtype=torch.float64)
        x = 0.5 / 2.0
        expected = torch.sin(torch.pi * k * x) / (torch.pi * k * x) * smooth_cutoff(torch.tensor(0.5).double(), 2.0)
        assert (phi[1] - expected).abs().max() < 1e-14


def test_smooth_cutoff_values_and_bad_radial_arguments() -> None:
    assert smooth_cutoff(torch.tensor(0.0), 1.5).item() == 1.0
    assert smooth_cutoff(torch.tensor(1.5), 1.5).item() == 0.0
    with pytest.raises(ValueError, match="num_basis"):
        RadialBasis(0, 1.0)
    with pytest.raises(ValueError, match="cutoff"):
        RadialBasis(4, 0.0)
    with pytest.raises(ValueError, match="kind"):
        RadialBasis(4, 1.0, kind="bessel")


# ---------------------------------------------------------------- Dense
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_dense_is_equivariant_and_biases_only_the_even_scalars(layout: IrrepsLayout) -> None:
    gen = torch.Generator().manual_seed(0)
    dense = Dense(layout, 5, 3, dtype=torch.float64)
    _check_equivariant(dense, layout, layout, _features(layout, 5, gen), gen)
    y0 = dense(torch.zeros(2, *layout.shape(5), dtype=torch.float64))
    assert torch.equal(y0[:, 0, 0], dense.bias.detach().expand(2, 3))
    y0[:, 0, 0] = 0
    assert not y0.any()


def test_dense_profiles_equal_dense_of_a_separable_input() -> None:
    gen = torch.Generator().manual_seed(1)
    layout = IrrepsLayout(2)
    dense = Dense(layout, 4, 6, dtype=torch.float64)
    s = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    y[:, 0] = 1  # as the degree-0 harmonic: the bias is not scaled by it
    direct = dense(y[:, None, :, None] * s[:, None, None, :])  # (7, 1, 9, 6)
    profiles = dense.profiles(s)[:, :, layout.degree_index()]  # (7, 1, 9, 6)
    assert_close(direct, y[:, None, :, None] * profiles, torch.float64)


def test_dense_rejects_bad_input() -> None:
    dense = Dense(IrrepsLayout(1), 4, 2)
    with pytest.raises(ValueError, match="x: expected shape"):
        dense(torch.zeros(3, 2, 4, 4))
    with pytest.raises(ValueError, match="in_features"):
        Dense(IrrepsLayout(1), 0, 2)
    with pytest.raises(TypeError, match="layout"):
        Dense(2, 4, 2)
    with pytest.raises(ValueError, match="params: expected blocks"):
        dense.load_e3x_({"0+": {"kernel": torch.zeros(4, 2)}})


# ---------------------------------------------------------------- TensorProduct
@pytest.mark.parametrize("layout", LAYOUTS[2:], ids=IDS[2:])
def test_tensor_product_is_equivariant(layout: IrrepsLayout) -> None:
    gen = torch.Generator().manual_seed(2)
    other = IrrepsLayout(1)
    tp = TensorProduct(layout, other, layout, 3, dtype=torch.float64)
    x, y = _features(layout, 3, gen), _features(other, 3, gen)
    for improper in (False, True):
        g = o3_element(gen, improper)
        rotated = tp(act_on_features(g, x, layout), act_on_features(g, y, other))
        assert_close(rotated, act_on_features(g, tp(x, y), layout), torch.float64)


def test_tensor_product_paths_follow_parity() -> None:
    natural = IrrepsLayout(1)
    # Natural parity only: vector x vector -> vector would be the (axial) cross product, which has no slot.
    assert (0, 1, 0, 1, 0, 1) not in TensorProduct(natural, natural, natural, 2).paths
    both = IrrepsLayout(1, True)
    # With pseudotensors it exists and lands in the even slot (1+): polar x polar = axial.
    assert (1, 1, 1, 1, 0, 1) in TensorProduct(both, both, both, 2).paths
    assert (1, 1, 1, 1, 1, 1) not in TensorProduct(both, both, both, 2).paths


def test_tensor_product_matches_a_direct_per_path_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    lay = IrrepsLayout(2, True)
    tp = TensorProduct(lay, lay, lay, 2, dtype=torch.float64)
    x, y = _features(lay, 2, gen, lead=()), _features(lay, 2, gen, lead=())
    expected = torch.zeros(*lay.shape(2), dtype=torch.float64)
    for w, (p1, l1, p2, l2, p3, l3) in zip(tp.weight, tp.paths):
        c = clebsch_gordan(l1, l2, l3)
        block = torch.einsum("af,bf,abc->cf", x[p1, l1 * l1 : (l1 + 1) ** 2], y[p2, l2 * l2 : (l2 + 1) ** 2], c)
        expected[p3, l3 * l3 : (l3 + 1) ** 2] += w * block
    assert_close(tp(x, y), expected.detach(), torch.float64)


def test_tensor_product_keeps_float64_coefficients_after_a_dtype_round_trip() -> None:
    lay = IrrepsLayout(2, True)
    tp = TensorProduct(lay, lay, lay, 2).double()  # built in float32, then moved
    exact = TensorProduct(lay, lay, lay, 2, dtype=torch.float64)
    exact.load_state_dict(tp.state_dict())
    assert torch.equal(tp.coupling(), exact.coupling())


def test_tensor_product_rejects_bad_input() -> None:
    even = IrrepsLayout(0)
    with pytest.raises(ValueError, match="kernel: expected shape"):
        TensorProduct(even, even, even, 2).load_e3x_(torch.zeros(1, 1, 1, 1, 1, 1, 3))
    with pytest.raises(ValueError, match="y: expected shape"):
        TensorProduct(even, even, even, 2)(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3))


# ---------------------------------------------------------------- norm and MLP
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_layer_norm_and_gated_mlp_are_equivariant(layout: IrrepsLayout) -> None:
    gen = torch.Generator().manual_seed(4)
    norm = O3LayerNorm(layout, 6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    mlp = GatedMLP(layout, 6, 10, dtype=torch.float64)
    x = _features(layout, 6, gen) * 3 + 1
    _check_equivariant(norm, layout, layout, x, gen)
    _check_equivariant(mlp, layout, layout, x, gen)


def test_layer_norm_is_torch_layer_norm_on_scalars_and_normalizes_every_block() -> None:
    gen = torch.Generator().manual_seed(5)
    layout = IrrepsLayout(2, True)
    norm = O3LayerNorm(layout, 8, elementwise_affine=False, dtype=torch.float64)
    x = _features(layout, 8, gen) * 5 + 2
    y = norm(x)
    reference = torch.nn.functional.layer_norm(x[:, 0, 0], (8,), eps=norm.eps)
    assert_close(y[:, 0, 0], reference, torch.float64)
    for p, l in layout.irreps():
        block = y[:, p, l * l : (l + 1) ** 2]
        assert ((block**2).mean((-2, -1)) - 1).abs().max() < 1e-4  # unit mean square up to eps


def test_gated_silu_is_silu_on_scalars() -> None:
    x = torch.randn(3, 1, 4, 5, dtype=torch.float64)
    y = gated_silu(x)
    assert_close(y[:, 0, 0], torch.nn.functional.silu(x[:, 0, 0]), torch.float64)
    assert_close(y[:, 0, 1:], torch.sigmoid(x[:, 0, :1]) * x[:, 0, 1:], torch.float64)


def test_norm_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eps"):
        O3LayerNorm(IrrepsLayout(1), 4, eps=0.0)
    with pytest.raises(ValueError, match="x: expected shape"):
        O3LayerNorm(IrrepsLayout(1), 4)(torch.zeros(2, 1, 4, 3))


# ---------------------------------------------------------------- inference caches
def test_cached_tables_follow_in_place_parameter_updates() -> None:
    """Under ``no_grad`` the expanded weights and coupling tables are cached; an in-place update (an optimizer step,
    ``load_state_dict``) must invalidate them."""
    gen = torch.Generator().manual_seed(6)
    lay = IrrepsLayout(1, True)
    dense, tp = Dense(lay, 3, 3, dtype=torch.float64), TensorProduct(lay, lay, lay, 3, dtype=torch.float64)
    x = _features(lay, 3, gen)
    with torch.no_grad():
        d0, t0 = dense(x), tp(x, x)
        dense.weight.mul_(2)
        tp.weight.mul_(2)
        d1, t1 = dense(x), tp(x, x)
    bias = torch.zeros_like(d0)
    bias[..., 0, 0, :] = dense.bias.detach()
    assert_close(d1 - bias, 2 * (d0 - bias), torch.float64)
    assert_close(t1, 2 * t0, torch.float64)
    assert_close(tp(x, x).detach(), t1, torch.float64)  # the differentiable path agrees with the cache


def test_layers_reject_inputs_of_another_dtype() -> None:
    lay = IrrepsLayout(1)
    with pytest.raises(TypeError, match="x: expected dtype torch.float64"):
        Dense(lay, 2, 2, dtype=torch.float64)(torch.zeros(1, 1, 4, 2))
    with pytest.raises(TypeError, match="y: expected dtype torch.float32"):
        TensorProduct(lay, lay, lay, 2)(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2, dtype=torch.float64))
