"""streamtx: continual streaming inference of equivariant transformer policies for robots.

* :mod:`streamtx.symmetry`: finite groups and their orthogonal representations.
* :mod:`streamtx.nn`: equivariant layers (``eLinear``, norms, ``eMultiheadAttention``, encoder/decoder layers) with
  ``forward_step`` over ring KV caches.
* :mod:`streamtx.models`: ``eCondTransformerRegressor``, the denoiser of a diffusion / flow-matching policy.
* :mod:`streamtx.policy`: samplers and ``StreamingPolicy`` (observations in, action chunks out).
* :mod:`streamtx.checkpoint`: save / load policies.
"""

__version__ = "0.1.0"
