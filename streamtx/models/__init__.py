"""Policy networks built from the equivariant layers."""

from .cond_regressor import (
    CondTransformerRegressor,
    RegressorConfig,
    RegressorPlan,
    RegressorState,
    eCondTransformerRegressor,
    get_optim_groups,
)
from .o3_denoiser import O3CondDenoiser, O3DenoiserConfig, O3DenoiserState

__all__ = [
    "eCondTransformerRegressor",
    "CondTransformerRegressor",
    "RegressorConfig",
    "RegressorPlan",
    "RegressorState",
    "get_optim_groups",
    "O3CondDenoiser",
    "O3DenoiserConfig",
    "O3DenoiserState",
]
