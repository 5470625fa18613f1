"""Retroactive (full-window) streaming step vs recomputing the layer's batch forward over the last n tokens.

Prints, per window n: the time of one step of :class:`eRetroactiveEncoderLayer` (all n outputs updated) and of the
batch forward over the window, the attention part alone (the O(n d) update vs the batch self-attention module:
projections, O(n^2 d) attention, out projection), the single-output step, the guard's exact recomputes per step and
head (generic and peaked logits), and the last step's error against the batch forward relative to the output scale.
Times are the best of interleaved calls, measured side by side in one run, so the ratios hold on a noisy machine.

    .venv/bin/python benchmarks/bench_retroactive.py [--n 64 256 1024] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from streamtx.nn.retroactive import RetroactiveState, eRetroactiveEncoderLayer
from streamtx.nn.transformer import EncoderLayerState, eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral


def best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function, in ms, the functions interleaved call by call so that load
    from other processes hits all of them alike (the minimum is the least disturbed run)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def filled(retro: eRetroactiveEncoderLayer, x: torch.Tensor) -> RetroactiveState | EncoderLayerState:
    """A state whose window already holds the first n tokens of ``x`` (entered as one block)."""
    state = retro.init_state(x.shape[0])
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


@torch.no_grad()
def bench(n: int, layer: eTransformerEncoderLayer, peaked: eTransformerEncoderLayer, batch: int, repeats: int) -> dict:
    d = layer.in_rep.size
    x = torch.randn(batch, n + 2 * repeats + 4, d, generator=torch.Generator().manual_seed(n))
    retro, single = eRetroactiveEncoderLayer(layer, n), eRetroactiveEncoderLayer(layer, n, single_output=True)
    state, single_state = filled(retro, x), filled(single, x)
    next_pos = n  # the steppers below continue one stream

    def step() -> None:
        nonlocal next_pos
        retro.forward_step(x[:, next_pos], state)
        next_pos += 1

    def attention_update() -> None:  # the attention part of a step alone (what is O(n d) instead of O(n^2 d))
        nonlocal next_pos
        retro._enter(x[:, next_pos][:, None], state, None)
        next_pos += 1

    window, pos = x[:, :n], torch.arange(n)
    row = best_ms(
        {
            "batch": lambda: layer(window, src_pos=pos),
            "step": step,
            "batch_attn": lambda: layer.self_attn(window, window, window, need_weights=False),
            "step_attn": attention_update,
            "single": lambda: single.forward_step(x[:, n], single_state),
        },
        repeats,
    )
    # Accuracy after all those steps (float32): the last step against the batch forward over its window.
    y, _ = retro.forward_step(x[:, next_pos], state)
    lo = next_pos - n + 1
    ref = layer(x[:, lo : next_pos + 1], src_pos=torch.arange(lo, next_pos + 1))
    row["error"] = ((y - ref).abs().max() / ref.abs().max()).item()
    row["recompute"] = recomputes_per_step(retro, x)
    row["recompute_peaked"] = recomputes_per_step(eRetroactiveEncoderLayer(peaked, n), x)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024], help="window sizes")
    parser.add_argument("--copies", type=int, default=8, help="regular copies of D4 (D = 8 * copies)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="independent streams stepped together")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (best of)")
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
        f"ff = {4 * rep.size}, batch {args.batch}, float32, {args.threads} thread(s), "
        f"best of {args.repeats} interleaved calls"
    )
    print("times in ms; 'attn': attention part only; recomputes: guard's exact rows per step and head")
    header = (
        f"{'n':>5} | {'batch':>7} | {'step':>7} | {'ratio':>6} | {'batch attn':>10} | {'step attn':>9} | "
        f"{'ratio':>6} | {'single':>7} | {'recomp':>6} | {'peaked':>6} | {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    for n in args.n:
        r = bench(n, layer, peaked, args.batch, args.repeats)
        print(
            f"{n:>5} | {r['batch']:7.3f} | {r['step']:7.3f} | {r['batch'] / r['step']:5.1f}x | "
            f"{r['batch_attn']:10.3f} | {r['step_attn']:9.3f} | {r['batch_attn'] / r['step_attn']:5.1f}x | "
            f"{r['single']:7.3f} | {r['recompute']:6.2f} | {r['recompute_peaked']:6.2f} | {r['error']:8.1e}"
        )


if __name__ == "__main__":
    main()
