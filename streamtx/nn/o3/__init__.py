"""O(3)-equivariant layers for tokens with 3-D positions and irreps features (a torch counterpart of e3x), streamable.

Features use e3x's layout ``(..., P, (L+1)**2, F)`` (see :mod:`.irreps`); positions are ``(..., 3)`` coordinates.
"""

from .attention import O3AttentionState, O3MemoryState, O3MultiheadAttention, change_layout, layout_index
from .block import O3EncoderState, O3TransformerBlock, O3TransformerEncoder
from .clebsch_gordan import clebsch_gordan
from .dense import Dense
from .irreps import IrrepsLayout, cartesian_order
from .mlp import GatedMLP, gated_silu
from .norm import O3LayerNorm
from .radial import RadialBasis, smooth_cutoff
from .spherical_harmonics import spherical_harmonics
from .tensor_product import TensorProduct

__all__ = [
    "IrrepsLayout",
    "cartesian_order",
    "spherical_harmonics",
    "clebsch_gordan",
    "RadialBasis",
    "smooth_cutoff",
    "Dense",
    "TensorProduct",
    "O3LayerNorm",
    "gated_silu",
    "GatedMLP",
    "O3MultiheadAttention",
    "O3AttentionState",
    "O3MemoryState",
    "layout_index",
    "change_layout",
    "O3TransformerBlock",
    "O3TransformerEncoder",
    "O3EncoderState",
]
