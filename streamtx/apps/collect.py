"""``streamtx collect``: Reacher-v5 demonstrations of the scripted expert, as a ``.npz`` file or a LeRobot dataset.

streamtx collect --episodes 1000 --out reacher_demos.npz
streamtx collect --episodes 1000 --format lerobot --out reacher_lerobot/     # LeRobotDataset v3.0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import Episodes, save_npz, write_lerobot
from ..tasks.reacher.collect import TASK, collect_demonstrations
from ..tasks.reacher.env import CONTROL_HZ, EPISODE_STEPS, SUCCESS_DISTANCE
from ..tasks.reacher.symmetry import ACT_NAMES, OBS_NAMES

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamtx collect", description="Collect Reacher-v5 expert demonstrations.")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument(
        "--format", choices=["npz", "lerobot"], default="npz", help="lerobot: a LeRobotDataset v3.0 directory"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: reacher_demos.npz or reacher_lerobot/")
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
    out = args.out or Path("reacher_demos.npz" if args.format == "npz" else "reacher_lerobot")
    data = collect_demonstrations(args.episodes, args.seed, args.half, args.action_noise, progress=not args.quiet)
    if args.format == "npz":
        save_npz(out, data)
    else:
        episodes = Episodes.from_padded(
            data["observations"], data["actions"], observation_names=list(OBS_NAMES), action_names=list(ACT_NAMES)
        )
        write_lerobot(out, episodes, CONTROL_HZ, task=f"{TASK}: reach the target", robot_type="gymnasium_reacher_v5")
    d = data["final_distance"]
    print(
        f"wrote {out}: {args.episodes} episodes x {EPISODE_STEPS} steps; expert success "
        f"{(d < SUCCESS_DISTANCE).mean():.1%}, mean final distance {d.mean():.4f}"
    )
    return 0
