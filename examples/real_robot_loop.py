"""A real-robot control loop against a streamtx daemon: copy this file and replace the robot class with your driver.

What it does, and why:

* **A fixed control rate on a monotonic clock.** Tick ``k`` is due at ``t0 + k / rate`` (absolute times, so
  latency never accumulates into drift); a tick that starts late runs at once and the ticks it overran are counted,
  never run in a burst to catch up (a robot wants the newest state, not old commands).
* **A deadline per tick.** The daemon is asked from a worker thread that sends requests strictly in order and never
  abandons one (a step the daemon applied late still carries its observation into the streaming state, and its
  sequence number stays in order). The loop waits for a chunk only until ``deadline`` after the tick began; without
  one it keeps playing the previous chunk while that chunk covers the tick, else it applies the robot's **safe
  action** (hold position / zero torque).
* **Action chunks** through the SDK's :class:`~streamtx_client.ActionChunkBuffer`: a chunk every ``execute`` ticks,
  observations in between only observed. A chunk that arrives ``d`` ticks late is aligned to now by dropping its
  first ``d`` actions (their ticks are past) and holding its last; one older than its horizon is dropped.
* **Clean shutdown on Ctrl-C**: the safe action is applied, the worker drains, the session is closed.

Run it against a local daemon (the stand-ins need nothing else; ``--robot reacher`` drives MuJoCo's Reacher-v5 with
the shipped policy's 10-d observation, ``pip install 'streamtx[sim]'``)::

    streamtx serve --checkpoint streamtx/tasks/reacher/policy.pt --bind tcp://127.0.0.1:5555 &
    python examples/real_robot_loop.py --endpoint tcp://127.0.0.1:5555 --robot reacher --rate 50 --steps 500

Robot side it needs only the client SDK (numpy, pyzmq, msgpack).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streamtx_client import ActionChunkBuffer, Client, PolicySession, RequestTimeout, ServerError

__all__ = ["Robot", "StandInRobot", "ReacherRobot", "PolicyLink", "LoopStats", "control_loop", "main"]


class Robot(Protocol):
    """What the loop needs of a robot driver."""

    def read(self) -> np.ndarray:
        """The current observation ``(obs_dim,)`` (sensors read now)."""
        ...

    def apply(self, action: np.ndarray) -> None:
        """Send ``action`` ``(action_dim,)`` to the actuators."""
        ...

    def safe_action(self) -> np.ndarray:
        """What to apply when no policy action is available in time (hold position, zero torque)."""
        ...


class StandInRobot:
    """Random sensor readings, finite actions checked: runs against any checkpoint's daemon."""

    def __init__(self, obs_dim: int, action_dim: int, seed: int = 0) -> None:
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.rng = np.random.default_rng(seed)
        self.applied: list[np.ndarray] = []

    def read(self) -> np.ndarray:
        return self.rng.standard_normal(self.obs_dim).astype(np.float32)

    def apply(self, action: np.ndarray) -> None:
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise ValueError(f"action: expected a finite ({self.action_dim},) array, got {action}")
        self.applied.append(action)

    def safe_action(self) -> np.ndarray:
        return np.zeros(self.action_dim)


class ReacherRobot:
    """MuJoCo's Reacher-v5 arm (gymnasium) as the robot: the shipped policy's 10-d observation, 2 joint torques."""

    def __init__(self, seed: int = 0) -> None:
        import gymnasium  # the simulator is optional: only this stand-in needs it

        self.env = gymnasium.make("Reacher-v5")
        self.obs, _ = self.env.reset(seed=seed)
        self.seed = seed

    def read(self) -> np.ndarray:
        return np.asarray(self.obs, dtype=np.float32)

    def apply(self, action: np.ndarray) -> None:
        self.obs, _, terminated, truncated, _ = self.env.step(np.clip(action, -1.0, 1.0))
        if terminated or truncated:  # a new target; the policy's session keeps streaming (a real robot would reset)
            self.seed += 1
            self.obs, _ = self.env.reset(seed=self.seed)

    def safe_action(self) -> np.ndarray:
        return np.zeros(2)  # zero torque


@dataclass
class _Request:
    tick: int
    obs: np.ndarray
    act: bool
    done: threading.Event = field(default_factory=threading.Event)
    chunk: np.ndarray | None = None
    error: BaseException | None = None
    latency: float = 0.0


class PolicyLink:
    """A session driven from a worker thread: requests are sent in submission order and never abandoned; the loop
    waits on each one only as long as it wants."""

    def __init__(self, session: PolicySession) -> None:
        self.session = session
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="policy-link", daemon=True)
        self._thread.start()

    def submit(self, tick: int, obs: np.ndarray, act: bool) -> _Request:
        request = _Request(tick, obs, act)
        self._queue.put(request)
        return request

    def _work(self) -> None:
        while (request := self._queue.get()) is not None:
            start = time.monotonic()
            try:
                if request.act:
                    request.chunk = self.session.step(request.obs)
                else:
                    self.session.observe(request.obs)
            except (RequestTimeout, ServerError, ValueError) as exc:
                request.error = exc
            request.latency = time.monotonic() - start
            request.done.set()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout)


@dataclass
class LoopStats:
    ticks: int = 0
    chunks: int = 0
    late: int = 0  # ticks whose chunk request was not answered by the deadline
    safe: int = 0  # ticks that applied the safe action
    dropped: int = 0  # chunks that arrived older than their horizon
    overruns: int = 0  # ticks skipped because a tick ran past the next one's start
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        return (
            f"ticks {self.ticks}  chunks {self.chunks}  late {self.late}  safe actions {self.safe}  dropped "
            f"{self.dropped}  overruns {self.overruns}  errors {self.errors}  chunk latency p50 "
            f"{np.percentile(lat, 50):.2f} ms p99 {np.percentile(lat, 99):.2f} ms"
        )


def _aligned(chunk: np.ndarray, delay: int) -> np.ndarray:
    """``chunk`` predicted ``delay`` ticks ago, as a chunk for now: its past actions dropped, its last held."""
    return np.concatenate([chunk[delay:], np.repeat(chunk[-1:], delay, axis=0)])


def control_loop(
    session: PolicySession,
    robot: Robot,
    *,
    rate: float,
    deadline: float,
    execute: int,
    steps: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LoopStats:
    """Run ``robot`` at ``rate`` Hz for ``steps`` ticks (None: until Ctrl-C), a chunk from ``session`` every
    ``execute`` ticks, waiting at most ``deadline`` seconds into a tick for it. Ctrl-C (KeyboardInterrupt) ends the
    loop cleanly: the safe action is applied and the session's queued requests are sent before returning."""
    if not rate > 0 or not 0 <= deadline < 1 / rate:
        raise ValueError(f"rate, deadline: expected rate > 0 and 0 <= deadline < 1/rate, got {rate}, {deadline}")
    period, horizon = 1.0 / rate, session.horizon
    buffer = ActionChunkBuffer(horizon, execute)
    link = PolicyLink(session)
    stats = LoopStats()
    pending: _Request | None = None
    covered_until = -1  # the last tick the newest chunk covers
    start = clock()
    tick = 0
    try:
        while steps is None or tick < steps:
            due = start + tick * period
            if (now := clock()) < due:
                sleep(due - now)
            elif now - due >= period:  # overran: skip to the current tick, never a burst of old ones
                skipped = int((now - due) // period)
                for past in range(tick, tick + skipped):
                    if past <= covered_until:
                        buffer.pop()  # the skipped ticks' actions: the buffer stays aligned with the clock
                stats.overruns += skipped
                tick += skipped
                due = start + tick * period
            obs = robot.read()
            ask = buffer.needs_chunk and pending is None
            request = link.submit(tick, obs, act=ask)
            if ask:
                pending = request
            if pending is not None:
                if pending.done.wait(max(0.0, due + deadline - clock())):
                    delay = tick - pending.tick
                    if pending.error is not None or pending.chunk is None:
                        stats.errors += 1
                    elif delay >= horizon:
                        stats.dropped += 1
                    else:
                        buffer.add(_aligned(pending.chunk, delay))
                        covered_until = tick + horizon - 1
                        stats.chunks += 1
                        stats.latencies.append(pending.latency)
                    pending = None
                elif pending.tick == tick:
                    stats.late += 1
            if tick <= covered_until:
                action = buffer.pop()
            else:
                buffer.clear()  # nothing covers this tick: ask again as soon as the link is free
                action = robot.safe_action()
                stats.safe += 1
            robot.apply(action)
            stats.ticks += 1
            tick += 1
    except KeyboardInterrupt:
        pass
    finally:
        robot.apply(robot.safe_action())
        link.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="the daemon")
    p.add_argument("--robot", choices=["stand-in", "reacher"], default="stand-in", help="which stand-in robot")
    p.add_argument("--rate", type=float, default=50.0, help="control rate, Hz")
    p.add_argument("--deadline-ms", type=float, default=10.0, help="how long a tick waits for a chunk")
    p.add_argument("--execute", type=int, default=4, help="ticks per action chunk")
    p.add_argument("--steps", type=int, default=None, help="ticks to run (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, default=0, help="the session's sampling seed")
    args = p.parse_args(argv)
    with Client(args.endpoint, timeout=1.0) as client, client.open(seed=args.seed) as session:
        info = session.info
        robot: Robot = (
            ReacherRobot(args.seed) if args.robot == "reacher" else StandInRobot(info.obs_dim, info.action_dim)
        )
        stats = control_loop(
            session,
            robot,
            rate=args.rate,
            deadline=args.deadline_ms / 1e3,
            execute=min(args.execute, info.horizon),
            steps=args.steps,
        )
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
