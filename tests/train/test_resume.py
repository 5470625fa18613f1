"""Resuming: a run continued from a mid-run checkpoint equals the uninterrupted run (weights, EMA, schedule, batches
and noise), through the trainer and through `streamtx train --resume`; the metrics file reads like one run."""

import pytest
import torch
from train_testing import max_weight_difference, metrics, tiny_args, tiny_lerobot

from streamtx.apps.train import main as train_main
from streamtx.models import CondTransformerRegressor, get_optim_groups
from streamtx.policy import FlowMatchingSampler
from streamtx.train import ChunkDataset, TrainConfig, TrainState, train

pytest.importorskip("pyarrow")


def _setup():
    torch.manual_seed(0)
    model = CondTransformerRegressor(
        2, 3, 2, in_horizon=2, cond_horizon=2, num_layers=1, num_attention_heads=1, embedding_dim=8, num_cond_layers=0
    ).double()
    gen = torch.Generator().manual_seed(1)
    obs, act = torch.randn(4, 9, 3, generator=gen), torch.randn(4, 9, 2, generator=gen)
    return model, ChunkDataset(obs, act, 2, 2, dtype=torch.float64)


def test_trainer_resumes_exactly():
    config = TrainConfig(
        steps=12, batch_size=8, lr=3e-3, warmup_steps=3, ema_decay=0.9, checkpoint_every=5, progress=False
    )
    model, data = _setup()
    saved: dict[int, dict] = {}

    def keep(state: TrainState) -> None:
        saved[state.step] = state.state_dict()

    full = train(model, FlowMatchingSampler(4), data, config, get_optim_groups(model), on_checkpoint=keep)
    assert sorted(saved) == [5, 10]
    model, data = _setup()
    torch.manual_seed(123)  # global RNG elsewhere must not matter
    resumed = train(model, FlowMatchingSampler(4), data, config, get_optim_groups(model), resume=saved[5])
    assert resumed.losses == full.losses  # losses 0..4 restored, 5..11 recomputed identically
    for p, q in zip(resumed.ema_model.parameters(), full.ema_model.parameters()):
        assert torch.equal(p, q)


def test_cli_resume_from_a_periodic_checkpoint_equals_the_uninterrupted_run(tmp_path, capsys):
    data = tiny_lerobot(tmp_path / "data")
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    assert train_main([*tiny_args(data, full), "--checkpoint-every", "10"]) == 0
    midway = tmp_path / "full.step-10.pt"
    assert midway.exists() and (tmp_path / "full.step-20.pt").exists()
    assert "resumable" in capsys.readouterr().out
    log_dir = tmp_path / "resumed-logs"
    # an interrupted run's rows after its last checkpoint are dropped on resume
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("step,loss,lr,val_loss,examples_per_s,elapsed_s\n1,9,9,,,\n11,9,9,,,\n")
    assert train_main([*tiny_args(data, resumed), "--resume", str(midway), "--log-dir", str(log_dir)]) == 0
    assert max_weight_difference(full, resumed) <= 1e-12
    rows, reference = metrics(log_dir), metrics(tmp_path / "full.pt.logs")
    assert [r["step"] for r in rows] == ["1"] + [str(s) for s in range(11, 21)]
    assert [r["loss"] for r in rows[1:]] == [r["loss"] for r in reference[10:]]
    assert rows[-1]["val_loss"] == reference[-1]["val_loss"] != ""


def test_resume_checks_the_model(tmp_path):
    data = tiny_lerobot(tmp_path / "data")
    assert train_main([*tiny_args(data, tmp_path / "a.pt", steps=2), "--checkpoint-every", "2"]) == 0
    with pytest.raises(SystemExit, match="with .* this run builds"):
        train_main(
            [*tiny_args(data, tmp_path / "b.pt", steps=2), "--dim", "16", "--resume", str(tmp_path / "a.step-2.pt")]
        )
    with pytest.raises(SystemExit, match="holds no training state"):
        train_main([*tiny_args(data, tmp_path / "b.pt", steps=2), "--resume", str(tmp_path / "a.pt")])
