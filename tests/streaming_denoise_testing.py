"""Helpers of the streaming-denoising tests: a small float64 per-token-level denoiser and the explicit reference of
the streaming buffer, written from the definition (the same noise and sequence of denoiser calls on the batch
model), independent of the policy's code."""

from __future__ import annotations

import torch
from torch import Tensor

from streamtx.models import eCondTransformerRegressor
from streamtx.policy import DDIMSampler, FlowMatchingSampler, Sampler
from streamtx.policy.streaming import step_noise
from streamtx.symmetry import Representation, cyclic

TOL = 1e-10  # float64, relative to the output scale


def tiny_model(horizon: int = 4, seed: int = 0, **kw) -> eCondTransformerRegressor:
    torch.manual_seed(seed)
    group = cyclic(2)
    obs = Representation.from_signed_permutations(group, [[1, 0, 2, 3]], [[1, 1, -1, -1]], name="obs")
    act = Representation.from_signed_permutations(group, [[0, 1]], [[-1, -1]], name="action")
    cfg = dict(
        in_horizon=horizon,
        cond_horizon=3,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=16,
        num_cond_layers=1,
        cond_window=3,
        token_levels=True,
    )
    cfg.update(kw)
    return eCondTransformerRegressor(act, obs, act, **cfg).double().eval()


class ReferenceRow:
    """One stream's buffer from the definition: at each act, the batch model on the window of the receptive
    field's newest observations, evaluated once per level offset, each action stepped by the sampler's own
    formula (flow: Euler along v; DDIM: eta = 0 with level 0 clean)."""

    def __init__(self, model: eCondTransformerRegressor, sampler: Sampler, execute: int, substeps: int, seed: int):
        self.model, self.sampler, self.e, self.n, self.seed = model, sampler, execute, substeps, seed
        self.tx, self.a = model.in_horizon, model.out_rep.size
        self.L = self.tx // execute * substeps
        self.reset(seed)

    def reset(self, seed: int, steps: int = 0) -> None:
        self.seed, self.step, self.history, self.buffer = seed, steps, [], None

    def observe(self, token: Tensor) -> None:
        self.history.append(token)

    def _k(self, level: int) -> float:
        if isinstance(self.sampler, FlowMatchingSampler):
            return (1 - level / self.L) * self.sampler.time_scale
        assert isinstance(self.sampler, DDIMSampler)
        return float(-(-level * self.sampler.num_train_steps // self.L) - 1)

    def _abar(self, level: int) -> float:
        assert isinstance(self.sampler, DDIMSampler)
        return 1.0 if level == 0 else float(self.sampler.alphas_cumprod[int(self._k(level))])

    @torch.no_grad()
    def act(self) -> tuple[Tensor, Tensor]:
        """``(chunk (Tx, A), carried buffer (Tx - e, A))`` of this act."""
        window = torch.stack(self.history[-self.model.receptive_field() :])[None]
        noise = step_noise(self.seed, self.step, (self.tx, self.a)).double()
        initialise = self.buffer is None
        x = noise.clone() if initialise else torch.cat((self.buffer, noise[self.tx - self.e :]))
        estimate = x
        for o in range(self.L if initialise else self.n, 0, -1):
            start = [min(self.L, o + j // self.e * self.n) for j in range(self.tx)]
            end = [min(self.L, o - 1 + j // self.e * self.n) for j in range(self.tx)]
            k = torch.tensor([[self._k(s) for s in start]], dtype=torch.float64)
            out = self.model(x[None], k, window)[0]
            new, estimate = x.clone(), x.clone()
            for j in range(self.tx):
                if isinstance(self.sampler, FlowMatchingSampler):
                    estimate[j] = x[j] + start[j] / self.L * out[j]
                    if end[j] != start[j]:
                        new[j] = x[j] + (start[j] - end[j]) / self.L * out[j]
                else:
                    a0, a1 = self._abar(start[j]), self._abar(end[j])
                    estimate[j] = (x[j] - (1 - a0) ** 0.5 * out[j]) / a0**0.5
                    if end[j] != start[j]:
                        new[j] = a1**0.5 * estimate[j] + (1 - a1) ** 0.5 * out[j]
            x = new
        self.buffer = x[self.e :]
        self.step += 1
        return estimate, self.buffer


def close(a: Tensor, b: Tensor, tol: float = TOL) -> bool:
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)
