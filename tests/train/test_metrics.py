"""The metrics file: one row per logged step, empty cells where nothing was measured, unknown names rejected;
TensorBoard only when installed (required on request)."""

import importlib.util

import pytest
from train_testing import metrics

from streamtx.train import MetricsLog

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_rows_and_resume(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(1, loss=2.0, lr=0.1)
        log.log(2, loss=1.5, lr=0.1, val_loss=1.7)
        with pytest.raises(ValueError, match=r"unknown metrics \['acc'\]"):
            log.log(3, acc=1.0)
    rows = metrics(tmp_path)
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [("1", "2.0", ""), ("2", "1.5", "1.7")]
    with MetricsLog(tmp_path, resume_step=1, tensorboard=False) as log:
        log.log(2, loss=1.25)
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [("1", "2.0"), ("2", "1.25")]


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_required_but_missing(tmp_path):
    assert not MetricsLog(tmp_path / "a").tensorboard  # optional: silently CSV only
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "b", tensorboard=True)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_events_written(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.log(1, loss=1.0)
    assert log.tensorboard and any((tmp_path / "tensorboard").iterdir())
