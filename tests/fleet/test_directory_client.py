"""The client side of the fleet's directory: the view as JSON (content-checked), fetched over HTTP GET from the
first address that answers, and a directory outage that leaves the client on the view it has."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from streamtx_client import RequestTimeout
from streamtx_client.fleet import Directory, FleetClient
from streamtx_client.placement import Replica, View

VIEW = View.of([Replica(f"r-{i}", f"tcp://127.0.0.1:{7000 + i}", "v1") for i in range(3)])


class _Directory(BaseHTTPRequestHandler):
    document: dict[str, Any] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.server.document).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def directory() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Directory)
    server.document = {**VIEW.to_json(), "replicas": [{**r, "sessions": 3} for r in VIEW.to_json()["replicas"]]}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/fleet"


def test_view_json_round_trips_and_a_torn_or_forged_document_is_refused():
    assert View.from_json(json.loads(json.dumps(VIEW.to_json()))) == VIEW
    forged = {**VIEW.to_json(), "view_id": "0" * 32}
    with pytest.raises(ValueError, match="does not match its replicas"):
        View.from_json(forged)
    with pytest.raises(ValueError, match="expected"):
        View.from_json({"replicas": [{"id": "r-0"}]})
    with pytest.raises(ValueError, match="non-empty string"):
        View.from_json({"view_id": "x", "replicas": [{"id": None, "endpoint": "tcp://a:1", "version": "v"}]})


def test_the_client_fetches_the_view_from_the_first_directory_address_that_answers(directory):
    dead = "http://127.0.0.1:9/fleet"  # the discard port: nothing listens there
    with FleetClient([dead, _url(directory)]) as fleet:
        assert fleet.view == VIEW and fleet.view_fetches == 1
    with pytest.raises(RequestTimeout, match="no address answered"):
        Directory(dead, timeout=1.0)()
    with pytest.raises(ValueError, match="http"):
        Directory("tcp://127.0.0.1:5555")
