"""Equivariant transformer layers with continual (streaming) inference."""

from .activation import ePointwise, get_activation
from .attention import AttentionState, causal_window_mask, eMultiheadAttention
from .equivariance import equivariance_error
from .linear import eLinear
from .norm import eLayerNorm, eRMSNorm
from .positional import (
    AbsolutePositional,
    PositionalAttention,
    RecyclingPositionalEncoding,
    RelativePositionBias,
    eRoPE,
    make_positional,
)
from .retroactive import RetroactiveState, accumulator_dtype, eRetroactiveEncoderLayer
from .state import RingCache, StreamState, band_mask
from .stream import Stream
from .streaming import StreamingModule
from .transformer import (
    DecoderLayerState,
    DecoderState,
    EncoderLayerState,
    EncoderState,
    eTransformerDecoder,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)

__all__ = [
    "eLinear",
    "eLayerNorm",
    "eRMSNorm",
    "ePointwise",
    "get_activation",
    "eMultiheadAttention",
    "causal_window_mask",
    "PositionalAttention",
    "AbsolutePositional",
    "RelativePositionBias",
    "eRoPE",
    "make_positional",
    "RecyclingPositionalEncoding",
    "eTransformerEncoderLayer",
    "eTransformerDecoderLayer",
    "eTransformerEncoder",
    "eTransformerDecoder",
    "RingCache",
    "StreamState",
    "band_mask",
    "Stream",
    "StreamingModule",
    "AttentionState",
    "EncoderLayerState",
    "DecoderLayerState",
    "EncoderState",
    "DecoderState",
    "equivariance_error",
    "eRetroactiveEncoderLayer",
    "RetroactiveState",
    "accumulator_dtype",
]
