"""Equivariant layers in eval() vs plain torch layers of the same width, on CPU.

Prints a table and the ratio equivariant / plain (goal: <= 1, i.e. no slower): in eval() under no_grad every
equivariant weight is expanded once and cached, so the forward pass runs the same dense kernels.
Usage: python benchmarks/bench_layers.py [--threads 1]
"""

from __future__ import annotations

import torch
from timing import median_ms, setup

from streamtx.models import CondTransformerRegressor, eCondTransformerRegressor
from streamtx.nn import eTransformerDecoderLayer, eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral


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


if __name__ == "__main__":
    main()
