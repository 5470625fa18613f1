"""``streamtx serve`` / ``stats`` / ``keygen`` / ``random-checkpoint`` / ``replay``: the daemon wired to streamtx
checkpoints.

The daemon (``streamtx_server``) serves any policy with its interface; this module is the one place that says which
streamtx policy a checkpoint and a device become: the static plan (CUDA graphs on a CUDA device, eager on the CPU),
or the module-path :class:`~streamtx.policy.StreamingPolicy` for a model the plan cannot run (the reason is logged)
or when asked for. ``serve --record DIR`` wraps that policy in a
:class:`~streamtx.apps.recording.RecordingPolicy`; ``replay`` replays such a recording against a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from streamtx_server import cli as server_cli
from streamtx_server.config_file import parse_args_with_config
from streamtx_server.jsonlog import LOGGER_NAME, log_event

from ..checkpoint import load_fastest_policy, load_policy, make_random_checkpoint
from .recording import RecordingPolicy, read_recording, replay
from .served_policy import TorchBatchPolicy

__all__ = [
    "load_served_policy",
    "serve_parser",
    "serve_main",
    "stats_main",
    "keygen_main",
    "random_checkpoint_main",
    "replay_main",
]

stats_main = server_cli.stats_main
keygen_main = server_cli.keygen_main


PATHS = ("module", "plan", "compiled")
"""What ``--policy-path`` picks: the module-by-module path (every model), the static plan (the default on every
device: eager on the CPU, where each batch computes exactly its sessions' rows, and CUDA graphs on a GPU; a model it
cannot run falls back to the module path with the reason logged), or the plan compiled by inductor on the CPU
(fastest per step; its first start compiles for minutes, later starts read the cache; it pads a batch to its bucket
size, as compiled programs have static shapes)."""


def load_served_policy(
    checkpoint: Path, device: str, threads: int | None, max_tokens_per_step: int, path: str | None = None
) -> TorchBatchPolicy:
    """The policy ``streamtx serve`` runs for ``checkpoint`` on ``device`` with ``threads`` torch threads, behind
    the daemon's numpy interface; ``path`` is one of :data:`PATHS` (None: ``plan``)."""
    path = path or "plan"
    if path not in PATHS:
        raise ValueError(f"--policy-path: expected one of {', '.join(PATHS)}, got {path!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device; use --device cpu")
    try:
        return _load(checkpoint, device, max_tokens_per_step, path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError) as exc:
        # the loaders' messages quote torch's long advice about weights_only: one line is what an operator needs
        raise ValueError(
            f"--checkpoint {checkpoint}: not a streamtx checkpoint ({type(exc).__name__}); make one with "
            "`streamtx train` or `streamtx random-checkpoint`"
        ) from None


def _load(checkpoint: Path, device: str, max_tokens_per_step: int, path: str) -> TorchBatchPolicy:
    if path == "module":
        return TorchBatchPolicy(load_policy(checkpoint, device=device, max_tokens_per_step=max_tokens_per_step))
    compile = path == "compiled" and torch.device(device).type == "cpu"
    policy = load_fastest_policy(checkpoint, device=device, max_tokens_per_step=max_tokens_per_step, compile=compile)
    return TorchBatchPolicy(policy)


def serve_parser() -> argparse.ArgumentParser:
    """The daemon's options and the ones this application adds (recording)."""
    p = server_cli.serve_parser()
    p.add_argument(
        "--policy-path",
        choices=PATHS,
        default=None,
        help="plan (the default): the static plan, eager on the CPU and CUDA graphs on a GPU (a model it cannot run "
        "is served by the module path, and the log says why); module: the module-by-module path; compiled: the plan "
        "compiled by inductor on the CPU (fastest per step; the first start compiles for minutes, later ones read "
        "the cache)",
    )
    p.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="record every session (observations, returned chunks, timing) as a LeRobot v3.0 dataset in DIR "
        "(must not exist or be empty); replay it with `streamtx replay DIR --checkpoint X`",
    )
    p.add_argument(
        "--record-fps", type=float, default=50.0, help="the robots' control rate: the recorded dataset's fps"
    )
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """``streamtx serve --checkpoint PATH --bind tcp://127.0.0.1:5555 [--record DIR] ...``"""
    args = parse_args_with_config(serve_parser(), argv)
    recorders: list[RecordingPolicy] = []

    def load(checkpoint: Path, device: str, threads: int | None, max_tokens_per_step: int) -> Any:
        policy = load_served_policy(checkpoint, device, threads, max_tokens_per_step, args.policy_path)
        if args.record is None:
            return policy
        recorders.append(RecordingPolicy(policy, args.record, fps=args.record_fps))
        return recorders[-1]

    code = server_cli.serve_args(args, load)
    for recorder in recorders:  # the daemon stopped: its sessions' last episodes are written now
        try:
            path = recorder.close()
        except RuntimeError as exc:
            print(f"streamtx serve: {exc}", file=sys.stderr)
            return 1
        log_event(logging.getLogger(LOGGER_NAME), logging.INFO, "recorded", path=str(path))
    return code


def replay_main(argv: list[str] | None = None) -> int:
    """``streamtx replay DIR --checkpoint PATH``: per episode, how the checkpoint's chunks differ from the served."""
    p = argparse.ArgumentParser(
        prog="streamtx replay",
        description="Replay a `streamtx serve --record` dataset against a checkpoint and compare the action chunks.",
    )
    p.add_argument("directory", type=Path, help="the recorded LeRobot dataset")
    p.add_argument("--checkpoint", required=True, type=Path, help="the policy to replay (the served one or another)")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object per episode")
    args = p.parse_args(argv)
    try:
        meta, _ = read_recording(args.directory)
        policy = load_served_policy(args.checkpoint, args.device, args.threads, int(meta["max_tokens_per_step"]))
        results = replay(args.directory, policy)
    except (OSError, ValueError, ImportError) as exc:
        print(f"streamtx replay: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for r in results:
            row = {"episode": r.index, "frames": r.frames, "chunks": len(r.chunks), "max_abs": r.max_abs}
            print(json.dumps({**row, "max_rel": r.max_rel}))
        return 0
    print(f"{'episode':>7} {'frames':>7} {'chunks':>7} {'max |diff|':>12} {'relative':>10}")
    for r in results:
        print(f"{r.index:>7} {r.frames:>7} {len(r.chunks):>7} {r.max_abs:>12.3e} {r.max_rel:>10.3e}")
    return 0


def random_checkpoint_main(argv: list[str] | None = None) -> int:
    """``streamtx random-checkpoint PATH [--seed N]``"""
    parser = argparse.ArgumentParser(prog="streamtx random-checkpoint", description=make_random_checkpoint.__doc__)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_random_checkpoint(args.path, seed=args.seed))
    return 0
