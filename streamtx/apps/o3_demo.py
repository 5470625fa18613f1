"""``streamtx o3-demo``: an O(3)-equivariant policy over 3-D tokens, end to end, against a plain one.

A point mass in 3-D (:mod:`streamtx.tasks.pointmass3d`) reaches a target. The analytic expert's demonstrations cover
only the cone of target directions within ``--cone`` degrees of ``+z`` (60: a quarter of the sphere).
``streamtx train`` fits two policies on the same demonstrations: the equivariant ``O3CondDenoiser`` and the plain
``CondTransformerRegressor`` of about the same size over the same flat tokens. Both run closed loop on held-out
targets, half in the seen cone and half in the unseen rest of the sphere, all episodes of a region at once (one row
each, in-process: the policy class the daemon serves). Then each checkpoint is served by the daemon (a child process
on a local port) and a few episodes of each region run through one SDK session: their final distances are compared
with the in-process ones, and the client round trip of every control step is the latency reported. Prints one table.

    streamtx o3-demo                        # ~2-3 min of training each on one CPU thread
    streamtx o3-demo --workdir o3_demo/     # keep the demonstrations, checkpoints and logs
    streamtx o3-demo --cone 30              # a narrower seen cone
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamtx_client import Client
from streamtx_server.process import DaemonProcess

from ..checkpoint import load_policy
from ..data import save_npz
from ..tasks.pointmass3d.collect import EpisodeStarts, collect_demonstrations
from ..tasks.pointmass3d.env import SUCCESS_DISTANCE
from ..tasks.pointmass3d.evaluate import (
    ExpertController,
    PolicyController,
    Rollouts,
    held_out_episodes,
    rollout,
)
from . import train
from .served_eval import SessionController

__all__ = ["DemoRow", "main", "train_arguments"]


def train_arguments(
    data: Path, out: Path, *, equivariant: bool, steps: int, seed: int = 0, quiet: bool = True
) -> list[str]:
    """The ``streamtx train`` command line of one of the demo's two policies (also what the README shows):
    ``O3CondDenoiser`` with 16 channels of degrees 0 and 1, or the plain regressor of width 20 (about the same
    number of parameters), both flow matching with 5 Euler steps, chunks of 4 actions, one control step of
    memory (the task is Markov)."""
    common = ["--action-horizon", "4", "--obs-horizon", "1", "--layers", "2", "--cond-layers", "1", "--heads", "2"]
    common += ["--steps", str(steps), "--batch-size", "128", "--lr", "3e-3", "--warmup-steps", "100"]
    common += ["--ema-decay", "0.99", "--eval-every", "0", "--seed", str(seed), "--threads", "1"]
    model = ["--dim", "16", "--max-degree", "1", "--cutoff", "2.0"] if equivariant else ["--dim", "20"]
    model += [] if equivariant else ["--no-equivariance"]
    return [str(data), "--out", str(out), *common, *model, *(["--quiet"] if quiet else [])]


class _OneSession:
    """A served session as a batch controller of one episode (what :func:`rollout` drives)."""

    def __init__(self, controller: SessionController) -> None:
        self.controller = controller

    def reset(self, seeds: np.ndarray) -> None:
        if len(seeds) != 1:
            raise ValueError(f"seeds: one session runs one episode at a time, got {len(seeds)}")
        self.controller.reset(int(seeds[0]))

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.controller(tokens[0])[None].astype(np.float64)


@dataclass
class DemoRow:
    """One policy's results: in-process rollouts on the seen and unseen targets, the client round trips (seconds)
    of the served episodes, their largest final-distance difference to the in-process ones, and its size."""

    name: str
    seen: Rollouts
    unseen: Rollouts
    latencies: np.ndarray
    served_difference: float
    num_parameters: int


def _served(checkpoint: Path, episodes: list[EpisodeStarts], log: Path) -> tuple[list[Rollouts], np.ndarray]:
    """Run ``episodes`` one after another through one session of a daemon serving ``checkpoint``."""
    daemon = DaemonProcess.serve(checkpoint.resolve(), ["tcp://127.0.0.1:*"], log, "--threads=1")
    try:
        endpoint = daemon.start()[0]
        with Client(endpoint, timeout=30.0, retries=0) as client:
            session = client.open(seed=int(episodes[0].seeds[0]))
            controller = SessionController(session, execute=1)
            results = [rollout(_OneSession(controller), e) for e in episodes]
            session.close()
    finally:
        code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"the daemon exited with code {code}:\n{daemon.log_tail()}")
    return results, np.asarray(controller.latencies)


def _evaluate(
    name: str, checkpoint: Path, seen: EpisodeStarts, unseen: EpisodeStarts, served: int, log: Path
) -> DemoRow:
    policy = load_policy(checkpoint)
    controller = PolicyController(policy)
    local = rollout(controller, seen), rollout(controller, unseen)
    picks = [starts.select(slice(i, i + 1)) for starts in (seen, unseen) for i in range(served)]
    served_runs, latencies = _served(checkpoint, picks, log)
    reference = [r.final_distance[i] for r in local for i in range(served)]
    difference = max(abs(float(s.final_distance[0]) - float(d)) for s, d in zip(served_runs, reference))
    return DemoRow(name, *local, latencies, difference, sum(p.numel() for p in policy.model.parameters()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtx o3-demo",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--episodes", type=int, default=400, help="demonstrations (targets in the seen cone)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps of each policy")
    p.add_argument("--targets", type=int, default=200, help="held-out targets per region (seen, unseen)")
    p.add_argument("--served", type=int, default=5, help="episodes per region run through the daemon per policy")
    p.add_argument("--cone", type=float, default=60.0, help="half-angle (degrees) of the seen cone about +z")
    p.add_argument("--workdir", type=Path, default=None, help="keep demonstrations, checkpoints, logs here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("episodes", "steps", "targets", "served"):
        if getattr(args, name) < 1:
            raise SystemExit(f"streamtx o3-demo: --{name}: expected >= 1, got {getattr(args, name)}")
    if not 0 < args.cone < 180:
        raise SystemExit(f"streamtx o3-demo: --cone: expected degrees in (0, 180), got {args.cone}")
    if args.served > args.targets:
        raise SystemExit(f"streamtx o3-demo: --served {args.served} is more than --targets {args.targets}")
    torch.set_num_threads(1)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="streamtx-o3-demo-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> int:
    start = time.perf_counter()
    data = work / "pointmass3d_demos.npz"
    half_angle = math.radians(args.cone)
    save_npz(data, collect_demonstrations(args.episodes, seed=0, region="seen", half_angle=half_angle))
    print(f"wrote {data}: {args.episodes} expert episodes, targets within {args.cone:g} degrees of +z")
    seen, unseen = held_out_episodes(args.targets, args.targets, half_angle=half_angle)
    rows, seconds = [], {}
    for name, equivariant in (("O3CondDenoiser (equivariant)", True), ("CondTransformerRegressor (plain)", False)):
        checkpoint = work / ("o3.pt" if equivariant else "plain.pt")
        began = time.perf_counter()
        train.main(train_arguments(data, checkpoint, equivariant=equivariant, steps=args.steps, quiet=args.quiet))
        seconds[name] = time.perf_counter() - began
        log = work / f"daemon-{checkpoint.stem}.log"
        rows.append(_evaluate(name, checkpoint, seen, unseen, args.served, log))
    expert = rollout(ExpertController(), seen), rollout(ExpertController(), unseen)
    _print_table(args, rows, expert, seconds)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _print_table(
    args: argparse.Namespace, rows: list[DemoRow], expert: tuple[Rollouts, Rollouts], seconds: dict[str, float]
) -> None:
    print(
        f"\n3-D point mass, {args.targets} held-out targets with directions in the training cone (<= {args.cone:g} deg "
        f"from +z: seen) and {args.targets} outside it (unseen); success = within {SUCCESS_DISTANCE} m at the end"
    )
    head = f"  {'policy':<34} {'params':>7} {'train s':>8} {'seen':>7} {'unseen':>7} {'final mm seen/unseen':>21}"
    print(head + f"  {'daemon step p50 / p99 ms':>25}  {'served = local':>14}")
    for r in rows:
        ms = 1e3 * r.latencies
        latency = f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}"
        mm = f"{1e3 * r.seen.final_distance.mean():.1f} / {1e3 * r.unseen.final_distance.mean():.1f}"
        print(
            f"  {r.name:<34} {r.num_parameters:>7,} {seconds[r.name]:>8.0f} {r.seen.success_rate:>7.1%} "
            f"{r.unseen.success_rate:>7.1%} {mm:>21}  {latency:>25}  {r.served_difference:>14.1e}"
        )
    mm = f"{1e3 * expert[0].final_distance.mean():.1f} / {1e3 * expert[1].final_distance.mean():.1f}"
    print(
        f"  {'analytic expert':<34} {'':>7} {'':>8} {expert[0].success_rate:>7.1%} {expert[1].success_rate:>7.1%} "
        f"{mm:>21}"
    )
    print(
        f"  final mm: mean final distance; daemon: {len(rows[0].latencies)} control steps per policy ({args.served} "
        "episodes per region, one session, a chunk per step, client round trip); served = local: largest |final "
        "distance| difference between the served and the in-process rollout of the same episodes (m)"
    )
