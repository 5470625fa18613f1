import pytest
import torch
from layer_testing import GROUPS, act, faithful_rep, quadruped, rel_err

from streamtx.nn import (
    causal_window_mask,
    eLayerNorm,
    ePointwise,
    eRMSNorm,
    eTransformerDecoder,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)
from streamtx.symmetry import Representation, cyclic, dihedral


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("norm", [eLayerNorm, eRMSNorm])
def test_norms_are_equivariant(name, norm):
    group = GROUPS[name]()
    rep = Representation.regular(group, 3)
    layer = norm(rep).double()
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(4, rep.size, dtype=torch.float64)
    for g in range(group.order):
        assert rel_err(layer(act(rep, g, x)), act(rep, g, layer(x))) <= 1e-10
    assert layer.weight.numel() == 3  # one scale per copy


def test_norms_reproduce_torch_for_trivial_group(trivial):
    rep = Representation.regular(trivial, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    ln, ref = eLayerNorm(rep).double(), torch.nn.LayerNorm(6).double()
    torch.nn.init.normal_(ref.weight), torch.nn.init.normal_(ref.bias)
    ln.load_dense_(ref.weight, ref.bias)
    assert rel_err(ln(x), ref(x)) <= 1e-12
    rms, ref = eRMSNorm(rep).double(), torch.nn.RMSNorm(6, eps=1e-6).double()
    torch.nn.init.normal_(ref.weight)
    rms.load_dense_(ref.weight)
    assert rel_err(rms(x), ref(x)) <= 1e-12


def test_pointwise_needs_a_permutation_representation():
    group, joints = quadruped("C2")
    with pytest.raises(ValueError, match="rep: a pointwise nonlinearity needs a permutation"):
        ePointwise(joints, "relu")  # sign flips do not commute with relu
    with pytest.raises(ValueError, match="rep"):
        eLayerNorm(Representation.trivial(group, 2))  # not regular copies in any basis (joints are: accepted)
    with pytest.raises(ValueError, match="activation"):
        ePointwise(Representation.regular(group), "swish2")
    rep = Representation.regular(group, 2)
    x = torch.randn(5, 4)
    f = ePointwise(rep, "gelu")
    for g in range(group.order):
        assert torch.equal(f(act(rep, g, x)), act(rep, g, f(x)))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@torch.no_grad()
def test_trivial_group_reproduces_torch_layers(trivial, norm_first, batch_first):
    rep = Representation.regular(trivial, 16)
    kw = dict(dim_feedforward=32, dropout=0.0, norm_first=norm_first, batch_first=batch_first)
    mask = causal_window_mask(7, 3, dtype=torch.float64)
    shape = (2, 7, 16) if batch_first else (7, 2, 16)
    x, mem = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    for act_name in ("relu", "gelu"):
        ref = torch.nn.TransformerEncoderLayer(16, 4, activation=act_name, **kw).double().eval()
        ours = eTransformerEncoderLayer(rep, 4, activation=act_name, **kw).double().eval().load_torch_(ref)
        assert float((ours(x, src_mask=mask) - ref(x, src_mask=mask)).abs().max()) <= 1e-6
        ref = torch.nn.TransformerDecoderLayer(16, 4, activation=act_name, **kw).double().eval()
        ours = eTransformerDecoderLayer(rep, 4, activation=act_name, **kw).double().eval().load_torch_(ref)
        causal = causal_window_mask(7, dtype=torch.float64)  # torch takes is_causal as "the mask is plain causal"
        for kwargs in ({"tgt_mask": mask}, {"tgt_mask": causal, "tgt_is_causal": True}):
            assert float((ours(x, mem, **kwargs) - ref(x, mem, **kwargs)).abs().max()) <= 1e-6


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("norm_module", ["layernorm", "rmsnorm"])
def test_layers_are_equivariant(name, norm_module):
    group = GROUPS[name]()
    rep = Representation.regular(group, 4)
    gen = torch.Generator().manual_seed(0)
    enc = eTransformerEncoderLayer(
        rep, 2, 8 * group.order, batch_first=True, norm_module=norm_module, positional="rope", norm_first=True
    )
    dec = eTransformerDecoderLayer(
        rep,
        2,
        8 * group.order,
        batch_first=True,
        norm_module=norm_module,
        positional="relative",
        cross_positional="rope",
    )
    # the relative bias is zero at init, which would leave its path untested: randomize it and check it is live
    with torch.no_grad():
        dec.self_attn.positional.bias.normal_(generator=gen)
        x = torch.randn(2, 5, rep.size, generator=gen)
        mem = torch.randn(2, 6, rep.size, generator=gen)
        live = dec.eval()(x, mem)
        saved = dec.self_attn.positional.bias.clone()
        dec.self_attn.positional.bias.zero_()
        assert (dec(x, mem) - live).abs().max() > 1e-4
        dec.self_attn.positional.bias.copy_(saved)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        assert enc.check_equivariance(dtype=dtype, generator=gen) <= tol
        assert enc.check_equivariance(dtype=dtype, generator=gen, is_causal=True) <= tol
        assert dec.check_equivariance(dtype=dtype, generator=gen) <= tol
    mask = causal_window_mask(4, 2, dtype=torch.float64)
    assert dec.check_equivariance(generator=gen, tgt_mask=mask) <= 1e-10


def test_stacks_are_equivariant_and_deep_copy_layers():
    group = dihedral(4)
    rep = Representation.regular(group, 4)
    layer = eTransformerEncoderLayer(rep, 2, 32, batch_first=True, positional="rope")
    enc = eTransformerEncoder(layer, 3, norm=eLayerNorm(rep)).double().eval()
    assert enc.layers[0].linear1.weight is not enc.layers[1].linear1.weight
    dec = eTransformerDecoder(eTransformerDecoderLayer(rep, 2, 32, batch_first=True), 2).double().eval()
    x, mem = torch.randn(2, 6, rep.size, dtype=torch.float64), torch.randn(2, 5, rep.size, dtype=torch.float64)
    with torch.no_grad():
        y, z = enc(x, is_causal=True), dec(x, mem)
        for g in range(group.order):
            assert rel_err(enc(act(rep, g, x), is_causal=True), act(rep, g, y)) <= 1e-10
            assert rel_err(dec(act(rep, g, x), act(rep, g, mem)), act(rep, g, z)) <= 1e-10


def test_layer_errors():
    group = cyclic(4)
    rep = Representation.regular(group, 4)
    with pytest.raises(ValueError, match="in_rep"):
        eTransformerEncoderLayer(faithful_rep(dihedral(4)), 1)
    with pytest.raises(ValueError, match="dim_feedforward"):
        eTransformerEncoderLayer(rep, 2, dim_feedforward=30)
    with pytest.raises(ValueError, match="norm_module"):
        eTransformerEncoderLayer(rep, 2, 16, norm_module="batchnorm")
    with pytest.raises(ValueError, match="num_layers"):
        eTransformerEncoder(eTransformerEncoderLayer(rep, 2, 16), 0)
