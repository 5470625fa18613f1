"""Fleet client: the session API of :class:`~streamtx_client.Client` over many replicas (docs/fleet.md).

A session is placed by rendezvous hashing of its id over the live replicas (:mod:`streamtx_client.placement`) and
opened on the first that admits it. It then talks to that replica only: the view is fetched on connect and again
only on membership trouble (every candidate failed, or ``moved`` names a replica the view does not hold), never per
step. When its replica fails, the session moves to the next candidate in hash order, locally, with one request:
the protocol's open with replay, built from the :class:`~streamtx_client.core.SessionLog` the SDK keeps anyway.

* missed deadline (the per-endpoint :class:`~streamtx_client.core.Patience` gave up): break-before-make: re-open on
  the next candidate, resend the step there (nothing is applied twice: the step carries the same sequence number,
  and the new replica's state is rebuilt from acknowledged observations only); the client's other sessions on that
  replica move at their next call without waiting the deadline out (:data:`SUSPECT_S`);
* ``draining`` / ``moved`` (a step the replica did not apply): make-before-break: re-open on the next candidate (for
  ``moved``, the replica it names), close the session on the old one, resend there; with nowhere to go the session
  stays where it is (the replica serves it on);
* ``full`` / ``draining`` on open: the next candidate (bounded-load placement: a replica's slots are finite).

The view comes from the fleet's directory (:class:`Directory`: HTTP GET of a content-checked JSON view, e.g. the
Ray Serve deployment of ``streamtx fleet up``), a fixed :class:`~streamtx_client.placement.View`, or any callable.
A session stays on one model version: it fails over only to replicas serving the checkpoint it opened on, else
:class:`FleetError` says so plainly.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import zmq

from .client import Client, Session
from .core import (
    Flow,
    Patience,
    ServerInfo,
    SessionLog,
    call,
    open_flow,
    reset_flow,
    step_flow,
)
from .errors import RETRYABLE, ErrorCode, RequestTimeout, ServerError
from .placement import Replica, View
from .protocol import request

__all__ = ["FleetClient", "FleetSession", "FleetError", "Directory", "ViewSource", "DEFAULT_FLEET_PATIENCE"]

T = TypeVar("T")

ViewSource = Callable[[], View]
"""Where the live replica list comes from (the fleet's directory); called on connect and on membership trouble."""

DEFAULT_FLEET_PATIENCE = Patience(attempt_timeout=0.25, total=0.5)
"""Per endpoint: how long a replica may stay silent before its sessions move on (a control deadline, not the
single daemon's 30 s, which waits out a restart)."""

SUSPECT_S = 30.0
"""How long a replica that missed a deadline is avoided by the client's other sessions: they move at their next
call instead of each waiting out the deadline on it (one process driving many robots loses one deadline per dead
replica, not one per session); any reply from the replica clears it sooner."""

_OPEN_RETRY = RETRYABLE - {ErrorCode.FULL.value, ErrorCode.DRAINING.value}  # go to the next candidate at once
_MOVE_ON = frozenset({ErrorCode.FULL.value, ErrorCode.DRAINING.value})  # an open refused for these: next candidate


class FleetError(RuntimeError):
    """The fleet cannot serve the session without changing what it serves: no live replica of its model version,
    or a replica of that version whose policy dimensions differ."""


class Directory:
    """The fleet's directory as a view source: ``GET url`` answers the view as JSON (:meth:`View.from_json`).

    Args:
        urls: the directory's address, e.g. ``"http://head:8000/fleet"`` (``streamtx fleet up`` prints it), or
            several (one per node of the fleet's HTTP proxies): each is tried in turn until one answers.
        timeout: seconds per address.

    Read-only by construction: the directory answers GET only, and a view names endpoints whose CURVE key the
    client checks, so a forged view cannot put an impostor on the data plane of a CURVE fleet.
    """

    def __init__(self, urls: str | Sequence[str], timeout: float = 5.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.urls):
            raise ValueError(f"urls: expected one or more 'http://host:port/path' addresses, got {urls!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        self.timeout = timeout

    def __call__(self) -> View:
        failures = []
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    return View.from_json(json.loads(response.read()))
            except (OSError, ValueError) as exc:  # unreachable, HTTP error, not a view
                failures.append(f"{url}: {exc}")
        raise RequestTimeout(f"fleet directory: no address answered with a view ({'; '.join(failures)})")

    def __repr__(self) -> str:
        return f"Directory({self.urls!r})"


class _Connection(Client):
    """The connection to one replica; keeps the error map of the last reply (``moved`` carries its target)."""

    def __init__(self, replica: Replica, **kwargs: Any) -> None:
        super().__init__(replica.endpoint, **kwargs)
        self.replica = replica
        self.last_error: dict[str, Any] = {}

    def _roundtrip(self, command: dict[str, Any], attempt_timeout: float) -> dict[str, Any]:
        reply = super()._roundtrip(command, attempt_timeout)
        error = reply.get("error")
        self.last_error = error if isinstance(error, dict) else {}
        return reply


def _compatible(a: ServerInfo, b: ServerInfo) -> bool:
    return (a.obs_dim, a.action_dim, a.horizon, a.replay_window) == (
        b.obs_dim,
        b.action_dim,
        b.horizon,
        b.replay_window,
    )


class FleetClient:
    """Blocking client of a fleet of replicas: ``open`` places each session, its session fails over by itself.

    Args:
        view_source: the fleet's directory address (``"http://head:8000/fleet"``, or a list of them: a
            :class:`Directory`), a fixed :class:`~streamtx_client.placement.View`, or a callable returning the live
            one; asked on connect and on membership trouble only, never on the failure path.
        version: the model version (checkpoint content hash) new sessions must run; None: any version of the view
            (a session then stays on the version it opened on).
        patience: per endpoint, how long one replica may fail to answer before the session tries the next one.
        server_key, client_keys, context: as for :class:`~streamtx_client.Client` (one key set for the fleet's
            data plane).

    Example::

        with FleetClient("http://head:8000/fleet") as fleet, fleet.open("robot-7", seed=0) as session:
            chunk = session.step(obs)   # (horizon, action_dim); the replica behind it may change
    """

    def __init__(
        self,
        view_source: str | Sequence[str] | View | ViewSource,
        *,
        version: str | None = None,
        patience: Patience = DEFAULT_FLEET_PATIENCE,
        server_key: str | bytes | os.PathLike[str] | None = None,
        client_keys: str | os.PathLike[str] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if isinstance(view_source, View):
            static = view_source
            self._source: ViewSource = lambda: static
        elif isinstance(view_source, (str, list, tuple)):
            self._source = Directory(view_source)
        elif callable(view_source):
            self._source = view_source
        else:
            raise TypeError(
                f"view_source: expected a directory address, a View or a callable returning one, got {view_source!r}"
            )
        if version is not None and (not isinstance(version, str) or not version):
            raise ValueError(f"version: expected a non-empty string or None, got {version!r}")
        self.version = version
        self.patience = patience
        self._connect = {"server_key": server_key, "client_keys": client_keys, "context": context}
        self._connections: dict[str, _Connection] = {}  # replica id -> connection
        self._suspects: dict[str, float] = {}  # replica id -> until when it is avoided (monotonic), see SUSPECT_S
        self.view_fetches = 0  # how often the view was fetched (connect and membership trouble only)
        self.view = self.refresh_view()

    def refresh_view(self) -> View:
        """Fetch the view from the source (what the client does by itself on membership trouble)."""
        view = self._source()
        if not isinstance(view, View):
            raise TypeError(f"view_source(): expected a View, got {type(view).__name__}")
        self.view_fetches += 1
        self.view = view
        return view

    def open(self, session_id: str | None = None, *, seed: int | None = None, takeover: bool = False) -> FleetSession:
        """Open a session on the first replica of its hash order that admits it (as :meth:`Client.open`)."""
        session_id = session_id or uuid.uuid4().hex

        def attempt(connection: _Connection) -> SessionLog:
            info = connection.info()
            flow = open_flow(info, session_id, seed, takeover, self.patience, connection.endpoint, retry=_OPEN_RETRY)
            return connection.execute(flow)

        failures: list[tuple[Replica, Exception]] = []
        admitted = self._first_admitting(f"open {session_id!r}", session_id, self.version, attempt, failures)
        if admitted is None:
            raise _unavailable(f"open {session_id!r}", failures)
        connection, log = admitted
        return FleetSession(self, log, connection.info(), connection)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FleetClient(view={self.view.view_id[:12]}, replicas={len(self.view.replicas)}, version={self.version!r})"
        )

    # -- placement and failover

    def _connection(self, replica: Replica) -> _Connection:
        connection = self._connections.get(replica.id)
        if connection is not None and connection.replica.endpoint != replica.endpoint:
            connection.close()  # the replica came back elsewhere
            connection = None
        if connection is None:
            connection = _Connection(replica, patience=self.patience, **self._connect)
            self._connections[replica.id] = connection
        return connection

    def _first_admitting(
        self,
        what: str,
        session_id: str,
        version: str | None,
        attempt: Callable[[_Connection], T],
        failures: list[tuple[Replica, Exception]],
        preferred: str | None = None,
        avoid_suspects: bool = False,
    ) -> tuple[_Connection, T] | None:
        """``attempt`` on the candidates of ``session_id`` (of ``version``) in hash order (``preferred`` first), each
        not yet in ``failures``, until one succeeds: its connection and result. A silent replica, a refusal that
        sends a session on (``full``, ``draining``) or a replica of other dimensions is added to ``failures`` and
        the next is tried; after the last, the view is fetched once (membership trouble) and the new candidates
        are tried (a directory that does not answer leaves the view as it was: an outage of the directory never
        fails a session that a replica of the old view can serve). ``avoid_suspects``: replicas that missed a
        deadline lately are not tried at all, and the view is not fetched (else they are tried last). None: no
        candidate took it."""
        for fetched in (False, True):
            if fetched and avoid_suspects:
                return None
            if fetched:
                try:
                    self.refresh_view()
                except RequestTimeout:
                    return None
            candidates = self.view.ranking(session_id, version)
            if not candidates:
                raise FleetError(
                    f"{what}: no live replica serves model version {version!r} (the view serves "
                    f"{sorted(self.view.versions)}); a session never changes its model: open a new session"
                )
            # stable: the named replica first, replicas that missed a deadline lately last, else hash order
            candidates.sort(key=lambda r: (r.id != preferred, self._suspect(r)))
            for replica in candidates:
                if any(replica == tried for tried, _ in failures) or (avoid_suspects and self._suspect(replica)):
                    continue
                connection = self._connection(replica)
                try:
                    return connection, attempt(connection)
                except ServerError as err:
                    if err.code not in _MOVE_ON:
                        raise
                    failures.append((replica, err))
                except RequestTimeout as err:
                    self._suspects[replica.id] = time.monotonic() + SUSPECT_S
                    failures.append((replica, err))
                except FleetError as err:  # a replica of other dimensions
                    failures.append((replica, err))
        return None

    def _suspect(self, replica: Replica) -> bool:
        until = self._suspects.get(replica.id)
        if until is not None and until <= time.monotonic():
            del self._suspects[replica.id]
            return False
        return until is not None

    def _follow(self, session: FleetSession, flow: Callable[[_Connection], Flow[Any]]) -> Any:
        """Run a session's operation on its replica, following it through failures (bounded: each switch goes to a
        replica not tried yet in this call)."""
        switches = 0
        if self._suspect(session._client.replica):
            # another session of this client saw its replica miss a deadline: move now (break-before-make, as on
            # a timeout of its own, but staying put when no unsuspected candidate takes it)
            reason = RequestTimeout(f"replica {session.replica.id!r} missed a deadline of another session")
            self._relocate(session, preferred=None, reason=reason, close_old=False, avoid_suspects=True)
        while True:
            connection = session._client
            try:
                result = connection.execute(flow(connection))
                self._suspects.pop(connection.replica.id, None)  # it answers
                return result
            except RequestTimeout as err:
                # break-before-make: the replica missed its deadline; its sessions' state is rebuilt elsewhere
                self._suspects[connection.replica.id] = time.monotonic() + SUSPECT_S
                self._relocate(session, preferred=None, reason=err, close_old=False, stay=False)
            except ServerError as err:
                if err.code == ErrorCode.MOVED.value:
                    target = connection.last_error.get("replica")
                    self._relocate(session, preferred=target if isinstance(target, str) else None, reason=err)
                elif err.code == ErrorCode.DRAINING.value:
                    self._relocate(session, preferred=None, reason=err)  # make-before-break
                elif err.code == ErrorCode.FULL.value:
                    # the replica lost the session and has no slot to restore it
                    self._relocate(session, preferred=None, reason=err, close_old=False, stay=False)
                else:
                    raise
            switches += 1
            if switches > len(self.view.replicas) + 1:
                raise RequestTimeout(f"session {session.id!r}: moved {switches} times in one call; giving up")

    def _relocate(
        self,
        session: FleetSession,
        *,
        preferred: str | None,
        reason: Exception,
        close_old: bool = True,
        stay: bool = True,
        avoid_suspects: bool = False,
    ) -> None:
        """Re-open ``session`` on the next candidate of its version (``preferred`` first), with the replay of its
        last acknowledged observations. ``close_old``: make-before-break, the old replica (which answers) is told
        to let the session go once the new one holds it. ``stay``: with nowhere to go it stays on its replica (a
        draining or moving replica serves it on); else (the replica is silent) the caller's error is raised."""
        old = session._client
        if preferred is not None and all(r.id != preferred for r in self.view.replicas):
            self.refresh_view()  # a move to a replica this view does not hold: membership changed

        def attempt(connection: _Connection) -> None:
            _check_compatible(connection, session)
            connection.execute(_restore(connection, session))

        failures: list[tuple[Replica, Exception]] = [(old.replica, reason)]
        try:
            moved = self._first_admitting(
                f"session {session.id!r}", session.id, session.version, attempt, failures, preferred, avoid_suspects
            )
        except FleetError as err:
            raise err from reason
        if moved is not None:
            if close_old:  # make-before-break: the new owner holds the session, now let the old one go
                _close_quietly(old, session._log)
            session._client = moved[0]
            session._log.lost = False
            return
        if stay:
            return
        if len(failures) == 1 and self.view.versions - {session.version}:
            raise FleetError(
                f"session {session.id!r}: replica {old.replica.id!r} failed and no other live replica serves its "
                f"model version {session.version!r} (the view serves {sorted(self.view.versions)}); it cannot "
                "continue without changing its model: open a new session"
            ) from reason
        raise _unavailable(f"session {session.id!r}", failures) from reason


def _check_compatible(connection: _Connection, session: FleetSession) -> None:
    """The replica's dimensions (its ``hello``, asked once per connection) must be those the session opened on."""
    info = connection.info()
    if not _compatible(info, session.info):
        raise FleetError(
            f"replica {connection.replica.id!r} serves a policy of other dimensions than session {session.id!r} "
            f"opened on ({info} vs {session.info}), under the same version {connection.replica.version!r}",
        )


def _restore(connection: _Connection, session: FleetSession) -> Flow[None]:
    """The open with replay: the session's state rebuilt from its acknowledged observations, in one request."""
    what = f"session {session.id!r}: move to {connection.replica.id!r}"
    yield from call(
        session._log.restore_request(),
        patience=connection.patience,
        what=what,
        endpoint=connection.endpoint,
        retry=_OPEN_RETRY,
    )


def _close_quietly(connection: _Connection, log: SessionLog) -> None:
    """Close the session on its old replica: one attempt within the replica's deadline, its failure not raised (the
    replica expires the session anyway)."""
    once = replace(connection.patience, retries=0)
    message = request("close", session=log.session_id, token=log.token)
    try:
        connection.execute(call(message, patience=once, what="close", endpoint=connection.endpoint), once)
    except (RequestTimeout, ServerError):
        pass


def _unavailable(what: str, failures: list[tuple[Replica, Exception]]) -> Exception:
    """No replica took the session: a timeout if any was silent, else the refusal (``full``, ``draining``)."""
    summary = "; ".join(f"{replica.id}: {_why(err)}" for replica, err in failures)
    message = f"{what}: no replica admitted it ({summary})"
    refusals = [err for _, err in failures if isinstance(err, ServerError)]
    if len(refusals) == len(failures) and refusals:
        return ServerError(refusals[-1].code, message)
    return RequestTimeout(message)


def _why(err: Exception) -> str:
    if isinstance(err, ServerError):
        return err.code
    return "other policy dimensions" if isinstance(err, FleetError) else "no reply"


class FleetSession(Session):
    """One robot stream on a fleet, opened by :meth:`FleetClient.open`: the methods of
    :class:`~streamtx_client.Session`, whose client is the connection to the replica that holds the session now
    (:attr:`replica`); ``step``, ``observe`` and ``reset`` follow the session when that replica fails, drains or
    moves it. ``resync`` asks the current replica (no failover: a diagnostic); ``close`` closes it there."""

    _client: _Connection

    def __init__(self, fleet: FleetClient, log: SessionLog, info: ServerInfo, connection: _Connection) -> None:
        super().__init__(connection, log, info)
        self._fleet = fleet
        self.version = connection.replica.version  # the model version the session stays on

    @property
    def replica(self) -> Replica:
        return self._client.replica

    def step(self, obs: Any) -> np.ndarray | None:
        """Feed observation token(s) ``(obs_dim,)`` or ``(S, obs_dim)`` and get the action chunk
        ``(horizon, action_dim)``."""
        return self._fleet._follow(self, lambda c: step_flow(self._log, self.info, obs, True, c.patience, c.endpoint))

    def observe(self, obs: Any) -> None:
        """Feed observation token(s) without asking for actions."""
        self._fleet._follow(self, lambda c: step_flow(self._log, self.info, obs, False, c.patience, c.endpoint))

    def reset(self, seed: int | None = None) -> int:
        """Forget this stream's past (new episode); returns the new seed."""
        return self._fleet._follow(self, lambda c: reset_flow(self._log, seed, c.patience, c.endpoint))

    def __repr__(self) -> str:
        return f"FleetSession(id={self.id!r}, seed={self.seed}, replica={self.replica.id!r})"
