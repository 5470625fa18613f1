"""No code in streamtx reads another object's private attributes: ``obj._name`` only for ``obj`` = ``self``/``cls``.

A module's private attributes are its own business; what another module needs is public (a property, a method such
as ``lower()``). The walk covers every ``.py`` file under ``streamtx/``.

Exceptions, by attribute name, each one a third-party object's member that has no public equivalent (and that
streamtx itself never defines, which the test checks, so the allowance cannot hide a streamtx attribute):

* ``_version``: a torch tensor's in-place version counter (``WeightCache`` keys cached dense weights on it, as
  autograd does; torch has no public accessor);
* ``_parameters`` / ``_buffers``: ``torch.nn.Module``'s own dicts, read directly by ``WeightCache`` on every forward
  (``named_parameters()`` is a generator walk costing microseconds per call on the hot path);
* ``_get_obs``: gymnasium's MuJoCo environments, the only way to re-read the observation after ``set_state``;
* ``_scaled_dot_product_flash_attention_for_cpu``: torch's CPU flash-attention op, the only one that returns each
  row's log-sum-exp beside the output (``F.scaled_dot_product_attention`` drops it), which the retroactive layer's
  window update keeps as its exact row shift.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "streamtx"
THIRD_PARTY = {"_version", "_parameters", "_buffers", "_get_obs", "_scaled_dot_product_flash_attention_for_cpu"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_accesses(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every ``obj._name`` read or write whose ``obj`` is not ``self``/``cls``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append((node.lineno, ast.unparse(node)))
    return found


def defined_private_names(source: str) -> set[str]:
    """Private names that a file defines: methods, functions, classes, ``self._x = ...`` and class attributes."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if _private(n)}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT.parent)): p.read_text() for p in sorted(ROOT.rglob("*.py"))}


def test_no_access_to_other_objects_private_attributes():
    sources = _sources()
    assert len(sources) > 30  # the walk sees the package
    violations = [
        f"{path}:{line}: {expr}"
        for path, source in sources.items()
        for line, expr in private_accesses(source)
        if expr.rsplit(".", 1)[-1] not in THIRD_PARTY
    ]
    assert violations == []


def test_third_party_exceptions_are_not_streamtx_names():
    defined = set().union(*(defined_private_names(s) for s in _sources().values()))
    assert "_step_token" in defined  # the walk sees streamtx's own private names (the regressor's method)
    assert defined & THIRD_PARTY == set()


def test_defined_private_names_sees_every_kind_of_definition():
    source = (
        "class _Plan:\n"
        "    _cache = {}\n"
        "    def _lower(self):\n"
        "        self._version = 1\n"
        "        _local = other._read\n"
        "    def __init__(self, public):\n"
        "        self.public = public\n"
    )
    assert defined_private_names(source) == {"_Plan", "_cache", "_lower", "_version", "_local"}


def test_the_walk_flags_what_the_old_static_plan_did():
    """The hand-written plan read a norm's ``_affine()`` and the regressor's ``_step_token``; ``self`` is fine."""
    source = (
        "def read(module, model, ks, ref):\n"
        "    weight, bias = module._affine()\n"
        "    return model._step_token(ks, len(ks), ref), self._cache, cls._registry\n"
    )
    assert private_accesses(source) == [(2, "module._affine"), (3, "model._step_token")]
