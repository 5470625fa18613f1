"""Drop-in replacements for the APIs of the reference libraries, built on streamtx's layers.

* :mod:`streamtx.compat.continual`: continual-inference's transformer modules (``import continual as co``):
  replace ``co.`` by ``streamtx.compat.continual.`` and keep the code (``docs/migration.md``).
* :mod:`streamtx.compat.symm_learning`: symm_learning's equivariant transformer modules, on escnn or streamtx
  representations, loading its state dicts.
* :mod:`streamtx.compat.escnn_reps`: escnn groups, representations and field types as streamtx ones (escnn
  optional).
* :mod:`streamtx.compat.morphosymm`: MorphoSymm's robot symmetries (group label, signed permutations per space) as
  streamtx representations, from its configuration data (MorphoSymm not needed).
"""

from . import continual, escnn_reps, morphosymm, symm_learning

__all__ = ["continual", "escnn_reps", "morphosymm", "symm_learning"]
