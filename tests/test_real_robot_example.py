"""``examples/real_robot_loop.py`` runs as is against a daemon; a late reply gets the safe action, deterministically
(a gated policy and a manual clock: no wall-clock assertion), the late chunk is aligned to the tick it arrives at, an
overrun tick is skipped with its action, every observation reaches the daemon and Ctrl-C shuts the loop down
cleanly."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import ManualClock

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx_client import Client, LocalSession
from streamtx_server import Server, ServerConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "real_robot_loop.py"
TIMEOUT = 20.0


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("real_robot_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


loop = _example()


class GatedPolicy:
    """The served policy, whose ``act`` waits for ``release`` (a daemon that is late)."""

    def __init__(self, policy: Any) -> None:
        self._policy = policy
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def act(self, state: Any, rows: np.ndarray) -> np.ndarray:
        assert self.release.wait(TIMEOUT)
        return self._policy.act(state, rows)


@pytest.fixture(scope="module")
def torch_policy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_policy(make_random_checkpoint(tmp_path_factory.mktemp("robot") / "random.pt", seed=0))


@pytest.fixture
def served(torch_policy) -> Iterator[tuple[Server, GatedPolicy]]:
    gated = GatedPolicy(TorchBatchPolicy(torch_policy))
    server = Server(gated, ["tcp://127.0.0.1:*"], ServerConfig(max_wait=0.0, idle_timeout=None))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.listening.wait(TIMEOUT)
    yield server, gated
    gated.release.set()
    server.stop()
    thread.join(TIMEOUT)


class ScriptedRobot(loop.StandInRobot):
    """A stand-in whose first ``late_ticks`` sensor reads take longer than the deadline (the reply is late: the gate
    opens only after them) and whose operator presses Ctrl-C at tick ``stop_at``."""

    def __init__(self, clock: ManualClock, gate: threading.Event, late_ticks: int, stop_at: int, **kw: Any):
        super().__init__(**kw)
        self.clock, self.gate, self.late_ticks, self.stop_at = clock, gate, late_ticks, stop_at
        self.observations: list[np.ndarray] = []

    def read(self) -> np.ndarray:
        if len(self.observations) < self.late_ticks:
            self.clock.now += DEADLINE + 1.0  # past the tick's deadline before the loop waits for the reply
        self.observations.append(super().read())
        return self.observations[-1]

    def apply(self, action: np.ndarray) -> None:
        super().apply(action)
        ticks = len(self.applied)
        if ticks == self.late_ticks:
            self.gate.set()
        if ticks == self.stop_at:
            raise KeyboardInterrupt  # Ctrl-C while the loop runs


PERIOD, DEADLINE = 30.0, 20.0  # manual-clock seconds; the real wait for a reply is bounded by DEADLINE


def test_a_late_reply_gets_the_safe_action_then_chunks_play_aligned(served, torch_policy) -> None:
    server, gated = served
    clock = ManualClock()
    late, stop = 2, 20
    with Client(server.bound[0], timeout=TIMEOUT) as client, client.open(seed=4) as session:
        robot = ScriptedRobot(clock, gated.release, late, stop, obs_dim=session.info.obs_dim, action_dim=2)
        stats = loop.control_loop(
            session, robot, rate=1 / PERIOD, deadline=DEADLINE, execute=2, clock=clock, sleep=clock.sleep
        )
        assert session.resync()["tokens"] == len(robot.observations) == stop  # every observation was streamed
    assert server.stats.snapshot(sessions=len(server.sessions), max_sessions=1)["sessions"] == 0  # closed

    applied = np.stack(robot.applied)
    assert len(applied) == stop + 1 and stats.ticks == stop - 1  # the tick Ctrl-C interrupted is not counted
    assert stats.late == 1 and stats.overruns == 0
    np.testing.assert_array_equal(applied[:late], 0.0)  # no chunk in time: the safe action
    np.testing.assert_array_equal(applied[-1], 0.0)  # and once more after Ctrl-C
    assert stats.safe == late and stats.chunks == 1 + (stop - late - 1) // 2 and stats.errors == stats.dropped == 0

    # The reference: the same observations; chunks asked at tick 0 (arrived at tick 2) and then every 2 ticks.
    reference = LocalSession(TorchBatchPolicy(torch_policy), seed=4)
    asked = {0: late, **{t: t for t in range(late + 2, stop, 2)}}  # asked at tick -> played from tick
    want = np.zeros_like(applied[:stop])
    for t, obs in enumerate(robot.observations):
        if t in asked:
            chunk = reference.step(obs)
            first = asked[t]
            for k in range(first, min(first + 2, stop)):
                want[k] = chunk[k - t]
        else:
            reference.observe(obs)
    np.testing.assert_allclose(applied[late:stop], want[late:stop], rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_chunk_a_horizon_late_is_dropped_and_the_next_one_asked(served, torch_policy) -> None:
    """The reply to tick 0's request arrives at tick ``horizon``: none of its actions is for a tick still to come, so
    it is dropped (the safe action again) and tick ``horizon + 1`` asks anew and plays that chunk."""
    server, gated = served
    clock = ManualClock()
    with Client(server.bound[0], timeout=TIMEOUT) as client, client.open(seed=4) as session:
        late = session.horizon
        robot = ScriptedRobot(clock, gated.release, late, late + 3, obs_dim=session.info.obs_dim, action_dim=2)
        stats = loop.control_loop(
            session, robot, rate=1 / PERIOD, deadline=DEADLINE, execute=2, clock=clock, sleep=clock.sleep
        )
    assert stats.dropped == 1 and stats.late == 1 and stats.chunks == 1 and stats.safe == late + 1
    applied = np.stack(robot.applied)
    np.testing.assert_array_equal(applied[: late + 1], 0.0)
    reference = LocalSession(TorchBatchPolicy(torch_policy), seed=4)
    reference.step(robot.observations[0])  # the dropped chunk still drew its noise
    for obs in robot.observations[1 : late + 1]:
        reference.observe(obs)
    chunk = reference.step(robot.observations[late + 1])
    np.testing.assert_allclose(applied[late + 1 : late + 3], chunk[:2], rtol=0, atol=1e-5 * np.abs(chunk).max())


class OverrunRobot(loop.StandInRobot):
    """A stand-in whose first ``apply`` takes ``2.5`` periods: the next tick is overrun, the one after starts late."""

    def __init__(self, clock: ManualClock, **kw: Any) -> None:
        super().__init__(**kw)
        self.clock = clock
        self.observations: list[np.ndarray] = []

    def read(self) -> np.ndarray:
        self.observations.append(super().read())
        return self.observations[-1]

    def apply(self, action: np.ndarray) -> None:
        super().apply(action)
        if len(self.applied) == 1:
            self.clock.now += 2.5 * PERIOD


def test_an_overrun_tick_is_skipped_and_the_chunk_stays_aligned_with_the_clock(served, torch_policy) -> None:
    """Tick 1 is overrun: it is counted, reads no sensor, and its action is dropped, so tick 2 plays the chunk's
    action for tick 2 (not for tick 1)."""
    server, gated = served
    gated.release.set()  # the daemon answers in time
    clock = ManualClock()
    with Client(server.bound[0], timeout=TIMEOUT) as client, client.open(seed=4) as session:
        horizon = session.horizon
        assert horizon >= 3
        robot = OverrunRobot(clock, obs_dim=session.info.obs_dim, action_dim=session.info.action_dim)
        stats = loop.control_loop(
            session,
            robot,
            rate=1 / PERIOD,
            deadline=DEADLINE,
            execute=horizon,
            steps=horizon,
            clock=clock,
            sleep=clock.sleep,
        )
    assert stats.overruns == 1 and stats.ticks == horizon - 1 and stats.late == stats.safe == 0 and stats.chunks == 1
    assert len(robot.observations) == horizon - 1  # the skipped tick read nothing
    chunk = LocalSession(TorchBatchPolicy(torch_policy), seed=4).step(robot.observations[0])
    played = [0, *range(2, horizon)]  # tick 1's action was skipped with its tick
    np.testing.assert_allclose(np.stack(robot.applied[:-1]), chunk[played], rtol=0, atol=1e-5 * np.abs(chunk).max())
    np.testing.assert_array_equal(robot.applied[-1], 0.0)  # the safe action once the loop ends


def test_the_example_runs_as_is(served, capsys: pytest.CaptureFixture[str]) -> None:
    server, gated = served
    gated.release.set()
    assert loop.main(["--endpoint", server.bound[0], "--steps", "12", "--rate", "100", "--deadline-ms", "5"]) == 0
    assert "ticks" in capsys.readouterr().out
    with pytest.raises(ValueError, match="deadline"):
        loop.control_loop(None, None, rate=50, deadline=0.05, execute=1)  # a deadline past the next tick
