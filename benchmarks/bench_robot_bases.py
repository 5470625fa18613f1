"""MorphoSymm's quadruped joint spaces as the residual stream vs the canonical basis of the same regular copies.

Per robot (solo K4, mini_cheetah C2 and K4; tests/fixtures/compat/morphosymm_quadrupeds.json), the residual stream is
the joint state (positions and velocities) repeated to about D = 180-192, and a 2-layer pre-norm RMSNorm encoder
stack is built twice with the same seed: on that joint space (the change of basis folded into the weights at
lowering) and on Representation.regular(G, m). Prints wall p50 / p99 and this thread's CPU p50 of the lowered plans
(what the daemon runs) and of the eager stacks, interleaved call by call, and the ratio joint / canonical (goal:
<= 1, the folded basis costs nothing).
Usage: taskset -c 1 python benchmarks/bench_robot_bases.py [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from timing import setup, timed

from streamtx.compat.morphosymm import morphosymm_representations
from streamtx.nn import eTransformerEncoder, eTransformerEncoderLayer
from streamtx.symmetry import Representation

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "compat" / "morphosymm_quadrupeds.json"
ROBOTS = {"solo-k4": (8, 4), "mini_cheetah-c2": (5, 6), "mini_cheetah-k4": (5, 5)}  # state repeats, heads


def joint_state(name: str, cfg: dict, repeats: int) -> Representation:
    reps = morphosymm_representations(
        cfg["group_label"], {k: (v["permutation"], v["reflection"]) for k, v in cfg["spaces"].items()}
    )
    state = Representation.direct_sum(reps["Q_js"], reps.get("TqQ_js", reps["Q_js"]))
    return Representation.direct_sum(*([state] * repeats))


def main() -> None:
    args = setup(__doc__, repeats=200)
    robots = json.loads(FIXTURE.read_text())["robots"]
    batch, tokens, window = 8, 16, 16
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, {args.repeats} interleaved calls each")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (
        f"{'robot, module':<48} {'joint p50':>10} {'p99':>8} {'canon p50':>10} {'p99':>8} {'ratio p50':>10} {'CPU':>6}"
    )
    print(header)
    for name, (repeats, heads) in ROBOTS.items():
        rep = joint_state(name, robots[name], repeats)
        canonical = Representation.regular(rep.group, rep.regular_basis.copies)
        x = torch.randn(batch, tokens, rep.size)
        pos = torch.arange(tokens).expand(batch, tokens)
        fns = {}
        for key, r in (("joint", rep), ("canon", canonical)):
            torch.manual_seed(0)
            layer = eTransformerEncoderLayer(
                r, heads, 4 * r.size, 0.0, batch_first=True, norm_first=True, norm_module="rmsnorm"
            )
            stack = eTransformerEncoder(layer, 2).eval()
            plan = stack.lower(window=window)
            empty = torch.zeros(batch, 0, 2, heads, layer.self_attn.head_dim)
            fns[f"plan_{key}"] = lambda plan=plan, empty=empty: plan(x, pos, empty, empty, pos[:, :0])
            fns[f"eager_{key}"] = lambda stack=stack: stack(x)
        with torch.no_grad():
            t = timed(fns, args.repeats)
        for kind, label in (("plan", "lowered 2-layer encoder"), ("eager", "eager 2-layer encoder")):
            j, c = t[f"{kind}_joint"], t[f"{kind}_canon"]
            row = f"{name} D={rep.size}, {label}"
            times = f"{j[0]:>10.3f} {j[1]:>8.3f} {c[0]:>10.3f} {c[1]:>8.3f}"
            print(f"{row:<48} {times} {j[0] / c[0]:>10.2f} {j[3] / c[3]:>6.2f}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
