"""The daemon with ``--device cuda`` (static plan + CUDA graphs captured at start-up): its actions equal the float32
CPU policy run in-process, and a restart-free session survives many steps. Skips without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serving_helpers import assert_same_actions, make_script, reference_run, start_daemon

from streamtx_client import Client

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_daemon_equals_the_cpu_policy(checkpoint, policy, tmp_path) -> None:
    script = make_script(np.random.default_rng(7), steps=200, obs_dim=policy.obs_dim, max_tokens=4, observe_every=5)
    want = reference_run(policy, seed=11, script=script)
    daemon = start_daemon(checkpoint, tmp_path, "--device=cuda")
    try:
        with Client(daemon.endpoints[0], timeout=20.0) as client:
            assert client.hello()["policy"]["metadata"]["device"].startswith("cuda")
            with client.open(seed=11) as session:
                got = [session.step(obs) if act else session.observe(obs) for obs, act in script]
        # fp32 on the GPU vs the CPU: same function, different kernels and summation orders
        assert_same_actions([None if g is None else np.asarray(g) for g in got], want, atol=1e-4)
    finally:
        daemon.stop()
