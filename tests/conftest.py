"""Fixtures of all tests; shared helpers live in the *_testing.py modules (layer_testing.py for the layer tests,
plan_testing.py for the plan tests' policies)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from streamtx.symmetry import Group, trivial_group


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every test runs single-threaded: the models here are small, and on a shared 2-core machine contending
    intra-op threads make ops ~10x slower. Restored afterwards (training code under test may set it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def trivial() -> Group:
    return trivial_group()
