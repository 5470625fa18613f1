"""Retroactive (full-window) streaming step vs recomputing the layer over the last n tokens, on CPU.

Per window n, measured side by side in one run (calls interleaved, so machine noise hits every column alike), wall
time per call p50 / p99 / max in ms:

* recompute: the fastest exact batch forward of the layer over the window, eager: the module's ``forward`` and the
  lowered block (``layer.lower()``: dense weights, fused q/k/v) over the same tokens; the faster p50 is the
  reference of the ratios;
* module path: ``forward_step`` run module by module (the layer in training mode with dropout 0: what a step costs
  when gradients are needed);
* step: ``forward_step`` at inference, which takes the lowered block (``why_not_fast_path() == ""``);
* lowered: the block of ``retro.lower()`` called directly (no argument checks).

Also: the guard's exact recomputes per step and head on generic and on peaked logits, and the last step's error
against the float64 batch forward relative to the output scale. ``floor``: the part of a step that no streaming can
avoid here, out-projection + residual + norms + feed-forward of all n outputs (every output changes each step), timed
alone; ``recompute / floor`` bounds the ratio any step can reach.

    .venv/bin/python benchmarks/bench_retroactive.py [--n 64 256 1024] [--batch 1] [--threads 1] [--repeats 40]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from timing import timed

from streamtx.nn.lowered import retroactive_attention
from streamtx.nn.retroactive import RetroactiveState, eRetroactiveEncoderLayer
from streamtx.nn.transformer import eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral


def filled(retro: eRetroactiveEncoderLayer, x: torch.Tensor) -> RetroactiveState:
    """A state whose window already holds the first n tokens of ``x`` (entered as one block)."""
    state = retro.init_state(x.shape[0])
    assert isinstance(state, RetroactiveState)
    retro.forward_step(x[:, : retro.window], state)
    return state


def recomputes_per_step(retro: eRetroactiveEncoderLayer, x: torch.Tensor) -> float:
    """Guard recomputes per step and head, streaming the rest of ``x`` after a full window."""
    state = filled(retro, x)
    steps = x.shape[1] - retro.window
    before = state.recomputed.sum().item()
    retro.forward_steps(x[:, retro.window :], state)
    heads = retro.layer.self_attn.num_heads
    return (state.recomputed.sum().item() - before) / (steps * heads * x.shape[0])


class Stepper:
    """Steps one stream of ``x`` through ``fn(token (b, 1, D), state)``, one new token per call."""

    def __init__(self, retro: eRetroactiveEncoderLayer, x: torch.Tensor, fn: Callable) -> None:
        self.x, self.fn, self.state, self.next = x, fn, filled(retro, x), retro.window

    def __call__(self) -> None:
        self.fn(self.x[:, self.next : self.next + 1], self.state)
        self.next += 1


@torch.no_grad()
def bench(n: int, layer: eTransformerEncoderLayer, peaked: eTransformerEncoderLayer, batch: int, repeats: int) -> dict:
    d = layer.in_rep.size
    x = torch.randn(batch, n + 4 * repeats + 16, d, generator=torch.Generator().manual_seed(n))
    retro = eRetroactiveEncoderLayer(layer, n).eval()
    block, dense = retro.lower(), layer.lower()
    heads, hd = layer.self_attn.num_heads, layer.self_attn.head_dim
    window, pos = x[:, :n], torch.arange(n).expand(batch, n)
    empty = torch.zeros(batch, 0, heads, hd)

    def module_path(token: torch.Tensor, state: RetroactiveState) -> None:
        layer.train()  # dropout is 0: the same numbers, module by module
        retro.forward_step(token, state)
        layer.eval()

    floor_state = filled(retro, x)

    def floor() -> None:  # what every step must redo for all n outputs
        att, xs, _ = retroactive_attention(floor_state, None)
        y = dense.norm1(xs + dense.attn.out(att))
        dense.norm2(y + dense.ff(y))

    assert retro.why_not_fast_path() == ""
    row = timed(
        {
            "module batch": lambda: layer(window, src_pos=pos),
            "lowered batch": lambda: dense(window, pos, empty, empty, pos, None),  # type: ignore[arg-type]
            "module path": Stepper(retro, x, module_path),
            "step": Stepper(retro, x, lambda t, s: retro.forward_step(t, s)),
            "lowered": Stepper(retro, x, block.step),
            "floor": floor,
        },
        repeats,
    )
    # Accuracy after a long stream (float32): the last step against the float64 forward over its window.
    state = filled(retro, x)
    end = x.shape[1]
    y = block.step(x[:, n:end], state)  # the rest of the stream, n tokens at a time
    reference = copy.deepcopy(layer).double()
    ref = reference(x[:, end - n : end].double(), src_pos=torch.arange(end - n, end))
    return {
        **row,
        "error": ((y.double() - ref).abs().max() / ref.abs().max()).item(),
        "recompute": recomputes_per_step(retro, x[:, : n + 2 * n // 4 + 8]),
        "recompute_peaked": recomputes_per_step(eRetroactiveEncoderLayer(peaked, n).eval(), x[:, : n + n // 2 + 8]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024], help="window sizes")
    parser.add_argument("--copies", type=int, default=8, help="regular copies of D4 (D = 8 * copies)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="independent streams stepped together")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per column")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rep = Representation.regular(dihedral(4), args.copies)
    layer = eTransformerEncoderLayer(rep, args.heads, 4 * rep.size, dropout=0.0, batch_first=True).eval()
    peaked = copy.deepcopy(layer)
    with torch.no_grad():
        peaked.self_attn.q_proj.weight.mul_(60.0)  # logits of ~100: rows dominated by one key
    print(
        f"eRetroactiveEncoderLayer, D4 x {args.copies} copies (D = {rep.size}), {args.heads} heads, "
        f"ff = {4 * rep.size}, batch {args.batch}, float32, {args.threads} thread(s), torch {torch.__version__}, "
        f"{args.repeats} interleaved calls per column; ms p50 / p99 / max"
    )
    columns = ["module batch", "lowered batch", "module path", "step", "lowered", "floor"]
    header = f"{'n':>5} | " + " | ".join(f"{c:>18}" for c in columns)
    header += " | step x | lowered x | ceiling | cpu: step x | lowered x | ceiling | recomp | peaked | rel err"
    print(header)
    print("-" * len(header))
    for n in args.n:
        r = bench(n, layer, peaked, args.batch, args.repeats)
        cells = " | ".join(f"{r[c][0]:.3g} / {r[c][1]:.3g} / {r[c][2]:.3g}".rjust(18) for c in columns)
        ratios = []
        for k in (0, 3):  # wall p50, CPU p50
            recompute = min(r["module batch"][k], r["lowered batch"][k])
            ratios.append(
                f"{recompute / r['step'][k]:5.2f}x | {recompute / r['lowered'][k]:8.2f}x | "
                f"{recompute / r['floor'][k]:6.2f}x"
            )
        print(
            f"{n:>5} | {cells} | {ratios[0]} | {ratios[1]:>30} | {r['recompute']:6.2f} | "
            f"{r['recompute_peaked']:6.2f} | {r['error']:7.1e}"
        )
    print(
        "step x / lowered x: the faster recompute's p50 over the step's p50 (wall time, then the thread's CPU time); "
        "ceiling: over the floor's p50 (the most any full-window step can gain here); recomp / peaked: guard "
        "recomputes per step and head"
    )


if __name__ == "__main__":
    main()
