"""The bring-your-own-data chain on a tiny dataset: a LeRobot directory -> `streamtx train` (a TOML config that flags
override, a declared symmetry) -> the checkpoint loads as a streaming policy -> action chunks. Also the CUDA path
(skips without a GPU) and the plain model without any symmetry."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_testing import REACHER_SYMMETRY, metrics, tiny_lerobot

from streamtx.apps.train import main as train_main
from streamtx.checkpoint import load_model, load_policy
from streamtx.data import Episodes, SymmetrySpec, read_lerobot, write_lerobot

pytest.importorskip("pyarrow")

CONFIG = """\
# train.toml: every `streamtx train` option by name; flags on the command line win
symmetry = "{symmetry}"
steps = 50
batch-size = 8
dim = 8
layers = 1
cond-layers = 1
heads = 1
action-horizon = 4
sampling-steps = 2
warmup-steps = 2
eval-every = 2
val-fraction = 0.25
quiet = true
"""


def test_lerobot_directory_to_policy_actions(tmp_path, capsys):
    data = tiny_lerobot(tmp_path / "my_robot")
    info = json.loads((data / "meta" / "info.json").read_text())  # a camera stream the trainer does not read
    info["features"]["observation.images.wrist"] = {"dtype": "video", "shape": [64, 64, 3], "names": None}
    (data / "meta" / "info.json").write_text(json.dumps(info))
    config = tmp_path / "train.toml"
    config.write_text(CONFIG.format(symmetry=REACHER_SYMMETRY))
    out = tmp_path / "policy.pt"
    assert train_main([str(data), "--config", str(config), "--out", str(out), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert (
        "wrote" in printed
        and "not used (video/image features are not supported yet): observation.images.wrist" in printed
    )
    model, sampler, extra = load_model(out)
    assert extra["train"]["steps"] == 4 and extra["train"]["batch_size"] == 8  # flag over file over default
    assert extra["symmetry"]["declaration"] == SymmetrySpec.load(REACHER_SYMMETRY).to_dict()
    assert extra["dataset"]["format"] == "lerobot" and extra["dataset"]["episodes"] == 4
    assert extra["dataset"]["fps"] == 50.0 and np.isfinite(extra["val_loss"])
    assert model.in_rep.group.order == 2 and model.check_equivariance() < 1e-10
    assert [r["step"] for r in metrics(tmp_path / "policy.pt.logs")] == ["2", "4"]

    policy = load_policy(out)
    episodes = read_lerobot(data)
    obs, _ = episodes.episode(0)
    state = policy.init_state(1)
    policy.reset(state, seed=0)
    chunks = [policy.step(state, torch.from_numpy(o).float()[None]) for o in obs]
    assert all(c.shape == (1, 4, 2) and torch.isfinite(c).all() for c in chunks)


def test_plain_model_without_symmetry(tmp_path):
    data = tiny_lerobot(tmp_path / "my_robot")
    args = [str(data), "--out", str(tmp_path / "p.pt"), "--steps", "2", "--batch-size", "4", "--dim", "8"]
    with pytest.raises(SystemExit, match="names no task; declare the robot's symmetry"):
        train_main([*args, "--quiet"])
    assert train_main([*args, "--quiet", "--no-equivariance", "--heads", "1", "--action-horizon", "2"]) == 0
    model, _, extra = load_model(tmp_path / "p.pt")
    assert type(model).__name__ == "CondTransformerRegressor" and "symmetry" not in extra


def test_declared_sizes_must_match_the_dataset(tmp_path):
    data = tiny_lerobot(tmp_path / "my_robot")
    bad = tmp_path / "bad.toml"
    bad.write_text('generators = ["m"]\n[[observation]]\nsize = 9\n[[action]]\nsize = 2\n')
    with pytest.raises(SystemExit, match="declares observations of size 9 .* the dataset has 10 and 2"):
        train_main([str(data), "--out", str(tmp_path / "p.pt"), "--symmetry", str(bad), "--quiet"])
    with pytest.raises(SystemExit, match="one of --symmetry and --task"):
        train_main([str(data), "--out", str(tmp_path / "p.pt"), "--symmetry", str(bad), "--task", "reacher"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_with_bf16_autocast(tmp_path):
    data = tiny_lerobot(tmp_path / "my_robot")
    out = tmp_path / "policy.pt"
    args = [str(data), "--out", str(out), "--symmetry", str(REACHER_SYMMETRY), "--steps", "5", "--batch-size", "8"]
    assert train_main([*args, "--dim", "8", "--heads", "1", "--device", "cuda", "--autocast", "bf16", "--quiet"]) == 0
    model, _, _ = load_model(out)
    assert model.check_equivariance() < 1e-10  # the folded checkpoint is float32 on the CPU, still equivariant


def test_quadruped_example_config_trains_a_k4_policy(tmp_path, monkeypatch):
    """examples/quadruped/train.toml + symmetry.toml on a synthetic 36/12-d dataset, small flags over the file's
    sizes, bf16 autocast on the CPU (the file's GPU settings, device overridden)."""
    root = Path(__file__).parents[2]
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(30, 36)).astype(np.float32)
    data = write_lerobot(tmp_path / "quadruped", Episodes(obs, obs[:, :12] * 0.5, np.array([12, 18])), fps=50)
    out = tmp_path / "quadruped.pt"
    small = ["--device", "cpu", "--steps", "2", "--batch-size", "8", "--dim", "32", "--heads", "1", "--layers", "1"]
    small += ["--cond-layers", "1", "--action-horizon", "4", "--obs-horizon", "2", "--checkpoint-every", "0", "--quiet"]
    config = root / "examples" / "quadruped" / "train.toml"
    monkeypatch.chdir(root)  # the file names its symmetry relative to the repository root
    assert train_main([str(data), "--config", str(config), "--out", str(out), *small]) == 0
    model, _, extra = load_model(out)
    assert model.in_rep.group.order == 4 and model.cond_rep.size == 36 and model.check_equivariance() < 1e-10
    assert extra["train"]["autocast"] == "bf16" and extra["symmetry"]["declaration"]["name"] == "K4"
