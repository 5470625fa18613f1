"""Same weights, same inputs: ``O3MultiheadAttention`` against e3x's ``MultiHeadAttention`` (float64).

The reference outputs come from ``e3x_fixture.npz``, written by ``make_e3x_fixtures.py`` in a separate environment with
e3x installed; this test needs neither jax nor e3x and skips if the fixture is absent.

The weight mapping is exact. Where the definitions differ, and how the mapping bridges it:

* e3x takes the relative basis as an input; this layer computes it from positions. e3x is given
  ``e3x.nn.basis(r, radial_fn=sinc(limit=cutoff), cutoff_fn=smooth_cutoff)`` of ``r = positions[src] -
  positions[dst]``, which is this layer's ``radial="sinc"`` basis.
* e3x splits query and key channels into heads by ``channel % H`` and value channels by ``channel // (Q / H)``; this
  layer uses contiguous heads everywhere, so ``load_e3x_`` permutes the query, key and encoding channels.
* e3x's dense index lists (``adj_idx`` + ``where``) are given as all pairs plus a ``where`` mask, which is this
  layer's boolean ``mask``.
"""

import pytest
import torch
from e3x_fixtures import HERE, config, load, params

from streamtx.nn.o3 import O3MultiheadAttention, clebsch_gordan, spherical_harmonics

pytestmark = pytest.mark.skipif(
    not (HERE / "e3x_fixture.npz").exists(), reason="e3x fixture not generated (see make_e3x_fixtures.py)"
)


@pytest.fixture(scope="module")
def data() -> dict:
    return load("e3x_fixture.npz")


CASES = ["l2_p2_biases_cutoff", "l1_p1_heads3", "l2_p1_basis1_plain_qk", "l1_p2_no_relative"]


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_e3x_with_the_same_weights(data: dict, case: str) -> None:
    cfg = config(data, case)
    layer = O3MultiheadAttention(
        cfg["features"],
        cfg["max_degree"],
        cfg["num_heads"],
        include_pseudotensors=cfg["pseudotensors"],
        qkv_features=cfg["qkv_features"],
        out_features=cfg["out_features"],
        num_basis=cfg["num_basis"],
        cutoff=cfg["cutoff"],
        radial="sinc",
        basis_max_degree=cfg["basis_max_degree"],
        use_relative_positional_encoding_qk=cfg["rel_qk"],
        use_relative_positional_encoding_v=cfg["rel_v"],
        use_basis_bias=cfg["use_basis_bias"],
        query_use_bias=cfg["qkv_bias"],
        key_use_bias=cfg["qkv_bias"],
        value_use_bias=cfg["qkv_bias"],
        softmax_cutoff=cfg["softmax_cutoff"],
        dtype=torch.float64,
    ).load_e3x_(params(data, case))
    x, pos = torch.from_numpy(data[f"{case}/x"]), torch.from_numpy(data[f"{case}/positions"])
    mask = torch.from_numpy(data[f"{case}/mask"])
    expected = torch.from_numpy(data[f"{case}/y"])
    y = layer(x, pos, mask)
    assert y.shape == expected.shape
    assert (y - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_harmonics_and_coefficients_match_e3x(data: dict) -> None:
    y = spherical_harmonics(torch.from_numpy(data["harmonics/r"]), 3)
    assert (y - torch.from_numpy(data["harmonics/y"])).abs().max() <= 1e-12
    table = torch.from_numpy(data["clebsch_gordan/max_degree_3"])
    for l1 in range(4):
        for l2 in range(4):
            for l3 in range(4):
                block = table[l1**2 : (l1 + 1) ** 2, l2**2 : (l2 + 1) ** 2, l3**2 : (l3 + 1) ** 2]
                assert (clebsch_gordan(l1, l2, l3) - block).abs().max() <= 1e-12, (l1, l2, l3)
