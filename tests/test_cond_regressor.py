import numpy as np
import pytest
import torch
from layer_testing import GROUPS, faithful_rep, mixed_rep, quadruped

from streamtx.checkpoint import load_model, make_random_checkpoint
from streamtx.models import CondTransformerRegressor, RegressorConfig, eCondTransformerRegressor, get_optim_groups
from streamtx.symmetry import Representation, dihedral


def small(in_rep, cond_rep, out_rep, **kw):
    n = in_rep.group.order
    cfg = dict(
        in_horizon=4,
        cond_horizon=5,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=4 * n,
        num_cond_layers=2,
        cond_window=3,
    )
    cfg.update(kw)
    return eCondTransformerRegressor(in_rep, cond_rep, out_rep, **cfg)


@pytest.mark.parametrize("name", list(GROUPS))
def test_regressor_is_equivariant(name):
    group = GROUPS[name]()
    rng = np.random.default_rng(0)
    action, obs = faithful_rep(group) + Representation.trivial(group, 1), mixed_rep(group, rng)
    model = small(action, obs, action, causal_attn=True)
    gen = torch.Generator().manual_seed(0)
    assert model.check_equivariance(history=9, generator=gen) <= 1e-10  # history longer than cond_horizon
    assert model.check_equivariance(dtype=torch.float32, generator=gen) <= 1e-5


@pytest.mark.parametrize("group_name", ["C2", "K4"])
@pytest.mark.parametrize("num_cond_layers", [0, 1])
def test_quadruped_policy_is_equivariant(group_name, num_cond_layers):
    group, joints = quadruped(group_name)
    obs = joints + joints + Representation.trivial(group, 3)  # positions, velocities, e.g. gravity's z and height
    model = small(joints, obs, joints, num_cond_layers=num_cond_layers, norm_module="rmsnorm")
    assert model.check_equivariance(generator=torch.Generator().manual_seed(1)) <= 1e-10


def test_output_shape_and_step_kinds():
    group = dihedral(4)
    action = faithful_rep(group)
    model = small(action, action, action).eval()
    x, z = torch.randn(3, 4, 2), torch.randn(3, 7, 2)
    with torch.no_grad():
        v = model(x, torch.tensor([1.0, 2.0, 3.0]), z)
        assert v.shape == (3, 4, 2)
        assert torch.allclose(model(x, 5.0, z), model(x, torch.full((3,), 5.0), z))  # scalar step broadcasts
        assert not torch.allclose(model(x, 5.0, z), model(x, 500.0, z))  # the step matters
        assert not torch.allclose(model(x, 5.0, z), model(x, 5.0, z[:, :-1]))  # the newest observation matters
        assert model(x[:, :2], 5.0, z).shape == (3, 2, 2)  # shorter chunks are allowed


def test_plain_baseline_has_the_same_architecture():
    base = CondTransformerRegressor(
        2, 6, 2, in_horizon=4, cond_horizon=5, num_layers=2, num_attention_heads=2, embedding_dim=16
    )
    assert base.in_rep.group.order == 1 and base.hidden_rep.regular_copies == 16
    # every eLinear of the trivial group is an unconstrained dense map
    lin = base.decoder.layers[0].linear1
    assert lin.weight.numel() == lin.in_features * lin.out_features
    with torch.no_grad():
        assert base(torch.randn(2, 4, 2), 3.0, torch.randn(2, 5, 6)).shape == (2, 4, 2)


def test_optim_groups_cover_every_parameter_once():
    group = dihedral(3)
    model = small(faithful_rep(group), faithful_rep(group), faithful_rep(group))
    groups = get_optim_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert id(model.pos_emb) in no_decay and id(model.input_emb.bias) in no_decay and id(model.head.weight) in decay
    torch.optim.AdamW(groups, lr=1e-3)


def test_state_dict_round_trip_and_train_eval_agree_after_a_step():
    group = dihedral(3)
    rep = faithful_rep(group)
    a, b = small(rep, rep, rep), small(rep, rep, rep)
    x, z, k = torch.randn(2, 4, 2), torch.randn(2, 5, 2), torch.tensor([3.0, 9.0])
    opt = torch.optim.AdamW(get_optim_groups(a), lr=1e-2)
    a.eval()
    with torch.no_grad():
        a(x, k, z)  # fills the dense-weight caches
    a.train()
    a(x, k, z).square().mean().backward()
    opt.step()
    a.eval()
    with torch.no_grad():
        cached = a(x, k, z)
    a.train()  # train mode with dropout 0: no cache, differentiable path
    assert torch.allclose(a(x, k, z).detach(), cached, atol=1e-6)
    b.load_state_dict(a.state_dict())
    b.eval()
    with torch.no_grad():
        assert torch.equal(b(x, k, z), cached)


def test_constructor_errors():
    group = dihedral(4)  # order 8
    rep = faithful_rep(group)
    with pytest.raises(ValueError, match="embedding_dim"):
        small(rep, rep, rep, embedding_dim=12)
    with pytest.raises(ValueError, match="num_attention_heads"):
        small(rep, rep, rep, embedding_dim=24)  # 3 copies cannot split into 2 heads
    with pytest.raises(ValueError, match="num_attention_heads"):
        small(rep, rep, rep, embedding_dim=16)  # 2 copies -> heads of 1 copy: RoPE needs pairs
    with pytest.raises(ValueError, match="cond_rep"):
        small(rep, faithful_rep(dihedral(3)), rep)
    with pytest.raises(ValueError, match="in_horizon"):
        small(rep, rep, rep, in_horizon=0)
    model = small(rep, rep, rep)
    with pytest.raises(ValueError, match="X"):
        model(torch.randn(2, 9, 2), 1.0, torch.randn(2, 5, 2))  # longer than in_horizon
    with pytest.raises(ValueError, match="Z"):
        model(torch.randn(2, 4, 2), 1.0, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="opt_step"):
        model(torch.randn(2, 4, 2), torch.ones(3), torch.randn(2, 5, 2))


def test_config_is_one_dataclass_serialised_in_checkpoints(tmp_path):
    """The constructor's options live in RegressorConfig: from_config rebuilds the same model, a checkpoint stores
    the config's plain dict, an older checkpoint's dict (the same names) loads, and an unknown name is refused."""
    path = make_random_checkpoint(tmp_path / "p.pt", cond_window=3)
    model, _, _ = load_model(path)
    assert isinstance(model.config, RegressorConfig) and model.config.cond_window == 3
    again = eCondTransformerRegressor.from_config(model.in_rep, model.cond_rep, model.out_rep, model.config)
    again.load_state_dict(model.state_dict())
    x, z = torch.randn(2, 4, 2), torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, 3.0, z), model(x, 3.0, z))
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == model.config.to_dict()
    with pytest.raises(ValueError, match=r"config: unknown eCondTransformerRegressor options \['depth'\]"):
        RegressorConfig.from_dict({**model.config.to_dict(), "depth": 3})


@pytest.mark.parametrize(
    "kw",
    [
        {},  # RoPE encoder, window 3 < horizon
        {"num_cond_layers": 0},  # the MLP encoder
        {"cond_window": None, "causal_attn": True, "norm_module": "rmsnorm"},
        {"plain": True},
    ],
    ids=["encoder", "mlp", "full-window", "plain"],
)
def test_windows_of_different_lengths_in_one_forward(kw):
    """``cond_lengths``: a left-padded batch equals each example run alone on its own window (float64)."""
    torch.manual_seed(0)
    group = dihedral(2)
    vec = faithful_rep(group)
    if kw.pop("plain", False):
        model = CondTransformerRegressor(2, 3, 2, in_horizon=4, cond_horizon=5, num_layers=2, num_attention_heads=2)
        in_size, cond_size = 2, 3
    else:
        model = small(vec, vec + vec, vec, **kw)
        in_size, cond_size = vec.size, 2 * vec.size
    model = model.double().eval()
    lengths = torch.tensor([1, 4, 7, 2, 5])
    b, width = len(lengths), 7
    z = torch.randn(b, width, cond_size, dtype=torch.float64)
    x = torch.randn(b, 4, in_size, dtype=torch.float64)
    k = torch.rand(b, dtype=torch.float64)
    padded = z.clone()
    for i, n in enumerate(lengths.tolist()):
        padded[i, : width - n] = 1e3  # whatever padding holds, it is never attended to
    out = model(x, k, padded, cond_lengths=lengths)
    alone = torch.cat(
        [model(x[i : i + 1], k[i : i + 1], z[i : i + 1, width - n :]) for i, n in enumerate(lengths.tolist())]
    )
    assert (out - alone).abs().max() <= 1e-10 * alone.abs().max()
    whole = torch.full((b,), width)
    torch.testing.assert_close(model(x, k, z, cond_lengths=whole), model(x, k, z), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"cond_lengths: expected lengths in 1\.\.7"):
        model(x, k, z, cond_lengths=torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"cond_lengths: expected integer lengths of shape \(5,\)"):
        model(x, k, z, cond_lengths=torch.ones(5))
