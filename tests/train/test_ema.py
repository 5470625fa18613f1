"""EMA: the documented update rule, exactly."""

import pytest
import torch
from torch import nn

from streamtx.train.ema import EMA


def test_update_rule_and_warmup():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    assert not ema.shadow.training and not any(p.requires_grad for p in ema.shadow.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n = 0: d = min(0.9, 1 / 10) = 0.1
    torch.testing.assert_close(ema.shadow.weight, 0.1 * start + 0.9 * (start + 1.0), rtol=0, atol=1e-6)
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.shadow.weight, model.weight, rtol=0, atol=1e-6)  # converges to constant weights
    assert ema.num_updates == 201


def test_every_update_moves_the_shadow_by_one_minus_the_warmed_up_decay():
    """Bump the weight by 1 before each update: the shadow's gap to the weight shrinks by exactly d_n per update,
    with d_n = min(decay, (1 + n) / (10 + n)) (0.1, 2/11, 3/12, ... capped at 0.9)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9)
    shadow = 0.0
    for n in range(100):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * (n + 1)
        assert abs(float(ema.shadow.weight) - shadow) <= 1e-4 * (n + 1), n


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)
