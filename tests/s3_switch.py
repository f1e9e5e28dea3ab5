"""A moto S3 server on loopback that a test can take down and bring back, or make answer 503.

moto's own ``ThreadedMotoServer`` can stop, but its ``stop`` leaves the listening socket open (new
connections wait in the backlog instead of being refused) and keeps serving keep-alive connections
already open. This server stops the way a crashed or restarted store does: the port is closed (a
client's connect is refused) and every open connection is cut. ``start`` listens again on the same
port; the objects survive, because moto keeps them in this process. ``unavailable(seconds)`` makes
every request answer ``503 ServiceUnavailable`` (S3's own error body) for that long, the way an
overloaded store or a load balancer with no healthy target answers.
"""

from __future__ import annotations

import socket
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

UNAVAILABLE_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                    b"<Message>Service is unable to handle request.</Message></Error>")


class _TrackedHandler(MotoRequestHandler):
    """Remembers its connection, so that ``stop`` can cut it."""

    def setup(self) -> None:
        super().setup()
        with self.server.switch.lock:
            self.server.switch.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.switch.lock:
            self.server.switch.connections.discard(self.connection)
        super().finish()


class SwitchableS3:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, 0
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.unavailable_until = 0.0
        self.pending_window: float | None = None  # seconds of 503s that start with the next request
        self.answered_503 = 0
        self.requests: list[str] = []  # "METHOD path?query" of every request answered
        self.refused_while_down = False
        self._server = None
        self._thread: threading.Thread | None = None
        self._app = DomainDispatcherApplication(create_backend_app)

    # -- the WSGI app: moto, unless told to be unavailable ----------------------------------------
    def _wsgi(self, environ, start_response):
        query = f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else ""
        with self.lock:
            self.requests.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}{query}")
            if self.pending_window is not None:
                self.unavailable_until, self.pending_window = time.monotonic() + self.pending_window, None
        if time.monotonic() < self.unavailable_until:
            with self.lock:
                self.answered_503 += 1
            body = b"" if environ["REQUEST_METHOD"] == "HEAD" else UNAVAILABLE_BODY  # a HEAD answer has no body
            start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                       ("Content-Length", str(len(body)))])
            return [body]
        return self._app(environ, start_response)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._server = make_server(self.host, self.port, self._wsgi, threaded=True, request_handler=_TrackedHandler)
        self._server.switch = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the port and cut every open connection (in-flight requests get a reset)."""
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for connection in list(self.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join()

    def is_refusing(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return True
        return False

    def unavailable(self, seconds: float, from_next_request: bool = False) -> None:
        """Answer 503 for ``seconds``: from now, or from the next request that arrives (a loaded
        machine may take longer than the window to send it)."""
        if from_next_request:
            self.pending_window = seconds
        else:
            self.unavailable_until = time.monotonic() + seconds
