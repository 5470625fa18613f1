"""streamtx daemon: serves a streaming policy to many robot sessions over ZeroMQ (``streamtx serve`` runs it).

* :class:`Server`: one policy, one ROUTER socket (tcp and ipc), sessions, dynamic batching, limits, statistics.
* :class:`ServerConfig`: limits, batching and expiry knobs.
* :mod:`streamtx_server.cli`: ``serve`` (given a policy loader), ``stats``, ``keygen``.
"""

from .config import ServerConfig
from .daemon import ServedPolicy, Server

__all__ = ["Server", "ServerConfig", "ServedPolicy"]
