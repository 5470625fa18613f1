"""symm_learning-trained checkpoints in the compat modules, without escnn or symm_learning: the committed fixture
(tests/fixtures/compat/make_symm_learning_fixture.py, seeded symm_learning 0.8.1 modules) holds each module's dense
state (reference_dense_state), inputs and float64 reference outputs; loaded into streamtx.compat.symm_learning, the
outputs equal the reference's. With the reference installed, its raw state dicts load to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from layer_testing import rel_err

from streamtx.compat import symm_learning as sl
from streamtx.symmetry import Group, Representation

TOL = 1e-10
FIXTURE = Path(__file__).parents[1] / "fixtures" / "compat" / "symm_learning_d2.pt"


@pytest.fixture(scope="module")
def fixture() -> dict:
    data = torch.load(FIXTURE, weights_only=True)
    g = data["group"]
    group = Group([m.numpy() for m in g["generators"]], name=g["name"], max_order=g["order"])
    data["streamtx_reps"] = {
        key: Representation(group, rep["matrices"].numpy(), name=rep["name"]) for key, rep in data["reps"].items()
    }
    return data


def regressor(fixture: dict, name: str) -> tuple[sl.ReferenceCondTransformer, dict]:
    reps = fixture["streamtx_reps"]
    entry = fixture["models"][name]
    model = sl.ReferenceCondTransformer(reps["in"], reps["cond"], None, **entry["args"]).double().eval()
    return model, entry


@pytest.mark.parametrize("name", ["absolute_causal", "mlp_none", "postnorm", "relative"])
def test_reference_regressor_checkpoint_gives_the_reference_outputs(fixture, name):
    model, entry = regressor(fixture, name)
    model.load_state_dict(entry["dense"])
    inputs = fixture["inputs"]
    with torch.no_grad():
        y = model(inputs["X"], inputs["k"], inputs["Z"])
    assert rel_err(y, entry["output"]) < TOL
    assert model.check_equivariance() < TOL
    # and it trains like the reference: its two AdamW groups cover every parameter once
    decay, no_decay = model.get_optim_groups(weight_decay=0.01)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)


def test_float32_model_loads_the_checkpoint(fixture):
    """The dense state is float64; a float32 model stores it rounded and matches to float32 accuracy."""
    model, entry = regressor(fixture, "absolute_causal")
    model.float().load_state_dict(entry["dense"])
    inputs = fixture["inputs"]
    with torch.no_grad():
        y = model(inputs["X"].float(), inputs["k"], inputs["Z"].float())
    assert y.dtype == torch.float32 and rel_err(y.double(), entry["output"]) < 1e-5


def test_post_norm_checkpoint_with_per_irrep_norm_scales_is_refused(fixture):
    """A post-norm layer's norm output feeds the residual stream, so a reference affine that is not one scale per
    regular copy cannot be folded anywhere: strict loading refuses it, non-strict loads its projection and warns."""
    model, entry = regressor(fixture, "postnorm")
    dense = dict(entry["dense"])
    scales = fixture["models"]["absolute_causal"]["dense"]["decoder.layers.0.norm2.weight"]  # per-irrep scales
    dense["decoder.layers.0.norm2.weight"] = scales
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.norm2.*not one scale per regular copy"):
        model.load_state_dict(dense)
    with pytest.warns(UserWarning, match="per-copy projection"):
        model.load_state_dict(dense, strict=False)


def test_streamable_regressor_refuses_a_reference_checkpoint(fixture):
    reps = fixture["streamtx_reps"]
    args = dict(fixture["models"]["mlp_none"]["args"])
    model = sl.eCondTransformer(reps["in"], reps["cond"], None, **args)
    with pytest.raises(ValueError, match="ReferenceCondTransformer"):
        model.load_state_dict(fixture["models"]["mlp_none"]["dense"])


def test_unexpected_and_missing_keys_are_named(fixture):
    model, entry = regressor(fixture, "mlp_none")
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        model.load_state_dict({**entry["dense"], "extra": torch.zeros(1)})
    missing = {k: v for k, v in entry["dense"].items() if k != "head.weight"}
    with pytest.raises(ValueError, match="missing key 'head.weight'"):
        model.load_state_dict(missing)


def test_reference_options_without_a_counterpart_are_refused(fixture):
    reps = fixture["streamtx_reps"]
    with pytest.raises(ValueError, match="pos_encoding"):
        sl.ReferenceCondTransformer(reps["in"], reps["cond"], None, 4, 3, 1, 2, 16, pos_encoding="rope")
    with pytest.raises(ValueError, match="eLayerNorm normalizes each irreducible block"):
        sl.ReferenceCondTransformer(reps["in"], reps["cond"], None, 4, 3, 1, 2, 16, norm_module="layernorm")


def test_reference_layer_checkpoints_give_the_reference_outputs(fixture):
    stack = fixture["streamtx_reps"]["stack"]
    x, mem = fixture["layer_inputs"]["x"], fixture["layer_inputs"]["memory"]
    models = fixture["models"]
    torch.manual_seed(0)
    attn = sl.eMultiheadAttention(stack, 2, dtype=torch.float64).eval()
    attn.load_state_dict(models["attention"]["dense"])
    enc = sl.eTransformerEncoderLayer(stack, sl.eMultiheadAttention(stack, 2, dtype=torch.float64), 32, dropout=0.0)
    enc.double().eval().load_state_dict(models["encoder_layer"]["dense"])
    dec = sl.eTransformerDecoderLayer(
        stack, *[sl.eMultiheadAttention(stack, 2, dtype=torch.float64) for _ in range(2)], 32, dropout=0.0
    )
    dec.double().eval().load_state_dict(models["decoder_layer"]["dense"])
    with torch.no_grad():
        assert rel_err(attn(x, mem, mem)[0], models["attention"]["output"]) < TOL
        mask = torch.ones(5, 5).triu(1).bool()
        assert rel_err(enc(x, src_mask=mask), models["encoder_layer"]["output"]) < TOL
        assert rel_err(dec(x, mem), models["decoder_layer"]["output"]) < TOL


# ---------------------------------------------------------------------------------------------------- reference
def test_raw_reference_checkpoints_load_with_the_reference_installed(fixture):
    pytest.importorskip("escnn")
    models = pytest.importorskip("symm_learning.models")
    from escnn.group import DihedralGroup, directsum

    dt = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        g = DihedralGroup(2)
        in_rep = directsum([g.irrep(1, 0), g.irrep(0, 1), g.irrep(1, 1)])
        args = dict(in_horizon=4, cond_horizon=3, num_layers=2, num_attention_heads=2, embedding_dim=16)
        ref = models.eCondTransformer(in_rep, in_rep, None, num_cond_layers=1, causal_attn=True, **args).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ours = sl.ReferenceCondTransformer(in_rep, in_rep, None, num_cond_layers=1, causal_attn=True, **args)
        ours.eval().load_state_dict(ref.state_dict())
        x, z = torch.randn(2, 4, in_rep.size), torch.randn(2, 3, in_rep.size)
        with torch.no_grad():
            assert rel_err(ours(x, 5, z), ref(x, 5, z)) < TOL
    finally:
        torch.set_default_dtype(dt)


def test_reference_drops_its_relative_bias_in_causal_decoder_self_attention(fixture):
    """Why the fixture's relative model is not causal: with ``causal_attn``, the reference's decoder detects its
    causal mask, torch's MultiheadAttention then takes ``is_causal`` as the mask and drops the relative bias merged
    into it, so zeroing that bias changes nothing (streamtx applies it)."""
    pytest.importorskip("escnn")
    models = pytest.importorskip("symm_learning.models")
    from escnn.group import DihedralGroup, directsum

    dt = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        g = DihedralGroup(2)
        rep = directsum([g.irrep(1, 0), g.irrep(0, 1), g.irrep(1, 1)])
        args = dict(in_horizon=4, cond_horizon=3, num_layers=1, num_attention_heads=2, embedding_dim=16)
        kw = dict(num_cond_layers=1, causal_attn=True, pos_encoding="additive_relative", **args)
        ref = models.eCondTransformer(rep, rep, None, **kw).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ours = sl.ReferenceCondTransformer(rep, rep, None, **kw).eval()
        ours.load_state_dict(ref.state_dict())
        x, z = torch.randn(2, 4, rep.size), torch.randn(2, 3, rep.size)
        with torch.no_grad():
            before, mine = ref(x, 5, z), ours(x, 5, z)
            ref.decoder.layers[0].self_attn.rel_bias.zero_()
            ours.decoder[0].self_attn.positional.table.zero_()
            after, mine_zeroed = ref(x, 5, z), ours(x, 5, z)
        assert rel_err(after, before) < TOL  # the reference never read it
        assert rel_err(mine_zeroed, after) < TOL and rel_err(mine, before) > 1e-3
    finally:
        torch.set_default_dtype(dt)
