"""Evaluate policies in closed loop through the daemon on held-out Reacher-v5 targets, next to the scripted expert.

    python examples/reacher/evaluate.py policy.pt [other.pt ...] --episodes 100 [--half lower] [--execute 1]

Each checkpoint is served by its own daemon process and driven through the client SDK, exactly as `streamtx demo`
does; the table gives success rate (fingertip within 0.02 m at the end) and mean final distance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamtx.apps.demo import DEFAULT_EXECUTE
from streamtx.apps.served_eval import evaluate_served
from streamtx.tasks.reacher.evaluate import EVAL_SEED, EvalResult, ExpertController, eval_seeds, run_episodes


def evaluate(
    checkpoints: list[Path], episodes: int, half: str | None, execute: int, seed: int = EVAL_SEED, progress: bool = True
) -> dict[str, EvalResult]:
    """``{name: result}`` for the expert and every checkpoint, on the same targets."""
    seeds = eval_seeds(episodes, seed)
    results = {"expert": run_episodes(ExpertController(), seeds, half, progress=progress, desc="expert")}
    for path in checkpoints:
        results[str(path)] = evaluate_served(path, seeds, half, execute, progress=progress, desc=path.name).result
    return results


def table(results: dict[str, EvalResult]) -> str:
    rows = ["| controller | success | mean final distance (m) |", "|---|---:|---:|"]
    rows += [f"| {name} | {r.success_rate:.0%} | {r.mean_final_distance:.4f} |" for name, r in results.items()]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--half", choices=["upper", "lower"], default=None)
    p.add_argument("--execute", type=int, default=DEFAULT_EXECUTE, help="control steps per action chunk")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode seed")
    args = p.parse_args()
    results = evaluate(args.checkpoints, args.episodes, args.half, args.execute, args.seed)
    where = f"{args.half} half-plane" if args.half else "all"
    print(f"\n{args.episodes} held-out targets ({where}), a chunk every {args.execute} steps\n")
    print(table(results))


if __name__ == "__main__":
    main()
