"""Session placement over a fleet of replicas by rendezvous (highest-random-weight) hashing, with no registry.

Every client ranks the live replicas for a session by ``w(session, replica) = H(session id, replica id)``, highest
first, and talks to the first one it can reach. Nothing is stored anywhere: every client (and every replica) computes
the same ranking from the same :class:`View`. The properties a fleet needs follow from the hash alone:

* even spread: each of ``N`` replicas owns about ``1/N`` of the sessions;
* removing a replica moves only its own sessions, each to its second choice, so they spread evenly over the
  survivors (no hot spot next to the dead replica, unlike a ring with one point per member);
* adding ``k`` replicas to ``N`` moves about ``k / (N + k)`` of the sessions, all of them onto the new replicas.

A session stays on one model version: :meth:`View.ranking` ranks only the replicas that serve the session's
checkpoint, so a failover or a move never changes the model under a running session.

The hash is BLAKE2b (64 bits) of the length-prefixed UTF-8 ids: stable across processes, platforms and Python
versions (unlike ``hash()``), so clients and replicas of different releases agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Replica", "View", "rank", "weight"]


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return len(data).to_bytes(4, "little") + data


def weight(session_id: str, replica_id: str) -> int:
    """The rendezvous weight of ``replica_id`` for ``session_id``: a 64-bit integer, the same on every machine."""
    digest = hashlib.blake2b(_field(session_id) + _field(replica_id), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Replica:
    """One policy replica of a fleet: a stable ``id`` (its name, e.g. ``"node-3/gpu-0"``), the ZeroMQ ``endpoint``
    its daemon binds, and the ``version`` (content hash of the checkpoint) it serves."""

    id: str
    endpoint: str
    version: str

    def __post_init__(self) -> None:
        for name in ("id", "endpoint", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Replica.{name}: expected a non-empty string, got {value!r}")


def rank(session_id: str, replicas: Iterable[Replica]) -> list[Replica]:
    """``replicas`` in the order ``session_id`` tries them: highest weight first (ties, which need a 64-bit
    collision, broken by id)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id: expected a non-empty string, got {session_id!r}")
    return sorted(replicas, key=lambda r: (-weight(session_id, r.id), r.id))


@dataclass(frozen=True)
class View:
    """The live replica list a fleet's directory publishes. ``view_id`` is derived from the content alone (the same
    replicas give the same id, in any order), so a client knows cheaply whether its view is current."""

    replicas: tuple[Replica, ...]

    def __post_init__(self) -> None:
        ids = [r.id for r in self.replicas]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"replicas: expected distinct replica ids, got duplicates {duplicates}")
        object.__setattr__(self, "replicas", tuple(sorted(self.replicas, key=lambda r: r.id)))

    @classmethod
    def of(cls, replicas: Sequence[Replica]) -> View:
        return cls(tuple(replicas))

    def to_json(self) -> dict[str, Any]:
        """The view as a directory publishes it: ``{"view_id": ..., "replicas": [{"id", "endpoint", "version"}]}``
        (a directory may add fields per replica, e.g. ``sessions``; :meth:`from_json` ignores them)."""
        return {"view_id": self.view_id, "replicas": [asdict(r) for r in self.replicas]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> View:
        """The view a directory published; its ``view_id`` must be the one its content gives (a torn or forged
        document is refused, not half-used)."""
        try:
            entries = data["replicas"]
            view = cls(tuple(Replica(e["id"], e["endpoint"], e["version"]) for e in entries))
            claimed = data["view_id"]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"view: expected {{'view_id', 'replicas': [{{id, endpoint, version}}]}}, got {exc!r}"
            ) from None
        if claimed != view.view_id:
            raise ValueError(f"view: view_id {claimed!r} does not match its replicas (they give {view.view_id!r})")
        return view

    @property
    def view_id(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for r in self.replicas:  # sorted by id in __post_init__
            h.update(_field(r.id) + _field(r.endpoint) + _field(r.version))
        return h.hexdigest()

    @property
    def versions(self) -> set[str]:
        return {r.version for r in self.replicas}

    def ranking(self, session_id: str, version: str | None = None) -> list[Replica]:
        """The replicas ``session_id`` tries, best first; only those serving ``version`` when it is given. An empty
        list means no live replica serves that version: the client must say so plainly, never switch models."""
        pool = self.replicas if version is None else [r for r in self.replicas if r.version == version]
        return rank(session_id, pool)
