"""`streamtx collect --format lerobot` writes the same demonstrations as the .npz, as a LeRobot v3.0 directory that
`streamtx train --task reacher` reads like the .npz (one data path for both formats)."""

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("pyarrow")

from streamtx.apps.collect import main as collect_main  # noqa: E402
from streamtx.data import load_npz, read_lerobot  # noqa: E402


def test_lerobot_demonstrations_equal_the_npz(tmp_path):
    npz, directory = tmp_path / "demos.npz", tmp_path / "demos"
    for fmt, out in (("npz", npz), ("lerobot", directory)):
        assert collect_main(["--episodes", "2", "--format", fmt, "--out", str(out), "--quiet"]) == 0
    a, b = load_npz(npz), read_lerobot(directory)
    np.testing.assert_array_equal(a.observations, b.observations)
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(b.lengths, [50, 50])
    assert b.fps == 50.0 and b.observation_names[0] == "observation.state.cos_q1" and a.meta["task"] == "reacher"
