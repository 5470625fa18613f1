"""The openpi-compatible endpoint: openpi's own ``WebsocketClientPolicy`` against ``streamtx serve --openpi-port``.

``openpi-client`` pins numpy<2, so it is not in the dev extra; install it with
``pip install --no-deps openpi-client`` (it needs only msgpack, numpy, websockets, typing_extensions here). The
tests that drive it skip without it; the frame, mapping and configuration tests run everywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import TIMEOUT, start_daemon

from streamtx.apps.cli import main as streamtx_main
from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.data import Episodes, write_lerobot
from streamtx_client import Client, LocalSession
from streamtx_server import ServerConfig
from streamtx_server.auth import create_curve_keys
from streamtx_server.cli import run_server
from streamtx_server.openpi import BadFrame, ObservationMapping, OpenpiEndpoint, pack, unpack
from streamtx_server.process import DaemonProcess

pytest.importorskip("websockets")

KEY = "observation/state"
# openpi-client 0.1.2 opens its connection outside a context manager, which websockets >= 15 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


def _openpi_port(daemon: DaemonProcess) -> int:
    """The port of the daemon's ``openpi_listening`` event (``--openpi-port 0`` picks a free one)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for line in daemon.log_path.read_text(errors="replace").splitlines():
            if '"openpi_listening"' in line:
                return int(json.loads(line)["port"])
        assert daemon.running, daemon.log_tail()
        time.sleep(0.02)  # polling a log file: the daemon is another process
    raise AssertionError(f"no openpi_listening event:\n{daemon.log_tail()}")


@pytest.fixture(scope="module")
def openpi_daemon(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, int]]:
    pytest.importorskip("openpi_client")
    daemon = start_daemon(
        checkpoint,
        tmp_path_factory.mktemp("openpi"),
        "--openpi-port=0",
        f"--openpi-obs-key={KEY}",
        "--openpi-ignore-key=prompt",
        binds=("tcp://127.0.0.1:*",),
    )
    try:
        yield daemon, _openpi_port(daemon)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()


def _connect(port: int):
    """openpi's own client (the tests that use it skip without it; the others run in any environment)."""
    client = pytest.importorskip("openpi_client.websocket_client_policy")
    return client.WebsocketClientPolicy(host="127.0.0.1", port=port)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def test_openpi_client_equals_a_local_session(openpi_daemon, policy) -> None:
    _, port = openpi_daemon
    client = _connect(port)
    meta = client.get_server_metadata()
    assert meta["server"] == "streamtx" and meta["obs_keys"] == [KEY] and meta["obs_dim"] == policy.obs_dim
    reference = LocalSession(TorchBatchPolicy(policy), seed=meta["seed"])
    rng = np.random.default_rng(0)
    try:
        for t in range(24):
            if t == 12:  # an episode boundary in the middle: openpi-style control frame
                ack = client.infer({"__ctrl__": "reset", "seed": 7})
                assert ack == {"__ack__": "reset", "seed": 7}
                reference.reset(7)
            obs = rng.standard_normal(policy.obs_dim).astype(np.float32)
            reply = client.infer({KEY: obs, "prompt": "reach the target"})
            want = reference.step(obs)
            assert reply["actions"].shape == (policy.horizon, policy.action_dim)
            assert _relative_error(reply["actions"], want) <= 1e-5, t
            timing = reply["server_timing"]
            assert timing["infer_ms"] >= timing["model_ms"] >= 0 and timing["batch"] >= 1
            assert ("prev_total_ms" in timing) == (t > 0)
    finally:
        client._ws.close()


def test_a_bad_observation_gets_an_error_and_nothing_else_changes(openpi_daemon, policy) -> None:
    daemon, port = openpi_daemon
    a, b = _connect(port), _connect(port)
    ref_a = LocalSession(TorchBatchPolicy(policy), seed=a.get_server_metadata()["seed"])
    ref_b = LocalSession(TorchBatchPolicy(policy), seed=b.get_server_metadata()["seed"])
    rng = np.random.default_rng(1)
    bad = {
        "unknown": ({"observation/joints": np.zeros(policy.obs_dim, np.float32)}, "missing ['observation/state']"),
        "size": ({KEY: np.zeros(policy.obs_dim + 1, np.float32)}, f"obs_dim is {policy.obs_dim}"),
        "text": ({KEY: "not numbers"}, "expected a numeric array"),
        "nan": ({KEY: np.full(policy.obs_dim, np.nan, np.float32)}, "non_finite"),
        "ctrl": ({"__ctrl__": "jump"}, "must be one of"),
    }
    try:
        for t in range(6):
            obs_a, obs_b = (rng.standard_normal(policy.obs_dim).astype(np.float32) for _ in range(2))
            if t == 3:
                for name, (obs, message) in bad.items():
                    with pytest.raises(RuntimeError, match="Error in inference server") as err:
                        a.infer(obs)
                    assert message in str(err.value), name
            assert _relative_error(a.infer({KEY: obs_a})["actions"], ref_a.step(obs_a)) <= 1e-5, t
            assert _relative_error(b.infer({KEY: obs_b})["actions"], ref_b.step(obs_b)) <= 1e-5, t
        # and the daemon keeps serving its own clients too
        with Client(daemon.endpoints[0], timeout=TIMEOUT) as zmq_client, zmq_client.open(seed=3) as session:
            obs = rng.standard_normal(policy.obs_dim).astype(np.float32)
            want = LocalSession(TorchBatchPolicy(policy), seed=3).step(obs)
            assert _relative_error(session.step(obs), want) <= 1e-5
    finally:
        a._ws.close()
        b._ws.close()


def test_a_reconnect_starts_a_fresh_session(openpi_daemon, policy) -> None:
    _, port = openpi_daemon
    obs = np.linspace(-1, 1, policy.obs_dim, dtype=np.float32)
    first = _connect(port)
    meta = first.get_server_metadata()
    first.infer({KEY: obs})
    first.infer({KEY: obs})
    first._ws.close()
    second = _connect(port)
    try:
        again = second.get_server_metadata()
        assert again["session"] != meta["session"]
        fresh = LocalSession(TorchBatchPolicy(policy), seed=again["seed"]).step(obs)  # no history carried over
        assert _relative_error(second.infer({KEY: obs})["actions"], fresh) <= 1e-5
    finally:
        second._ws.close()


def test_mapping_concatenates_keys_in_order_and_refuses_the_rest() -> None:
    # the declared order, neither the frame's nor the alphabet's
    mapping = ObservationMapping(("b", "a"), ignored=("image",))
    tokens = mapping.tokens({"a": np.zeros((2, 2)), "image": np.zeros((4, 4, 3)), "b": np.ones((2, 1))}, obs_dim=3)
    np.testing.assert_array_equal(tokens, [[1, 0, 0], [1, 0, 0]])
    mapping = ObservationMapping(("a", "b"), ignored=("image",))
    with pytest.raises(BadFrame, match=r"missing \['b'\]; unknown \['c'\]"):
        mapping.tokens({"a": np.zeros(2), "c": np.zeros(1)}, obs_dim=3)
    with pytest.raises(BadFrame, match="same number of tokens"):
        mapping.tokens({"a": np.zeros((2, 2)), "b": np.zeros((3, 1))}, obs_dim=3)
    with pytest.raises(ValueError, match="also observation keys"):
        ObservationMapping(("a",), ignored=("a",))


def test_frames_round_trip_numeric_arrays_and_refuse_objects() -> None:
    value = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5), "n": [1, "t"]}
    back = unpack(pack(value))
    np.testing.assert_array_equal(back["x"], value["x"])
    assert back["x"].dtype == np.float32 and back["s"] == 2.5 and back["n"] == [1, "t"]
    forged = pack({"x": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}})
    with pytest.raises(BadFrame, match="not numeric"):
        unpack(forged)
    short = pack({"x": {b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "<f4", b"shape": [2]}})
    with pytest.raises(BadFrame, match="does not hold"):
        unpack(short)
    with pytest.raises(BadFrame, match="not a msgpack frame"):
        unpack(b"\xc1")


def test_bring_your_own_data_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LeRobot directory -> ``streamtx train`` -> ``streamtx serve --openpi-port --record`` -> our client and
    openpi's -> ``streamtx replay`` of what was served: the README's chain on a tiny dataset."""
    pytest.importorskip("openpi_client")
    rng = np.random.default_rng(3)
    obs = rng.standard_normal((2, 24, 6))
    actions = np.tanh(obs[..., :2] + 0.1 * rng.standard_normal((2, 24, 2)))
    dataset = write_lerobot(tmp_path / "data", Episodes.from_padded(obs, actions), fps=50)
    trained = tmp_path / "policy.pt"
    train = ["train", str(dataset), f"--out={trained}", "--no-equivariance", "--layers=1", "--dim=16", "--heads=1"]
    assert streamtx_main([*train, "--steps=4", "--batch-size=8", "--quiet", "--threads=1"]) == 0
    recorded = tmp_path / "served"
    daemon = start_daemon(trained, tmp_path, "--openpi-port=0", f"--record={recorded}", binds=("tcp://127.0.0.1:*",))
    try:
        port = _openpi_port(daemon)
        with Client(daemon.endpoints[0], timeout=TIMEOUT) as client, client.open(seed=0) as session:
            ours = [session.step(o.astype(np.float32)) for o in obs[0, :5]]
        openpi = _connect(port)
        theirs = [openpi.infer({KEY: o.astype(np.float32)})["actions"] for o in obs[1, :5]]
        openpi._ws.close()
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert all(c.shape == theirs[0].shape for c in ours + theirs)
    capsys.readouterr()
    assert streamtx_main(["replay", str(recorded), f"--checkpoint={trained}", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["chunks"] for r in rows) == [5, 5] and max(r["max_rel"] for r in rows) <= 1e-6


def test_the_unauthenticated_endpoint_is_refused_with_curve(policy, tmp_path: Path) -> None:
    create_curve_keys(tmp_path / "keys")
    with pytest.raises(ValueError, match="no authentication"):
        run_server(
            TorchBatchPolicy(policy),
            ["tcp://127.0.0.1:*"],
            ServerConfig(),
            curve_keys=tmp_path / "keys",
            openpi=OpenpiEndpoint(port=0),
        )
