"""ChunkDataset: every step of every episode is an example, windows and chunks clamped at the episode's ends."""

import numpy as np
import pytest
import torch

from streamtx.train.chunks import ChunkDataset


def _episodes(num=3, steps=7):
    # value = 100 * episode + step, so every gathered entry says where it came from
    code = 100 * np.arange(num)[:, None] + np.arange(steps)[None]
    obs = np.stack([code, -code], -1).astype(np.float64)
    act = code[..., None].astype(np.float64) + 0.5
    return obs, act


def test_windows_are_truncated_at_the_start_and_chunks_clamped_at_the_end():
    obs, act = _episodes()
    ds = ChunkDataset(obs, act, obs_horizon=3, action_horizon=4, dtype=torch.float64)
    assert len(ds) == 21 and ds.obs_dim == 2 and ds.act_dim == 1
    index = torch.tensor([7 + 3, 0, 2 * 7 + 6, 1])  # episode 1 step 3, e0 s0, e2 s6, e0 s1
    groups = ds.get(index)
    assert [tuple(z.shape) for z, _ in groups] == [(1, 1, 2), (1, 2, 2), (2, 3, 2)]  # by window length
    (z1, x1), (z2, x2), (z3, x3) = groups
    np.testing.assert_array_equal(z1[..., 0], [[0]])
    np.testing.assert_array_equal(z2[..., 0], [[0, 1]])
    np.testing.assert_array_equal(z3[..., 0], [[101, 102, 103], [204, 205, 206]])
    np.testing.assert_array_equal(z3[..., 1], -z3[..., 0])
    np.testing.assert_array_equal(x1[..., 0] - 0.5, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(x2[..., 0] - 0.5, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(x3[..., 0] - 0.5, [[103, 104, 105, 106], [206, 206, 206, 206]])


def test_sampling_is_seeded():
    obs, act = _episodes()
    ds = ChunkDataset(obs, act, 2, 2)
    a = ds.sample(16, torch.Generator().manual_seed(3))
    b = ds.sample(16, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for ga, gb in zip(a, b) for u, v in zip(ga, gb))
    assert sum(len(z) for z, _ in a) == 16 and a[0][0].dtype == torch.float32


def test_bad_input_is_rejected():
    obs, act = _episodes()
    with pytest.raises(ValueError, match="same E and T"):
        ChunkDataset(obs, act[:, :-1], 2, 2)
    with pytest.raises(ValueError, match="obs_horizon"):
        ChunkDataset(obs, act, 0, 2)
    with pytest.raises(ValueError, match="action_horizon"):
        ChunkDataset(obs, act, 1, 2.5)
    obs[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ChunkDataset(obs, act, 1, 1)
