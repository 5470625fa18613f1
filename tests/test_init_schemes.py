"""``init_scheme``: every parametrization draws its free parameters so that the dense weight has the scheme's
variance (symm_learning's scheme names), on every equivariant layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_testing import quadruped, random_orthogonal

from streamtx.models import eCondTransformerRegressor
from streamtx.nn import eLinear, eMultiheadAttention, eTransformerDecoderLayer, eTransformerEncoderLayer
from streamtx.nn.linear import INIT_SCHEMES, scheme_variance
from streamtx.symmetry import Representation, cyclic, dihedral, klein_four

K4 = klein_four()
D4 = dihedral(4)
WIDE = Representation.regular(K4, 48)  # 192
JOINTS = Representation.direct_sum(*([quadruped("K4")[1]] * 16))  # 192, signed permutations
ROTATED = Representation.regular(K4, 24).change_basis(random_orthogonal(96, np.random.default_rng(0)))
C2 = cyclic(2)
SMALL = Representation.regular(C2, 16).change_basis(random_orthogonal(32, np.random.default_rng(1)))
PAIRS = {  # one of each parametrization: convolution, lift, projection, Hom basis
    "conv": (WIDE, Representation.regular(K4, 32)),
    "lift": (JOINTS, WIDE),
    "project": (WIDE, JOINTS),
    "conv_rotated": (ROTATED, JOINTS),
    "basis": (SMALL + Representation.trivial(C2, 1), SMALL + Representation.trivial(C2, 1)),  # K = 545
}
RANDOM = [s for s in INIT_SCHEMES if s != "identity"]


@pytest.fixture(scope="module")
def layers() -> dict[str, eLinear]:
    """One layer per parametrization, built once (the Hom basis costs an SVD); each test re-draws it."""
    return {kind: eLinear(*pair, dtype=torch.float64) for kind, pair in PAIRS.items()}


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("scheme", RANDOM)
def test_dense_variance_matches_the_scheme(layers, kind, scheme):
    torch.manual_seed(0)
    in_rep, out_rep = PAIRS[kind]
    layer = layers[kind]
    assert layer.kind == kind.split("_")[0]
    layer.reset_parameters(scheme)
    target = scheme_variance(scheme, in_rep.size, out_rep.size)[1]
    assert abs(layer.dense()[0].var().item() / target - 1) < 0.1, (kind, scheme)


def test_constructor_scheme_is_the_default_of_reset():
    torch.manual_seed(0)
    in_rep, out_rep = PAIRS["lift"]
    layer = eLinear(in_rep, out_rep, dtype=torch.float64, init_scheme="kaiming_normal")
    for _ in range(2):  # at construction, then reset_parameters() without a scheme
        target = scheme_variance("kaiming_normal", in_rep.size, out_rep.size)[1]
        assert abs(layer.dense()[0].var().item() / target - 1) < 0.1
        layer.reset_parameters()


def test_identity_scheme_and_default():
    layer = eLinear(WIDE, WIDE, init_scheme="identity", dtype=torch.float64)
    w, b = layer.dense()
    assert torch.allclose(w, torch.eye(WIDE.size, dtype=torch.float64)) and torch.all(b == 0)
    torch.manual_seed(0)
    plain = eLinear(WIDE, WIDE, dtype=torch.float64)  # None: torch.nn.Linear's variance 1 / (3 d_in)
    assert abs(plain.dense()[0].var().item() * 3 * WIDE.size - 1) < 0.1
    with pytest.raises(ValueError, match="init_scheme: expected one of"):
        eLinear(WIDE, WIDE, init_scheme="orthogonal")


@pytest.mark.parametrize("scheme", ["xavier_uniform", "kaiming_normal"])
def test_layers_apply_the_scheme_to_every_linear_map(scheme):
    torch.manual_seed(0)
    rep = Representation.regular(D4, 16)
    attn = eMultiheadAttention(rep, 4, init_scheme=scheme)
    enc = eTransformerEncoderLayer(rep, 4, 4 * rep.size, init_scheme=scheme)
    dec = eTransformerDecoderLayer(rep, 4, 4 * rep.size, init_scheme=scheme)
    model = eCondTransformerRegressor(
        JOINTS, JOINTS, JOINTS, 4, 4, num_layers=1, num_attention_heads=2, embedding_dim=64, init_scheme=scheme
    )
    maps = [m for module in (attn, enc, dec, model) for m in module.modules() if isinstance(m, eLinear)]
    assert len(maps) > 20
    for m in maps:
        target = scheme_variance(scheme, m.in_features, m.out_features)[1]
        ratio = m.dense()[0].var().item() / target
        assert 0.75 < ratio < 1.25, (m, ratio)  # small maps: a looser band than the wide test above
    enc.norm1.weight.data.fill_(3.0)
    enc.reset_parameters("identity")
    assert torch.all(enc.norm1.weight == 1)
    assert torch.allclose(enc.self_attn.out_proj.dense()[0], torch.eye(rep.size))
