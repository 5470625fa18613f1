"""The fast paths of serving give what the general paths give: a row-indexed policy call on a contiguous range (a
view, no index) equals the indexed call, a batch's one finiteness test poisons exactly the rows it must, a small
observation's magnitude check in Python accepts and refuses what the numpy check does, and a queued step's retries
are bounded like steps."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from serving_helpers import RawPeer, error_code, start_server, stop_server

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.nn.state import StreamState
from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_server.config import ServerConfig
from streamtx_server.daemon import Server, _finite_sum

ROWS = 6
# (rows of one call): every row in order, a sorted range, an unsorted range, a scattered subset, every row permuted,
# one row at each end
PATTERNS = [[0, 1, 2, 3, 4, 5], [1, 2, 3], [4, 2, 3], [0, 2, 5], [5, 3, 1, 0, 2, 4], [0], [5], [2, 3]]


def _drive(served: TorchBatchPolicy, policy: Any, seeds: np.ndarray, tokens: np.ndarray, direct: bool):
    """Run PATTERNS (each: observe then act) through the adapter, or (``direct``) through the policy with an
    explicit row index on every call: the reference. Returns the action chunks of every call."""
    chunks = []
    if direct:
        state = policy.init_state(ROWS)
        policy.reset(state, seed=seeds.tolist())
    else:
        state = served.init_state(ROWS)
        served.reset(state, np.arange(ROWS), seeds, np.zeros(ROWS, np.int64))
    for step, rows in enumerate(PATTERNS):
        index = np.array(rows, np.int64)
        obs = tokens[step, : len(rows)]
        if direct:
            policy.observe(state, torch.from_numpy(obs), rows=torch.from_numpy(index))
            chunks.append(policy.act(state, rows=torch.from_numpy(index)).numpy())
        else:
            served.observe(state, obs, index)
            chunks.append(served.act(state, index))
    return chunks


def test_contiguous_rows_run_without_an_index_and_equal_the_indexed_call(policy) -> None:
    served = TorchBatchPolicy(policy)
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**31, ROWS)
    tokens = rng.standard_normal((len(PATTERNS), ROWS, 2, policy.obs_dim)).astype(np.float32)
    calls: list[Any] = []
    original = policy.act

    def recording_act(state: Any, rows: Any = None) -> torch.Tensor:
        calls.append(rows)
        return original(state, rows)

    policy.act = recording_act
    try:
        fast = _drive(served, policy, seeds, tokens, direct=False)
    finally:
        del policy.act
    reference = _drive(served, policy, seeds, tokens, direct=True)
    for rows, got, want in zip(PATTERNS, fast, reference):
        np.testing.assert_array_equal(got, want, err_msg=f"rows {rows}")
    # only the scattered subset needed the index
    assert [rows is not None for rows in calls] == [rows == [0, 2, 5] for rows in PATTERNS]


def test_two_states_of_one_adapter_keep_their_own_row_counts(policy) -> None:
    """A one-row state made after a bigger one (a LocalSession next to a daemon) must not make the bigger state's
    one-row calls look like 'every row'."""
    served = TorchBatchPolicy(policy)
    big = served.init_state(4)
    served.init_state(1)
    served.reset(big, np.arange(4), np.arange(4), np.zeros(4, np.int64))
    obs = np.ones((1, 1, policy.obs_dim), np.float32)
    served.observe(big, obs, np.array([0], np.int64))
    assert served.act(big, np.array([0], np.int64)).shape == (1, policy.horizon, policy.action_dim)
    assert policy.model.num_observed(big.inner.model).tolist() == [1, 0, 0, 0]


@dataclass
class _Counter(StreamState):
    total: torch.Tensor  # (B,)


class _ReplacingPolicy:
    """A streaming policy whose observe, called without an index, replaces its state tensor instead of writing
    into it (legal for a module: the retroactive attention does it): a view must still update the state."""

    obs_dim, action_dim, horizon, max_tokens_per_step, receptive_field, dtype = 2, 1, 1, 1, 1, torch.float32

    def metadata(self) -> dict[str, Any]:
        return {}

    def init_state(self, batch_size: int) -> _Counter:
        return _Counter(torch.zeros(batch_size))

    def reset(self, state: _Counter, rows: Any = None, seed: Any = None, steps: Any = 0) -> None:
        state.total[slice(None) if rows is None else rows] = 0

    def observe(self, state: _Counter, obs: torch.Tensor, rows: Any = None) -> None:
        if rows is None:
            state.total = state.total + obs.sum(dim=(1, 2))
        else:
            state.total[rows] += obs.sum(dim=(1, 2))

    def act(self, state: _Counter, rows: Any = None) -> torch.Tensor:
        return (state.total if rows is None else state.total[rows])[:, None, None].clone()


def test_a_view_whose_tensor_was_replaced_still_updates_the_state() -> None:
    served = TorchBatchPolicy(_ReplacingPolicy())
    state = served.init_state(5)
    for _ in range(2):  # the second call makes a fresh view: the first one's tensor was replaced
        served.observe(state, np.ones((2, 1, 2), np.float32), np.array([3, 2], np.int64))
    assert state.inner.total.tolist() == [0, 0, 4, 4, 0]
    np.testing.assert_array_equal(served.act(state, np.array([3, 2], np.int64))[:, 0, 0], [4, 4])


class _NaNForRows:
    """The real adapter, with the actions of chosen state rows replaced by NaN (a model that blew up for them)."""

    def __init__(self, served: TorchBatchPolicy) -> None:
        self._served = served
        self.nan_rows: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._served, name)

    def act(self, state: Any, rows: np.ndarray) -> np.ndarray:
        actions = self._served.act(state, rows).copy()
        actions[[i for i, r in enumerate(rows.tolist()) if r in self.nan_rows]] = np.nan
        return actions


def test_one_finiteness_test_per_batch_poisons_exactly_the_non_finite_rows(policy) -> None:
    adapter = _NaNForRows(TorchBatchPolicy(policy))
    endpoint = f"inproc://overhead-{uuid.uuid4().hex}"
    server, thread = start_server(policy, endpoint, max_sessions=4, max_wait=10.0)
    server.policy = adapter  # type: ignore[assignment]  # the same state, answered through the NaN filter
    obs = np.ones(policy.obs_dim, np.float32)
    try:
        with RawPeer(endpoint) as peer:
            for name in ("a", "b", "c"):
                assert peer.request("open", session=name, token=name, seed=1)["ok"]
            adapter.nan_rows = {1}  # session b's slot
            ids = {name: peer.send_request("step", session=name, token=name, seq=1, obs=obs) for name in "abc"}
            replies = {reply["id"]: reply for reply in (peer.recv() for _ in range(3))}
    finally:
        stop_server(server, thread)
    assert server.stats.batch_sizes.values().tolist() == [3.0]  # one batch of the three
    assert error_code(replies[ids["b"]]) == "poisoned"
    for name in "ac":
        assert replies[ids[name]]["ok"] and np.isfinite(replies[ids[name]]["result"]["actions"]).all()


def test_retries_of_a_queued_step_are_bounded(policy) -> None:
    endpoint = f"inproc://overhead-{uuid.uuid4().hex}"
    server, thread = start_server(policy, endpoint, max_sessions=2, max_queued_per_session=2, max_wait=10.0)
    obs = np.ones(policy.obs_dim, np.float32)
    try:
        with RawPeer(endpoint) as peer:
            assert peer.request("open", session="s", token="t", seed=1)["ok"]
            assert peer.request("open", session="idle", token="t", seed=1)["ok"]  # holds the batch back
            step = [peer.send_request("step", session="s", token="t", seq=1, obs=obs) for _ in range(4)]
            refused = peer.recv()  # the fourth: the step and two retries are queued
            assert refused["id"] == step[3] and error_code(refused) == "busy"
            assert "retries" in refused["error"]["message"]
            assert peer.request("close", session="idle", token="t")["ok"]  # the batch runs: three replies
            answered = [peer.recv() for _ in range(3)]
    finally:
        stop_server(server, thread)
    assert sorted(reply["id"] for reply in answered) == step[:3]
    assert all(reply["ok"] and reply["result"]["seq"] == 1 for reply in answered)


@pytest.mark.parametrize("rows", [[0, 0, 2], [4, 5, 6], []])
def test_rows_that_are_not_a_range_of_the_state_go_to_the_policy_which_refuses_them(policy, rows) -> None:
    served = TorchBatchPolicy(policy)
    state = served.init_state(6)
    obs = np.ones((len(rows), 1, policy.obs_dim), np.float32)
    with pytest.raises(ValueError, match="rows"):
        served.observe(state, obs, np.array(rows, np.int64))


class _NumpyPolicy:
    """A numpy policy of ``dtype`` with nothing behind it: what :meth:`Server._checked` needs to know."""

    obs_dim, action_dim, horizon, max_tokens_per_step, receptive_field = 4, 2, 3, 64, 1

    def __init__(self, dtype: str) -> None:
        self.dtype = np.dtype(dtype)

    def metadata(self) -> dict[str, Any]:
        return {}

    def init_state(self, batch_size: int) -> None:
        return None

    def reset(self, state: None, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        raise AssertionError("not served")

    def observe(self, state: None, obs: np.ndarray, rows: np.ndarray) -> None:
        raise AssertionError("not served")

    def act(self, state: None, rows: np.ndarray) -> np.ndarray:
        raise AssertionError("not served")


@pytest.mark.parametrize("model_dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("size", [4, 256])  # a step's few tokens (checked in Python) and a large replay (numpy)
def test_the_magnitude_check_agrees_with_the_exact_rule_on_both_sides_of_the_limit(model_dtype: str, size: int) -> None:
    limit = 1000.1  # not representable in float16/float32: the rule is the comparison in the model's dtype
    server = Server(_NumpyPolicy(model_dtype), ["inproc://unused"], ServerConfig(max_obs_abs=limit))
    dt = np.dtype(model_dtype)
    below = float(dt.type(limit)) if float(dt.type(limit)) <= limit else float(np.nextafter(dt.type(limit), dt.type(0)))
    above = float(np.nextafter(dt.type(below), dt.type(np.inf)))
    cases = {"at the largest accepted value": below, "one step above it": above, "-inf": -np.inf, "nan": np.nan}
    cases |= {"a float32 beyond the model dtype's range": 1e38, "negative, past the limit": -above}
    for name, value in cases.items():
        flat = np.full(size, 0.5, np.float32 if name.startswith("a float32") else dt)
        flat[size // 2] = value
        obs = flat.reshape(-1, 4)
        with np.errstate(over="ignore"):
            expected = bool(np.abs(obs.astype(dt)).max() <= limit)  # the exact rule
        try:
            server._checked(obs, "obs")
            accepted = True
        except ProtocolError as err:
            assert err.code == ErrorCode.NON_FINITE and "after the cast" in err.message
            accepted = False
        assert accepted == expected, f"{name} ({size} values, {model_dtype})"
    # a sum of magnitudes over the limit with every value under it is no reason to refuse: the exact test decides
    many = np.full((1, 4), 0.9 * limit, dt)
    assert server._checked(many, "obs") is many


@pytest.mark.parametrize("size", [8, 512])  # summed in Python, in numpy
def test_a_finite_sum_of_actions_is_exactly_all_finite(size: int) -> None:
    for dtype in ("float32", "float64"):
        chunk = np.ones(size, dtype)
        assert _finite_sum(chunk)
        for bad in (np.nan, np.inf, -np.inf):
            chunk[size - 1] = bad
            assert not _finite_sum(chunk)
    # finite float32 values whose float32 sum overflows: a small chunk is summed in float64, no false alarm (a large
    # one's overflow only sends the batch to the row-by-row test)
    assert _finite_sum(np.full(8, np.finfo(np.float32).max, np.float32))
