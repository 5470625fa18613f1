"""asyncio client: one DEALER socket shared by any number of sessions and concurrent requests."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import zmq
import zmq.asyncio

from .client import make_patience
from .core import (
    LEAVING,
    Flow,
    Patience,
    ServerInfo,
    SessionLog,
    SessionView,
    Sleep,
    call,
    close_flow,
    hello_flow,
    open_flow,
    reset_flow,
    resync_flow,
    step_flow,
)
from .errors import ProtocolError, RequestTimeout, ServerError
from .protocol import decode, request
from .transport import CurveKeys, connect_dealer, frame_request, load_curve_keys

__all__ = ["AsyncClient", "AsyncSession"]

T = TypeVar("T")


class AsyncClient:
    """asyncio connection to a streamtx daemon; same arguments and behaviour as :class:`streamtx_client.Client`,
    but many requests (of many sessions) can be in flight at once on one socket, matched to their replies by id.

    Example::

        async with AsyncClient("tcp://127.0.0.1:5555") as client:
            sessions = [await client.open(seed=i) for i in range(16)]
            chunks = await asyncio.gather(*(s.step(obs) for s in sessions))
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        patience: Patience | None = None,
        server_key: str | bytes | os.PathLike[str] | None = None,
        client_keys: str | os.PathLike[str] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.patience = make_patience(timeout, retries, patience)
        self.endpoint = endpoint
        self._curve: CurveKeys | None = None if server_key is None else load_curve_keys(server_key, client_keys)
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket = connect_dealer(self._context, endpoint, self._curve)  # type: ignore[assignment]
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._info: ServerInfo | None = None
        self._info_lock: asyncio.Lock | None = None

    # -- operations

    async def hello(self) -> dict[str, Any]:
        """Ask the daemon for its description: protocol, policy metadata and dimensions, limits."""
        self._info = await self._run(hello_flow(self.patience, self.endpoint))
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
        return await self._run(call(request("stats"), patience=self.patience, what="stats", endpoint=self.endpoint))

    async def open(
        self, session_id: str | None = None, *, seed: int | None = None, takeover: bool = False
    ) -> AsyncSession:
        info = await self.info()
        flow = open_flow(info, session_id or uuid.uuid4().hex, seed, takeover, self.patience, self.endpoint)
        return AsyncSession(self, await self._run(flow), info)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RequestTimeout(f"request to {self.endpoint} abandoned: client closed"))
        self._waiting.clear()
        self._socket.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.endpoint!r}, patience={self.patience}, curve={self._curve is not None})"

    # -- I/O

    async def _run(self, flow: Flow[T], patience: Patience | None = None) -> T:
        attempt_timeout = (patience or self.patience).attempt_timeout
        outcome: Any = None
        resume: Callable[[Any], Any] = flow.send
        while True:
            try:
                command = resume(outcome)
            except StopIteration as stop:
                return stop.value
            if isinstance(command, Sleep):
                await asyncio.sleep(command.seconds)
                outcome, resume = None, flow.send
                continue
            try:
                outcome, resume = await self._roundtrip(command, attempt_timeout), flow.send
            except RequestTimeout as exc:
                outcome, resume = exc, flow.throw

    async def _roundtrip(self, message: dict[str, Any], attempt_timeout: float) -> dict[str, Any]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        request_id = next(self._ids)
        limit = self._info.max_message_bytes if self._info is not None else None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        data = frame_request(message, request_id, limit)

        async def exchange() -> dict[str, Any]:
            # the send is inside the deadline: with no live connection (daemon down, CURVE refused) it waits
            await self._socket.send(data)
            return await future

        try:
            return await asyncio.wait_for(exchange(), attempt_timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no reply within {attempt_timeout} s") from None
        finally:
            self._waiting.pop(request_id, None)

    async def _read_replies(self) -> None:
        while True:
            try:
                reply = decode(await self._socket.recv())
            except ProtocolError:
                continue  # not a reply of ours; the request it might answer times out and retries
            rid = reply.get("id")
            if rid is None and len(self._waiting) == 1:
                rid = next(iter(self._waiting))  # the daemon could not read the id: with one in flight, it is ours
            future = self._waiting.get(rid) if type(rid) is int else None
            if future is not None and not future.done():
                future.set_result(reply)


class AsyncSession(SessionView):
    """One robot stream on the daemon, opened by :meth:`AsyncClient.open`; see :class:`streamtx_client.Session`."""

    def __init__(self, client: AsyncClient, log: SessionLog, info: ServerInfo) -> None:
        super().__init__(log, info)
        self._client = client

    async def step(self, obs: Any) -> np.ndarray | None:
        c = self._client
        return await c._run(step_flow(self._log, self.info, obs, True, c.patience, c.endpoint))

    async def observe(self, obs: Any) -> None:
        c = self._client
        await c._run(step_flow(self._log, self.info, obs, False, c.patience, c.endpoint))

    async def reset(self, seed: int | None = None) -> int:
        c = self._client
        return await c._run(reset_flow(self._log, seed, c.patience, c.endpoint))

    async def resync(self) -> dict[str, Any]:
        c = self._client
        return await c._run(resync_flow(self._log, c.patience, c.endpoint))

    async def close(self) -> None:
        c = self._client
        await c._run(close_flow(self._log, c.patience, c.endpoint))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:  # leaving on the user's error: one short try, never a second error chained to theirs
            await self._client._run(close_flow(self._log, LEAVING, self._client.endpoint), LEAVING)
        except (RequestTimeout, ServerError):
            pass
