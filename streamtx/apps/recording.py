"""What the daemon served, recorded as a LeRobot v3.0 dataset, and replayed against any checkpoint.

:class:`RecordingPolicy` wraps the numpy :class:`~streamtx_client.BatchPolicy` the daemon serves (the daemon knows no
streamtx and needs no change): a row of the state is a session's slot; ``reset`` of a row (the daemon resets a row
when a session opens, resets, or is poisoned) ends the row's episode and starts the next one; ``observe`` and
``act`` append to it. Every observation token is one frame of the dataset:

=========================== ================================= ==============================================
column                      shape                             meaning
=========================== ================================= ==============================================
``observation.state``       ``(obs_dim,)``                    the token as the model saw it (after the cast)
``action``                  ``(action_dim,)``                 the action the served chunks prescribe for this
                                                              frame: entry ``f - f0`` of the newest chunk
                                                              served at a frame ``f0 <= f`` (what a robot
                                                              playing chunks one action per token does); past
                                                              its horizon its last action is held; zeros before
                                                              the first chunk (``streamtx.chunk_offset`` -1)
``streamtx.chunk``          ``(horizon * action_dim,)``       the chunk returned at this frame (zeros if none)
``streamtx.acted``          ``(1,)``                          1 where a chunk was returned (the last token of
                                                              an acting step; a poisoned one was not)
``streamtx.chunk_offset``   ``(1,)``                          ``f - f0`` above, -1 before the first chunk
``streamtx.call``           ``(1,)``                          the step within the episode (its tokens were fed
                                                              in one call)
``streamtx.seed``,          ``(1,)``                          the episode's seed and control-step counter at
``streamtx.start_steps``                                      its reset (what its sampling noise depends on)
``streamtx.time_s``         ``(1,)``                          seconds since recording began when the step's
                                                              tokens reached the model
``streamtx.model_ms``       ``(1,)``                          the step's share of the model calls (observe;
                                                              and act, on acting frames)
``streamtx.row``            ``(1,)``                          the state row (session slot)
=========================== ================================= ==============================================

A closed session's episode ends when its row is reset for the next session or when recording stops (the daemon
tells the policy nothing at close). Finished episodes are written by a background thread, the whole dataset
rewritten next to ``root`` and swapped in, so the daemon's loop never waits for the disk and ``root`` always holds
a complete dataset; :meth:`RecordingPolicy.close` ends every open episode and writes the last version. Finished
episodes stay in memory and each write costs time in proportion to all frames so far: a recording is sized for a
deployment session (hours at 50 Hz: ~10^5-10^6 frames), not for weeks; start a new ``DIR`` for the next one.

:func:`replay` feeds a recording's episodes, step by step with their seeds, to a policy and compares the chunks it
returns with the recorded ones: the same checkpoint gives the same actions; another one shows what it would have
done. ``streamtx.data``'s writer writes the dataset; the ``streamtx.*`` columns are added to its data file and
``info.json`` (``read_lerobot`` reads the dataset like any other: ``observation.state`` and ``action``).

Needs ``pyarrow`` (``pip install 'streamtx[lerobot]'``), imported in the functions that touch parquet.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamtx_client.policy import BatchPolicy

from ..data import Episodes, write_lerobot

__all__ = ["RecordingPolicy", "RecordedEpisode", "EpisodeReplay", "replay", "read_recording"]

_INT_COLUMNS = ("streamtx.acted", "streamtx.chunk_offset", "streamtx.call", "streamtx.seed", "streamtx.start_steps")
_FLOAT_COLUMNS = ("streamtx.time_s", "streamtx.model_ms")
_SCALARS = (*_INT_COLUMNS, "streamtx.row")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:  # optional dependency: say how to get it
        raise ImportError("recording needs pyarrow: pip install 'streamtx[lerobot]'") from exc
    return pyarrow


@dataclass
class _Episode:
    """One row's frames since its last reset."""

    row: int
    seed: int
    start_steps: int
    obs: list[np.ndarray] = field(default_factory=list)  # (obs_dim,) per frame
    call: list[int] = field(default_factory=list)
    time_s: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    chunks: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> (horizon, action_dim)
    calls: int = 0

    def add(self, tokens: np.ndarray, at: float, model_ms: float) -> None:
        for token in tokens:
            self.obs.append(np.array(token))
            self.call.append(self.calls)
            self.time_s.append(at)
            self.model_ms.append(0.0)
        self.model_ms[-1] = model_ms
        self.calls += 1

    def acted(self, chunk: np.ndarray, model_ms: float) -> None:
        if not self.obs:
            raise RuntimeError(f"row {self.row}: act before any observation")
        self.model_ms[-1] += model_ms
        if np.isfinite(chunk).all():  # a non-finite chunk never left the daemon (``poisoned``; the row is reset)
            self.chunks[len(self.obs) - 1] = np.array(chunk)


class RecordingPolicy:
    """Serves ``policy`` unchanged and records every session's observations, returned chunks and timing into a
    LeRobot v3.0 dataset at ``root`` (see the module docstring for its columns).

    Args:
        policy: the served policy (numpy interface).
        root: the dataset directory; it must not exist or be empty.
        fps: the robots' control rate, the dataset's ``fps`` (its ``timestamp`` column is ``frame_index / fps``).
        task: the task string of every episode.
    """

    def __init__(self, policy: BatchPolicy, root: str | Path, *, fps: float = 50.0, task: str = "served") -> None:
        _pyarrow()  # fail at start-up, not at the first write
        self.policy = policy
        self.root = Path(root)
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise FileExistsError(f"--record {self.root}: exists and is not an empty directory")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps: expected > 0, got {fps}")
        self.fps, self.task = float(fps), task
        self.obs_dim, self.action_dim, self.horizon = policy.obs_dim, policy.action_dim, policy.horizon
        self.max_tokens_per_step = policy.max_tokens_per_step
        self.receptive_field = policy.receptive_field
        self.dtype = policy.dtype
        self._open: dict[int, _Episode] = {}
        self._finished: list[_Episode] = []
        self._written = 0  # episodes in the dataset on disk
        self._t0 = time.monotonic()
        self._changed = threading.Condition()
        self._closing = False
        self.error: BaseException | None = None  # the writer's failure, if any (logged by the caller)
        self._writer = threading.Thread(target=self._write_loop, name="recorder", daemon=True)
        self._writer.start()

    # -- the BatchPolicy interface

    def metadata(self) -> dict[str, Any]:
        return self.policy.metadata()

    def init_state(self, batch_size: int) -> Any:
        self._end(list(self._open))
        return self.policy.init_state(batch_size)

    def reset(self, state: Any, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        self.policy.reset(state, rows, seeds, steps)
        self._end([int(r) for r in rows])
        for row, seed, start in zip(rows.tolist(), seeds.tolist(), steps.tolist()):
            self._open[row] = _Episode(row, int(seed), int(start))

    def observe(self, state: Any, obs: np.ndarray, rows: np.ndarray) -> None:
        at = time.monotonic() - self._t0
        self.policy.observe(state, obs, rows)
        ms = (time.monotonic() - self._t0 - at) * 1e3 / len(rows)
        for i, row in enumerate(rows.tolist()):
            self._episode(row).add(np.asarray(obs[i], dtype=self.dtype), at, ms)

    def act(self, state: Any, rows: np.ndarray) -> np.ndarray:
        t0 = time.monotonic()
        actions = self.policy.act(state, rows)
        ms = (time.monotonic() - t0) * 1e3 / len(rows)
        for i, row in enumerate(rows.tolist()):
            self._episode(row).acted(actions[i], ms)
        return actions

    # -- episodes

    def _episode(self, row: int) -> _Episode:
        episode = self._open.get(row)
        if episode is None:
            raise RuntimeError(f"row {row}: observe/act before its first reset (the daemon resets a row at open)")
        return episode

    def _end(self, rows: list[int]) -> None:
        ended = [e for e in (self._open.pop(r, None) for r in rows) if e is not None and e.obs]
        if ended:
            with self._changed:
                self._finished.extend(ended)
                self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every finished episode is on disk; True if so within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._written == len(self._finished) or self.error is not None, timeout
            )

    def close(self) -> Path:
        """End every open episode, write the dataset, stop the writer; returns ``root``."""
        self._end(list(self._open))
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._writer.join()
        if self.error is not None:
            raise RuntimeError(f"--record {self.root}: writing the dataset failed: {self.error}") from self.error
        return self.root

    def _write_loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closing or len(self._finished) > self._written)
                episodes = list(self._finished)
                if len(episodes) == self._written and self._closing:
                    return
            try:
                self._write(episodes)
            except (OSError, ValueError, ImportError) as exc:  # the daemon keeps serving; close() reports it
                with self._changed:
                    self.error = exc
                    self._changed.notify_all()
                return
            with self._changed:
                self._written = len(episodes)
                self._changed.notify_all()

    def _write(self, episodes: list[_Episode]) -> None:
        pa = _pyarrow()
        frames = [_frames(e, self.horizon, self.action_dim) for e in episodes]
        data = Episodes(
            np.concatenate([f["obs"] for f in frames]),
            np.concatenate([f["action"] for f in frames]),
            np.array([len(f["obs"]) for f in frames]),
            self.fps,
        )
        staging = self.root.with_name(self.root.name + ".writing")
        shutil.rmtree(staging, ignore_errors=True)
        write_lerobot(staging, data, self.fps, task=self.task, robot_type="streamtx-served")
        path = staging / "data/chunk-000/file-000.parquet"
        table = pa.parquet.read_table(path)
        extra = {"streamtx.chunk": np.concatenate([f["chunk"] for f in frames])}
        extra.update({name: np.concatenate([f[name] for f in frames]) for name in (*_SCALARS, *_FLOAT_COLUMNS)})
        features = {}
        for name, values in extra.items():
            if values.ndim == 2:
                flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
                table = table.append_column(name, pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
                features[name] = {"dtype": "float32", "shape": [values.shape[1]], "names": None}
            else:
                dtype = "float64" if name in _FLOAT_COLUMNS else "int64"
                table = table.append_column(name, pa.array(values.astype(dtype)))
                features[name] = {"dtype": dtype, "shape": [1], "names": None}
        pa.parquet.write_table(table, path)
        info_path = staging / "meta/info.json"
        info = json.loads(info_path.read_text())
        info["features"].update(features)
        info["streamtx"] = {
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "max_tokens_per_step": self.max_tokens_per_step,
            "dtype": np.dtype(self.dtype).name,
            "policy": _jsonable(self.policy.metadata()),
        }
        info_path.write_text(json.dumps(info, indent=4))
        # swap in: root always holds a complete dataset (the previous one until the rename)
        previous = self.root.with_name(self.root.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if self.root.exists():
            self.root.rename(previous)
        staging.rename(self.root)
        shutil.rmtree(previous, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v)))


def _frames(episode: _Episode, horizon: int, action_dim: int) -> dict[str, np.ndarray]:
    """The columns of one episode (see the module docstring)."""
    n = len(episode.obs)
    action = np.zeros((n, action_dim))
    chunk = np.zeros((n, horizon * action_dim))
    acted = np.zeros(n, np.int64)
    offset = np.full(n, -1, np.int64)
    newest: tuple[int, np.ndarray] | None = None
    for f in range(n):
        if f in episode.chunks:
            newest = (f, episode.chunks[f])
            chunk[f], acted[f] = newest[1].reshape(-1), 1
        if newest is not None:
            offset[f] = f - newest[0]
            action[f] = newest[1][min(offset[f], horizon - 1)]
    return {
        "obs": np.stack(episode.obs).astype(np.float64),
        "action": action,
        "chunk": chunk,
        "streamtx.acted": acted,
        "streamtx.chunk_offset": offset,
        "streamtx.call": np.array(episode.call, np.int64),
        "streamtx.seed": np.full(n, episode.seed, np.int64),
        "streamtx.start_steps": np.full(n, episode.start_steps, np.int64),
        "streamtx.row": np.full(n, episode.row, np.int64),
        "streamtx.time_s": np.array(episode.time_s),
        "streamtx.model_ms": np.array(episode.model_ms),
    }


# -- reading and replaying


@dataclass(frozen=True)
class RecordedEpisode:
    """One recorded episode: ``obs`` ``(T, obs_dim)``, ``call`` ``(T,)`` (tokens of one step share it), ``chunks``
    ``{frame: (horizon, action_dim)}`` returned after that frame, and the seed / step counter it was reset with."""

    index: int
    seed: int
    start_steps: int
    obs: np.ndarray
    call: np.ndarray
    chunks: dict[int, np.ndarray]


def read_recording(root: str | Path) -> tuple[dict[str, Any], list[RecordedEpisode]]:
    """``(info["streamtx"], episodes)`` of a dataset :class:`RecordingPolicy` wrote."""
    pa = _pyarrow()
    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{root}: not a LeRobot dataset directory (no meta/info.json)")
    info = json.loads(info_path.read_text())
    if "streamtx" not in info or "streamtx.chunk" not in info.get("features", {}):
        raise ValueError(f"{root}: not a recording of `streamtx serve --record` (no streamtx.* features)")
    meta = info["streamtx"]
    horizon, action_dim = int(meta["horizon"]), int(meta["action_dim"])
    files = sorted((root / "data").glob("**/*.parquet"))
    table = pa.concat_tables([pa.parquet.read_table(f) for f in files])

    def column(name: str) -> np.ndarray:
        values = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(values.type):
            return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)
        return values.to_numpy(zero_copy_only=False)

    order = np.lexsort((column("frame_index"), column("episode_index")))
    cols = {n: column(n)[order] for n in ("episode_index", "observation.state", "streamtx.chunk", *_INT_COLUMNS)}
    episodes = []
    for index in np.unique(cols["episode_index"]).tolist():
        mask = cols["episode_index"] == index
        chunks = cols["streamtx.chunk"][mask].astype(np.float32)
        acted = np.flatnonzero(cols["streamtx.acted"][mask])
        episodes.append(
            RecordedEpisode(
                index=int(index),
                seed=int(cols["streamtx.seed"][mask][0]),
                start_steps=int(cols["streamtx.start_steps"][mask][0]),
                obs=cols["observation.state"][mask],
                call=cols["streamtx.call"][mask],
                chunks={int(f): chunks[f].reshape(horizon, action_dim) for f in acted},
            )
        )
    return meta, episodes


@dataclass(frozen=True)
class EpisodeReplay:
    """How a policy's chunks on a recorded episode compare with the served ones: ``max_abs`` the largest absolute
    difference, ``max_rel`` that over the largest recorded magnitude; ``chunks`` the replayed ones by frame."""

    index: int
    frames: int
    max_abs: float
    max_rel: float
    chunks: dict[int, np.ndarray]


def replay(root: str | Path, policy: BatchPolicy) -> list[EpisodeReplay]:
    """Replay every episode of the recording at ``root`` against ``policy``: each one reset with its recorded seed
    and step counter, its steps fed as they were served (the same tokens per call), a chunk asked where one was
    returned. Deterministic: the same checkpoint reproduces the served chunks (up to float rounding)."""
    meta, episodes = read_recording(root)
    if policy.obs_dim != int(meta["obs_dim"]) or (policy.horizon, policy.action_dim) != (
        int(meta["horizon"]),
        int(meta["action_dim"]),
    ):
        raise ValueError(
            f"policy: expected obs_dim {meta['obs_dim']}, horizon {meta['horizon']}, action_dim "
            f"{meta['action_dim']} like the recording, got {policy.obs_dim}, {policy.horizon}, {policy.action_dim}"
        )
    state = policy.init_state(1)
    row = np.zeros(1, np.int64)
    results = []
    for episode in episodes:
        policy.reset(state, row, np.array([episode.seed], np.int64), np.array([episode.start_steps], np.int64))
        replayed: dict[int, np.ndarray] = {}
        starts = np.flatnonzero(np.diff(episode.call, prepend=-1))
        for start, stop in zip(starts, [*starts[1:], len(episode.call)]):
            tokens = np.ascontiguousarray(episode.obs[start:stop], dtype=policy.dtype)[None]
            policy.observe(state, tokens, row)
            if stop - 1 in episode.chunks:
                replayed[stop - 1] = np.asarray(policy.act(state, row)[0])
        diffs = [np.abs(replayed[f] - c).max() for f, c in episode.chunks.items()]
        scale = float(max((np.abs(c).max() for c in episode.chunks.values()), default=0.0))
        max_abs = float(max(diffs, default=0.0))
        results.append(EpisodeReplay(episode.index, len(episode.obs), max_abs, max_abs / max(scale, 1e-12), replayed))
    return results
