"""The small D4 regressor policies over the configuration factors of the plan tests (the plan matrix and the
portable session state read the same ones)."""

from __future__ import annotations

import torch
from layer_testing import faithful_rep

from streamtx.models import eCondTransformerRegressor
from streamtx.policy import DDIMSampler, FlowMatchingSampler, Sampler, StreamingPolicy
from streamtx.symmetry import Representation, dihedral

BACKENDS = ("none", "absolute", "relative", "rope")
SAMPLERS: dict[str, Sampler] = {
    "euler": FlowMatchingSampler(2),
    "heun": FlowMatchingSampler(1, "heun"),
    "ddim": DDIMSampler(50, 2, clip_sample=1.0),
}
HORIZON, WINDOW = 4, 3


def make_policy(case: tuple, dtype: torch.dtype = torch.float64, seed: int = 0) -> StreamingPolicy:
    """A small D4 policy of configuration ``case`` with every parameter randomized (relative biases and position
    tables start at zero, norms at one: untouched they would hide a missing term)."""
    norm_first, norm_module, encoder, self_pos, cross_pos, tokens, sampler = case
    g = dihedral(4)
    plane = faithful_rep(g)
    torch.manual_seed(seed)
    model = eCondTransformerRegressor(
        plane,
        plane + plane + Representation.trivial(g, 2),
        plane,
        in_horizon=3,
        cond_horizon=HORIZON,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=32,
        dim_feedforward=64,
        cond_window=WINDOW,
        num_cond_layers=0 if encoder == "mlp" else 2,
        norm_module=norm_module,
        causal_attn=bool(seed % 2),
        norm_first=norm_first,
        cond_positional="rope" if encoder == "mlp" else encoder,
        self_positional=self_pos,
        cross_positional=cross_pos,
        dtype=dtype,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return StreamingPolicy(model.eval(), SAMPLERS[sampler], max_tokens_per_step=tokens)
