"""streamtx-client: talk to a streamtx daemon from a robot (numpy, pyzmq, msgpack; no torch).

* :class:`Client` / :class:`Session`: blocking; :class:`AsyncClient` / :class:`AsyncSession`: asyncio.
* :class:`FleetClient` / :class:`FleetSession`: the same session API over a fleet of replicas (placement by
  rendezvous hashing, failover with replay; :mod:`streamtx_client.fleet`).
* :class:`LocalSession`: the same session interface in-process, over any numpy :class:`BatchPolicy`.
* :class:`ActionChunkBuffer`: one action per control tick from action chunks, with optional temporal ensembling.
* :mod:`streamtx_client.protocol`: the wire format, shared with the daemon.
"""

from .aio import AsyncClient, AsyncSession
from .chunks import ActionChunkBuffer
from .client import Client, Session
from .core import Patience, ServerInfo
from .errors import RETRYABLE, ErrorCode, ProtocolError, RequestTimeout, ServerError
from .fleet import Directory, FleetClient, FleetError, FleetSession
from .placement import Replica, View
from .policy import BatchPolicy, LocalSession, PolicySession
from .protocol import PROTOCOL_VERSION

__all__ = [
    "Client",
    "Session",
    "AsyncClient",
    "AsyncSession",
    "FleetClient",
    "FleetSession",
    "FleetError",
    "Directory",
    "Replica",
    "View",
    "ActionChunkBuffer",
    "ServerInfo",
    "Patience",
    "BatchPolicy",
    "PolicySession",
    "LocalSession",
    "RETRYABLE",
    "ErrorCode",
    "ProtocolError",
    "RequestTimeout",
    "ServerError",
    "PROTOCOL_VERSION",
]

__version__ = "0.1.0"
