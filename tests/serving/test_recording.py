"""``serve --record``: what the daemon served becomes a LeRobot v3.0 dataset that replays deterministically."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import MAX_TOKENS, TIMEOUT, make_script, start_daemon

from streamtx.apps.cli import main as streamtx_main
from streamtx.apps.recording import RecordingPolicy, read_recording, replay
from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx.data import Episodes, read_lerobot, write_lerobot
from streamtx_client import Client
from streamtx_server import Server, ServerConfig

pytest.importorskip("pyarrow")


def _serve_recorded(policy, root: Path) -> tuple[RecordingPolicy, Server, threading.Thread]:
    recorder = RecordingPolicy(TorchBatchPolicy(policy), root, fps=20)
    server = Server(recorder, ["tcp://127.0.0.1:*"], ServerConfig(max_tokens_per_step=MAX_TOKENS, max_wait=0.002))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.listening.wait(TIMEOUT)
    return recorder, server, thread


def test_a_recorded_session_replays_to_the_same_actions(policy, tmp_path: Path) -> None:
    root = tmp_path / "served"
    recorder, server, thread = _serve_recorded(policy, root)
    rng = np.random.default_rng(0)
    served: dict[int, list[np.ndarray]] = {}  # seed -> the chunks the client got, in order
    try:
        with Client(server.bound[0], timeout=TIMEOUT) as client:
            a, b = client.open(seed=11), client.open(seed=12)
            scripts = {
                11: make_script(rng, 10, policy.obs_dim, MAX_TOKENS, observe_every=3),
                12: make_script(rng, 8, policy.obs_dim, MAX_TOKENS, observe_every=2),
                13: make_script(rng, 6, policy.obs_dim, MAX_TOKENS),
            }
            for session, seeds in ((a, (11, 13)), (b, (12,))):
                for seed in seeds:
                    if seed != session.seed:
                        session.reset(seed)  # an episode boundary
                    for obs, act in scripts[seed]:
                        chunk = session.step(obs) if act else session.observe(obs)
                        if chunk is not None:
                            served.setdefault(seed, []).append(chunk)
            assert recorder.flush(TIMEOUT)  # a's first episode ended at its reset: on disk while serving
            assert [e.seed for e in read_recording(root)[1]] == [11]
            a.close()
            b.close()
    finally:
        server.stop()
        thread.join(TIMEOUT)
    recorder.close()

    meta, episodes = read_recording(root)
    assert sorted(e.seed for e in episodes) == [11, 12, 13]
    for e in episodes:
        assert len(e.obs) == sum(len(obs) for obs, _ in scripts[e.seed])
        got = [e.chunks[f] for f in sorted(e.chunks)]
        np.testing.assert_allclose(np.stack(got), np.stack(served[e.seed]), rtol=0, atol=1e-6)
    data = read_lerobot(root)  # a LeRobot dataset like any other: state and per-frame action
    assert data.num_episodes == 3 and data.act_dim == policy.action_dim and data.fps == 20

    same = replay(root, TorchBatchPolicy(policy))
    assert max(r.max_rel for r in same) <= 1e-6
    for r in same:
        episode = next(e for e in episodes if e.index == r.index)
        assert sorted(r.chunks) == sorted(episode.chunks)
    other = load_policy(make_random_checkpoint(tmp_path / "other.pt", seed=1), max_tokens_per_step=MAX_TOKENS)
    assert min(r.max_rel for r in replay(root, TorchBatchPolicy(other))) > 1e-3


def test_serve_record_writes_at_shutdown_and_replay_reports_per_episode(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "recorded"
    daemon = start_daemon(checkpoint, tmp_path, f"--record={root}", binds=("tcp://127.0.0.1:*",))
    try:
        with Client(daemon.endpoints[0], timeout=TIMEOUT) as client, client.open(seed=5) as session:
            rng = np.random.default_rng(2)
            for _ in range(6):
                session.step(rng.standard_normal(4).astype(np.float32))
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert '"event": "recorded"' in daemon.log_tail()
    assert streamtx_main(["replay", str(root), f"--checkpoint={checkpoint}", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["frames"] == 6 and rows[0]["chunks"] == 6 and rows[0]["max_rel"] <= 1e-6


def test_recording_refuses_a_directory_in_use(policy, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        RecordingPolicy(TorchBatchPolicy(policy), tmp_path / "taken")
    plain = write_lerobot(tmp_path / "plain", Episodes(np.zeros((3, 4)), np.zeros((3, 2)), [3]), fps=10)
    with pytest.raises(ValueError, match="not a recording"):
        read_recording(plain)
