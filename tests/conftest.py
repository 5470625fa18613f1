"""Fixtures of the layer tests; shared helpers live in layer_testing.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtx.symmetry import Group, trivial_group

# The layers here are small: one thread is faster than two fighting over a shared 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def trivial() -> Group:
    return trivial_group()
