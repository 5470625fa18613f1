"""The point of equivariance, measured: train the equivariant and the plain policy only on demonstrations whose target
lies in the upper half-plane (y > 0), then evaluate both through the daemon on held-out targets in the lower
half-plane (never seen) and in the upper one (seen).

    python examples/reacher/half_plane.py --workdir runs/half_plane [--episodes 100] [--steps 6000]
        [--schedules k-step streaming]

Steps whose output already exists in ``--workdir`` are skipped, so the experiment can be resumed or re-evaluated.
Both policies are trained with the same data, architecture width, optimizer settings and seed; only the symmetry
constraint differs. ``--schedules`` picks the sampler each pair is trained for: ``k-step`` (the sampler's K
denoiser calls per control step) and/or ``streaming`` (``--noise-chunk 1 --anticausal-attn``: the streaming buffer,
one denoiser call per control step); every policy is evaluated on the same targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluate import evaluate, table  # examples/reacher/evaluate.py

from streamtx.apps.collect import main as collect_main
from streamtx.apps.demo import DEFAULT_EXECUTE
from streamtx.apps.train import main as train_main
from streamtx.checkpoint import load_fastest_policy
from streamtx.tasks.reacher.env import Half
from streamtx.tasks.reacher.evaluate import EvalResult, ExpertController, PolicyController, eval_seeds, run_episodes

SCHEDULES = {"k-step": ("", []), "streaming": ("-streaming", ["--noise-chunk", "1", "--anticausal-attn"])}
"""Per training schedule: the checkpoints' name suffix and the trainer flags."""


def evaluate_in_process(checkpoints: list[Path], episodes: int, half: Half) -> dict[str, EvalResult]:
    """As ``evaluate`` (same targets, the expert first), each policy run in-process on the static plan that
    `streamtx serve` serves, a chunk every control step: the daemon's actions without a daemon per checkpoint."""
    seeds = eval_seeds(episodes)
    results = {"expert": run_episodes(ExpertController(), seeds, half, desc="expert")}
    for path in checkpoints:
        controller = PolicyController(load_fastest_policy(path, compile=False))
        results[str(path)] = run_episodes(controller, seeds, half, desc=path.name)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/half_plane"))
    p.add_argument("--demos", type=int, default=1000, help="upper-half-plane demonstration episodes")
    p.add_argument("--steps", type=int, default=6000, help="training steps of each policy")
    p.add_argument("--dim", type=int, default=32, help="embedding dim of both policies")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes in the unseen (lower) half-plane")
    p.add_argument("--seen-episodes", type=int, default=None, help="in the seen half-plane (default: --episodes)")
    p.add_argument("--in-process", action="store_true", help="run the policies in-process (execute 1), no daemon")
    p.add_argument("--execute", type=int, default=DEFAULT_EXECUTE)
    p.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=["k-step"])
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "demos_upper.npz"
    if not data.exists():
        collect_main(["--episodes", str(args.demos), "--half", "upper", "--out", str(data)])
    policies = {}
    for schedule in args.schedules:
        suffix, schedule_flags = SCHEDULES[schedule]
        for name in ("equivariant", "plain"):
            ckpt = policies[f"{name}{suffix}"] = args.workdir / f"{name}{suffix}.pt"
            if not ckpt.exists():
                flags = [*schedule_flags, *(["--no-equivariance"] if name == "plain" else [])]
                train_main([str(data), "--out", str(ckpt), "--steps", str(args.steps), "--dim", str(args.dim), *flags])
    summary = {}
    halves: tuple[Half, Half] = ("lower", "upper")
    for half in halves:
        episodes = args.episodes if half == "lower" or args.seen_episodes is None else args.seen_episodes
        if args.in_process:
            results = evaluate_in_process(list(policies.values()), episodes, half)
        else:
            results = evaluate(list(policies.values()), episodes, half, args.execute)
        print(
            f"\ntargets in the {half} half-plane ({'unseen' if half == 'lower' else 'seen'} in training), "
            f"{episodes} held-out episodes\n"
        )
        print(table(results))
        summary[half] = {
            name: {"success_rate": r.success_rate, "mean_final_distance": r.mean_final_distance}
            for name, r in results.items()
        }
    out = args.workdir / "results.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
