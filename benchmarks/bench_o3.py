"""O3MultiheadAttention on CPU: recompute a window of N tokens vs stream one new token into it, N = 64 ... 1024.

* ``recompute``: the batch forward over the window's N tokens with the causal mask, which is what a runtime without
  state pays for the newest token's output;
* ``step``: ``forward_step`` of one new token against a ring that already holds the previous N - 1 tokens
  (``window = N``): its keys/values are cached, only the N new (query, key) pairs get a relative basis.

Both give the newest token's output; the table checks they agree (``max |diff|``) and prints ``recompute / step``,
measured side by side in one run. A second table does the same for cross-attention (a query token against a memory
of N key/value tokens with their own layout, ``L_kv = 1``, ``F_kv = F / 2``): ``recompute`` is the batch forward
of one query against the N keys, ``step`` is ``forward_step`` with a ``memory_window = N`` state, appending one key
to a full ring of N and attending.
Times are the best of repeated calls under ``torch.inference_mode`` (on a shared
machine the minimum is the measurement least disturbed by other processes).

    .venv/bin/python benchmarks/bench_o3.py                      # defaults below
    .venv/bin/python benchmarks/bench_o3.py --sizes 64 256 --threads 2 --dtype float64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from streamtx.nn.o3 import O3MultiheadAttention
from streamtx.nn.state import band_mask


def best_time(fn: Callable[[], object], min_total: float, max_repeats: int) -> float:
    fn()  # warm-up
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < 3 or sum(times) < min_total):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--max-degree", type=int, default=2)
    parser.add_argument("--pseudotensors", action="store_true")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-basis", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    attn = O3MultiheadAttention(
        args.features,
        args.max_degree,
        args.heads,
        include_pseudotensors=args.pseudotensors,
        num_basis=args.num_basis,
        cutoff=4.0,
        softmax_cutoff=True,
        dtype=dtype,
    ).eval()
    print(
        f"O3MultiheadAttention {attn.layout}, F={args.features}, heads={args.heads}, K={args.num_basis}, "
        f"relative encoding in query-key and values, {args.dtype}, {args.threads} thread(s), batch 1"
    )
    print(f"{'N':>6} {'recompute ms':>13} {'step ms':>9} {'recompute/step':>15} {'max |diff|':>11}")
    for n in args.sizes:
        x = torch.randn(1, n + 64, *attn.layout.shape(args.features), dtype=dtype)
        pos = (0.5 * torch.randn(1, n + 64, 3, dtype=dtype)).cumsum(1)  # a drifting trajectory
        t = torch.arange(n)
        with torch.inference_mode():
            state = attn.init_state(1, window=n)
            attn.forward_steps(
                x[:, : n - 1], state, positions=pos[:, : n - 1]
            )  # the ring holds the previous N - 1 tokens
            newest, _ = attn.forward_step(x[:, n - 1], state.clone(), positions=pos[:, n - 1])
            reference = attn(x[:, :n], pos[:, :n], band_mask(t, t, n))[:, -1]
            diff = (newest - reference).abs().max().item()
            recompute = best_time(lambda: attn(x[:, :n], pos[:, :n], band_mask(t, t, n)), 1.0, 20)
            tokens = iter(range(n - 1, n + 64))

            def step() -> None:
                i = next(tokens)  # each call streams the next token; the ring stays full, so each costs the same
                attn.forward_step(x[:, i], state, positions=pos[:, i])

            stepped = best_time(step, 0.5, 60)
        print(f"{n:>6} {recompute * 1e3:>13.2f} {stepped * 1e3:>9.3f} {recompute / stepped:>15.1f} {diff:>11.2e}")
    bench_memory(args, dtype)


def bench_memory(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Cross-attention: one query token against a memory of N key/value tokens, recomputed vs ``forward_step``."""
    torch.manual_seed(1)
    kv_features = max(1, args.features // 2)
    attn = O3MultiheadAttention(
        args.features,
        args.max_degree,
        args.heads,
        include_pseudotensors=args.pseudotensors,
        kv_features=kv_features,
        kv_max_degree=1,
        num_basis=args.num_basis,
        cutoff=4.0,
        softmax_cutoff=True,
        dtype=dtype,
    ).eval()
    print(f"\ncross-attention: queries {attn.layout}, F={args.features}; memory {attn.kv_layout}, F={kv_features}")
    print(f"{'N':>6} {'recompute ms':>13} {'step ms':>9} {'recompute/step':>15} {'max |diff|':>11}")
    for n in args.sizes:
        z = torch.randn(1, n + 64, *attn.kv_layout.shape(kv_features), dtype=dtype)
        pz = (0.5 * torch.randn(1, n + 64, 3, dtype=dtype)).cumsum(1)
        x = torch.randn(1, 1, *attn.layout.shape(args.features), dtype=dtype)
        px = pz[:, n - 1 : n] + 0.1
        with torch.inference_mode():
            state = attn.init_state(1, memory_window=n)
            attn.append_memory(z[:, : n - 1], state, kv_positions=pz[:, : n - 1])
            newest, _ = attn.forward_step(x, state.clone(), positions=px, kv=z[:, n - 1], kv_positions=pz[:, n - 1])
            reference = attn(x, px, kv=z[:, :n], kv_positions=pz[:, :n])
            diff = (newest - reference).abs().max().item()
            recompute = best_time(lambda: attn(x, px, kv=z[:, :n], kv_positions=pz[:, :n]), 1.0, 20)
            tokens = iter(range(n - 1, n + 64))

            def step() -> None:
                i = next(tokens)  # one new key per call; the ring stays full, so each costs the same
                attn.forward_step(x, state, positions=px, kv=z[:, i], kv_positions=pz[:, i])

            stepped = best_time(step, 0.5, 60)
        print(f"{n:>6} {recompute * 1e3:>13.2f} {stepped * 1e3:>9.3f} {recompute / stepped:>15.1f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
