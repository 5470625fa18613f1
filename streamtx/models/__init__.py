"""Policy networks built from the equivariant layers."""

from .cond_regressor import (
    CondTransformerRegressor,
    RegressorConfig,
    RegressorPlan,
    RegressorState,
    eCondTransformerRegressor,
    get_optim_groups,
)

__all__ = [
    "eCondTransformerRegressor",
    "CondTransformerRegressor",
    "RegressorConfig",
    "RegressorPlan",
    "RegressorState",
    "get_optim_groups",
]
