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
    z, x, lengths = ds.get(index)
    assert z.shape == (4, 3, 2) and x.shape == (4, 4, 1)  # windows left-padded to the longest, 3
    np.testing.assert_array_equal(lengths, [3, 1, 3, 2])
    real = [z[b, 3 - n :, 0].tolist() for b, n in enumerate(lengths.tolist())]
    assert real == [[101, 102, 103], [0], [204, 205, 206], [0, 1]]
    np.testing.assert_array_equal(z[..., 1], -z[..., 0])
    np.testing.assert_array_equal(
        x[..., 0] - 0.5, [[103, 104, 105, 106], [0, 1, 2, 3], [206, 206, 206, 206], [1, 2, 3, 4]]
    )
    assert ds.get(torch.tensor([1, 0])).Z.shape == (2, 2, 2)  # padded only to the batch's own longest window


def test_sampling_is_seeded():
    obs, act = _episodes()
    ds = ChunkDataset(obs, act, 2, 2)
    a = ds.sample(16, torch.Generator().manual_seed(3))
    b = ds.sample(16, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(a.Z) == 16 and a.Z.dtype == torch.float32


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


def test_episodes_of_different_lengths_never_mix():
    lengths = [2, 5, 1, 4]
    frames = np.concatenate([100 * e + np.arange(t) for e, t in enumerate(lengths)]).astype(np.float64)
    ds = ChunkDataset(frames[:, None], frames[:, None] + 0.5, 3, 3, torch.float64, np.array(lengths))
    assert len(ds) == 12 and ds.num_episodes == 4
    for i in range(len(ds)):
        z, x, _ = ds.get(torch.tensor([i]))
        episode = int(frames[i]) // 100
        assert (z // 100 == episode).all() and (x // 100 == episode).all()  # nothing from a neighbour
        assert z[0, -1, 0] == frames[i] and x[0, 0, 0] == frames[i] + 0.5
    z, x, _ = ds.get(torch.tensor([7]))  # episode 2 has one frame: window 1, chunk holds its only action
    np.testing.assert_array_equal(x[0, :, 0], [200.5] * 3)
    # equal lengths as (E, T, d) and as frames with lengths give the same examples
    padded = ChunkDataset(frames[:8].reshape(2, 4, 1), frames[:8].reshape(2, 4, 1), 2, 2, torch.float64)
    flat = ChunkDataset(frames[:8, None], frames[:8, None], 2, 2, torch.float64, np.array([4, 4]))
    index = torch.arange(8)
    assert all(torch.equal(u, v) for u, v in zip(padded.get(index), flat.get(index)))
    with pytest.raises(ValueError, match="lengths: expected episode lengths >= 1 summing to 12"):
        ChunkDataset(frames[:, None], frames[:, None], 2, 2, lengths=np.array([2, 5, 1]))
