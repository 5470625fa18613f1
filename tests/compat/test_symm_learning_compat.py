"""streamtx.compat.symm_learning: symm_learning's signatures and conventions on streamtx's layers; with escnn and
symm_learning installed, the same weights give the reference's outputs where the reference is equivariant, and its
documented example runs with only the import changed."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from layer_testing import quadruped, random_orthogonal

from streamtx.compat import symm_learning as sl
from streamtx.nn.equivariance import equivariance_error
from streamtx.symmetry import Representation, klein_four

TOL = 1e-10
JOINTS = Representation.direct_sum(*([quadruped("K4")[1]] * 4))  # 48 = 12 regular copies of K4


def params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_signatures_are_the_reference_ones():
    empty = inspect.Parameter.empty
    assert params(sl.eMultiheadAttention.__init__) == [
        ("in_rep", empty), ("num_heads", empty), ("dropout", 0.0), ("bias", True), ("add_bias_kv", False),
        ("add_zero_attn", False), ("device", None), ("dtype", None), ("init_scheme", "xavier_normal"),
    ]  # fmt: skip
    enc = params(sl.eTransformerEncoderLayer.__init__)
    assert [n for n, _ in enc] == [
        "in_rep", "self_attn", "dim_feedforward", "dropout", "activation", "layer_norm_eps", "norm_first",
        "norm_module", "bias", "device", "dtype", "init_scheme",
    ]  # fmt: skip
    dec = dict(params(sl.eTransformerDecoderLayer.__init__))
    assert list(dec)[:3] == ["in_rep", "self_attn", "multihead_attn"] and "device" not in dec
    assert dec["norm_first"] is True and dec["norm_module"] == "rmsnorm" and dec["init_scheme"] == "xavier_uniform"
    fwd = [n for n, _ in params(sl.eTransformerDecoderLayer.forward)]
    assert fwd[-4:] == ["tgt_positions", "memory_positions", "tgt_position_mask", "memory_position_mask"]
    assert dict(params(sl.eCondTransformer.__init__))["pos_encoding"] == "additive_absolute"
    assert dict(params(sl.eCondTransformer.get_optim_groups))["weight_decay"] == 1e-3
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        sl.eMultiheadAttention(JOINTS, 2, add_bias_kv=True)


def test_layers_are_equivariant_on_a_joint_space():
    torch.manual_seed(0)
    d = JOINTS.size
    attn = sl.eMultiheadAttention(JOINTS, 2, dtype=torch.float64)
    dec = sl.eTransformerDecoderLayer(
        JOINTS, sl.eMultiheadAttention(JOINTS, 2, dtype=torch.float64),
        sl.eMultiheadAttention(JOINTS, 2, dtype=torch.float64), dim_feedforward=2 * d, dropout=0.0,
    )  # fmt: skip
    x, m = torch.randn(2, 4, d, dtype=torch.float64), torch.randn(2, 5, d, dtype=torch.float64)
    assert equivariance_error(attn, lambda mod, xs: mod(xs[0], xs[0], xs[0])[0], [(x, JOINTS)], JOINTS) < TOL
    pos = torch.arange(4)
    err = equivariance_error(
        dec, lambda mod, xs: mod(xs[0], xs[1], tgt_positions=pos), [(x, JOINTS), (m, JOINTS)], JOINTS
    )
    assert err < TOL
    assert dec.linear1.out_features == 2 * d  # dim_feedforward rounded up to whole copies, as the reference


def test_regressor_and_optim_groups():
    torch.manual_seed(0)
    model = sl.eCondTransformer(JOINTS, JOINTS, None, 4, 3, 1, 2, 64, num_cond_layers=1, pos_encoding="none")
    y = model(torch.randn(2, 4, JOINTS.size), 5, torch.randn(2, 3, JOINTS.size))
    assert y.shape == (2, 4, JOINTS.size)
    decay, no_decay = model.get_optim_groups(weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="pos_encoding"):
        sl.eCondTransformer(JOINTS, JOINTS, None, 4, 3, 1, 2, 64, pos_encoding="rotary")


def test_reference_state_dict_needs_the_escnn_representation():
    attn = sl.eMultiheadAttention(Representation.regular(klein_four(), 4), 2)
    with pytest.raises(ValueError, match="escnn representation"):
        attn.load_state_dict({"parametrizations.in_proj_weight.original": torch.zeros(48, 16)})


# ---------------------------------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("escnn")
    return pytest.importorskip("symm_learning.nn")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def test_escnn_representations_convert_matrix_for_matrix(ref):
    from escnn.group import DihedralGroup, directsum

    from streamtx.compat.escnn_reps import escnn_element_indices, representation_from_escnn

    g = DihedralGroup(4)
    rep = directsum([g.regular_representation, g.irrep(1, 1)])
    ours = representation_from_escnn(rep)
    for element, index in zip(g.elements, escnn_element_indices(g)):
        assert np.allclose(ours(index), rep(element))
    assert representation_from_escnn(directsum([g.regular_representation] * 3)).regular_basis.aligned


def test_same_weights_same_outputs_where_the_reference_is_equivariant(ref):
    from escnn.group import DihedralGroup, directsum

    torch.manual_seed(0)
    g = DihedralGroup(4)
    in_rep = directsum([g.regular_representation] * 4)
    dt = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, mem = torch.randn(3, 5, in_rep.size), torch.randn(3, 6, in_rep.size)
        r_attn, o_attn = ref.eMultiheadAttention(in_rep, 2).eval(), sl.eMultiheadAttention(in_rep, 2).eval()
        o_attn.load_state_dict(r_attn.state_dict())
        assert _rel(o_attn(x, mem, mem)[0], r_attn(x, mem, mem)[0]) < TOL

        def pair(cls_ref, cls_ours, n_attn):
            r = cls_ref(in_rep, *[ref.eMultiheadAttention(in_rep, 2) for _ in range(n_attn)], 64, dropout=0.0)
            o = cls_ours(in_rep, *[sl.eMultiheadAttention(in_rep, 2) for _ in range(n_attn)], 64, dropout=0.0)
            o.load_state_dict(r.state_dict())
            return r.eval(), o.eval()

        r_enc, o_enc = pair(ref.eTransformerEncoderLayer, sl.eTransformerEncoderLayer, 1)
        assert _rel(o_enc(x, is_causal=True, src_mask=torch.ones(5, 5).triu(1).bool()), r_enc(x, is_causal=True,
                    src_mask=torch.ones(5, 5).triu(1).bool())) < TOL  # fmt: skip
        r_dec, o_dec = pair(ref.eTransformerDecoderLayer, sl.eTransformerDecoderLayer, 2)
        assert _rel(o_dec(x, mem), r_dec(x, mem)) < TOL
    finally:
        torch.set_default_dtype(dt)


def test_reference_breaks_equivariance_off_the_stacked_basis_and_compat_does_not(ref):
    from escnn.group import DihedralGroup, change_basis, directsum

    from streamtx.compat.escnn_reps import representation_from_escnn

    torch.manual_seed(0)
    g = DihedralGroup(4)
    stacked = directsum([g.regular_representation] * 4)
    rep = change_basis(stacked, random_orthogonal(stacked.size, np.random.default_rng(0)), name="rotated")
    ours_rep = representation_from_escnn(rep)
    x = torch.randn(2, 5, rep.size, dtype=torch.float64)
    errors = {}
    for name, attn in (("reference", ref.eMultiheadAttention(rep, 2)), ("compat", sl.eMultiheadAttention(rep, 2))):
        errors[name] = equivariance_error(attn, lambda m, xs: m(xs[0], xs[0], xs[0])[0], [(x, ours_rep)], ours_rep)
    print(f"equivariance error on a rotated regular basis: {errors}")
    assert errors["reference"] > 1e-2 and errors["compat"] < TOL


def test_reference_documented_example_runs_with_the_import_changed(ref):
    """symm_learning.nn.transformer.etransformer's own example (its __main__), with ``symm_learning.nn`` replaced by
    ``streamtx.compat.symm_learning``: layers, stacks through torch.nn.TransformerEncoder/Decoder, equivariance
    checks."""
    from escnn.group import CyclicGroup
    from symm_learning.representation_theory import direct_sum

    from streamtx.compat.escnn_reps import representation_from_escnn
    from streamtx.compat.symm_learning import eMultiheadAttention, eTransformerDecoderLayer, eTransformerEncoderLayer

    G = CyclicGroup(2)
    in_rep = direct_sum([G.regular_representation] * 2)
    encoder_kwargs = dict(
        in_rep=in_rep,
        self_attn=eMultiheadAttention(in_rep=in_rep, num_heads=1, dropout=0.1, bias=True),
        dim_feedforward=in_rep.size * 4,
        dropout=0.1,
        activation=torch.nn.ReLU(),
        norm_first=True,
    )
    etransformer = eTransformerEncoderLayer(**encoder_kwargs)
    etransformer.eval()
    rep = representation_from_escnn(in_rep)
    for depth in [1, 3]:
        base_layer = eTransformerEncoderLayer(**encoder_kwargs)
        base_layer.reset_parameters()
        base_layer.eval()
        encoder_stack = torch.nn.TransformerEncoder(
            encoder_layer=base_layer, num_layers=depth, enable_nested_tensor=False
        ).eval()
        x = torch.randn(4, 5, in_rep.size)
        assert equivariance_error(encoder_stack, lambda m, xs: m(xs[0]), [(x, rep)], rep) < TOL
    decoder_kwargs = dict(
        in_rep=in_rep,
        self_attn=eMultiheadAttention(in_rep=in_rep, num_heads=1, dropout=0.0, bias=True),
        multihead_attn=eMultiheadAttention(in_rep=in_rep, num_heads=1, dropout=0.0, bias=True),
        dim_feedforward=in_rep.size * 2,
        dropout=0.0,
        activation=torch.nn.ReLU(),
        norm_first=True,
    )
    tdecoder = eTransformerDecoderLayer(**decoder_kwargs)
    tdecoder.eval()
    assert tdecoder.check_equivariance() < TOL
    decoder_stack = torch.nn.TransformerDecoder(decoder_layer=tdecoder, num_layers=3).eval()
    tgt, mem = torch.randn(11, 3, in_rep.size), torch.randn(11, 5, in_rep.size)
    err = equivariance_error(decoder_stack, lambda m, xs: m(tgt=xs[0], memory=xs[1]), [(tgt, rep), (mem, rep)], rep)
    assert err < TOL
