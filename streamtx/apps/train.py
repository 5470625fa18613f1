"""``streamtx train``: fit a flow-matching (or DDIM diffusion) policy on a demonstration file and write a checkpoint
in the daemon's format.

    streamtx train reacher_demos.npz --out policy.pt [--no-equivariance] [--steps 6000]

The dataset names its task (``task`` array, or ``--task``), which gives the representations of observations and
actions; the equivariant model (default) is an ``eCondTransformerRegressor`` over them, the baseline
(``--no-equivariance``) the same architecture as a ``CondTransformerRegressor`` of the same width.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_checkpoint
from ..models import CondTransformerRegressor, eCondTransformerRegressor, get_optim_groups
from ..policy import DDIMSampler, FlowMatchingSampler, Sampler
from ..symmetry import Representation
from ..tasks import task_representations
from ..train.data import ChunkDataset, load_dataset
from ..train.normalize import fold_input_normalization, observation_normalizer
from ..train.trainer import TrainConfig, TrainResult, train

__all__ = ["build_model", "build_sampler", "split_episodes", "main"]


def build_model(
    obs_rep: Representation, act_rep: Representation, *, equivariant: bool = True, **arch: Any
) -> eCondTransformerRegressor:
    """The policy denoiser ``V = f(X_k, k, Z)``: equivariant over the representations' group, or the plain baseline
    with the same dimensions. ``arch`` are ``eCondTransformerRegressor`` arguments (``in_horizon``,
    ``cond_horizon``, ``num_layers``, ...)."""
    if equivariant:
        return eCondTransformerRegressor(act_rep, obs_rep, act_rep, **arch)
    return CondTransformerRegressor(act_rep.size, obs_rep.size, act_rep.size, **arch)


def build_sampler(kind: str, num_steps: int) -> Sampler:
    """``"flow"``: rectified flow with Euler steps; ``"ddim"``: DDIM over 100 training steps."""
    if kind == "flow":
        return FlowMatchingSampler(num_steps=num_steps, method="euler")
    if kind == "ddim":
        return DDIMSampler(num_train_steps=100, num_steps=num_steps)
    raise ValueError(f"kind: expected 'flow' or 'ddim', got {kind!r}")


def split_episodes(num_episodes: int, val_fraction: float) -> tuple[slice, slice]:
    """Train on the first episodes, validate on the last ``val_fraction`` of them (at least one when > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    num_val = int(round(num_episodes * val_fraction))
    num_val = max(num_val, 1) if val_fraction > 0 and num_episodes > 1 else num_val
    return slice(0, num_episodes - num_val), slice(num_episodes - num_val, num_episodes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtx train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", type=Path, help="demonstration .npz (observations (E, T, obs), actions (E, T, act))")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    p.add_argument("--task", default=None, help="task whose symmetry to use (default: the dataset's 'task')")
    p.add_argument("--no-equivariance", action="store_true", help="train the plain baseline")
    g = p.add_argument_group("model")
    g.add_argument("--action-horizon", type=int, default=8, help="Tx, actions per chunk")
    g.add_argument("--obs-horizon", type=int, default=2, help="Tz, observation tokens in the decoder's memory")
    g.add_argument("--layers", type=int, default=2, help="decoder layers")
    g.add_argument(
        "--cond-layers", type=int, default=0, help="conditioning-encoder layers (0: a per-token equivariant MLP)"
    )
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--dim", type=int, default=32, help="embedding dim (a multiple of |G| * 2 * heads)")
    g.add_argument("--sampler", choices=["flow", "ddim"], default="flow")
    g.add_argument("--sampling-steps", type=int, default=5, help="denoiser calls per action chunk")
    g = p.add_argument_group("optimization")
    defaults = TrainConfig()
    g.add_argument("--steps", type=int, default=6000)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size)
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--ema-decay", type=float, default=0.995)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.05, help="episodes held out for the validation loss")
    g.add_argument("--eval-every", type=int, default=500, help="steps between validation losses")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave cores to the simulator/daemon)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    task = args.task or (str(data["task"]) if "task" in data else None)
    if task is None:
        raise SystemExit(f"streamtx train: {args.data} names no task; pass --task")
    obs_rep, act_rep = task_representations(task)
    obs, act = data["observations"], data["actions"]
    if obs.shape[-1] != obs_rep.size or act.shape[-1] != act_rep.size:
        raise SystemExit(
            f"streamtx train: task {task!r} has observations of size {obs_rep.size} and actions of size "
            f"{act_rep.size}, the dataset {obs.shape[-1]} and {act.shape[-1]}"
        )
    torch.manual_seed(args.seed)  # the model's initialization
    model = build_model(
        obs_rep,
        act_rep,
        equivariant=not args.no_equivariance,
        in_horizon=args.action_horizon,
        cond_horizon=args.obs_horizon,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        embedding_dim=args.dim,
        num_cond_layers=args.cond_layers,
    )
    sampler = build_sampler(args.sampler, args.sampling_steps)
    history = model.receptive_field()
    tr, va = split_episodes(len(obs), args.val_fraction)
    scale, shift = observation_normalizer(obs[tr], obs_rep)
    obs = ((obs - shift) * scale).astype(np.float32)  # trained on normalized observations, folded in below
    train_set = ChunkDataset(obs[tr], act[tr], history, args.action_horizon)
    val_set = ChunkDataset(obs[va], act[va], history, args.action_horizon) if va.stop > va.start else None
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_steps, args.steps - 1),
        ema_decay=args.ema_decay,
        seed=args.seed,
        eval_every=args.eval_every,
        progress=not args.quiet,
    )
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(model).__name__} ({num_params:,} parameters, receptive field {history} observations), {sampler}; "
        f"{len(train_set):,} training examples from {tr.stop} episodes of task {task!r}"
    )
    start = time.perf_counter()
    result: TrainResult = train(model, sampler, train_set, config, get_optim_groups(model, args.weight_decay), val_set)
    seconds = time.perf_counter() - start
    fold_input_normalization(result.ema_model.cond_obs_emb, scale, shift)  # the checkpoint takes raw observations
    extra = {
        "task": task,
        "command": "streamtx train " + shlex.join(argv),
        "train": config.to_dict(),
        "dataset": {
            "path": str(args.data),
            "episodes": int(len(obs)),
            "half": str(data["half"]) if "half" in data else "all",
        },
        "final_loss": float(np.mean(result.losses[-100:])),
        "train_seconds": seconds,
    }
    if result.val_losses:
        extra["val_loss"] = result.val_losses[-1][1]
    save_checkpoint(args.out, result.ema_model, sampler, extra=extra)
    size = args.out.stat().st_size
    val = f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB) after {seconds / 60:.1f} min; "
        f"training loss {extra['final_loss']:.4f}{val}"
    )
    return 0
