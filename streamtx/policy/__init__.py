"""Action policies: samplers and the streaming policy the daemon runs per robot."""

from .samplers import DDIMSampler, FlowMatchingSampler, Sampler, make_sampler
from .streaming import Denoiser, PolicyState, StreamingPolicy
from .streaming_denoise import StreamingDenoisePolicy

__all__ = [
    "Sampler",
    "FlowMatchingSampler",
    "DDIMSampler",
    "make_sampler",
    "StreamingPolicy",
    "Denoiser",
    "PolicyState",
    "StreamingDenoisePolicy",
]
