"""The real daemon in a child process, driven by the real clients: its actions are the in-process policy's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from serving_helpers import MAX_TOKENS, assert_same_actions, make_script, reference_run

from streamtx.policy.static import StaticStreamingPolicy
from streamtx_client import AsyncClient, Client
from streamtx_server.cli import stats_main


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_streamed_actions_equal_the_in_process_policy(daemon, policy, transport: str) -> None:
    endpoint = daemon.endpoints[0 if transport == "tcp" else 1]
    rng = np.random.default_rng(1)
    first = make_script(rng, 18, policy.obs_dim, MAX_TOKENS, observe_every=3)  # longer than the receptive field
    second = make_script(rng, 5, policy.obs_dim, MAX_TOKENS)
    with Client(endpoint, timeout=20.0) as client, client.open(seed=3) as session:
        got = [session.step(obs) if act else session.observe(obs) for obs, act in first]
        assert session.reset(seed=4) == 4  # a new episode: empty past, new seed
        got2 = [session.step(obs) if act else session.observe(obs) for obs, act in second]
    assert_same_actions(got, reference_run(policy, 3, first))
    assert_same_actions(got2, reference_run(policy, 4, second))


def test_sixteen_concurrent_sessions_match_each_session_alone(daemon, policy) -> None:
    rng = np.random.default_rng(2)
    scripts = [make_script(rng, 5, policy.obs_dim, 2, observe_every=4) for _ in range(16)]

    async def concurrently() -> list[list[np.ndarray | None]]:
        async with AsyncClient(daemon.endpoints[0], timeout=20.0) as client:
            sessions = await asyncio.gather(*(client.open(seed=100 + i) for i in range(16)))
            before = await client.stats()
            results: list[list[np.ndarray | None]] = [[] for _ in sessions]
            for t in range(5):  # all 16 sessions step together, as 16 robots at the same control rate
                chunks = await asyncio.gather(
                    *(
                        s.step(script[t][0]) if script[t][1] else s.observe(script[t][0])
                        for s, script in zip(sessions, scripts)
                    )
                )
                for out, chunk in zip(results, chunks):
                    out.append(chunk)
            after = await client.stats()
            await asyncio.gather(*(s.close() for s in sessions))
        steps = after["requests"]["step"] - before["requests"]["step"]
        batches = after["batches"]["count"] - before["batches"]["count"]
        assert steps == 80 and batches < steps / 2, (steps, batches)  # the daemon did batch them
        return results

    together = asyncio.run(concurrently())
    with Client(daemon.endpoints[0], timeout=20.0) as client:
        for i, script in enumerate(scripts):
            with client.open(seed=100 + i) as session:
                alone = [session.step(obs) if act else session.observe(obs) for obs, act in script]
            assert_same_actions(together[i], alone, atol=1e-6)
            assert_same_actions(together[i], reference_run(policy, 100 + i, script))


def test_hello_describes_the_policy_and_the_limits(daemon, policy) -> None:
    with Client(daemon.endpoints[1], timeout=20.0) as client:
        hello = client.hello()
    assert hello["protocol"] == 2 and hello["versions"] == [2]
    # `streamtx serve` runs the static plan by default, eager on the CPU
    assert hello["policy"]["metadata"] == StaticStreamingPolicy(policy, cuda_graph=False).metadata()
    # the random checkpoint: cond_horizon 8 + 1 encoder layer * (cond_window 8 - 1)
    assert hello["policy"]["replay_window"] == policy.receptive_field == 15
    assert hello["limits"] == {
        "max_message_bytes": 65536,
        "max_array_elements": 4096,
        "max_sessions": 24,
        "max_tokens_per_step": MAX_TOKENS,
        "max_queued_per_session": 16,
        "max_obs_abs": 1e6,
        "idle_timeout": 30.0,
        "max_waiting_opens": 64,
    }


def test_sessions_are_independent_rows(daemon, policy) -> None:
    script = make_script(np.random.default_rng(3), 3, policy.obs_dim)
    with Client(daemon.endpoints[0], timeout=20.0, retries=0) as client:
        a, b = client.open("session-a", seed=1), client.open("session-b", seed=1)
        got_a = [a.step(obs) for obs, _ in script]
        got_b = [b.step(obs) for obs, _ in script]  # same seed, same inputs, another row: the same actions
        a.close()
        b.close()
        with pytest.raises(ValueError, match="closed"):
            a.step(script[0][0])
    assert_same_actions(got_a, got_b, atol=0)


def test_stats_cli_prints_every_stage(daemon, capsys) -> None:
    assert stats_main([daemon.endpoints[0], "--timeout=20"]) == 0
    table = capsys.readouterr().out
    for stage in ("decode", "queue", "model", "encode", "total"):
        assert stage in table
    assert "p50 ms" in table and "p99 ms" in table
    assert stats_main([daemon.endpoints[0], "--timeout=20", "--json"]) == 0
    assert '"latency"' in capsys.readouterr().out
