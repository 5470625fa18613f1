"""Exponential moving average of a model's weights, the weights a diffusion / flow policy is evaluated and shipped
with."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``shadow <- d * shadow + (1 - d) * weights`` after each optimizer step, with
    ``d = min(decay, (1 + n) / (10 + n))`` at update ``n``: early updates follow the fast-moving weights, later ones
    average over about ``1 / (1 - decay)`` steps. Buffers are copied as they are.

    Args:
        model: the model being trained; the shadow is a frozen deep copy in ``eval()`` mode.
        decay: the largest decay, in ``[0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1.0 - d)
        for shadow_buffer, b in zip(self.shadow.buffers(), model.buffers()):
            shadow_buffer.copy_(b)

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, num_updates={self.num_updates})"
