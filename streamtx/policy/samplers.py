"""Samplers that turn a denoiser ``V = f(X_k, k)`` into actions: DDIM for diffusion, Euler/Heun for flow matching.

A sampler owns both halves of its convention, so that training and inference can never disagree:
``training_example(actions)`` gives the noisy input, the step and the regression target, and ``sample(denoise, noise)``
integrates from noise to actions with ``num_steps`` denoiser calls (Heun: ``2 * num_steps - 1``).

Chunk-wise noise (``noise_chunk``, Streaming Diffusion Policy, arXiv 2406.04806; Responsive Noise-Relaying,
arXiv 2502.12724): trained so, the denoiser also learns per-action-token levels that increase along the horizon (a
model with ``token_levels``), and the per-token steps :meth:`Sampler.level_input` / :meth:`Sampler.level_step` move
a buffer of actions one level at a time (:mod:`streamtx.policy.streaming_denoise`). A noise level ``sigma`` runs from
0 (clean) to 1 (pure noise); the flow time is ``t = 1 - sigma``, the diffusion step ``ceil(sigma T) - 1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Sampler", "FlowMatchingSampler", "DDIMSampler", "make_sampler", "chunkwise_levels"]

Denoise = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x (B, Tx, A), k (B,)) -> (B, Tx, A)``"""


def chunkwise_levels(batch: int, horizon: int, chunk: int, generator: torch.Generator | None = None) -> Tensor:
    """Training noise levels ``sigma (batch, horizon)`` (float64, in ``(0, 1]``) of a chunk-wise schedule: the
    ``h = horizon / chunk`` chunks of ``chunk`` actions have levels ``min(1, u + c / h)`` (chunk ``c`` from the head)
    with ``u`` drawn per example from a mixture of thirds: ``u`` in ``(0, 1/h]`` (a streaming buffer between two
    control steps), ``u`` in ``(0, 1]`` (the ramp with its noisy tail clamped at 1 that a buffer's initialisation
    passes through), and one level ``u`` shared by the chunk (so the K-step sampler runs on the same model)."""
    if chunk < 1 or horizon % chunk:
        raise ValueError(f"noise_chunk: expected a divisor of the action horizon {horizon}, got {chunk}")
    h = horizon // chunk
    kind = torch.randint(3, (batch, 1), generator=generator)
    u = 1 - torch.rand(batch, 1, generator=generator, dtype=torch.float64)  # (0, 1]
    ramp = torch.arange(horizon, dtype=torch.float64) // chunk / h  # c / h per token
    return torch.where(kind == 0, u / h + ramp, torch.where(kind == 1, (u + ramp).clamp(max=1), u.expand(-1, horizon)))


class Sampler(ABC):
    num_steps: int
    noise_chunk: int | None = None
    """``None``: every training example has one level for the whole chunk; else chunk-wise levels over chunks of
    this many actions (:func:`chunkwise_levels`), for a model with ``token_levels``."""

    @abstractmethod
    def training_example(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``actions (B, Tx, A)`` -> ``(x_k, k (B,), target)``: train with ``mse(f(x_k, k, Z), target)``."""

    @abstractmethod
    def sample(self, denoise: Denoise, noise: Tensor) -> Tensor:
        """Integrate from ``noise (B, Tx, A)`` to actions."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments plus ``"type"``, for checkpoints (see :func:`make_sampler`)."""

    @property
    def num_evaluations(self) -> int:
        """Denoiser calls per ``sample``."""
        return self.num_steps

    @abstractmethod
    def level_input(self, levels: Tensor, num_levels: int) -> Tensor:
        """The denoiser's step values (float64) of integer levels ``levels / num_levels`` (``1..num_levels``), any
        shape: per action token for a streaming buffer."""

    @abstractmethod
    def level_step(self, x: Tensor, out: Tensor, start: Tensor, end: Tensor, num_levels: int) -> tuple[Tensor, Tensor]:
        """One deterministic step of each action token of ``x (B, Tx, A)`` from level ``start`` to ``end <= start``
        (integer ``(B, Tx)`` or ``(Tx,)`` over ``num_levels``), given the denoiser's output ``out`` at ``start``:
        ``(x at end, the clean estimate)``. A token with ``end == start`` keeps its value; at ``end == 0`` both
        are the estimate."""

    def _chunk_config(self) -> dict[str, Any]:
        return {} if self.noise_chunk is None else {"noise_chunk": self.noise_chunk}

    def _levels(self, actions: Tensor, generator: torch.Generator | None) -> Tensor:
        assert self.noise_chunk is not None  # only the chunk-wise branch of training_example asks
        b, tx = actions.shape[:2]
        return chunkwise_levels(b, tx, self.noise_chunk, generator).to(actions.device)


class FlowMatchingSampler(Sampler):
    """Rectified flow: ``x_t = (1 - t) noise + t actions``, velocity target ``actions - noise``, ``t`` from 0 (noise)
    to 1 (actions) in ``num_steps`` uniform steps; the denoiser sees ``k = t * time_scale``.

    ``method="euler"`` costs ``num_steps`` calls; ``"heun"`` (second order) ``2 num_steps - 1``. With
    ``noise_chunk``, training examples have per-token times ``t = 1 - sigma`` (:func:`chunkwise_levels`).
    """

    def __init__(
        self, num_steps: int = 10, method: str = "euler", time_scale: float = 1000.0, noise_chunk: int | None = None
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
        if method not in ("euler", "heun"):
            raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
        if noise_chunk is not None and noise_chunk < 1:
            raise ValueError(f"noise_chunk: expected None or >= 1, got {noise_chunk}")
        self.num_steps, self.method, self.time_scale = num_steps, method, time_scale
        self.noise_chunk = noise_chunk

    def training_example(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        b = actions.shape[0]
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype).to(actions.device)
        if self.noise_chunk is not None:
            sigma = self._levels(actions, generator)  # (B, Tx)
            s = sigma.to(actions.dtype)[..., None]
            return s * noise + (1 - s) * actions, (1 - sigma) * self.time_scale, actions - noise
        t = torch.rand(b, generator=generator, dtype=actions.dtype).to(actions.device)
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
        return x_t, t * self.time_scale, actions - noise

    def level_input(self, levels: Tensor, num_levels: int) -> Tensor:
        return (1 - levels.to(torch.float64) / num_levels) * self.time_scale

    def level_step(self, x: Tensor, out: Tensor, start: Tensor, end: Tensor, num_levels: int) -> tuple[Tensor, Tensor]:
        # Euler per token: x_t = sigma noise + (1 - sigma) actions moves along v = actions - noise
        s0 = (start.to(x.dtype) / num_levels)[..., None]
        s1 = (end.to(x.dtype) / num_levels)[..., None]
        moving = (end != start)[..., None]
        return torch.where(moving, x + (s0 - s1) * out, x), x + s0 * out

    def sample(self, denoise: Denoise, noise: Tensor) -> Tensor:
        x, b, dt = noise, noise.shape[0], 1.0 / self.num_steps
        for i in range(self.num_steps):
            t = torch.full((b,), i * dt, dtype=x.dtype, device=x.device)
            v = denoise(x, t * self.time_scale)
            if self.method == "heun" and i < self.num_steps - 1:
                v2 = denoise(x + dt * v, (t + dt) * self.time_scale)
                v = 0.5 * (v + v2)
            x = x + dt * v
        return x

    @property
    def num_evaluations(self) -> int:
        return self.num_steps if self.method == "euler" else 2 * self.num_steps - 1

    def config(self) -> dict[str, Any]:
        return {
            "type": "flow",
            "num_steps": self.num_steps,
            "method": self.method,
            "time_scale": self.time_scale,
            **self._chunk_config(),
        }

    def __repr__(self) -> str:
        return f"FlowMatchingSampler(num_steps={self.num_steps}, method={self.method!r})"


class DDIMSampler(Sampler):
    """Diffusion with an epsilon-predicting denoiser, squared-cosine noise schedule over ``num_train_steps``, and
    deterministic DDIM sampling (``eta = 0``) in ``num_steps`` evenly spaced steps. With ``noise_chunk``, training
    examples have per-token steps ``ceil(sigma T) - 1`` (:func:`chunkwise_levels`)."""

    def __init__(
        self,
        num_train_steps: int = 100,
        num_steps: int = 10,
        clip_sample: float | None = None,
        noise_chunk: int | None = None,
    ) -> None:
        if num_train_steps < 2:
            raise ValueError(f"num_train_steps: expected >= 2, got {num_train_steps}")
        if not 1 <= num_steps <= num_train_steps:
            raise ValueError(f"num_steps: expected 1..{num_train_steps} (num_train_steps), got {num_steps}")
        if noise_chunk is not None and noise_chunk < 1:
            raise ValueError(f"noise_chunk: expected None or >= 1, got {noise_chunk}")
        self.num_train_steps, self.num_steps, self.clip_sample = num_train_steps, num_steps, clip_sample
        self.noise_chunk = noise_chunk
        steps = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # float64, cast on use
        stride = num_train_steps // num_steps
        self.timesteps = [int(t) for t in range(num_train_steps - 1, -1, -stride)][:num_steps]
        self._alphas_on: dict[torch.device, Tensor] = {}

    def _abar(self, k: Tensor, like: Tensor) -> Tensor:
        # one copy per device: a host-to-device copy per call would synchronize the host inside every control step
        # (and cannot be captured in a CUDA graph)
        table = self._alphas_on.get(like.device)
        if table is None:
            table = self._alphas_on[like.device] = self.alphas_cumprod.to(like.device)
        return table[k].to(like.dtype)[:, None, None]

    def training_example(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        b = actions.shape[0]
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype).to(actions.device)
        if self.noise_chunk is not None:
            sigma = self._levels(actions, generator)  # (B, Tx)
            k = (sigma * self.num_train_steps).ceil().long().clamp(1, self.num_train_steps) - 1
            abar = self._abar(k.flatten(), actions).view(*k.shape, 1)
            return abar.sqrt() * actions + (1 - abar).sqrt() * noise, k.to(actions.dtype), noise
        k = torch.randint(0, self.num_train_steps, (b,), generator=generator).to(actions.device)
        abar = self._abar(k, actions)
        return abar.sqrt() * actions + (1 - abar).sqrt() * noise, k.to(actions.dtype), noise

    def _level_steps(self, levels: Tensor, num_levels: int) -> Tensor:
        # ceil(levels T / L) - 1 in integers: a float ceil could step over an exact integer
        return (levels * self.num_train_steps + num_levels - 1) // num_levels - 1

    def level_input(self, levels: Tensor, num_levels: int) -> Tensor:
        return self._level_steps(levels.long(), num_levels).to(torch.float64)

    def level_step(self, x: Tensor, out: Tensor, start: Tensor, end: Tensor, num_levels: int) -> tuple[Tensor, Tensor]:
        # DDIM (eta = 0) per token; level 0 is the clean action (abar = 1)
        start, end = start.expand(x.shape[:2]), end.expand(x.shape[:2])
        abar0 = self._abar(self._level_steps(start, num_levels).clamp(min=0).flatten(), x).view(*start.shape, 1)
        abar1 = self._abar(self._level_steps(end, num_levels).clamp(min=0).flatten(), x).view(*end.shape, 1)
        abar0 = torch.where((start == 0)[..., None], torch.ones_like(abar0), abar0)
        abar1 = torch.where((end == 0)[..., None], torch.ones_like(abar1), abar1)
        x0 = (x - (1 - abar0).sqrt() * out) / abar0.sqrt()
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        moving = (end != start)[..., None]
        return torch.where(moving, abar1.sqrt() * x0 + (1 - abar1).sqrt() * out, x), x0

    def sample(self, denoise: Denoise, noise: Tensor) -> Tensor:
        x, b = noise, noise.shape[0]
        for i, t in enumerate(self.timesteps):
            k = torch.full((b,), t, dtype=torch.long, device=x.device)
            eps = denoise(x, k.to(x.dtype))
            abar = self._abar(k, x)
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            if self.clip_sample is not None:
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            if i + 1 < len(self.timesteps):
                abar_prev = self._abar(torch.full_like(k, self.timesteps[i + 1]), x)
                x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
            else:
                x = x0
        return x

    def config(self) -> dict[str, Any]:
        return {
            "type": "ddim",
            "num_train_steps": self.num_train_steps,
            "num_steps": self.num_steps,
            "clip_sample": self.clip_sample,
            **self._chunk_config(),
        }

    def __repr__(self) -> str:
        return f"DDIMSampler(num_train_steps={self.num_train_steps}, num_steps={self.num_steps})"


def make_sampler(config: dict[str, Any]) -> Sampler:
    """Rebuild a sampler from :meth:`Sampler.config`."""
    kinds = {"flow": FlowMatchingSampler, "ddim": DDIMSampler}
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in kinds:
        raise ValueError(f"config['type']: expected one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind](**config)
