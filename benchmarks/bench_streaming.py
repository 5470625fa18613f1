"""Streaming vs recomputing, on CPU, measured side by side in one run.

(1) Per-token cost: one new token per stream against the ring cache vs the batch forward over the whole window (what a
    non-streaming model recomputes for each new token), for W = 64, 256, 1024, one layer and a 4-layer stack. Steps:
    the module's ``forward_step`` and the lowered layers' ``EncoderLayer.step`` over the same ring (dense weights,
    fused q/k/v, no module dispatch); recompute: the faster (by p50) of the module's batch forward and the lowered
    stack over the window, both with the band-causal mask. ms per call p50 / p99 / max, calls interleaved.
(2) Control step (new observation -> action chunk, K = 10 Euler steps) of ``StreamingPolicy`` vs recomputing the batch
    ``eCondTransformerRegressor`` (encoder over the window + decoder) for every denoising step, robot-sized config:
    D4, embedding 128, 4 decoder + 2 encoder layers, Tx = 16, 32 observation tokens.
Usage: python benchmarks/bench_streaming.py [--threads 1] [--repeats 20] [--streams 1 8] [--layers 1 4]
       [--windows 64 256 1024] [--no-control]
"""

from __future__ import annotations

import argparse

import torch
from robot_model import robot_model
from timing import Times, median_ms, timed

from streamtx.nn import causal_window_mask, eTransformerEncoder, eTransformerEncoderLayer
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.symmetry import Representation, dihedral


def per_token(rep: Representation, depth: int, window: int, repeats: int, batch: int) -> dict[str, Times]:
    layer = eTransformerEncoderLayer(
        rep, 4, 4 * rep.size, dropout=0.0, batch_first=True, norm_first=True, positional="rope"
    )
    enc = eTransformerEncoder(layer, depth).eval()
    blocks = [layer.lower() for layer in enc.layer_list]
    stack = enc.lower(window=window)
    heads, hd = layer.self_attn.num_heads, layer.self_attn.head_dim
    x = torch.randn(batch, window, rep.size)
    mask = causal_window_mask(window, window)
    pos = torch.arange(window).expand(batch, window)
    empty = torch.zeros(batch, 0, depth, heads, hd)
    state, lowered_state = enc.init_state(batch, window=window), enc.init_state(batch, window=window)
    caches = [s.self_attn.cache for s in lowered_state.layers]

    def lowered_step(token: torch.Tensor) -> torch.Tensor:
        for block, cache in zip(blocks, caches):
            token = block.step(token, cache, window)
        return token

    with torch.no_grad():
        for t in range(window):  # a full ring: every step attends to W cached tokens
            enc.forward_step(x[:, t], state)
        lowered_step(x)
        token = x[:, -1]
        return timed(
            {
                "step": lambda: enc.forward_step(token, state),
                "lowered": lambda: lowered_step(token[:, None]),
                "module batch": lambda: enc(x, mask=mask),
                "lowered batch": lambda: stack(x, pos, empty, empty, empty[:, :, 0, 0, 0].long()),
            },
            repeats,
        )


def control_step(repeats: int) -> tuple[float, float, int]:
    model = robot_model()
    sampler = FlowMatchingSampler(num_steps=10)
    policy = StreamingPolicy(model, sampler)
    state = policy.init_state(1)
    z = torch.randn(1, 64, model.cond_rep.size)
    with torch.no_grad():
        for t in range(63):
            policy.observe(state, z[:, t])
        window = z[:, -32:]
        noise = policy.noise(state)

        def recompute() -> torch.Tensor:  # a non-streaming policy: the whole model for each denoising step
            return sampler.sample(lambda x, k: model(x, k, window), noise)

        def stream() -> torch.Tensor:
            snapshot = state.clone()  # keep the stream at the same length for every repeat (clone timed too)
            return policy.step(snapshot, z[:, -1])

        t = median_ms({"stream": stream, "recompute": recompute}, repeats)
    return t["stream"], t["recompute"], sampler.num_evaluations


def fmt(t: Times) -> str:
    return f"{t[0]:.3g} / {t[1]:.3g} / {t[2]:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--no-control", action="store_true", help="skip (2), the control step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rep = Representation.regular(dihedral(4), 16)  # D = 128
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, D4, D=128, {args.repeats} interleaved calls")
    print("(1) one new token per stream vs recomputing the window; ms p50 / p99 / max; speed-ups of p50s")
    header = (
        f"{'streams':>7} {'layers':>6} {'W':>5} {'step':>20} {'lowered step':>20} {'recompute':>22} "
        f"{'step x':>7} {'lowered x':>9} {'cpu: step x':>11} {'lowered x':>9}"
    )
    print(header)
    for batch in args.streams:
        for depth in args.layers:
            for window in args.windows:
                t = per_token(rep, depth, window, args.repeats, batch)
                which = min(("module batch", "lowered batch"), key=lambda k: t[k][0])
                full, cpu = t[which][0], min(t["module batch"][3], t["lowered batch"][3])
                print(
                    f"{batch:>7} {depth:>6} {window:>5} {fmt(t['step']):>20} {fmt(t['lowered']):>20} "
                    f"{fmt(t[which]) + (' m' if which == 'module batch' else ' l'):>22} "
                    f"{full / t['step'][0]:>6.1f}x {full / t['lowered'][0]:>8.1f}x "
                    f"{cpu / t['step'][3]:>10.1f}x {cpu / t['lowered'][3]:>8.1f}x"
                )
    print(
        "recompute: m = the module's batch forward, l = the lowered stack, whichever has the lower p50; "
        "cpu: the same ratios of the thread's CPU-time p50s"
    )
    if args.no_control:
        return
    stream, full, evals = control_step(args.repeats)
    print(f"(2) control step, robot config, K = {evals} denoiser evaluations (medians)")
    print(f"{'StreamingPolicy ms':>19} {'recompute ms':>13} {'speed-up':>9}")
    print(f"{stream:>19.2f} {full:>13.2f} {full / stream:>8.1f}x")


if __name__ == "__main__":
    main()
