"""``streamtx train``: fit a flow-matching (or DDIM diffusion) policy on demonstrations and write a checkpoint in the
daemon's format.

    streamtx train DATA --out policy.pt [--symmetry robot.toml | --task reacher | --no-equivariance] [--config FILE]
    torchrun --nproc-per-node 2 -m streamtx train DATA --out policy.pt ...      # data-parallel, same trajectory

``DATA`` is a ``.npz`` demonstration file (``streamtx collect``) or a LeRobot dataset directory (v3.0 or v2.1; its
``--observation-features`` and ``--action-features`` become the observation and action tokens). The symmetry comes
from a declaration (``--symmetry``, see :mod:`streamtx.data.symmetry`), a task (``--task``, or the ``.npz``'s own
``task``), or none (``--no-equivariance``: the plain ``CondTransformerRegressor`` of the same width). Every option
can also come from a TOML file (``--config``); flags override it.

A dataset of 3-D entity tokens (its metadata names the token layout: ``tokens_num_entities``, ``tokens_obs_features``,
``tokens_obs_max_degree``, ``tokens_obs_pseudotensors``, as ``streamtx.tasks.pointmass3d`` writes) trains an
O(3)-equivariant ``O3CondDenoiser`` (``--dim`` channels per irrep of degrees ``0..--max-degree``, relative positions
up to ``--cutoff``), or with ``--no-equivariance`` the plain ``CondTransformerRegressor`` over the same flat tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from streamtx_server.config_file import add_config_option, parse_args_with_config

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Episodes, SymmetrySpec, SymmetrySpecError, load_npz, read_lerobot
from ..models import (
    CondTransformerRegressor,
    O3CondDenoiser,
    O3DenoiserConfig,
    RegressorConfig,
    eCondTransformerRegressor,
    get_optim_groups,
)
from ..nn.linear import eLinear
from ..policy import DDIMSampler, FlowMatchingSampler, Sampler
from ..symmetry import Representation, trivial_group
from ..tasks import task_representations
from ..train.chunks import ChunkDataset
from ..train.metrics import MetricsLog
from ..train.normalize import fold_input_normalization, observation_normalizer
from ..train.trainer import AUTOCAST_DTYPES, TrainConfig, TrainResult, TrainState, train

__all__ = ["build_model", "build_sampler", "load_episodes", "split_episodes", "token_layout", "main"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

TOKEN_FIELDS = ("num_entities", "obs_features", "obs_max_degree", "obs_pseudotensors")
"""The ``O3DenoiserConfig`` fields a dataset of 3-D tokens declares, as metadata ``tokens_<field>``."""


def token_layout(episodes: Episodes) -> dict[str, Any] | None:
    """The 3-D token layout that ``episodes``' metadata declares (``O3DenoiserConfig`` fields), or ``None``."""
    found = {name: episodes.meta[f"tokens_{name}"] for name in TOKEN_FIELDS if f"tokens_{name}" in episodes.meta}
    if not found:
        return None
    if len(found) != len(TOKEN_FIELDS):
        missing = [f"tokens_{name}" for name in TOKEN_FIELDS if name not in found]
        raise ValueError(f"dataset: its 3-D token layout lacks {missing}")
    return {name: bool(v) if name == "obs_pseudotensors" else int(v) for name, v in found.items()}


def build_model(
    obs_rep: Representation, act_rep: Representation, *, equivariant: bool = True, **arch: Any
) -> eCondTransformerRegressor:
    """The policy denoiser ``V = f(X_k, k, Z)``: equivariant over the representations' group, or the plain baseline
    with the same dimensions. ``arch`` are ``eCondTransformerRegressor`` arguments (``in_horizon``,
    ``cond_horizon``, ``num_layers``, ...)."""
    if equivariant:
        return eCondTransformerRegressor(act_rep, obs_rep, act_rep, **arch)
    return CondTransformerRegressor(act_rep.size, obs_rep.size, act_rep.size, **arch)


def build_sampler(kind: str, num_steps: int, noise_chunk: int | None = None) -> Sampler:
    """``"flow"``: rectified flow with Euler steps; ``"ddim"``: DDIM over 100 training steps. ``noise_chunk``: train
    with chunk-wise noise levels along the horizon, for the streaming sampler (``StreamingDenoisePolicy``)."""
    if kind == "flow":
        return FlowMatchingSampler(num_steps=num_steps, method="euler", noise_chunk=noise_chunk)
    if kind == "ddim":
        return DDIMSampler(num_train_steps=100, num_steps=num_steps, noise_chunk=noise_chunk)
    raise ValueError(f"kind: expected 'flow' or 'ddim', got {kind!r}")


def split_episodes(num_episodes: int, val_fraction: float) -> tuple[slice, slice]:
    """Train on the first episodes, validate on the last ``val_fraction`` of them (at least one when > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    num_val = int(round(num_episodes * val_fraction))
    num_val = max(num_val, 1) if val_fraction > 0 and num_episodes > 1 else num_val
    return slice(0, num_episodes - num_val), slice(num_episodes - num_val, num_episodes)


def load_episodes(path: Path, fmt: str, observation_features: list[str], action_features: list[str]) -> Episodes:
    """The demonstrations at ``path``: ``fmt`` ``"npz"``, ``"lerobot"`` or ``"auto"`` (a directory is LeRobot)."""
    if fmt == "auto":
        fmt = "lerobot" if path.is_dir() else "npz"
    if fmt == "lerobot":
        return read_lerobot(path, observation_features, action_features)
    if fmt == "npz":
        return load_npz(path)
    raise ValueError(f"fmt: expected 'auto', 'npz' or 'lerobot', got {fmt!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtx train",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", type=Path, help="a .npz demonstration file or a LeRobot dataset directory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    add_config_option(p)
    g = p.add_argument_group("data and symmetry")
    g.add_argument("--format", choices=["auto", "npz", "lerobot"], default="auto", help="auto: a directory is LeRobot")
    g.add_argument(
        "--observation-features", nargs="+", default=["observation.state"], help="LeRobot features, in order"
    )
    g.add_argument("--action-features", nargs="+", default=["action"], help="LeRobot features, in order")
    g.add_argument("--symmetry", type=Path, default=None, help="TOML declaration of the group and representations")
    g.add_argument("--task", default=None, help="task whose symmetry to use (default: the .npz's 'task')")
    g.add_argument("--no-equivariance", action="store_true", help="train the plain baseline")
    g = p.add_argument_group("model")
    g.add_argument("--action-horizon", type=int, default=8, help="Tx, actions per chunk")
    g.add_argument("--obs-horizon", type=int, default=2, help="Tz, observation tokens in the decoder's memory")
    g.add_argument("--layers", type=int, default=2, help="decoder layers")
    g.add_argument(
        "--cond-layers", type=int, default=0, help="conditioning-encoder layers (0: a per-token equivariant MLP)"
    )
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--dim", type=int, default=32, help="embedding dim (a multiple of |G| * 2 * heads)")
    g.add_argument("--max-degree", type=int, default=1, help="3-D tokens: highest irrep degree of the hidden features")
    g.add_argument("--cutoff", type=float, default=2.0, help="3-D tokens: range of the relative-position bases")
    g.add_argument("--sampler", choices=["flow", "ddim"], default="flow")
    g.add_argument("--sampling-steps", type=int, default=5, help="denoiser calls per action chunk")
    g.add_argument(
        "--noise-chunk",
        type=int,
        default=None,
        help="train for the streaming sampler (one denoiser call per control step): noise levels rise along the "
        "horizon in chunks of N actions, each action token gets its own level (default: one level per chunk)",
    )
    g.add_argument(
        "--anticausal-attn",
        action="store_true",
        help="each action token attends only to itself and later ones: the streaming buffer is then rebuilt "
        "exactly by a finite replay",
    )
    g = p.add_argument_group("optimization")
    defaults = TrainConfig()
    g.add_argument("--steps", type=int, default=6000)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (all processes)")
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--ema-decay", type=float, default=0.995)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.05, help="episodes held out for the validation loss")
    g.add_argument("--eval-every", type=int, default=500, help="steps between validation losses")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: the LOCAL_RANK GPU), cuda:1, ...")
    g.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None, help="mixed-precision forward")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and data precision")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave cores to the simulator/daemon)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between resumable OUT.step-N.pt (0: none)")
    g.add_argument("--resume", type=Path, default=None, help="continue from a periodic checkpoint")
    g.add_argument("--log-dir", type=Path, default=None, help="metrics.csv (+ TensorBoard) here; default OUT.logs/")
    g.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between metrics rows")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _representations(args: argparse.Namespace, episodes: Episodes) -> tuple[Representation, Representation, Any]:
    """``(obs_rep, act_rep, symmetry record for the checkpoint)`` from the declaration, the task or neither."""
    if args.symmetry is not None and args.task is not None:
        raise SystemExit("streamtx train: give one of --symmetry and --task, got both")
    if args.symmetry is not None:
        try:
            spec = SymmetrySpec.load(args.symmetry)
        except SymmetrySpecError as exc:
            raise SystemExit(f"streamtx train: {exc}") from None
        obs_rep, act_rep = spec.representations()
        record: Any = {"source": str(args.symmetry), "declaration": spec.to_dict()}
    else:
        task = args.task or episodes.meta.get("task")
        if task is None:
            if not args.no_equivariance:
                raise SystemExit(
                    f"streamtx train: {args.data} names no task; declare the robot's symmetry (--symmetry FILE), "
                    "name a task (--task) or train the plain model (--no-equivariance)"
                )
            group = trivial_group()
            return (
                Representation.trivial(group, episodes.obs_dim),
                Representation.trivial(group, episodes.act_dim),
                None,
            )
        obs_rep, act_rep = task_representations(str(task))
        record = {"task": str(task)}
    where = args.symmetry or f"task {record.get('task')!r}"
    if episodes.obs_dim != obs_rep.size or episodes.act_dim != act_rep.size:
        raise SystemExit(
            f"streamtx train: {where} declares observations of size {obs_rep.size} and actions of size "
            f"{act_rep.size}; the dataset has {episodes.obs_dim} and {episodes.act_dim}"
        )
    return obs_rep, act_rep, record


def _servable(
    ema_model: torch.nn.Module, scale: np.ndarray | None, shift: np.ndarray | None
) -> eCondTransformerRegressor | O3CondDenoiser:
    """A float32 copy of the EMA model that takes raw observations (the normalisation folded in; an
    ``O3CondDenoiser`` trains on raw tokens: ``scale`` and ``shift`` are ``None``)."""
    model = copy.deepcopy(ema_model).float().cpu()
    if isinstance(model, O3CondDenoiser) and scale is None and shift is None:
        return model
    if scale is None or shift is None:
        raise ValueError("scale, shift: a regressor's input normalisation is needed to serve it")
    if not isinstance(model, eCondTransformerRegressor) or not isinstance(model.cond_obs_emb, eLinear):
        raise TypeError(f"ema_model: expected an eCondTransformerRegressor, got {type(model).__name__}")
    fold_input_normalization(model.cond_obs_emb, scale, shift)
    return model


def _init_distributed(device: str) -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:  # before NCCL starts: each process talks from its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args_with_config(_parser(), argv)
    torch.set_num_threads(args.threads)
    rank, world = _init_distributed(args.device)
    try:
        return _run(args, argv, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _datasets(
    args: argparse.Namespace, episodes: Episodes, obs_rep: Representation | None, history: int
) -> tuple[ChunkDataset, ChunkDataset | None, np.ndarray | None, np.ndarray | None, int]:
    """Training and validation examples, normalised by ``obs_rep``'s equivariant normaliser (``None``: raw, the 3-D
    tokens of an ``O3CondDenoiser``, whose positions and vectors are already in the task's units)."""
    tr, va = split_episodes(episodes.num_episodes, args.val_fraction)
    train_eps = episodes.select(tr)
    scale, shift = (None, None) if obs_rep is None else observation_normalizer(train_eps.observations, obs_rep)
    dtype = DTYPES[args.dtype]

    def chunks(eps: Episodes) -> ChunkDataset:
        raw = eps.observations if scale is None or shift is None else (eps.observations - shift) * scale
        obs = raw.astype(np.float32 if dtype == torch.float32 else np.float64)
        return ChunkDataset(obs, eps.actions, history, args.action_horizon, dtype, eps.lengths)

    val = chunks(episodes.select(va)) if va.stop > va.start else None
    return chunks(train_eps), val, scale, shift, train_eps.num_episodes


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_steps, args.steps - 1),
        ema_decay=args.ema_decay,
        seed=args.seed,
        eval_every=args.eval_every,
        progress=not args.quiet,
        device=args.device,
        autocast=args.autocast,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )


def _extra(
    args: argparse.Namespace, argv: list[str], episodes: Episodes, config: TrainConfig, world: int, symmetry: Any
) -> dict[str, Any]:
    """The checkpoint's ``extra``: how it was trained, on what, with which symmetry."""
    extra: dict[str, Any] = {
        "command": "streamtx train " + shlex.join(argv),
        "train": config.to_dict(),
        "processes": world,
        "dataset": {
            "path": str(args.data),
            "format": episodes.meta.get("format", "npz"),
            "episodes": episodes.num_episodes,
            "frames": episodes.num_frames,
            "fps": episodes.fps,
            "half": str(episodes.meta.get("half", "all")),
            "observation_names": episodes.observation_names,
            "action_names": episodes.action_names,
        },
    }
    if symmetry is not None and "task" in symmetry:
        extra["task"] = symmetry["task"]
    elif symmetry is not None:
        extra["symmetry"] = symmetry
    return extra


def _say(rank: int, message: str) -> None:
    if rank == 0:  # one process speaks for all
        print(message)


def _o3_model(args: argparse.Namespace, layout: dict[str, Any], episodes: Episodes) -> O3CondDenoiser:
    """The ``O3CondDenoiser`` of a 3-D token dataset (``layout``: :func:`token_layout`)."""
    if args.symmetry is not None:
        raise SystemExit("streamtx train: a dataset of 3-D tokens is O(3)-equivariant by its layout; drop --symmetry")
    if args.noise_chunk is not None or args.anticausal_attn:
        raise SystemExit("streamtx train: --noise-chunk and --anticausal-attn are options of the regressor only")
    config = O3DenoiserConfig(
        **layout,
        in_horizon=args.action_horizon,
        cond_horizon=args.obs_horizon,
        features=args.dim,
        max_degree=args.max_degree,
        num_attention_heads=args.heads,
        num_layers=args.layers,
        num_cond_layers=args.cond_layers,
        cutoff=args.cutoff,
    )
    model = O3CondDenoiser(config)
    if episodes.obs_dim != model.token_dim or episodes.act_dim != model.action_dim:
        raise SystemExit(
            f"streamtx train: the token layout {layout} makes tokens of size {model.token_dim} and actions of size "
            f"{model.action_dim}; the dataset has {episodes.obs_dim} and {episodes.act_dim}"
        )
    return model


def _run(args: argparse.Namespace, argv: list[str], rank: int, world: int) -> int:
    episodes = load_episodes(args.data, args.format, args.observation_features, args.action_features)
    if episodes.meta.get("skipped_features"):
        _say(
            rank,
            f"not used (video/image features are not supported yet): {', '.join(episodes.meta['skipped_features'])}",
        )
    layout = token_layout(episodes)
    torch.manual_seed(args.seed)  # the model's initialization
    model: eCondTransformerRegressor | O3CondDenoiser
    obs_rep: Representation | None
    if layout is not None and not args.no_equivariance:
        model = _o3_model(args, layout, episodes).to(DTYPES[args.dtype])
        obs_rep, symmetry = None, {"group": model.symmetry(), "tokens": model.token_layout()}
    else:
        obs_rep, model, symmetry = _regressor(args, episodes, layout is not None)
    sampler = build_sampler(args.sampler, args.sampling_steps, args.noise_chunk)
    history = model.receptive_field()
    train_set, val_set, scale, shift, num_train = _datasets(args, episodes, obs_rep, history)
    config = _train_config(args)
    extra = _extra(args, argv, episodes, config, world, symmetry)
    resume = _resume_state(args.resume, model) if args.resume is not None else None
    num_params = sum(p.numel() for p in model.parameters())
    _say(
        rank,
        f"{type(model).__name__} ({num_params:,} parameters, receptive field {history} observations), {sampler}; "
        f"{len(train_set):,} training examples from {num_train} episodes; {world} process(es) on {args.device}",
    )

    def checkpoint(state: TrainState) -> None:
        path = args.out.with_name(f"{args.out.stem}.step-{state.step}{args.out.suffix}")
        save_checkpoint(
            path, _servable(state.ema.shadow, scale, shift), sampler, {**extra, "train_state": state.state_dict()}
        )
        _say(rank, f"wrote {path} (resumable)")

    log_dir = args.log_dir or args.out.with_name(args.out.name + ".logs")
    _say(rank, f"metrics: {log_dir / 'metrics.csv'}")
    start = time.perf_counter()
    metrics = MetricsLog(log_dir, resume_step=resume["step"] if resume else None) if rank == 0 else None
    try:
        result: TrainResult = train(
            model,
            sampler,
            train_set,
            config,
            get_optim_groups(model, args.weight_decay),
            val_set,
            resume=resume,
            on_checkpoint=checkpoint,
            metrics=metrics,
        )
    finally:
        if metrics is not None:
            metrics.close()
    if rank == 0:
        _finish(args, result, extra, _servable(result.ema_model, scale, shift), sampler, time.perf_counter() - start)
    return 0


def _regressor(
    args: argparse.Namespace, episodes: Episodes, plain_tokens: bool
) -> tuple[Representation, eCondTransformerRegressor, Any]:
    """``(obs_rep, model, symmetry record)`` of the regressor; ``plain_tokens``: a 3-D token dataset trained
    without equivariance (the baseline over the same flat tokens, no group)."""
    if plain_tokens:
        group = trivial_group()
        obs_rep, act_rep = (Representation.trivial(group, d) for d in (episodes.obs_dim, episodes.act_dim))
        symmetry: Any = None
    else:
        obs_rep, act_rep, symmetry = _representations(args, episodes)
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
        token_levels=args.noise_chunk is not None,
        anticausal_attn=args.anticausal_attn,
    ).to(DTYPES[args.dtype])
    return obs_rep, model, symmetry


def _finish(
    args: argparse.Namespace,
    result: TrainResult,
    extra: dict[str, Any],
    model: eCondTransformerRegressor | O3CondDenoiser,
    sampler: Sampler,
    seconds: float,
) -> None:
    """Write the final checkpoint (EMA weights, normalisation folded in) and say how training went."""
    extra["final_loss"] = float(np.mean(result.losses[-100:]))
    extra["train_seconds"] = seconds
    if result.val_losses:
        extra["val_loss"] = result.val_losses[-1][1]
    save_checkpoint(args.out, model, sampler, extra=extra)
    size = args.out.stat().st_size
    val = f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB) after {seconds / 60:.1f} min; "
        f"training loss {extra['final_loss']:.4f}{val}"
    )


def _resume_state(path: Path, model: eCondTransformerRegressor | O3CondDenoiser) -> dict[str, Any]:
    """The training state of a periodic checkpoint, checked against the model being trained."""
    payload = load_checkpoint(path)
    state = payload["extra"].get("train_state")
    if state is None:
        raise SystemExit(f"streamtx train: --resume {path} holds no training state (write it with --checkpoint-every)")
    # through the config class: a state saved before an option existed holds that option's default
    config_class = O3DenoiserConfig if payload["model_class"] == "O3CondDenoiser" else RegressorConfig
    saved = config_class.from_dict(payload["config"])
    if saved != model.config or payload["model_class"] != type(model).__name__:
        raise SystemExit(
            f"streamtx train: --resume {path} is a {payload['model_class']} with {payload['config']}; this run builds "
            f"a {type(model).__name__} with {model.config.to_dict()}"
        )
    return dict(state)
