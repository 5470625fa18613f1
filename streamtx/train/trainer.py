"""A reusable trainer for denoising policies on action chunks (flow matching or diffusion).

Works with any model ``V = model(X_k, k, Z)`` (``X_k (B, Tx, act_dim)`` noisy chunk, ``k (B,)`` step or time,
``Z (B, Tz, obs_dim)`` observation window) and any sampler with ``training_example(X, generator) -> (X_k, k, target)``:
the loss is ``mse(model(X_k, k, Z), target)`` (:func:`chunk_loss`), so the sampler alone decides what is learnt
(velocity, noise, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import ChunkDataset
from .ema import EMA

__all__ = ["TrainConfig", "TrainResult", "TrainingSampler", "chunk_loss", "train"]


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
        progress: show a progress bar.
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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")

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
    """``ema_model``: the averaged weights (what to evaluate and ship); ``losses``: training loss per step;
    ``val_losses``: ``(step, loss)`` of the EMA model on the validation set."""

    ema_model: nn.Module
    losses: list[float]
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def chunk_loss(
    model: nn.Module,
    sampler: TrainingSampler,
    batch: list[tuple[Tensor, Tensor]],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean squared error of ``model`` against ``sampler``'s targets over a batch grouped by window length (as
    :meth:`ChunkDataset.get` returns it): one forward per group, every example weighted alike."""
    total, count = None, 0
    for z, x in batch:
        x_k, k, target = sampler.training_example(x, generator=generator)
        err = F.mse_loss(model(x_k, k, z), target, reduction="sum")
        total = err if total is None else total + err
        count += target.numel()
    if total is None:
        raise ValueError("batch: expected at least one group of examples, got none")
    return total / count


@torch.no_grad()
def _validation_loss(
    model: nn.Module, sampler: TrainingSampler, batch: list[tuple[Tensor, Tensor]], seed: int
) -> float:
    # the same noise every time: losses are comparable across evaluations
    return chunk_loss(model, sampler, batch, torch.Generator().manual_seed(seed)).item()


def train(
    model: nn.Module,
    sampler: TrainingSampler,
    dataset: ChunkDataset,
    config: TrainConfig,
    param_groups: list[dict[str, Any]] | None = None,
    val_dataset: ChunkDataset | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place to predict ``sampler``'s targets from the chunks and windows of ``dataset``.

    Args:
        model: ``V = model(X_k, k, Z)``.
        sampler: provides ``training_example``.
        dataset: the training examples.
        config: optimization settings.
        param_groups: AdamW parameter groups (e.g. ``streamtx.models.get_optim_groups(model, weight_decay)``);
            default: every parameter with ``config.weight_decay``.
        val_dataset: if given, the EMA model's loss on a fixed batch of it (fixed noise) is recorded every
            ``config.eval_every`` steps and at the end.
        callback: called as ``callback(step, loss)`` after each step.

    Returns:
        The EMA model and the loss curves.
    """
    if not callable(getattr(sampler, "training_example", None)):
        raise TypeError(f"sampler: expected an object with training_example(actions, generator), got {type(sampler)}")
    if param_groups is None:
        param_groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}
        ]
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas)
    ema = EMA(model, config.ema_decay)
    gen = torch.Generator().manual_seed(config.seed)
    val_batch = (
        val_dataset.sample(min(len(val_dataset), 1024), torch.Generator().manual_seed(config.seed + 1))
        if val_dataset is not None
        else None
    )
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    model.train()
    bar = tqdm(range(config.steps), desc="train", disable=not config.progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        loss = chunk_loss(model, sampler, dataset.sample(config.batch_size, gen), gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(model)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: loss {value} at step {step}; lower config.lr")
        losses.append(value)
        if callback is not None:
            callback(step, value)
        last = step + 1 == config.steps
        if val_batch is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            val_losses.append((step + 1, _validation_loss(ema.shadow, sampler, val_batch, config.seed)))
        if step % 50 == 0 or last:
            postfix = {"loss": f"{sum(losses[-50:]) / len(losses[-50:]):.4f}"}
            if val_losses:
                postfix["val"] = f"{val_losses[-1][1]:.4f}"
            bar.set_postfix(postfix)
    model.eval()
    return TrainResult(ema.shadow, losses, val_losses)
