"""The whole pipeline on a tiny scale: collect -> train (the `streamtx train` entry point) -> serve (a real daemon
process) -> control (the client SDK drives the simulator), and the served episodes equal the same episodes run
in-process on the loaded checkpoint."""

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("streamtx_server")
pytest.importorskip("streamtx_client")

from tiny_train_args import tiny_model_args  # noqa: E402

from streamtx.apps.collect import main as collect_main  # noqa: E402
from streamtx.apps.served_eval import SessionController, evaluate_served  # noqa: E402
from streamtx.apps.served_policy import TorchBatchPolicy  # noqa: E402
from streamtx.apps.train import main as train_main  # noqa: E402
from streamtx.checkpoint import load_model, load_policy  # noqa: E402
from streamtx.tasks.reacher.evaluate import eval_seeds, run_episodes  # noqa: E402
from streamtx_client import LocalSession  # noqa: E402


def test_collect_train_serve_control(tmp_path, capsys):
    data, ckpt = tmp_path / "demos.npz", tmp_path / "policy.pt"
    assert collect_main(["--episodes", "6", "--out", str(data), "--quiet"]) == 0
    assert (
        train_main(
            [
                str(data),
                "--out",
                str(ckpt),
                "--steps",
                "3",
                "--batch-size",
                "16",
                *tiny_model_args(dim=16),
                "--eval-every",
                "2",
                "--quiet",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    model, sampler, extra = load_model(ckpt)
    assert extra["task"] == "reacher" and extra["dataset"]["episodes"] == 6 and np.isfinite(extra["val_loss"])
    assert type(model).__name__ == "eCondTransformerRegressor" and sampler.num_steps == 2

    served = evaluate_served(ckpt, eval_seeds(2), execute=2, progress=False)
    result = served.result
    assert result.actions.shape == (2, 50, 2) and result.fingertip.shape == (2, 51, 2)
    assert served.chunks.shape == (50, 4, 2) and np.isfinite(served.chunks).all()  # every other step of 2 x 50
    assert np.abs(result.actions).max() <= 1.0 and np.isfinite(result.final_distance).all()
    assert served.latencies.shape == (50,) and (served.latencies > 0).all()
    assert served.stats["requests"]["step"] == 100  # every observation reached the daemon
    assert served.stats["latency"]["model"]["count"] > 0 and served.hello["policy"]["horizon"] == 4

    # the same two episodes in-process, through the same controller on a local session: same chunks, same torques
    seeds = eval_seeds(2)
    with LocalSession(TorchBatchPolicy(load_policy(ckpt)), seed=seeds[0]) as local:
        controller = SessionController(local, execute=2)
        in_process = run_episodes(controller, seeds, progress=False)
    scale = np.abs(served.chunks).max()
    np.testing.assert_allclose(np.stack(controller.chunks), served.chunks, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(in_process.actions, result.actions, rtol=0, atol=1e-5)
