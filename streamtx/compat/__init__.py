"""Drop-in replacements for the APIs of the reference libraries, built on streamtx's layers.

* :mod:`streamtx.compat.continual`: continual-inference's transformer modules (``import continual as co``):
  replace ``co.`` by ``streamtx.compat.continual.`` and keep the code (``docs/migration.md``).
"""

from . import continual

__all__ = ["continual"]
