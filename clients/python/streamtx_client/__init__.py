"""streamtx-client: talk to a streamtx daemon from a robot (numpy, pyzmq, msgpack; no torch).

* :class:`Client` / :class:`Session`: blocking; :class:`AsyncClient` / :class:`AsyncSession`: asyncio.
* :class:`ActionChunkBuffer`: one action per control tick from action chunks, with optional temporal ensembling.
* :mod:`streamtx_client.protocol`: the wire format, shared with the daemon.
"""

from .aio import AsyncClient, AsyncSession
from .chunks import ActionChunkBuffer
from .client import Client, Session
from .core import ServerInfo
from .errors import ErrorCode, ProtocolError, RequestTimeout, ServerError
from .protocol import PROTOCOL_VERSION

__all__ = [
    "Client",
    "Session",
    "AsyncClient",
    "AsyncSession",
    "ActionChunkBuffer",
    "ServerInfo",
    "ErrorCode",
    "ProtocolError",
    "RequestTimeout",
    "ServerError",
    "PROTOCOL_VERSION",
]

__version__ = "0.1.0"
