"""The streaming contract (streamtx.nn.streaming): one signature each for init_state / forward_step /
forward_steps across every streaming module, and forward_steps' one meaning (the stack of single-token steps)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from layer_testing import faithful_rep, rel_err

from streamtx.models import eCondTransformerRegressor
from streamtx.nn import (
    StreamingModule,
    eMultiheadAttention,
    eRetroactiveEncoderLayer,
    eTransformerDecoder,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.symmetry import Representation, cyclic

HIDDEN = Representation.regular(cyclic(2), 4)


def _enc_layer() -> eTransformerEncoderLayer:
    return eTransformerEncoderLayer(HIDDEN, 2, 16, batch_first=True, positional="rope")


def _dec_layer() -> eTransformerDecoderLayer:
    return eTransformerDecoderLayer(HIDDEN, 2, 16, batch_first=True, cross_positional="rope")


def _regressor() -> eCondTransformerRegressor:
    action = faithful_rep(cyclic(2))
    return eCondTransformerRegressor(
        action, action, action, 3, 4, num_layers=1, num_attention_heads=1, embedding_dim=8, num_cond_layers=1
    )


# name -> (module factory, init_state geometry, extra forward inputs for a stream of T tokens of batch B)
CASES: dict[str, tuple[Callable[[], Any], dict[str, Any], Callable[[int, int], dict[str, torch.Tensor]]]] = {
    "attention": (lambda: eMultiheadAttention(HIDDEN, 2, batch_first=True), {"window": 3}, lambda b, t: {}),
    "encoder_layer": (_enc_layer, {"window": 3}, lambda b, t: {}),
    "encoder": (lambda: eTransformerEncoder(_enc_layer(), 2), {"window": 3}, lambda b, t: {}),
    "decoder_layer": (
        _dec_layer,
        {"window": 3, "memory_window": 2},
        lambda b, t: {"memory": torch.randn(b, t, HIDDEN.size, dtype=torch.float64)},
    ),
    "decoder": (
        lambda: eTransformerDecoder(_dec_layer(), 2),
        {"window": 3, "memory_window": 2},
        lambda b, t: {"memory": torch.randn(b, t, HIDDEN.size, dtype=torch.float64)},
    ),
    "retroactive": (lambda: eRetroactiveEncoderLayer(_enc_layer(), 3), {}, lambda b, t: {}),
    "regressor": (
        _regressor,
        {},
        lambda b, t: {"actions": torch.randn(b, t, 3, 2, dtype=torch.float64), "opt_step": 5.0},
    ),
    "policy": (lambda: StreamingPolicy(_regressor(), FlowMatchingSampler(2)), {}, lambda b, t: {}),
}


def _keyword_only_after(fn: Callable[..., Any], positional: int) -> list[str]:
    """Names of parameters after the first ``positional`` ones that are not keyword-only (should be none)."""
    params = list(inspect.signature(fn).parameters.values())[positional:]
    return [p.name for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]


@pytest.mark.parametrize("name", list(CASES))
def test_every_streaming_module_has_the_contract_signatures(name):
    module = CASES[name][0]()
    assert isinstance(module, StreamingModule)
    init = inspect.signature(module.init_state).parameters
    assert next(iter(init.values())).kind is inspect.Parameter.POSITIONAL_ONLY
    assert _keyword_only_after(module.init_state, 1) == []
    assert {"dtype", "device"} <= set(init)
    for method in (module.forward_step, module.forward_steps):
        params = inspect.signature(method).parameters
        assert [p.kind for p in list(params.values())[:2]] == [inspect.Parameter.POSITIONAL_ONLY] * 2
        assert _keyword_only_after(method, 2) == []
        assert params["rows"].default is None


@pytest.mark.parametrize("name", list(CASES))
def test_forward_steps_is_the_stack_of_single_token_steps(name):
    """forward_steps(x)[0] == stack_t forward_step(x[:, t])[0] (float64), for every module of the contract."""
    factory, geometry, inputs = CASES[name]
    torch.manual_seed(0)
    module = factory().double().eval()
    b, t = 2, 7  # > 2 ring wraps of the window-3 rings
    size = module.obs_dim if name == "policy" else (2 if name == "regressor" else HIDDEN.size)
    x = torch.randn(b, t, size, dtype=torch.float64)
    extra = inputs(b, t)
    with torch.no_grad():
        batched, _ = module.forward_steps(x, module.init_state(b, **geometry), **extra)
        state = module.init_state(b, **geometry)
        steps = []
        for i in range(t):
            step_inputs = {k: (v[:, i] if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in extra.items()}
            if "memory" in step_inputs:
                step_inputs["memory"] = step_inputs["memory"][:, None]
            steps.append(module.forward_step(x[:, i], state, **step_inputs)[0])
    assert batched.shape[:2] == (b, t)
    assert rel_err(batched, torch.stack(steps, dim=1)) <= 1e-10


def test_forward_steps_refuses_a_single_token():
    module = _enc_layer()
    with pytest.raises(ValueError, match=r"x: expected a stream \(B, T, 8\)"):
        module.forward_steps(torch.randn(2, HIDDEN.size), module.init_state(2, window=3))


def test_policy_state_refuses_a_foreign_dtype():
    policy = StreamingPolicy(_regressor(), FlowMatchingSampler(2))
    with pytest.raises(ValueError, match="dtype: this policy's state lives in torch.float32"):
        policy.init_state(1, dtype=torch.float64)
