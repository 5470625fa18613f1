"""LeRobot datasets (a local ``LeRobotDataset`` directory) read into :class:`Episodes` and written from them.

Layout of format v3.0 (what :func:`write_lerobot` writes)::

    meta/info.json                                   codebase_version, fps, features, path templates, totals
    meta/stats.json                                  per feature: mean, std, min, max, count
    meta/tasks.parquet                               task (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet         per episode: length, tasks, dataset_from_index/_to_index, ...
    data/chunk-000/file-000.parquet                  one row per frame, many episodes per file

Format v2.1 keeps one parquet file per episode (``data/chunk-000/episode_000000.parquet``) and its episode metadata
in ``meta/episodes.jsonl``. Both keep in every frame row the columns ``episode_index``, ``frame_index``, ``index``
(the frame's position in the whole dataset), ``timestamp`` and ``task_index``, which is what :func:`read_lerobot`
cuts episodes by (and checks against the episode metadata): it reads every data file of either version the same way.

Only numeric features become observations and actions. Video and image features (camera streams) are not read:
:func:`read_lerobot` lists them in ``meta["skipped_features"]`` and trains on the state features you select. The
statistics in ``meta/stats.json`` are not used for training: the trainer computes equivariant ones on its own split.

Needs ``pyarrow`` (``pip install 'streamtx[lerobot]'``), imported inside the functions that read or write parquet so
that the rest of streamtx does not depend on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .episodes import Episodes

__all__ = ["LEROBOT_VERSION", "read_lerobot", "write_lerobot", "lerobot_features"]

LEROBOT_VERSION = "v3.0"
"""The format version :func:`write_lerobot` writes."""

_INDEX_COLUMNS = ("episode_index", "frame_index")
_VISUAL_DTYPES = ("video", "image")
_DEFAULT_TASK = "demonstration"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError("LeRobot datasets need pyarrow: pip install 'streamtx[lerobot]'") from exc
    return pyarrow


def _info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"root: {root} is not a LeRobot dataset directory (no meta/info.json)")
    with open(path) as f:
        info = json.load(f)
    for key in ("codebase_version", "features"):
        if key not in info:
            raise ValueError(f"{path}: expected a key {key!r}, got keys {sorted(info)}")
    version = str(info["codebase_version"])
    if not version.startswith(("v2.", "v3.")):
        raise ValueError(f"{path}: codebase_version {version!r} is not supported (expected v2.x or v3.x)")
    return info


def lerobot_features(root: str | Path) -> dict[str, dict[str, Any]]:
    """The ``features`` of ``root``'s ``meta/info.json`` (name -> ``dtype``, ``shape``, ``names``)."""
    return dict(_info(Path(root))["features"])


def _column(table: Any, name: str, size: int, path: Path) -> np.ndarray:
    """Column ``name`` of a pyarrow table as ``(rows, size)`` float64."""
    pa = _pyarrow()
    column = table.column(name).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != size).any():
            raise ValueError(
                f"{path}: feature {name!r}: expected {size} values per frame, found rows of {set(lengths)}"
            )
        values = column.flatten().to_numpy(zero_copy_only=False)
    else:
        if size != 1:
            raise ValueError(f"{path}: feature {name!r}: expected {size} values per frame, found a scalar column")
        values = column.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64).reshape(len(column), size)


def _feature_size(info: dict[str, Any], name: str, role: str) -> tuple[int, list[str]]:
    features = info["features"]
    if name not in features:
        numeric = [k for k, v in features.items() if v.get("dtype") not in _VISUAL_DTYPES]
        raise ValueError(f"{role}: the dataset has no feature {name!r}; its numeric features are {numeric}")
    feature = features[name]
    if feature.get("dtype") in _VISUAL_DTYPES:
        raise ValueError(
            f"{role}: feature {name!r} is a {feature['dtype']} feature; camera streams are not supported yet, "
            "choose state features"
        )
    shape = [int(s) for s in feature.get("shape", [1])]
    if len(shape) > 1:
        raise ValueError(f"{role}: feature {name!r} has shape {shape}; expected a vector (one dimension)")
    size = shape[0] if shape else 1
    names = feature.get("names")
    if isinstance(names, dict):  # some datasets nest names, e.g. {"motors": [...]}
        names = next(iter(names.values()), None)
    names = [str(n) for n in names] if isinstance(names, list) and len(names) == size else None
    return size, ([f"{name}[{i}]" for i in range(size)] if names is None else [f"{name}.{n}" for n in names])


def _declared_lengths(root: Path) -> dict[int, int] | None:
    """Episode index -> length from the episode metadata (v3 parquet or v2 jsonl), if present."""
    pa = _pyarrow()
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if files:
        table = pa.concat_tables([pa.parquet.read_table(f, columns=["episode_index", "length"]) for f in files])
        return dict(zip(table.column("episode_index").to_pylist(), table.column("length").to_pylist()))
    jsonl = root / "meta" / "episodes.jsonl"
    if jsonl.is_file():
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {int(r["episode_index"]): int(r["length"]) for r in rows}
    return None


def read_lerobot(
    root: str | Path,
    observation_features: Sequence[str] = ("observation.state",),
    action_features: Sequence[str] = ("action",),
) -> Episodes:
    """Read a local LeRobot dataset (format v3.0 or v2.x) as episodes.

    Args:
        root: the dataset directory (the one holding ``meta/`` and ``data/``).
        observation_features: numeric features concatenated, in this order, into each frame's observation.
        action_features: likewise for the action.

    Returns:
        Episodes ordered by ``episode_index``, frames by ``frame_index``; ``fps`` from ``info.json``; coordinate
        names from the features' ``names``; ``meta`` holds ``codebase_version``, ``robot_type``, ``episode_index``
        (the dataset's index of each episode), ``tasks`` and ``skipped_features`` (video/image features not read).
    """
    pa = _pyarrow()
    root = Path(root)
    info = _info(root)
    roles = {"observation_features": list(observation_features), "action_features": list(action_features)}
    for role, names in roles.items():
        if not names:
            raise ValueError(f"{role}: expected at least one feature name, got none")
    sizes = {n: _feature_size(info, n, role) for role, names in roles.items() for n in names}
    files = sorted((root / "data").glob("**/*.parquet"))
    if not files:
        raise FileNotFoundError(f"root: {root} has no parquet files under data/")
    columns = list(dict.fromkeys([*_INDEX_COLUMNS, *sizes]))
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for path in files:
        table = pa.parquet.read_table(path)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: expected the columns {missing}, got {table.column_names}")
        for c in columns:
            parts[c].append(_column(table, c, sizes[c][0] if c in sizes else 1, path))
    data = {c: np.concatenate(v) for c, v in parts.items()}
    episode = data["episode_index"][:, 0].astype(np.int64)
    frame = data["frame_index"][:, 0].astype(np.int64)
    order = np.lexsort((frame, episode))
    episode, frame = episode[order], frame[order]
    ids, starts, lengths = np.unique(episode, return_index=True, return_counts=True)
    expected = np.arange(len(frame)) - np.repeat(starts, lengths)
    if not np.array_equal(frame, expected):
        bad = int(episode[np.argmax(frame != expected)])
        raise ValueError(f"root: episode {bad} of {root} does not have frame_index 0, 1, 2, ... (missing or repeated)")
    declared = _declared_lengths(root)
    if declared is not None:
        for i, n in zip(ids.tolist(), lengths.tolist()):
            if declared.get(i) != n:
                raise ValueError(f"root: episode {i} of {root} has {n} frames, its metadata says {declared.get(i)}")

    def stack(names: list[str]) -> tuple[np.ndarray, list[str]]:
        return np.concatenate([data[n][order] for n in names], axis=1), [c for n in names for c in sizes[n][1]]

    obs, obs_names = stack(roles["observation_features"])
    act, act_names = stack(roles["action_features"])
    skipped = [k for k, v in info["features"].items() if v.get("dtype") in _VISUAL_DTYPES]
    meta = {
        "format": "lerobot",
        "codebase_version": info["codebase_version"],
        "robot_type": info.get("robot_type"),
        "episode_index": ids,
        "observation_features": roles["observation_features"],
        "action_features": roles["action_features"],
        "skipped_features": skipped,
    }
    fps = info.get("fps")
    return Episodes(obs, act, lengths, float(fps) if fps is not None else None, obs_names, act_names, meta)


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "count": [len(x)],
    }


def _tasks_table(pa: Any, task: str) -> Any:
    # pandas metadata makes `task` the index when LeRobot reads this file with pandas (its own layout)
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64"},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object"},
        ],
    }
    schema = pa.schema(
        [("task_index", pa.int64()), ("task", pa.string())], metadata={"pandas": json.dumps(pandas_meta)}
    )
    return pa.table({"task_index": [0], "task": [task]}, schema=schema)


def write_lerobot(
    root: str | Path,
    episodes: Episodes,
    fps: float,
    *,
    task: str = _DEFAULT_TASK,
    robot_type: str | None = None,
    observation_feature: str = "observation.state",
    action_feature: str = "action",
) -> Path:
    """Write ``episodes`` as a LeRobot dataset of format v3.0 (one data file, one episode-metadata file).

    Args:
        root: the directory to create; it must not exist or be empty.
        episodes: the demonstrations; coordinate names come from ``observation_names`` / ``action_names``.
        fps: frames per second (``info.json``'s ``fps``, the ``timestamp`` column is ``frame_index / fps``).
        task: the natural-language task of every episode.
        robot_type: ``info.json``'s ``robot_type``.
        observation_feature, action_feature: the feature names of the two vectors.
    """
    pa = _pyarrow()
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"root: {root} exists and is not empty")
    if not fps > 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    n, e = episodes.num_frames, episodes.num_episodes
    starts = episodes.starts
    episode_index = np.repeat(np.arange(e), episodes.lengths)
    frame_index = np.arange(n) - np.repeat(starts, episodes.lengths)

    def vector(x: np.ndarray) -> Any:
        flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])

    def names(given: list[str] | None, dim: int, prefix: str) -> list[str]:
        return list(given) if given is not None else [f"{prefix}_{i}" for i in range(dim)]

    features: dict[str, dict[str, Any]] = {
        observation_feature: {
            "dtype": "float32",
            "shape": [episodes.obs_dim],
            "names": names(episodes.observation_names, episodes.obs_dim, "obs"),
        },
        action_feature: {
            "dtype": "float32",
            "shape": [episodes.act_dim],
            "names": names(episodes.action_names, episodes.act_dim, "act"),
        },
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    frames = pa.table(
        {
            observation_feature: vector(episodes.observations),
            action_feature: vector(episodes.actions),
            "timestamp": pa.array((frame_index / fps).astype(np.float32)),
            "frame_index": pa.array(frame_index.astype(np.int64)),
            "episode_index": pa.array(episode_index.astype(np.int64)),
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "task_index": pa.array(np.zeros(n, dtype=np.int64)),
        }
    )
    episodes_table = pa.table(
        {
            "episode_index": pa.array(np.arange(e, dtype=np.int64)),
            "tasks": pa.array([[task]] * e, type=pa.list_(pa.string())),
            "length": pa.array(episodes.lengths.astype(np.int64)),
            "data/chunk_index": pa.array(np.zeros(e, dtype=np.int64)),
            "data/file_index": pa.array(np.zeros(e, dtype=np.int64)),
            "dataset_from_index": pa.array(starts.astype(np.int64)),
            "dataset_to_index": pa.array((starts + episodes.lengths).astype(np.int64)),
            "meta/episodes/chunk_index": pa.array(np.zeros(e, dtype=np.int64)),
            "meta/episodes/file_index": pa.array(np.zeros(e, dtype=np.int64)),
        }
    )
    info = {
        "codebase_version": LEROBOT_VERSION,
        "robot_type": robot_type,
        "total_episodes": e,
        "total_frames": n,
        "total_tasks": 1,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps if not float(fps).is_integer() else int(fps),
        "splits": {"train": f"0:{e}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": None,
        "features": features,
    }
    stats = {
        observation_feature: _stats(episodes.observations),
        action_feature: _stats(episodes.actions),
        "timestamp": _stats(frame_index[:, None] / fps),
        "frame_index": _stats(frame_index[:, None].astype(np.float64)),
        "episode_index": _stats(episode_index[:, None].astype(np.float64)),
        "index": _stats(np.arange(n, dtype=np.float64)[:, None]),
        "task_index": _stats(np.zeros((n, 1))),
    }
    for sub in ("meta/episodes/chunk-000", "data/chunk-000"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pa.parquet.write_table(frames, root / "data/chunk-000/file-000.parquet")
    pa.parquet.write_table(episodes_table, root / "meta/episodes/chunk-000/file-000.parquet")
    pa.parquet.write_table(_tasks_table(pa, task), root / "meta/tasks.parquet")
    for name, content in (("info.json", info), ("stats.json", stats)):
        with open(root / "meta" / name, "w") as f:
            json.dump(content, f, indent=4)
    return root
