"""Run the O(3) tests single-threaded: their tensors are tiny, so intra-op threads only add overhead, and on a shared
machine they oversubscribe the cores (a 10x slowdown); single-threaded reductions are also run-to-run deterministic."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
