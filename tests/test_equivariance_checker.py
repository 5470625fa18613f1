"""The shared checker ``equivariance_error`` itself: ~0 for an equivariant layer, large for a generic one."""

import torch

from streamtx.nn import eLinear, equivariance_error
from streamtx.symmetry import Representation, cyclic


def _rep() -> Representation:
    return Representation.regular(cyclic(4), 2)  # reg(C4)^2, size 8


def _x(rep: Representation) -> torch.Tensor:
    return torch.randn(5, rep.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_checker_is_zero_for_elinear():
    torch.manual_seed(0)
    rep = _rep()
    layer = eLinear(rep, rep)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    err = equivariance_error(layer, lambda m, xs: m(xs[0]), [(_x(rep), rep)], rep)
    assert err <= 1e-10


def test_checker_flags_plain_linear():
    torch.manual_seed(0)
    rep = _rep()
    layer = torch.nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    err = equivariance_error(layer, lambda m, xs: m(xs[0]), [(_x(rep), rep)], rep)
    assert err > 0.1


def test_checker_flags_a_wrong_output_representation():
    """An equivariant layer checked against the wrong output representation (trivial action) is flagged."""
    torch.manual_seed(0)
    rep = _rep()
    layer = eLinear(rep, rep)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    wrong = Representation.trivial(cyclic(4), 8)
    err = equivariance_error(layer, lambda m, xs: m(xs[0]), [(_x(rep), rep)], wrong)
    assert err > 0.1
