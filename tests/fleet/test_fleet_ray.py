"""The fleet on a simulated Ray cluster: a replica crash, a node loss, scale-up and scale-down under a running fleet
of sessions, every action checked against an uninterrupted reference (tests/fleet/ray_scenarios.py).

Ray runs only inside a network namespace this test creates, holding nothing but loopback (``unshare -rn``, then
``ip link set lo up``): the scenario refuses to start Ray anywhere else, and Ray must register its nodes as
127.0.0.1. Run them with ``.venv/bin/python -m pytest -m ray tests/fleet`` (needs ``pip install -e '.[fleet]'``;
about 6 minutes on a 2-core machine at load 8, most of it Ray and replica start-up).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ray_scenarios import PATIENCE

pytest.importorskip("ray", reason="the fleet extra is not installed: pip install -e '.[fleet]'")

pytestmark = pytest.mark.ray

SCENARIO = Path(__file__).with_name("ray_scenarios.py")
LIMIT_S = 1500  # the whole scenario, bounded (it takes 5-8 min at load 8)
GAP_S = PATIENCE.total + PATIENCE.attempt_timeout  # the deadline on a silent replica, plus one restore


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _scenario(name: str, checkpoint: Path, tmp: Path) -> dict[str, Any]:
    if not _unshare_works():
        pytest.skip("needs `unshare -rn` (a user and network namespace) and `ip` to isolate Ray on loopback")
    out = tmp / f"{name}.json"
    command = f"ip link set lo up && exec {sys.executable} {SCENARIO} {name} {checkpoint} {out}"
    done = subprocess.run(["unshare", "-rn", "sh", "-c", command], capture_output=True, text=True, timeout=LIMIT_S)
    assert out.exists(), done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result.get("ok"), done.stderr[-4000:]
    assert result["interfaces"] == ["lo"]
    assert result["node_addresses"] == ["127.0.0.1"]  # Ray registered its nodes on loopback only
    return result


@pytest.fixture(scope="module")
def run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _scenario("all", checkpoint, tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def autoscaled(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _scenario("autoscale", checkpoint, tmp_path_factory.mktemp("ray"))


def _event(run: dict[str, Any], action: str) -> dict[str, Any]:
    return next(e for e in run["events"] if e["action"] == action)


@pytest.mark.parametrize("action", ["crash", "node_loss", "scale_up", "scale_down"])
def test_every_action_of_the_fleet_equals_the_reference_and_moves_only_the_sessions_it_must(run, action):
    """Zero wrong actions (checked per step in the scenario: it stops at the first), each session's longest step at
    most the deadline plus one restore, the sessions that moved exactly those whose first choice changed (or whose
    replica left), and about the expected fraction of them."""
    _check(_event(run, action), action)


@pytest.mark.parametrize("action", ["autoscale_up", "autoscale_down"])
def test_serve_scales_the_fleet_on_the_live_sessions_the_replicas_report(autoscaled, action):
    """Past one replica's target of live sessions Serve starts a second (its share of the sessions moves to it);
    back under it, one replica drains (its sessions move to the other): the same guarantees as a manual scale."""
    _check(_event(autoscaled, action), action.removeprefix("auto"))


def _check(event: dict[str, Any], action: str) -> None:
    assert event["longest_step_s"] <= GAP_S, event
    assert event["moved"] == event["predicted"], event
    assert event["moved"], event  # the action did move someone: the check above is not vacuous
    before, after = event["replicas_before"], event["replicas_after"]
    if action == "scale_up":
        expected = event["sessions"] * (after - before) / after  # k/(N+k) of the sessions, onto the newcomer
        assert abs(len(event["moved"]) - expected) <= 0.5 * expected, event
    if action == "scale_down":
        expected = event["sessions"] / before  # the drained replica's share
        assert abs(len(event["moved"]) - expected) <= 0.5 * expected, event
