"""Retroactive (full-window) streaming step vs recomputing the layer over the last n tokens, on CPU.

Per window n, measured side by side in one run (calls interleaved, so machine noise hits every column alike), wall
time per call p50 / p99 / max and the thread's CPU time p50, in ms:

* recompute: the fastest exact batch forward of the layer over the window, eager: the module's ``forward`` and the
  lowered block (``layer.lower()``: dense weights, fused q/k/v) over the same tokens; the faster p50 is the
  reference of the ratios;
* module path: ``forward_step`` run module by module (the layer in training mode with dropout 0: what a step costs
  when gradients are needed);
* step: ``forward_step`` at inference, which takes the lowered block (``why_not_fast_path() == ""``) with the update
  the module chooses for this n (``update_choice()``, printed);
* incremental / window: the lowered block with each update forced (``update="incremental"`` / ``"window"``), called
  directly (no argument checks).

Also: the guard's exact recomputes per step and head on generic and on peaked logits (incremental update), and the
last step's error against the float64 batch forward relative to the output scale, per update. ``floor``: the part of a
step that no update avoids here, out-projection + residual + norms + feed-forward of all n outputs (every output
changes each step), timed alone as the block runs it (its ``outputs``, into its reused buffers);
``recompute / floor`` bounds the ratio any step can reach (a bound, not a target: alone, the floor runs with warm
caches, while inside a step the attention update's reads of the ring evict part of its working set).

    .venv/bin/python benchmarks/bench_retroactive.py [--n 64 256 1024] [--batch 1] [--threads 1] [--repeats 40]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from timing import timed

from streamtx.nn.lowered import RetroactiveEncoderLayer
from streamtx.nn.retroactive import RetroactiveState, eRetroactiveEncoderLayer
from streamtx.nn.transformer import eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral

UPDATES = ("incremental", "window")


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


def last_step_error(retro: eRetroactiveEncoderLayer, block: RetroactiveEncoderLayer, x: torch.Tensor) -> float:
    """The last step's error after streaming all of ``x`` (float32), against the float64 forward over its window,
    relative to the output scale."""
    n, end = retro.window, x.shape[1]
    state = filled(retro, x)
    for t in range(n, end):
        y = block.step(x[:, t : t + 1], state)
    reference = copy.deepcopy(retro.layer).double()
    ref = reference(x[:, end - n : end].double(), src_pos=torch.arange(end - n, end))
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def bench(n: int, layer: eTransformerEncoderLayer, peaked: eTransformerEncoderLayer, batch: int, repeats: int) -> dict:
    d = layer.in_rep.size
    x = torch.randn(batch, n + 8 * repeats + 64, d, generator=torch.Generator().manual_seed(n))
    retro = eRetroactiveEncoderLayer(layer, n).eval()
    forced = {u: eRetroactiveEncoderLayer(layer, n, update=u).eval() for u in UPDATES}
    blocks = {u: r.lower() for u, r in forced.items()}
    dense = layer.lower()
    heads, hd = layer.self_attn.num_heads, layer.self_attn.head_dim
    window, pos = x[:, :n], torch.arange(n).expand(batch, n)
    empty = torch.zeros(batch, 0, heads, hd)

    def module_path(token: torch.Tensor, state: RetroactiveState) -> None:
        layer.train()  # dropout is 0: the same numbers, module by module
        retro.forward_step(token, state)
        layer.eval()

    floor_state = filled(retro, x)
    assert retro.why_not_fast_path() == ""
    row = timed(
        {
            "module batch": lambda: layer(window, src_pos=pos),
            "lowered batch": lambda: dense(window, pos, empty, empty, pos, None),  # type: ignore[arg-type]
            "module path": Stepper(retro, x, module_path),
            "step": Stepper(retro, x, lambda t, s: retro.forward_step(t, s)),
            **{u: Stepper(forced[u], x, blocks[u].step) for u in UPDATES},
            "floor": lambda: blocks["incremental"].outputs(floor_state),  # what every step must redo for all n
        },
        repeats,
    )
    stream = x[:, : n + 64]
    return {
        **row,
        "choice": retro.update_choice()[0],
        **{f"error {u}": last_step_error(forced[u], blocks[u], stream) for u in UPDATES},
        "recompute": recomputes_per_step(forced["incremental"], x[:, : n + 2 * n // 4 + 8]),
        "recompute_peaked": recomputes_per_step(
            eRetroactiveEncoderLayer(peaked, n, update="incremental").eval(), x[:, : n + n // 2 + 8]
        ),
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
        f"{args.repeats} interleaved calls per column; ms"
    )
    columns = ["module batch", "lowered batch", "module path", "step", *UPDATES, "floor"]
    header = f"{'n':>5} | {'':13} | {'p50':>7} | {'p99':>7} | {'max':>7} | {'cpu p50':>7} | recompute / this: wall, cpu"
    print(header)
    print("-" * len(header))
    for n in args.n:
        r = bench(n, layer, peaked, args.batch, args.repeats)
        recompute = [min(r["module batch"][k], r["lowered batch"][k]) for k in range(4)]
        for c in columns:
            wall, p99, worst, cpu = r[c]
            name = f"step ({r['choice'][:4]})" if c == "step" else c
            ratio = f"{recompute[0] / wall:6.2f}x, {recompute[3] / cpu:6.2f}x"
            print(f"{n:>5} | {name:13} | {wall:7.3f} | {p99:7.3f} | {worst:7.3f} | {cpu:7.3f} | {ratio}")
        print(
            f"{n:>5} | guard recomputes per step and head {r['recompute']:.2f} (peaked logits "
            f"{r['recompute_peaked']:.2f}); last-step error: incremental {r['error incremental']:.1e}, "
            f"window {r['error window']:.1e}"
        )
    print(
        "recompute / this: the faster recompute's p50 over this column's p50 (wall time, then the thread's CPU "
        "time); on the floor row: the most any full-window step can gain here. step (incr / wind): the update the "
        "module chose"
    )


if __name__ == "__main__":
    main()
