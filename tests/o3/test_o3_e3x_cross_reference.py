"""Same weights, same inputs: ``O3MultiheadAttention`` against e3x's ``MultiHeadAttention`` as cross-attention
(float64), with the inputs e3x's call takes: its own basis or one computed elsewhere (reciprocal Bernstein radial
functions), given cutoff values, dense index lists with ``where``, sparse index lists with ``num_segments`` and
``indices_are_sorted``, and an output layout chosen by e3x's parity rule.

The reference outputs come from ``e3x_cross_fixture.npz``, written by ``make_e3x_fixtures.py`` in a separate
environment with e3x installed; this test needs neither jax nor e3x.
"""

import pytest
import torch
from e3x_fixtures import config, load, params

from streamtx.nn.o3 import O3MultiheadAttention

CASES = [
    "q_l2p2_kv_l1p1_sinc",
    "q_l1p1_kv_l2p2_given_basis_adj",
    "q_l2p1_kv_l1p2_sparse_no_rel_v",
    "q_l1p2_kv_l1p1_scalar_out_rule",
]


@pytest.fixture(scope="module")
def data() -> dict:
    return load("e3x_cross_fixture.npz")


def _layer(cfg: dict) -> O3MultiheadAttention:
    (lq, pq, fq), (lkv, pkv, fkv), (lout, pout, fout) = cfg["q"], cfg["kv"], cfg["out"]
    return O3MultiheadAttention(
        fq,
        lq,
        cfg["heads"],
        include_pseudotensors=pq,
        kv_features=fkv,
        kv_max_degree=lkv,
        kv_pseudotensors=pkv,
        out_max_degree=lout,
        out_pseudotensors=pout,
        qkv_features=cfg["qkv"],
        out_features=fout,
        num_basis=cfg["num_basis"],
        cutoff=cfg["cutoff"],
        basis_max_degree=cfg["basis_max_degree"],
        use_relative_positional_encoding_qk=cfg["rel_qk"],
        use_relative_positional_encoding_v=cfg["rel_v"],
        use_basis_bias=cfg["basis_bias"],
        query_use_bias=cfg["qkv_bias"],
        key_use_bias=cfg["qkv_bias"],
        value_use_bias=cfg["qkv_bias"],
        softmax_cutoff=cfg["cutoff_value"] == "smooth",
        dtype=torch.float64,
    )


def _call(layer: O3MultiheadAttention, data: dict, case: str, cfg: dict, own_basis: bool) -> torch.Tensor:
    """The layer's call for a case: with its own basis and cutoff computed from positions (``own_basis``, only for
    the sinc cases over all pairs), else with e3x's basis, cutoff values and index lists passed through."""
    t = {
        k.split("/", 1)[1]: torch.from_numpy(v)
        for k, v in data.items()
        if k.startswith(f"{case}/") and "/param/" not in k and not k.endswith("/config")
    }
    if own_basis:
        return layer(t["x"], t["positions"], t["where"], kv=t["kv"], kv_positions=t["kv_positions"])
    given = {"basis": t["basis"], "cutoff_value": t.get("cutoff_value")}
    if cfg["pairs"] == "sparse":
        pairs = {"dst_idx": t["dst_idx"], "src_idx": t["src_idx"], "num_segments": 5, "indices_are_sorted": True}
    else:
        pairs = {"adj_idx": t["adj_idx"], "where": t["where"]}
    return layer(t["x"], kv=t["kv"], **given, **pairs)


@pytest.mark.parametrize("case", CASES)
def test_cross_attention_matches_e3x_with_the_same_weights(data: dict, case: str) -> None:
    cfg = config(data, case)
    layer = _layer(cfg).load_e3x_(params(data, case))
    expected = torch.from_numpy(data[f"{case}/y"])
    scale = expected.abs().max()
    modes = [False] + ([True] if cfg["basis"] == "sinc" and cfg["pairs"] == "all" else [])
    for own_basis in modes:
        y = _call(layer, data, case, cfg, own_basis)
        assert y.shape == expected.shape, (own_basis, y.shape)
        err = (y - expected).abs().max()
        assert err <= 1e-12 * scale, f"own_basis={own_basis}: max error {err:.3e} vs scale {scale:.3e}"


def test_output_layout_follows_e3x_parity_rule(data: dict) -> None:
    """``include_pseudotensors=True`` with polar values (``P_kv = 1``) and a scalar output: no coupling path yields a
    pseudoscalar, so e3x returns ``P = 1``; so does this layer (and its output shape equals e3x's)."""
    cfg = config(data, "q_l1p2_kv_l1p1_scalar_out_rule")
    layer = _layer(cfg)
    assert cfg["out"][1] and not layer.out_layout.pseudotensors
    assert data["q_l1p2_kv_l1p1_scalar_out_rule/y"].shape[-3] == 1
    assert _layer({**cfg, "out": [1, True, 3]}).out_layout.pseudotensors  # with a vector output they exist
