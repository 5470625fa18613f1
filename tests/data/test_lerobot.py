"""LeRobot datasets: a v3.0 and a v2.1 directory built here from the documented layout with pyarrow alone (not by our
writer) read back exactly, our v3.0 writer round-trips, bad directories are rejected with messages."""

import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from streamtx.data import Episodes, read_lerobot, write_lerobot  # noqa: E402

LENGTHS = [5, 3, 7]  # episodes of different lengths, split over two data files in v3.0


def _frames(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    return {
        "state": rng.normal(size=(n, 4)).astype(np.float32),
        "velocity": rng.normal(size=(n, 2)).astype(np.float32),
        "action": rng.normal(size=(n, 3)).astype(np.float32),
        "episode": np.repeat(np.arange(len(lengths)), lengths),
        "frame": np.concatenate([np.arange(t) for t in lengths]),
    }


def _features():
    return {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["a", "b", "c", "d"]},
        "observation.velocity": {"dtype": "float32", "shape": [2], "names": None},
        "action": {"dtype": "float32", "shape": [3], "names": {"motors": ["m0", "m1", "m2"]}},
        "observation.images.front": {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channels"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def _table(f, rows):
    def vec(x):  # variable-size lists, as the datasets library writes Sequence features
        return pa.array([list(map(float, r)) for r in x], type=pa.list_(pa.float32()))

    return pa.table(
        {
            "observation.state": vec(f["state"][rows]),
            "observation.velocity": vec(f["velocity"][rows]),
            "action": vec(f["action"][rows]),
            "timestamp": pa.array(f["frame"][rows] / 10.0, type=pa.float32()),
            "frame_index": pa.array(f["frame"][rows]),
            "episode_index": pa.array(f["episode"][rows]),
            "index": pa.array(np.asarray(rows)),
            "task_index": pa.array(np.zeros(len(rows), dtype=np.int64)),
        }
    )


def _info(version, **paths):
    return {
        "codebase_version": version,
        "robot_type": "test_arm",
        "total_episodes": len(LENGTHS),
        "total_frames": sum(LENGTHS),
        "fps": 10,
        "features": _features(),
        **paths,
    }


def _write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _v30(root, f):
    """Episodes 0-1 in data file-000 (rows shuffled), episode 2 in chunk-001/file-000."""
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    first = np.random.default_rng(1).permutation(LENGTHS[0] + LENGTHS[1])
    second = np.arange(LENGTHS[0] + LENGTHS[1], sum(LENGTHS))
    for chunk, rows in (("chunk-000", first), ("chunk-001", second)):
        (root / "data" / chunk).mkdir(parents=True)
        pq.write_table(_table(f, rows), root / "data" / chunk / "file-000.parquet")
    episodes = pa.table(
        {
            "episode_index": [0, 1, 2],
            "tasks": [["reach"]] * 3,
            "length": LENGTHS,
            "data/chunk_index": [0, 0, 1],
            "data/file_index": [0, 0, 0],
            "dataset_from_index": starts.tolist(),
            "dataset_to_index": (starts + LENGTHS).tolist(),
        }
    )
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(episodes, root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    template = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    _write_json(root / "meta" / "info.json", _info("v3.0", data_path=template))
    _write_json(root / "meta" / "stats.json", {})


def _v21(root, f):
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    (root / "data" / "chunk-000").mkdir(parents=True)
    for e, (s, t) in enumerate(zip(starts, LENGTHS)):
        pq.write_table(_table(f, np.arange(s, s + t)), root / "data" / "chunk-000" / f"episode_{e:06d}.parquet")
    template = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    _write_json(root / "meta" / "info.json", _info("v2.1", data_path=template, chunks_size=1000))
    lines = [json.dumps({"episode_index": e, "tasks": ["reach"], "length": t}) for e, t in enumerate(LENGTHS)]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("layout", [_v30, _v21])
def test_reads_a_directory_written_from_the_documented_layout(tmp_path, layout):
    f = _frames()
    layout(tmp_path, f)
    eps = read_lerobot(tmp_path, ["observation.state", "observation.velocity"], ["action"])
    np.testing.assert_array_equal(eps.lengths, LENGTHS)
    np.testing.assert_array_equal(eps.observations, np.concatenate([f["state"], f["velocity"]], 1))
    np.testing.assert_array_equal(eps.actions, f["action"])
    assert eps.fps == 10.0 and eps.meta["robot_type"] == "test_arm"
    assert eps.meta["skipped_features"] == ["observation.images.front"]  # camera streams are not read
    assert eps.observation_names[:2] == ["observation.state.a", "observation.state.b"]
    assert eps.observation_names[4:] == ["observation.velocity[0]", "observation.velocity[1]"]
    assert eps.action_names == ["action.m0", "action.m1", "action.m2"]
    obs, act = eps.episode(2)  # the episode of the second file, in frame order
    np.testing.assert_array_equal(act, f["action"][8:])


def test_writer_round_trips_and_writes_the_v30_layout(tmp_path):
    f = _frames()
    eps = Episodes(f["state"], f["action"], np.array(LENGTHS), observation_names=list("abcd"))
    root = write_lerobot(tmp_path / "ds", eps, fps=50, task="reach", robot_type="arm")
    back = read_lerobot(root)
    np.testing.assert_array_equal(back.observations, f["state"])
    np.testing.assert_array_equal(back.actions, f["action"])
    np.testing.assert_array_equal(back.lengths, LENGTHS)
    assert back.observation_names == [
        "observation.state.a",
        "observation.state.b",
        "observation.state.c",
        "observation.state.d",
    ]
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 50 and info["total_frames"] == sum(LENGTHS)
    episodes = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pydict()
    assert episodes["dataset_from_index"] == [0, 5, 8] and episodes["dataset_to_index"] == [5, 8, 15]
    assert episodes["tasks"] == [["reach"]] * 3
    frames = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").to_pydict()
    assert frames["timestamp"][5:7] == pytest.approx([0.0, 0.02]) and frames["index"] == list(range(15))
    stats = json.loads((root / "meta" / "stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["mean"], f["action"].mean(0), rtol=1e-6)
    assert pq.read_table(root / "meta" / "tasks.parquet").to_pydict() == {"task_index": [0], "task": ["reach"]}
    with pytest.raises(FileExistsError, match="not empty"):
        write_lerobot(root, eps, fps=50)


def test_bad_directories_and_features_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta/info.json"):
        read_lerobot(tmp_path)
    f = _frames()
    _v30(tmp_path, f)
    with pytest.raises(ValueError, match="no feature 'observation.joints'.*numeric features are"):
        read_lerobot(tmp_path, ["observation.joints"])
    with pytest.raises(ValueError, match="video feature; camera streams are not supported"):
        read_lerobot(tmp_path, ["observation.images.front"])
    with pytest.raises(ValueError, match="action_features: expected at least one"):
        read_lerobot(tmp_path, action_features=[])
    meta = tmp_path / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(meta)
    pq.write_table(table.set_column(2, "length", pa.array([5, 4, 7])), meta)
    with pytest.raises(ValueError, match="episode 1 .* has 3 frames, its metadata says 4"):
        read_lerobot(tmp_path)


def test_a_missing_frame_is_rejected(tmp_path):
    f = _frames()
    _v21(tmp_path, f)
    path = tmp_path / "data" / "chunk-000" / "episode_000002.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)  # episode 2 loses frame 0
    with pytest.raises(ValueError, match="episode 2 .* frame_index 0, 1, 2"):
        read_lerobot(tmp_path)
