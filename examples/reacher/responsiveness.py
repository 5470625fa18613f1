"""Responsiveness of the streaming sampler against the K-step policy: the target jumps mid-episode (control step 20
of 50) and we count the control steps until the fingertip turns toward it (and until it has covered a quarter of the
way), next to the scripted expert on the same episodes (``streamtx.tasks.reacher.responsiveness``).

    python examples/reacher/responsiveness.py k_step.pt streaming.pt [--episodes 200] [--half upper] [--png F]

Each checkpoint runs in-process on the static plan (what `streamtx serve` serves), one chunk per control step, its
first action applied. The PNG (optional, needs matplotlib) shows the distributions of both counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamtx.checkpoint import load_fastest_policy
from streamtx.tasks.reacher.evaluate import EVAL_SEED, ExpertController, PolicyController, eval_seeds
from streamtx.tasks.reacher.responsiveness import MOVE_AT, Reaction, run_moved_target


def table(results: dict[str, tuple[str, Reaction]]) -> str:
    rows = [
        "| controller | denoiser evaluations per step | turn p50 / mean (steps) | quarter p50 / mean (steps) | "
        "reached the moved target |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (evals, r) in results.items():
        s = r.summary()
        rows.append(
            f"| {name} | {evals} | {s['turn_p50']:.0f} / {s['turn_mean']:.2f} | {s['quarter_p50']:.0f} / "
            f"{s['quarter_mean']:.2f} | {s['reached']:.1%} |"
        )
    return "\n".join(rows)


def plot(results: dict[str, tuple[str, Reaction]], path: Path) -> bool:
    try:
        import matplotlib  # optional: the table is the result, the figure an illustration

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, field in zip(axes, ("turn", "quarter")):
        top = max(int(getattr(r, field).max()) for _, r in results.values())
        for name, (_, r) in results.items():
            ax.hist(getattr(r, field), bins=range(1, top + 2), histtype="step", label=name, align="left")
        ax.set_xlabel(f"control steps after the jump ({field})")
        ax.set_ylabel("episodes")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--half", choices=["upper", "lower"], default=None)
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode seed")
    p.add_argument("--move-at", type=int, default=MOVE_AT)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args()
    seeds = eval_seeds(args.episodes, args.seed)
    results = {"expert": ("-", run_moved_target(ExpertController(), seeds, args.half, args.move_at, desc="expert"))}
    for path in args.checkpoints:
        policy = load_fastest_policy(path, compile=False)
        evals = str(policy.metadata()["num_evaluations"])
        controller = PolicyController(policy)
        results[path.name] = (evals, run_moved_target(controller, seeds, args.half, args.move_at, desc=path.name))
    print(f"\n{args.episodes} episodes, the target jumps at control step {args.move_at} of 50\n")
    print(table(results))
    if args.png is not None:
        print(f"\nwrote {args.png}" if plot(results, args.png) else "\nno PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
