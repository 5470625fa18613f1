"""Data parallel training through torchrun: 2 gloo processes on the loopback interface follow the same trajectory as
one process at the same global batch (float64, <= 1e-6 after 20 steps)."""

import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist
from train_testing import max_weight_difference, metrics, tiny_args, tiny_lerobot

from streamtx.apps.train import main as train_main

pytest.importorskip("pyarrow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_gloo_processes_equal_one_process(tmp_path):
    data = tiny_lerobot(tmp_path / "data")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert train_main(tiny_args(data, one)) == 0
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "streamtx",
        "train",
        *tiny_args(data, two),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout and done.stdout.count("wrote") == 1  # only the first process writes
    assert max_weight_difference(one, two) <= 1e-6
    losses_one = [float(r["loss"]) for r in metrics(tmp_path / "one.pt.logs")]
    losses_two = [float(r["loss"]) for r in metrics(tmp_path / "two.pt.logs")]
    assert len(losses_two) == 20 and max(abs(a - b) for a, b in zip(losses_one, losses_two)) <= 1e-6
