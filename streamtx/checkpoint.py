"""Checkpoints: model config + weights + representations + sampler in one file, loadable without the training code.

The file is a ``torch.save`` of plain containers (numbers, strings, lists, tensors), read back with
``torch.load(weights_only=True)``: no pickled code is ever executed. Groups are stored by their faithful generator
matrices (the numerical closure is deterministic, so element numbering is reproduced), representations by the matrices
of the group's generators. An ``O3CondDenoiser`` (``model_class`` ``"O3CondDenoiser"``) needs no group: its config
says it all (the symmetry is O(3), or the vertical-axis subgroup with ``gravity``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.cond_regressor import CondTransformerRegressor, RegressorConfig, eCondTransformerRegressor
from .models.o3_denoiser import O3CondDenoiser, O3DenoiserConfig
from .policy.samplers import FlowMatchingSampler, Sampler, make_sampler
from .policy.static import StaticStreamingPolicy
from .policy.streaming import StreamingPolicy
from .policy.streaming_denoise import StreamingDenoisePolicy
from .symmetry import Group, Representation, cyclic

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_policy",
    "load_static_policy",
    "load_fastest_policy",
    "make_random_checkpoint",
]

FORMAT, VERSION = "streamtx-checkpoint", 1

log = logging.getLogger(__name__)


def _rep_dict(rep: Representation) -> dict[str, Any]:
    gens = rep.group.generators
    return {
        "name": rep.name,
        "regular_copies": rep.regular_copies,
        "generators": [rep.matrices[g].tolist() for g in gens],
    }


def _rep_from(d: dict[str, Any], group: Group) -> Representation:
    if d["regular_copies"] is not None:
        return Representation.regular(group, d["regular_copies"])
    return Representation.from_generators(
        group, [np.asarray(m, dtype=np.float64) for m in d["generators"]], name=d["name"]
    )


Model = eCondTransformerRegressor | O3CondDenoiser
"""The denoisers a checkpoint holds."""


def save_checkpoint(path: str | Path, model: Model, sampler: Sampler, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config, weights, representations: none for an ``O3CondDenoiser``) and ``sampler`` to
    ``path``."""
    symmetry: dict[str, Any] = {}
    if isinstance(model, eCondTransformerRegressor):
        group = model.in_rep.group
        symmetry = {
            "group": {"name": group.name, "generators": [group.matrices[g].tolist() for g in group.generators]},
            "representations": {name: _rep_dict(getattr(model, name)) for name in ("in_rep", "cond_rep", "out_rep")},
        }
    elif not isinstance(model, O3CondDenoiser):
        raise TypeError(f"model: expected an eCondTransformerRegressor or an O3CondDenoiser, got {type(model)}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),
        **symmetry,
        "sampler": sampler.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dictionary (validated format), loaded safely."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt or foreign file: say so instead of a pickle traceback
        raise ValueError(f"path: {path} is not a readable streamtx checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not a streamtx checkpoint (format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"path: {path} has checkpoint version {payload.get('version')}, this build reads {VERSION}")
    return payload


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Model, Sampler, dict[str, Any]]:
    """``(model in eval mode, sampler, extra)`` from a checkpoint."""
    payload = load_checkpoint(path)
    model: Model
    if payload["model_class"] == "O3CondDenoiser":
        model = O3CondDenoiser.from_config(O3DenoiserConfig.from_dict(payload["config"]))
    else:
        model = _regressor(payload)
    model.load_state_dict(payload["state_dict"])
    model = model.to(device=device, dtype=dtype).eval()
    return model, make_sampler(payload["sampler"]), payload["extra"]


def _regressor(payload: dict[str, Any]) -> eCondTransformerRegressor:
    """The (untrained) regressor of a checkpoint's config, group and representations."""
    group = Group(
        [np.asarray(m, dtype=np.float64) for m in payload["group"]["generators"]], name=payload["group"]["name"]
    )
    reps = {name: _rep_from(d, group) for name, d in payload["representations"].items()}
    config = RegressorConfig.from_dict(payload["config"])
    if payload["model_class"] == "CondTransformerRegressor":
        model: eCondTransformerRegressor = CondTransformerRegressor.from_dims(
            reps["in_rep"].size, reps["cond_rep"].size, reps["out_rep"].size, config
        )
    else:
        model = eCondTransformerRegressor.from_config(reps["in_rep"], reps["cond_rep"], reps["out_rep"], config)
    return model


def load_policy(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, max_tokens_per_step: int = 1
) -> StreamingPolicy:
    """A :class:`StreamingPolicy` (eval mode) from a checkpoint: the streaming sampler
    (:class:`StreamingDenoisePolicy`, one denoiser call per control step) for a model trained for it (per-token
    levels and a chunk-wise schedule), else the sampler's K steps per control step (always for an
    ``O3CondDenoiser``)."""
    model, sampler, _ = load_model(path, device, dtype)
    if isinstance(model, eCondTransformerRegressor) and model.config.token_levels and sampler.noise_chunk is not None:
        return StreamingDenoisePolicy(model, sampler, max_tokens_per_step).eval()
    return StreamingPolicy(model, sampler, max_tokens_per_step).eval()


def make_random_checkpoint(path: str | Path, *, seed: int = 0, **model_overrides: Any) -> Path:
    """A small random-weight policy for tests and benchmarks: group C2 acting on a 4-d observation (swap of two
    coordinates, sign flip of two) and a 2-d action (sign flips); flow matching with 4 Euler steps.
    ``model_overrides`` replace eCondTransformerRegressor arguments (e.g. ``embedding_dim=32``)."""
    torch.manual_seed(seed)
    group = cyclic(2)
    obs_rep = Representation.from_signed_permutations(group, [[1, 0, 2, 3]], [[1, 1, -1, -1]], name="obs")
    act_rep = Representation.from_signed_permutations(group, [[0, 1]], [[-1, -1]], name="action")
    small = RegressorConfig(
        in_horizon=4, cond_horizon=8, num_layers=2, num_attention_heads=2, embedding_dim=16, num_cond_layers=1
    )
    config = RegressorConfig.from_dict({**small.to_dict(), **model_overrides})
    model = eCondTransformerRegressor.from_config(act_rep, obs_rep, act_rep, config)
    return save_checkpoint(path, model, FlowMatchingSampler(num_steps=4), extra={"random_seed": seed})


def load_static_policy(
    path: str | Path,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | None = None,
    *,
    cuda_graph: bool = True,
    max_tokens_per_step: int = 1,
    buckets: Sequence[int] | None = None,
    fused_kernels: bool = True,
) -> StaticStreamingPolicy:
    """A :class:`StaticStreamingPolicy` from a checkpoint: the weights load in float32 on ``device`` and the plan
    computes in ``dtype`` (``None``: float32)."""
    policy = load_policy(path, device=device, max_tokens_per_step=max_tokens_per_step)
    return StaticStreamingPolicy(
        policy, dtype=dtype, cuda_graph=cuda_graph, buckets=buckets, fused_kernels=fused_kernels
    )


def load_fastest_policy(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    max_tokens_per_step: int = 1,
    buckets: Sequence[int] | None = None,
    compile: bool = True,
) -> StaticStreamingPolicy | StreamingPolicy:
    """The fastest exact policy of a checkpoint for ``device``, for the daemon: the static plan, compiled by inductor
    on the CPU (``compile=False``: run eagerly) and captured as CUDA graphs on CUDA, in float32. A model that the plan
    cannot run falls back to the module path (:class:`StreamingPolicy`), and the reason is logged; both have the same
    methods (``init_state``, ``reset``, ``observe``, ``act``, ``step``, ``metadata``)."""
    policy = load_policy(path, device=device, max_tokens_per_step=max_tokens_per_step)
    if isinstance(policy.model, O3CondDenoiser):
        log.warning(
            "serving the module path: the static plan lowers eCondTransformerRegressor only, not %s",
            type(policy.model).__name__,
        )
        return policy
    try:
        cuda = torch.device(device).type == "cuda"
        fast = StaticStreamingPolicy(policy, cuda_graph=cuda, buckets=buckets, compile=compile)
    except (TypeError, ValueError, NotImplementedError) as exc:
        log.warning("serving the module path: the static plan cannot run this model (%s)", exc)
        return policy
    log.info("serving the static plan on %s (%s)", fast.device, fast.compile_reason)
    return fast
