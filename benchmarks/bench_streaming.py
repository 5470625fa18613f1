"""Streaming vs recomputing, on CPU, measured side by side in one run.

(1) Per-token cost: ``forward_step`` of one new token against the ring cache vs the batch forward over the whole window
    (what a non-streaming model recomputes for each new token), for W = 64, 256, 1024, one layer and a 4-layer stack.
(2) Control step (new observation -> action chunk, K = 10 Euler steps) of ``StreamingPolicy`` vs recomputing the batch
    ``eCondTransformerRegressor`` (encoder over the window + decoder) for every denoising step, robot-sized config:
    D4, embedding 128, 4 decoder + 2 encoder layers, Tx = 16, 32 observation tokens.
Usage: python benchmarks/bench_streaming.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import torch
from timing import median_ms, setup

from streamtx.models import eCondTransformerRegressor
from streamtx.nn import causal_window_mask, eTransformerEncoder, eTransformerEncoderLayer
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.symmetry import Representation, dihedral


def per_token(rep: Representation, depth: int, window: int, repeats: int, batch: int) -> tuple[float, float]:
    layer = eTransformerEncoderLayer(
        rep, 4, 4 * rep.size, dropout=0.0, batch_first=True, norm_first=True, positional="rope"
    )
    enc = eTransformerEncoder(layer, depth).eval()
    x = torch.randn(batch, window, rep.size)
    mask = causal_window_mask(window, window)
    state = enc.init_state(batch, window=window)
    with torch.no_grad():
        for t in range(window):  # a full ring: every step attends to W cached tokens
            enc.forward_step(x[:, t], state)
        token = x[:, -1]
        t = median_ms({"step": lambda: enc.forward_step(token, state), "recompute": lambda: enc(x, mask=mask)}, repeats)
    return t["step"], t["recompute"]


def control_step(repeats: int) -> tuple[float, float, int]:
    group = dihedral(4)
    vec = Representation.from_generators(group, [group.matrices[g] for g in group.generators])
    action = vec + Representation.trivial(group, 1)
    obs = vec + vec + Representation.trivial(group, 2) + Representation.regular(group, 1)
    model = eCondTransformerRegressor(
        action,
        obs,
        action,
        in_horizon=16,
        cond_horizon=32,
        num_layers=4,
        num_attention_heads=4,
        embedding_dim=128,
        num_cond_layers=2,
    ).eval()
    sampler = FlowMatchingSampler(num_steps=10)
    policy = StreamingPolicy(model, sampler)
    state = policy.init_state(1)
    z = torch.randn(1, 64, obs.size)
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


def main() -> None:
    args = setup(__doc__, repeats=20)
    rep = Representation.regular(dihedral(4), 16)  # D = 128
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, D4, D=128, median of {args.repeats} runs")
    print("(1) one new token per stream: forward_step vs recomputing the window")
    print(f"{'streams':>7} {'layers':>6} {'W':>5} {'step ms':>9} {'recompute ms':>13} {'speed-up':>9}")
    for batch in (1, 8):
        for depth in (1, 4):
            for window in (64, 256, 1024):
                step, full = per_token(rep, depth, window, args.repeats, batch)
                print(f"{batch:>7} {depth:>6} {window:>5} {step:>9.3f} {full:>13.3f} {full / step:>8.1f}x")
    stream, full, evals = control_step(args.repeats)
    print(f"(2) control step, robot config, K = {evals} denoiser evaluations")
    print(f"{'StreamingPolicy ms':>19} {'recompute ms':>13} {'speed-up':>9}")
    print(f"{stream:>19.2f} {full:>13.2f} {full / stream:>8.1f}x")


if __name__ == "__main__":
    main()
