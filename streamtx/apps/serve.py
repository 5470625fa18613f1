"""``streamtx serve`` / ``stats`` / ``keygen`` / ``random-checkpoint``: the daemon wired to streamtx checkpoints.

The daemon (``streamtx_server``) serves any policy with its interface; this module is the one place that says which
streamtx policy a checkpoint and a device become: the static CUDA-graph plan on a CUDA device, the module-path
:class:`~streamtx.policy.StreamingPolicy` elsewhere.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from streamtx_server import cli as server_cli

from ..checkpoint import load_policy, load_static_policy, make_random_checkpoint
from .served_policy import TorchBatchPolicy

__all__ = ["load_served_policy", "serve_main", "stats_main", "keygen_main", "random_checkpoint_main"]

stats_main = server_cli.stats_main
keygen_main = server_cli.keygen_main


def load_served_policy(
    checkpoint: Path, device: str, threads: int | None, max_tokens_per_step: int
) -> TorchBatchPolicy:
    """The policy ``streamtx serve`` runs for ``checkpoint`` on ``device`` with ``threads`` torch threads, behind
    the daemon's numpy interface."""
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device; use --device cpu")
    try:
        return _load(checkpoint, device, max_tokens_per_step)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError) as exc:
        # the loaders' messages quote torch's long advice about weights_only: one line is what an operator needs
        raise ValueError(
            f"--checkpoint {checkpoint}: not a streamtx checkpoint ({type(exc).__name__}); make one with "
            "`streamtx train` or `streamtx random-checkpoint`"
        ) from None


def _load(checkpoint: Path, device: str, max_tokens_per_step: int) -> TorchBatchPolicy:
    if torch.device(device).type == "cuda":  # static plan + CUDA graphs captured at start-up, pinned I/O
        return TorchBatchPolicy(load_static_policy(checkpoint, device=device, max_tokens_per_step=max_tokens_per_step))
    return TorchBatchPolicy(load_policy(checkpoint, device=device, max_tokens_per_step=max_tokens_per_step))


def serve_main(argv: list[str] | None = None) -> int:
    """``streamtx serve --checkpoint PATH --bind tcp://127.0.0.1:5555 ...``"""
    return server_cli.serve_main(argv, load_served_policy)


def random_checkpoint_main(argv: list[str] | None = None) -> int:
    """``streamtx random-checkpoint PATH [--seed N]``"""
    parser = argparse.ArgumentParser(prog="streamtx random-checkpoint", description=make_random_checkpoint.__doc__)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_random_checkpoint(args.path, seed=args.seed))
    return 0
