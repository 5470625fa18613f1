"""``streamtx collect``: Reacher-v5 demonstrations of the scripted expert into a ``.npz`` dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.reacher.collect import collect_demonstrations
from ..tasks.reacher.env import EPISODE_STEPS, SUCCESS_DISTANCE
from ..train.data import save_dataset

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamtx collect", description="Collect Reacher-v5 expert demonstrations.")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("reacher_demos.npz"))
    parser.add_argument("--seed", type=int, default=0, help="episodes use seeds seed, seed+1, ...")
    parser.add_argument(
        "--half", choices=["upper", "lower"], default=None, help="only targets in this half-plane (mirrored into it)"
    )
    parser.add_argument(
        "--action-noise",
        type=float,
        default=0.1,
        help="std of the noise added to the executed torques (the recorded ones stay clean)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    data = collect_demonstrations(args.episodes, args.seed, args.half, args.action_noise, progress=not args.quiet)
    save_dataset(args.out, data)
    d = data["final_distance"]
    print(
        f"wrote {args.out}: {args.episodes} episodes x {EPISODE_STEPS} steps; expert success "
        f"{(d < SUCCESS_DISTANCE).mean():.1%}, mean final distance {d.mean():.4f}"
    )
    return 0
