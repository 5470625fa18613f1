"""asyncio client: one DEALER socket shared by any number of sessions and concurrent requests."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any, TypeVar

import numpy as np
import zmq
import zmq.asyncio

from .core import (
    RECONNECT,
    Flow,
    ServerInfo,
    SessionLog,
    SessionView,
    call,
    check_options,
    close_flow,
    hello_flow,
    open_flow,
    reset_flow,
    step_flow,
)
from .errors import ProtocolError, RequestTimeout
from .protocol import decode, request
from .transport import CurveKeys, connect_dealer, frame_request, load_curve_keys

__all__ = ["AsyncClient", "AsyncSession"]

T = TypeVar("T")


class AsyncClient:
    """asyncio connection to a streamtx daemon; same arguments and behaviour as :class:`streamtx_client.Client`,
    but many requests (of many sessions) can be in flight at once, matched to their replies by id.

    Example::

        async with AsyncClient("tcp://127.0.0.1:5555") as client:
            sessions = [await client.open(seed=i) for i in range(16)]
            chunks = await asyncio.gather(*(s.step(obs) for s in sessions))
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 1.0,
        retries: int = 3,
        server_key: str | bytes | os.PathLike[str] | None = None,
        client_keys: str | os.PathLike[str] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.timeout, self.retries = check_options(timeout, retries)
        self.endpoint = endpoint
        self._curve: CurveKeys | None = None if server_key is None else load_curve_keys(server_key, client_keys)
        self._context = context or zmq.asyncio.Context.instance()
        self._socket = connect_dealer(self._context, endpoint, self._curve)
        self._generation = 0  # bumps on every reconnect; a flow reconnects only the socket it used
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._info: ServerInfo | None = None
        self._info_lock: asyncio.Lock | None = None

    # -- operations

    async def hello(self) -> dict[str, Any]:
        """Ask the daemon for its description: protocol, policy metadata and dimensions, limits."""
        self._info = await self._run(hello_flow(self.retries))
        return self._info.raw

    async def info(self) -> ServerInfo:
        """The daemon's dimensions and limits (from the last :meth:`hello`; asked once if none yet)."""
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:  # concurrent first calls ask once
            if self._info is None:
                await self.hello()
        assert self._info is not None
        return self._info

    async def stats(self) -> dict[str, Any]:
        return await self._run(call(request("stats"), retries=self.retries))

    async def open(self, session_id: str | None = None, *, seed: int | None = None) -> AsyncSession:
        info = await self.info()
        log = await self._run(open_flow(info, session_id or uuid.uuid4().hex, seed, self.retries))
        return AsyncSession(self, log, info)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_waiting("client closed")
        self._socket.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"AsyncClient({self.endpoint!r}, timeout={self.timeout}, retries={self.retries}, "
            f"curve={self._curve is not None})"
        )

    # -- I/O

    async def _run(self, flow: Flow[T]) -> T:
        outcome: Any = None
        resume = flow.send
        generation = self._generation
        while True:
            try:
                command = resume(outcome)
            except StopIteration as stop:
                return stop.value
            try:
                if command is RECONNECT:
                    outcome, resume = self._reconnect(generation), flow.send
                else:
                    generation = self._generation
                    outcome, resume = await self._roundtrip(command), flow.send
            except RequestTimeout as exc:
                outcome, resume = exc, flow.throw

    def _reconnect(self, generation: int) -> None:
        if generation != self._generation:
            return  # another flow already replaced the socket this one timed out on
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        # Requests in flight on the old socket can never be answered on the new one: fail them now so their flows
        # retry at once instead of waiting out their timeouts.
        self._fail_waiting("reconnected")
        self._socket.close(linger=0)
        self._socket = connect_dealer(self._context, self.endpoint, self._curve)
        self._generation += 1

    def _fail_waiting(self, why: str) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RequestTimeout(f"request to {self.endpoint} abandoned: {why}"))
        self._waiting.clear()

    async def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies(self._socket))
        request_id = next(self._ids)
        limit = self._info.max_message_bytes if self._info is not None else None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._socket.send(frame_request(message, request_id, limit))
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no reply from {self.endpoint} within {self.timeout} s to {message.get('kind')!r}"
            ) from None
        finally:
            self._waiting.pop(request_id, None)

    async def _read_replies(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            try:
                reply = decode(await socket.recv())
            except ProtocolError:
                continue  # not a reply of ours; the request it might answer times out and retries
            rid = reply.get("id")
            future = self._waiting.get(rid) if type(rid) is int else None
            if future is not None and not future.done():
                future.set_result(reply)


class AsyncSession(SessionView):
    """One robot stream on the daemon, opened by :meth:`AsyncClient.open`; see :class:`streamtx_client.Session`."""

    def __init__(self, client: AsyncClient, log: SessionLog, info: ServerInfo) -> None:
        super().__init__(log, info)
        self._client = client

    async def step(self, obs: Any) -> np.ndarray | None:
        return await self._client._run(step_flow(self._log, self.info, obs, True, self._client.retries))

    async def observe(self, obs: Any) -> None:
        await self._client._run(step_flow(self._log, self.info, obs, False, self._client.retries))

    async def reset(self, seed: int | None = None) -> int:
        return await self._client._run(reset_flow(self._log, seed, self._client.retries))

    async def close(self) -> None:
        await self._client._run(close_flow(self._log, self._client.retries))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
