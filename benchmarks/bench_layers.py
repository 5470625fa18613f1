"""Equivariant layers in eval() vs plain torch layers of the same width, on CPU.

Prints a table and the ratio equivariant / plain (goal: <= 1, i.e. no slower): in eval() under no_grad every
equivariant weight is expanded once and cached, so the forward pass runs the same dense kernels. A second table
compares the residual stream in a non-canonical basis of regular copies (a random orthogonal one, a quadruped's
signed-permutation joint space) with the canonical basis, for the lowered encoder stack that inference plans run
(the change of basis folded into the weights: goal ratio <= 1) and for the eager layer.
Usage: python benchmarks/bench_layers.py [--threads 1]
"""

from __future__ import annotations

import numpy as np
import torch
from timing import median_ms, setup

from streamtx.models import CondTransformerRegressor, eCondTransformerRegressor
from streamtx.nn import eTransformerDecoderLayer, eTransformerEncoder, eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral, klein_four


def _random_orthogonal(d: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def basis_rows(repeats: int) -> list[tuple[str, float, float]]:
    """Lowered encoder stack and eager layer: canonical basis vs another basis of the same regular copies."""
    k4 = klein_four()
    lr = ([3, 4, 5, 0, 1, 2, 9, 10, 11, 6, 7, 8], [-1, 1, 1] * 4)
    fb = ([6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5], [1, -1, -1] * 4)
    joints = Representation.from_signed_permutations(k4, [lr[0], fb[0]], [lr[1], fb[1]], name="joints")
    canonical = Representation.regular(k4, 48)
    others = {
        "random basis": canonical.change_basis(_random_orthogonal(canonical.size)),
        "joint space": Representation.direct_sum(*([joints] * 16)),
    }
    rows = []
    batch, tokens, window = 8, 16, 16
    x = torch.randn(batch, tokens, canonical.size)
    pos = torch.arange(tokens).expand(batch, tokens)
    for name, rep in others.items():
        fns = {}
        for key, r in (("c", canonical), ("o", rep)):
            torch.manual_seed(0)
            layer = eTransformerEncoderLayer(r, 4, 4 * r.size, 0.0, batch_first=True, norm_first=True,
                                             norm_module="rmsnorm", positional="rope")  # fmt: skip
            stack = eTransformerEncoder(layer, 2).eval()
            plan = stack.lower(window=window)
            empty = torch.zeros(batch, 0, 2, 4, layer.self_attn.head_dim)
            fns[f"plan_{key}"] = lambda plan=plan, empty=empty: plan(x, pos, empty, empty, pos[:, :0])
            layer.eval()
            fns[f"eager_{key}"] = lambda layer=layer: layer(x)
        with torch.no_grad():
            t = median_ms(fns, repeats)
        rows.append((f"lowered 2-layer encoder, {name}", t["plan_o"], t["plan_c"]))
        rows.append((f"eager encoder layer, {name}", t["eager_o"], t["eager_c"]))
    return rows


def main() -> None:
    args = setup(__doc__, repeats=30)
    group = dihedral(4)
    rows = []
    for width, batch in ((128, 8), (256, 8)):
        rep = Representation.regular(group, width // group.order)
        kw = dict(dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True)
        tgt, mem = torch.randn(batch, 16, width), torch.randn(batch, 33, width)
        ours_dec = eTransformerDecoderLayer(rep, 8, **kw).eval()
        ref_dec = torch.nn.TransformerDecoderLayer(width, 8, activation="gelu", **kw).eval()
        ours_enc = eTransformerEncoderLayer(rep, 8, **kw).eval()
        ref_enc = torch.nn.TransformerEncoderLayer(width, 8, activation="gelu", **kw).eval()
        with torch.no_grad():
            t = median_ms(
                {
                    "e_dec": lambda: ours_dec(tgt, mem),
                    "t_dec": lambda: ref_dec(tgt, mem),
                    "e_enc": lambda: ours_enc(mem),
                    "t_enc": lambda: ref_enc(mem),
                },
                args.repeats,
            )
        rows.append((f"decoder layer D={width} B={batch}", t["e_dec"], t["t_dec"]))
        rows.append((f"encoder layer D={width} B={batch}", t["e_enc"], t["t_enc"]))
    # the full regressor, robot-sized (D4, embedding 128, 4 decoder + 2 encoder layers, Tx 16, 32 observation tokens)
    act = Representation.from_generators(group, [group.matrices[g] for g in group.generators]) + Representation.trivial(
        group, 1
    )
    obs = act + act + Representation.regular(group, 2)
    cfg = dict(
        in_horizon=16, cond_horizon=32, num_layers=4, num_attention_heads=4, embedding_dim=128, num_cond_layers=2
    )
    ours = eCondTransformerRegressor(act, obs, act, **cfg).eval()
    plain = CondTransformerRegressor(act.size, obs.size, act.size, **cfg).eval()
    x, z, k = torch.randn(8, 16, act.size), torch.randn(8, 32, obs.size), torch.full((8,), 10.0)
    with torch.no_grad():
        t = median_ms({"e": lambda: ours(x, k, z), "p": lambda: plain(x, k, z)}, args.repeats)
    rows.append(("eCondTransformerRegressor B=8", t["e"], t["p"]))
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, median of {args.repeats} interleaved runs")
    print(f"{'module':<34} {'equivariant ms':>15} {'plain ms':>10} {'ratio e/plain':>14}")
    for name, e, p in rows:
        print(f"{name:<34} {e:>15.3f} {p:>10.3f} {e / p:>14.2f}")
    print(f"\n{'residual stream basis, D=192, K4, B=8, T=16':<44} {'other ms':>9} {'canonical ms':>13} {'ratio':>6}")
    for name, o, c in basis_rows(args.repeats):
        print(f"{name:<44} {o:>9.3f} {c:>13.3f} {o / c:>6.2f}")


if __name__ == "__main__":
    main()
