"""A reusable trainer for denoising policies on action chunks (flow matching or diffusion).

Works with any model ``V = model(X_k, k, Z)`` (``X_k (B, Tx, act_dim)`` noisy chunk, ``k (B,)`` step or time,
``Z (B, Tz, obs_dim)`` observation window) and any sampler with ``training_example(X, generator) -> (X_k, k, target)``:
the loss is ``mse(model(X_k, k, Z), target)`` (:func:`chunk_loss`), so the sampler alone decides what is learnt
(velocity, noise, ...) and under which noise schedule: one level per chunk, or with the sampler's ``noise_chunk``
chunk-wise levels increasing along the horizon (``k (B, Tx)``, for a model with ``token_levels`` and the streaming
sampler of :mod:`streamtx.policy.streaming_denoise`); the checkpoint's sampler config records which.

Scaling: on any device (``TrainConfig.device``, optional bf16 autocast), and on several processes when
``torch.distributed`` is initialised (``torchrun``): every process draws the same global batch and noise from the same
seeded generator and computes the loss of its own slice of it inside ``DistributedDataParallel``, so a run on ``W``
processes follows the same trajectory as one process at the same global batch (up to summation order). A run resumes
exactly from :meth:`TrainState.state_dict` (weights, optimizer, EMA, schedule position, batch order and noise).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .chunks import ChunkBatch, ChunkDataset
from .ema import EMA
from .metrics import MetricsLog

__all__ = ["TrainConfig", "TrainResult", "TrainState", "TrainingSampler", "chunk_loss", "train"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingSampler(Protocol):
    def training_example(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]: ...


@dataclass
class TrainConfig:
    """Optimization settings.

    Args:
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak learning rate of AdamW, reached after ``warmup_steps`` of linear warm-up, then cosine decay to
            ``min_lr_ratio * lr``.
        weight_decay: on the weight matrices only (``get_optim_groups`` decides which).
        betas: AdamW's.
        grad_clip: max global gradient norm (``0``: no clipping).
        ema_decay: of the evaluated weights (:class:`~streamtx.train.ema.EMA`).
        seed: seeds the model initialization (when the caller builds the model after :func:`torch.manual_seed`),
            the batches and the noise.
        eval_every: steps between validation losses (``0``: only at the end); needs a validation set.
        progress: show a progress bar (on the first process only).
        device: where the model and the examples live (``"cuda"`` is the process's ``LOCAL_RANK`` device under
            ``torchrun``); batches and noise are always drawn on the CPU, so every device sees the same ones.
        autocast: ``None`` (full precision), ``"bf16"`` or ``"fp16"``: the forward pass under ``torch.autocast``.
        checkpoint_every: steps between calls of ``train``'s ``on_checkpoint`` (``0``: never).
        log_every: steps between rows of the metrics file (the last step is always written).
    """

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    eval_every: int = 0
    progress: bool = True
    device: str = "cpu"
    autocast: str | None = None
    checkpoint_every: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.log_every < 1:
            raise ValueError(f"log_every: expected >= 1, got {self.log_every}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast: expected None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """``ema_model``: the averaged weights (what to evaluate and ship); ``losses``: training loss per step (of the
    global batch); ``val_losses``: ``(step, loss)`` of the EMA model on the validation set (first process only)."""

    ema_model: nn.Module
    losses: list[float]
    val_losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped; ``step`` optimizer steps are done."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    losses: list[float]
    val_losses: list[tuple[int, float]]

    def state_dict(self) -> dict[str, Any]:
        """A snapshot in plain containers and CPU tensors (copies: training on does not change it), loadable with
        ``torch.load(weights_only=True)``."""
        return {
            "step": self.step,
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "ema": _to_cpu(self.ema.shadow.state_dict()),
            "ema_updates": self.ema.num_updates,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout, if the model has any
            "losses": list(self.losses),
            "val_losses": [list(v) for v in self.val_losses],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.shadow.load_state_dict(state["ema"])
        self.ema.num_updates = int(state["ema_updates"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.losses = [float(v) for v in state["losses"]]
        self.val_losses = [(int(s), float(v)) for s, v in state["val_losses"]]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


class Examples(NamedTuple):
    """A batch ready for the loss: windows ``Z``, noisy chunks ``X_k``, steps ``k``, targets and window lengths."""

    Z: Tensor
    X_k: Tensor
    k: Tensor
    target: Tensor
    lengths: Tensor


def _examples(sampler: TrainingSampler, batch: ChunkBatch, generator: torch.Generator | None) -> Examples:
    x_k, k, target = sampler.training_example(batch.X, generator=generator)
    return Examples(batch.Z, x_k, k, target, batch.lengths)


def _shard(examples: Examples, rank: int, world: int) -> Examples:
    """This process's contiguous slice of the batch, ``1 / world`` of it."""
    total = len(examples.Z)
    lo, hi = rank * total // world, (rank + 1) * total // world
    return Examples(*(t[lo:hi] for t in examples))


class _SquaredError(nn.Module):
    """``sum ||model(X_k, k, Z) - target||^2`` over a batch, windows of every length in one forward: the module
    that DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, examples: Examples) -> Tensor:
        if len(examples.Z) == 0:
            raise ValueError("batch: expected at least one example, got none")
        prediction = self.model(examples.X_k, examples.k, examples.Z, cond_lengths=examples.lengths)
        return F.mse_loss(prediction, examples.target, reduction="sum")


def chunk_loss(
    model: nn.Module,
    sampler: TrainingSampler,
    batch: ChunkBatch,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean squared error of ``model`` against ``sampler``'s targets over a batch (as :meth:`ChunkDataset.get`
    returns it), every example weighted alike."""
    examples = _examples(sampler, batch, generator)
    return _SquaredError(model)(examples) / examples.target.numel()


@torch.no_grad()
def _validation_loss(model: nn.Module, sampler: TrainingSampler, batch: ChunkBatch, seed: int) -> float:
    # the same noise every time: losses are comparable across evaluations
    return chunk_loss(model, sampler, batch, torch.Generator().manual_seed(seed)).item()


def _device(config: TrainConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {config.device!r} requested, but CUDA is not available")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if config.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[config.autocast])


def train(
    model: nn.Module,
    sampler: TrainingSampler,
    dataset: ChunkDataset,
    config: TrainConfig,
    param_groups: list[dict[str, Any]] | None = None,
    val_dataset: ChunkDataset | None = None,
    callback: Callable[[int, float], None] | None = None,
    *,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    metrics: MetricsLog | None = None,
) -> TrainResult:
    """Train ``model`` in place to predict ``sampler``'s targets from the chunks and windows of ``dataset``.

    Args:
        model: ``V = model(X_k, k, Z)``; moved to ``config.device``.
        sampler: provides ``training_example``.
        dataset: the training examples (moved to ``config.device``).
        config: optimization settings.
        param_groups: AdamW parameter groups (e.g. ``streamtx.models.get_optim_groups(model, weight_decay)``);
            default: every parameter with ``config.weight_decay``.
        val_dataset: if given, the EMA model's loss on a fixed batch of it (fixed noise) is recorded every
            ``config.eval_every`` steps and at the end (first process only).
        callback: called as ``callback(step, loss)`` after each step.
        resume: a :meth:`TrainState.state_dict` to continue from (same model, data and config).
        on_checkpoint: called with the :class:`TrainState` every ``config.checkpoint_every`` steps, on the first
            process only (the others hold the same state).
        metrics: where the first process writes a row every ``config.log_every`` steps.

    Returns:
        The EMA model and the loss curves.
    """
    if not callable(getattr(sampler, "training_example", None)):
        raise TypeError(f"sampler: expected an object with training_example(actions, generator), got {type(sampler)}")
    chunk, config_of_model = getattr(sampler, "noise_chunk", None), getattr(model, "config", None)
    if chunk is not None and not getattr(config_of_model, "token_levels", True):
        raise ValueError(
            f"sampler: its chunk-wise noise schedule (noise_chunk={chunk}) gives every action token its own level; "
            "the model needs token_levels=True"
        )
    rank, world = _world()
    if config.batch_size % world:
        raise ValueError(f"batch_size: expected a multiple of the {world} processes, got {config.batch_size}")
    device = _device(config)
    model.to(device)
    dataset.to(device)
    if param_groups is None:
        param_groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}
        ]
    state = TrainState(
        0,
        model,
        torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas),
        EMA(model, config.ema_decay),
        torch.Generator().manual_seed(config.seed),
        [],
        [],
    )
    if resume is not None:
        state.load_state_dict(resume)
    loss_module: nn.Module = _SquaredError(model)
    if world > 1:
        loss_module = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    val_batch = None
    if val_dataset is not None and rank == 0:
        val_dataset.to(device)
        val_batch = val_dataset.sample(min(len(val_dataset), 1024), torch.Generator().manual_seed(config.seed + 1))
    model.train()
    start_time, start_step = time.perf_counter(), state.step
    bar = tqdm(
        range(state.step, config.steps),
        desc="train",
        disable=not config.progress or rank != 0,
        dynamic_ncols=True,
        initial=state.step,
        total=config.steps,
    )
    for step in bar:
        lr = config.lr_at(step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        examples = _examples(sampler, dataset.sample(config.batch_size, state.generator), state.generator)
        count = examples.target.numel()
        with _autocast(device, config):
            # DDP averages gradients over processes: scale by `world` so they are those of the global mean
            loss = loss_module(_shard(examples, rank, world)) / count * world
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.optimizer.step()
        state.ema.update(model)
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)
            value = value / world
        loss_value = value.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged: loss {loss_value} at step {step}; lower config.lr")
        state.losses.append(loss_value)
        state.step = step + 1
        if callback is not None:
            callback(step, loss_value)
        if rank == 0:
            _after_step(state, config, sampler, val_batch, metrics, on_checkpoint, lr, start_time, start_step)
            if step % 50 == 0 or state.step == config.steps:
                postfix = {"loss": f"{sum(state.losses[-50:]) / len(state.losses[-50:]):.4f}"}
                if state.val_losses:
                    postfix["val"] = f"{state.val_losses[-1][1]:.4f}"
                bar.set_postfix(postfix)
    model.eval()
    return TrainResult(state.ema.shadow, state.losses, state.val_losses)


def _after_step(
    state: TrainState,
    config: TrainConfig,
    sampler: TrainingSampler,
    val_batch: ChunkBatch | None,
    metrics: MetricsLog | None,
    on_checkpoint: Callable[[TrainState], None] | None,
    lr: float,
    start_time: float,
    start_step: int,
) -> None:
    """Validation, metrics and checkpoints after optimizer step ``state.step`` (first process only)."""
    done, last = state.step, state.step == config.steps
    val = None
    if val_batch is not None and (last or (config.eval_every and done % config.eval_every == 0)):
        val = _validation_loss(state.ema.shadow, sampler, val_batch, config.seed)
        state.val_losses.append((done, val))
    if metrics is not None and (last or done % config.log_every == 0 or val is not None):
        elapsed = time.perf_counter() - start_time
        recent = state.losses[-config.log_every :]
        rate = (done - start_step) * config.batch_size / elapsed if elapsed > 0 else None
        metrics.log(done, loss=sum(recent) / len(recent), lr=lr, val_loss=val, examples_per_s=rate, elapsed_s=elapsed)
    if on_checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
        on_checkpoint(state)
