"""Policy networks built from the equivariant layers."""

from .cond_regressor import CondTransformerRegressor, RegressorState, eCondTransformerRegressor, get_optim_groups

__all__ = ["eCondTransformerRegressor", "CondTransformerRegressor", "RegressorState", "get_optim_groups"]
