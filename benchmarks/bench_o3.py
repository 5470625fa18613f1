"""O3MultiheadAttention on CPU: recompute vs stream one new token, N = 64 ... 1024, for self- and cross-attention.

Self-attention (a window of N tokens):

* ``recompute``: the batch forward over the window's N tokens with the causal mask, which is what a runtime without
  state pays for the newest token's output;
* ``step``: ``forward_step`` of one new token against a ring that already holds the previous N - 1 tokens
  (``init_state(1, window=N)``): its keys/values are cached, only the N new (query, key) pairs get a relative basis.

Cross-attention (a query token against a memory of N key/value tokens with their own layout, ``L_kv = 1``,
``F_kv = F / 2``):

* ``recompute``: the batch forward of one query against the N keys;
* ``step``: ``forward_step`` with ``kv=`` one new key/value token on a full ring (``init_state(1, memory_window=N)``):
  the new token is projected and written, the query attends to the N cached ones.

Both paths give the same output; the tables check it (``max |diff|``). The two paths run interleaved (recompute,
step, recompute, ...) under ``torch.inference_mode`` so that both see the same machine noise; the tables print
p50 / p99 of each and ``recompute / step`` as the ratio of the medians. On a shared machine pin the process
(``taskset -c 1``) and note the load (``uptime``).

    .venv/bin/python benchmarks/bench_o3.py                      # defaults below
    .venv/bin/python benchmarks/bench_o3.py --sizes 64 256 --threads 2 --dtype float64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from streamtx.nn.o3 import O3MultiheadAttention
from streamtx.nn.state import band_mask


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """``(p50, p99)`` wall time in ms of each function, measured round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(s), statistics.quantiles(s, n=100)[98]) for name, s in samples.items()}


def _row(n: int, times: dict[str, tuple[float, float]], diff: float) -> str:
    (r50, r99), (s50, s99) = times["recompute"], times["step"]
    return f"{n:>6} {r50:>9.2f} / {r99:<9.2f} {s50:>7.3f} / {s99:<7.3f} {r50 / s50:>15.1f} {diff:>11.2e}"


HEADER = f"{'N':>6} {'recompute ms p50 / p99':>22} {'step ms p50 / p99':>17} {'recompute/step':>15} {'max |diff|':>11}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--max-degree", type=int, default=2)
    parser.add_argument("--pseudotensors", action="store_true")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-basis", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    load = os.getloadavg()[0]
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
        f"relative encoding in query-key and values, {args.dtype}, {args.threads} thread(s), batch 1, "
        f"{args.repeats} interleaved repeats, load {load:.1f}"
    )
    print(HEADER)
    extra = args.repeats + 2  # tokens streamed by the timed steps (one per call, after the warm-up)
    for n in args.sizes:
        x = torch.randn(1, n + extra, *attn.layout.shape(args.features), dtype=dtype)
        pos = (0.5 * torch.randn(1, n + extra, 3, dtype=dtype)).cumsum(1)  # a drifting trajectory
        t = torch.arange(n)
        with torch.inference_mode():
            state = attn.init_state(1, window=n)
            attn.forward_steps(x[:, : n - 1], state, positions=pos[:, : n - 1])  # the ring holds N - 1 tokens
            newest, _ = attn.forward_step(x[:, n - 1], state, positions=pos[:, n - 1])
            reference = attn(x[:, :n], pos[:, :n], band_mask(t, t, n))[:, -1]
            diff = (newest - reference).abs().max().item()
            tokens = iter(range(n, n + extra))

            def step() -> None:
                i = next(tokens)  # each call streams the next token; the ring stays full, so each costs the same
                attn.forward_step(x[:, i], state, positions=pos[:, i])

            times = interleaved_ms(
                {"recompute": lambda: attn(x[:, :n], pos[:, :n], band_mask(t, t, n)), "step": step}, args.repeats
            )
        print(_row(n, times, diff))
    bench_memory(args, dtype, extra)


def bench_memory(args: argparse.Namespace, dtype: torch.dtype, extra: int) -> None:
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
    print(HEADER)
    for n in args.sizes:
        z = torch.randn(1, n + extra, *attn.kv_layout.shape(kv_features), dtype=dtype)
        pz = (0.5 * torch.randn(1, n + extra, 3, dtype=dtype)).cumsum(1)
        x = torch.randn(1, 1, *attn.layout.shape(args.features), dtype=dtype)
        px = pz[:, n - 1 : n] + 0.1
        with torch.inference_mode():
            state = attn.init_state(1, memory_window=n)
            attn.append_memory(z[:, : n - 1], state, kv_positions=pz[:, : n - 1])
            newest, _ = attn.forward_step(x, state, positions=px, kv=z[:, n - 1], kv_positions=pz[:, n - 1])
            reference = attn(x, px, kv=z[:, :n], kv_positions=pz[:, :n])
            diff = (newest - reference).abs().max().item()
            tokens = iter(range(n, n + extra))

            def step() -> None:
                i = next(tokens)  # one new key per call; the ring stays full, so each costs the same
                attn.forward_step(x, state, positions=px, kv=z[:, i], kv_positions=pz[:, i])

            times = interleaved_ms(
                {"recompute": lambda: attn(x, px, kv=z[:, :n], kv_positions=pz[:, :n]), "step": step}, args.repeats
            )
        print(_row(n, times, diff))


if __name__ == "__main__":
    main()
