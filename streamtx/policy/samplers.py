"""Samplers that turn a denoiser ``V = f(X_k, k)`` into actions: DDIM for diffusion, Euler/Heun for flow matching.

A sampler owns both halves of its convention, so that training and inference can never disagree:
``training_example(actions)`` gives the noisy input, the step and the regression target, and ``sample(denoise, noise)``
integrates from noise to actions with ``num_steps`` denoiser calls (Heun: ``2 * num_steps - 1``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Sampler", "FlowMatchingSampler", "DDIMSampler", "make_sampler"]

Denoise = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x (B, Tx, A), k (B,)) -> (B, Tx, A)``"""


class Sampler(ABC):
    num_steps: int

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


class FlowMatchingSampler(Sampler):
    """Rectified flow: ``x_t = (1 - t) noise + t actions``, velocity target ``actions - noise``, ``t`` from 0 (noise)
    to 1 (actions) in ``num_steps`` uniform steps; the denoiser sees ``k = t * time_scale``.

    ``method="euler"`` costs ``num_steps`` calls; ``"heun"`` (second order) ``2 num_steps - 1``.
    """

    def __init__(self, num_steps: int = 10, method: str = "euler", time_scale: float = 1000.0) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
        if method not in ("euler", "heun"):
            raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
        self.num_steps, self.method, self.time_scale = num_steps, method, time_scale

    def training_example(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        b = actions.shape[0]
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype).to(actions.device)
        t = torch.rand(b, generator=generator, dtype=actions.dtype).to(actions.device)
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
        return x_t, t * self.time_scale, actions - noise

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
        return {"type": "flow", "num_steps": self.num_steps, "method": self.method, "time_scale": self.time_scale}

    def __repr__(self) -> str:
        return f"FlowMatchingSampler(num_steps={self.num_steps}, method={self.method!r})"


class DDIMSampler(Sampler):
    """Diffusion with an epsilon-predicting denoiser, squared-cosine noise schedule over ``num_train_steps``, and
    deterministic DDIM sampling (``eta = 0``) in ``num_steps`` evenly spaced steps."""

    def __init__(self, num_train_steps: int = 100, num_steps: int = 10, clip_sample: float | None = None) -> None:
        if num_train_steps < 2:
            raise ValueError(f"num_train_steps: expected >= 2, got {num_train_steps}")
        if not 1 <= num_steps <= num_train_steps:
            raise ValueError(f"num_steps: expected 1..{num_train_steps} (num_train_steps), got {num_steps}")
        self.num_train_steps, self.num_steps, self.clip_sample = num_train_steps, num_steps, clip_sample
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
        k = torch.randint(0, self.num_train_steps, (b,), generator=generator).to(actions.device)
        abar = self._abar(k, actions)
        return abar.sqrt() * actions + (1 - abar).sqrt() * noise, k.to(actions.dtype), noise

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
