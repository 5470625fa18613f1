"""Samplers against closed forms: DDIM with a known epsilon, Euler and Heun on the linear flow ``v = a x``."""

import pytest
import torch

from streamtx.policy import DDIMSampler, FlowMatchingSampler


def _noise(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("num_train_steps,num_steps", [(100, 10), (50, 5), (20, 1)])
def test_ddim_zero_eps_rescales_noise_by_first_abar(num_train_steps, num_steps):
    """eps = 0: every step rescales x by sqrt(abar_next / abar_cur), the product telescopes to 1 / sqrt(abar[t0])."""
    sampler = DDIMSampler(num_train_steps, num_steps)
    noise = _noise()
    out = sampler.sample(lambda x, k: torch.zeros_like(x), noise)
    expected = noise / sampler.alphas_cumprod[sampler.timesteps[0]].sqrt()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_train_steps,num_steps", [(100, 10), (50, 5)])
def test_ddim_exact_eps_of_a_target_returns_the_target(num_train_steps, num_steps):
    sampler = DDIMSampler(num_train_steps, num_steps)
    target = _noise(1)
    abar = sampler.alphas_cumprod

    def denoise(x, k):
        a = abar[k.long()][:, None, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = sampler.sample(denoise, _noise())
    torch.testing.assert_close(out, target, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_euler_on_linear_flow(n):
    a = 0.7
    noise = _noise()
    out = FlowMatchingSampler(n, "euler").sample(lambda x, k: a * x, noise)
    torch.testing.assert_close(out, noise * (1 + a / n) ** n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_heun_on_linear_flow(n):
    """Heun steps multiply x by 1 + h + h^2 / 2 (h = a dt); the last step is plain Euler (1 + h)."""
    a = 0.7
    h = a / n
    noise = _noise()
    out = FlowMatchingSampler(n, "heun").sample(lambda x, k: a * x, noise)
    torch.testing.assert_close(out, noise * (1 + h + h * h / 2) ** (n - 1) * (1 + h), rtol=1e-12, atol=1e-12)


def test_flow_denoiser_sees_scaled_time():
    seen = []
    sampler = FlowMatchingSampler(4, "euler", time_scale=1000.0)
    sampler.sample(lambda x, k: seen.append(k.clone()) or torch.zeros_like(x), _noise())
    assert [float(k[0]) for k in seen] == [0.0, 250.0, 500.0, 750.0]
