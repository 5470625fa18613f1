"""``streamtx demo``: the main job end to end. A simulated Reacher-v5 arm streams its observations to the streamtx
daemon and is driven by the action chunks it returns.

Starts the daemon with the embedded checkpoint (a mirror-equivariant flow-matching policy), runs ``--episodes``
held-out episodes as a client robot through the SDK, runs the scripted expert on the same targets for comparison,
prints success rate, mean final distance and latencies (client round trip, and the daemon's own model time), writes a
PNG, and shuts the daemon down. Ctrl-C stops the daemon too and exits with status 130 and one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..tasks.reacher import SHIPPED_POLICY
from ..tasks.reacher.env import SUCCESS_DISTANCE
from ..tasks.reacher.evaluate import EVAL_SEED, ExpertController, eval_seeds, run_episodes
from ..tasks.reacher.plot import plot_evaluation
from .served_eval import evaluate_served

__all__ = ["DEFAULT_EXECUTE", "INTERRUPTED", "main"]

DEFAULT_EXECUTE = 1
"""Control steps per action chunk in the demo: a fresh chunk every step (``--execute 2`` asks every second step and
only observes in between), so every request is a full control step and the daemon's model time is per chunk."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtx demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes (targets) to run")
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_POLICY, help="policy to serve")
    p.add_argument("--execute", type=int, default=DEFAULT_EXECUTE, help="control steps per action chunk")
    p.add_argument("--half", choices=["upper", "lower"], default=None, help="only targets in this half-plane")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode seed (training used 0, 1, ...)")
    p.add_argument("--png", type=Path, default=Path("reacher_demo.png"), help="figure to write")
    p.add_argument("--log", type=Path, default=None, help="keep the daemon's JSON log in this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.episodes < 1:
        print(f"streamtx demo: --episodes: expected >= 1, got {args.episodes}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except KeyboardInterrupt:  # the daemon was stopped on the way out (evaluate_served's finally)
        print("\nstreamtx demo: interrupted (Ctrl-C); the daemon it started is stopped", file=sys.stderr)
        return INTERRUPTED


def _listening(endpoint: str) -> None:
    print(f"daemon listening on {endpoint} (Ctrl-C stops it and the demo)", flush=True)


def _run(args: argparse.Namespace) -> int:
    seeds = eval_seeds(args.episodes, args.seed)
    start = time.perf_counter()
    served = evaluate_served(
        args.checkpoint,
        seeds,
        args.half,
        args.execute,
        log_path=args.log,
        progress=not args.quiet,
        on_listening=_listening,
    )
    expert = run_episodes(ExpertController(), seeds, args.half, progress=not args.quiet, desc="expert")
    policy, meta = served.result, served.hello["policy"]["metadata"]
    client_ms = 1e3 * served.latencies
    model_ms = served.model_time_ms()
    runner = meta.get("runner")  # the static plan describes itself; the module path has no runner
    path = "module path" if runner is None else f"static plan, {'compiled' if runner['compiled'] else 'eager'}"

    print(
        f"\nReacher-v5, {args.episodes} held-out targets (seeds {seeds[0]}..{seeds[-1]}"
        f"{', ' + args.half + ' half-plane' if args.half else ''}); success = fingertip within "
        f"{SUCCESS_DISTANCE} m at the end"
    )
    print(
        f"policy: {meta['model']} over {meta['group']['name']}, {meta['num_parameters']:,} parameters, "
        f"{meta['sampler']['type']} sampler with {meta['num_evaluations']} denoiser calls per chunk of "
        f"{meta['horizon']} actions, a chunk every {args.execute} control steps"
    )
    print(f"  {'controller':<26} {'success':>8} {'mean final dist':>16}")
    for name, r in (("policy through the daemon", policy), ("scripted expert", expert)):
        print(f"  {name:<26} {r.success_rate:>8.1%} {r.mean_final_distance:>16.4f}")
    print(
        f"  latency per chunk request: client round trip p50 {np.percentile(client_ms, 50):.2f} ms, "
        f"p99 {np.percentile(client_ms, 99):.2f} ms; daemon model time ({path}) p50 {model_ms['p50']:.2f} ms, "
        f"p99 {model_ms['p99']:.2f} ms ({len(client_ms)} chunk requests"
        f"{'' if args.execute == 1 else '; the model time includes the observe-only steps'})"
    )

    plot_evaluation(
        policy,
        args.png,
        latencies=served.latencies,
        expert=expert,
        model_time_ms=model_ms,
        title=f"streamtx demo: Reacher-v5 through the daemon ({args.episodes} episodes)",
    )
    print(f"wrote {args.png}; done in {time.perf_counter() - start:.0f} s")
    return 0
