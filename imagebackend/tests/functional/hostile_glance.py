# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""A hostile (or broken) Glance on 127.0.0.1 for the functional tests.

:class:`HostileGlance` answers the Glance v2 requests the Glance source
makes -- ``GET /v2/images/<id>`` (the record) and ``GET
/v2/images/<id>/file`` (the data); for uploads ``POST /v2/images``, ``PUT
/v2/images/<id>/file`` and ``DELETE /v2/images/<id>`` -- the way each
test tells it to: the test registers, per path (GET) or per ``(method,
path)``, a function that writes the whole answer (status, headers, body,
timing) through the :class:`Answer` helpers.  It records every request it
received (method, path and headers) and counts the body bytes it managed
to send; :meth:`HostileGlance.upload_target` sets up a well-behaved
upload whose steps a test replaces one by one.

The source reaches it with the ``admin_token`` auth plugin (``[glance]
auth_type = admin_token``, ``token``, ``endpoint``), which sends a fixed
token and needs no Keystone; :meth:`HostileGlance.glance_options` gives
those options.  A second instance on another port plays "another origin"
for redirect tests: its :attr:`HostileGlance.requests` tell whether the
token reached it.

Nothing here is part of the library.
"""

import dataclasses
import hashlib
import http.server
import json
import socket
import struct
import threading
import time
import typing
import uuid

TOKEN = "hostile-test-token-0123456789"
MiB = 1024 * 1024


@dataclasses.dataclass
class Received:
    """One request the server received."""

    method: str
    path: str
    headers: dict


class Answer:
    """What a route function gets: the request, and ways to answer it.

    Every write that fails because the client went away ends the answer
    quietly (:class:`ClientGone` is caught by the server).
    """

    def __init__(self, handler, server: "HostileGlance") -> None:
        self._handler = handler
        self._server = server
        self.path = handler.path
        self.method = handler.command
        self.headers = {k.lower(): v for k, v in handler.headers.items()}

    def receive(self, limit: int | None = None) -> tuple[int, str]:
        """Read the request's body (``Content-Length`` bytes, or chunked,
        or at most ``limit`` bytes); returns its ``(size, sha512)``.
        """
        digest, size = hashlib.sha512(), 0
        rfile = self._handler.rfile
        chunked = "chunked" in self.headers.get("transfer-encoding", "")
        try:
            while limit is None or size < limit:
                if chunked:
                    left = int(rfile.readline().split(b";")[0], 16)
                    if left == 0:
                        rfile.readline()
                        break
                else:
                    left = int(self.headers.get("content-length",
                                                "0")) - size
                    if left <= 0:
                        break
                while left > 0 and (limit is None or size < limit):
                    want = min(left, MiB)
                    if limit is not None:
                        want = min(want, limit - size)
                    piece = rfile.read1(want)
                    if not piece:
                        raise ClientGone()
                    digest.update(piece)
                    size += len(piece)
                    left -= len(piece)
                    self._server.count_received(len(piece))
                if chunked and left == 0:
                    rfile.readline()
        except OSError as exc:
            raise ClientGone() from exc
        return size, digest.hexdigest()

    def read_json(self):
        """The request's body, parsed as JSON (small bodies only)."""
        length = int(self.headers.get("content-length", "0"))
        data = self._handler.rfile.read(length)
        self._server.count_received(len(data))
        return json.loads(data)

    def start(self, status: int = 200,
              headers: typing.Iterable[tuple[str, str]] = ()) -> None:
        """Send the status line and headers (exactly these, nothing
        added but Date/Server, and ``Connection: close``).
        """
        h = self._handler
        h.send_response_only(status)
        for name, value in headers:
            h.send_header(name, value)
        h.send_header("Connection", "close")
        h.end_headers()
        self._flush()

    def write(self, data: bytes) -> None:
        try:
            self._handler.wfile.write(data)
        except OSError as exc:
            raise ClientGone() from exc
        self._server.count_sent(len(data))

    def _flush(self) -> None:
        try:
            self._handler.wfile.flush()
        except OSError as exc:
            raise ClientGone() from exc

    def body(self, data: bytes | typing.Iterable[bytes],
             pace: float = 0.0) -> None:
        """Send ``data`` (bytes or an iterable of pieces), sleeping
        ``pace`` seconds after each piece.
        """
        pieces = [data] if isinstance(data, (bytes, bytearray)) else data
        for piece in pieces:
            self.write(piece)
            if pace:
                self._flush()
                time.sleep(pace)
        self._flush()

    def json(self, value, status: int = 200,
             content_type: str = "application/json") -> None:
        data = json.dumps(value).encode()
        self.start(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(data)))])
        self.body(data)

    def stall(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (or until the server stops)."""
        self._flush()
        self._server.stopping.wait(seconds)

    def reset(self) -> None:
        """Close the connection at once, with an RST."""
        sock = self._handler.connection
        # Linger on, for 0 s: close() sends an RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
        raise ClientGone()


class ClientGone(Exception):
    """The client closed the connection (or the route dropped it)."""


def repeat(block: bytes, total: int) -> typing.Iterator[bytes]:
    """``total`` bytes of ``block`` repeated, in pieces of ``block``."""
    view = memoryview(block)
    sent = 0
    while sent < total:
        piece = view[:min(len(block), total - sent)]
        sent += len(piece)
        yield piece


def digests(pieces: typing.Iterable[bytes]) -> tuple[int, str, str]:
    """``(size, md5, sha512)`` of the concatenated pieces."""
    md5, sha512, size = hashlib.md5(), hashlib.sha512(), 0
    for piece in pieces:
        md5.update(piece)
        sha512.update(piece)
        size += len(piece)
    return size, md5.hexdigest(), sha512.hexdigest()


def record(image_id: str, size: int | None = None, md5: str | None = None,
           sha512: str | None = None, **overrides) -> dict:
    """A Glance v2 image record (active, bare, raw) with these values."""
    value = {
        "id": image_id, "name": "hostile", "status": "active",
        "container_format": "bare", "disk_format": "raw",
        "size": size, "virtual_size": None, "checksum": md5,
        "os_hash_algo": "sha512" if sha512 else None,
        "os_hash_value": sha512, "updated_at": "2026-12-01T00:00:00Z",
        "owner": "p1", "visibility": "private",
    }
    value.update(overrides)
    return value


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):   # keep test output quiet
        pass

    def do_GET(self):
        server = self.server.owner
        server.requests.append(Received(self.command, self.path,
                                        dict(self.headers.items())))
        path = self.path.split("?")[0]
        route = server.routes.get((self.command, path))
        if route is None and self.command == "GET":
            route = server.routes.get(path)
        answer = Answer(self, server)
        try:
            if route is None:
                text = b"404 Not Found\n\nThe resource could not be found."
                answer.start(404, [("Content-Type", "text/plain"),
                                   ("Content-Length", str(len(text)))])
                answer.body(text)
            else:
                route(answer)
        except ClientGone:
            pass
        self.close_connection = True

    do_POST = do_PUT = do_DELETE = do_GET


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that went away mid-answer is what many tests do.
        pass


class HostileGlance:
    """An HTTP server on 127.0.0.1 whose answers each test chooses.

    ``routes`` maps a path (``/v2/images/<id>``, for GET) or a ``(method,
    path)`` pair to a function taking an :class:`Answer`.  Use as a
    context manager (started on enter, stopped on exit).
    """

    def __init__(self) -> None:
        self.routes: dict[str, typing.Callable[[Answer], None]] = {
            # What python-glanceclient reads before it trusts a record.
            "/v2/schemas/image": lambda answer: answer.json(
                {"name": "image", "properties": {},
                 "additionalProperties": True}),
        }
        self.requests: list[Received] = []
        #: ids of the images deleted through :meth:`upload_target`.
        self.deleted: list[str] = []
        #: ``(size, sha512)`` of each body stored by
        #: :meth:`upload_target`, by image id.
        self.stored: dict[str, tuple[int, str]] = {}
        self.stopping = threading.Event()
        self._sent = 0
        self._received = 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = None

    # --- lifecycle --------------------------------------------------------

    def start(self) -> "HostileGlance":
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # --- what it saw ------------------------------------------------------

    def count_sent(self, n: int) -> None:
        with self._lock:
            self._sent += n

    def count_received(self, n: int) -> None:
        with self._lock:
            self._received += n

    @property
    def body_bytes_received(self) -> int:
        """Request body bytes read from clients."""
        with self._lock:
            return self._received

    def requests_of(self, method: str) -> list[Received]:
        return [r for r in self.requests if r.method == method]

    @property
    def body_bytes_sent(self) -> int:
        """Body bytes written to clients (accepted by the kernel)."""
        with self._lock:
            return self._sent

    def tokens_received(self) -> list[str]:
        return [r.headers.get("X-Auth-Token") for r in self.requests
                if r.headers.get("X-Auth-Token")]

    # --- setting it up ----------------------------------------------------

    def glance_options(self, **overrides) -> dict:
        """``[glance]`` options that reach this server with a fixed
        token and no Keystone, no retries.
        """
        values = {"auth_type": "admin_token", "token": TOKEN,
                  "endpoint": self.url, "num_retries": 0}
        values.update(overrides)
        return values

    def image(self, data: typing.Callable[[Answer], None] | None = None,
              meta: typing.Callable[[Answer], None] | None = None,
              image_id: str | None = None, **fields) -> str:
        """Register an image and return its id: its record is
        :func:`record` with ``fields`` (served as JSON), or what ``meta``
        answers; its data is what ``data`` answers.
        """
        image_id = image_id or str(uuid.uuid4())
        if meta is None:
            value = record(image_id, **fields)

            def meta(answer):
                answer.json(value)
        self.routes["/v2/images/%s" % image_id] = meta
        if data is not None:
            self.routes["/v2/images/%s/file" % image_id] = data
        return image_id

    def upload_target(self, create=None, upload=None, meta=None,
                      image_id: str | None = None) -> str:
        """Answer an upload (create, data, record, delete) like Glance,
        but for the steps given: ``create`` answers ``POST /v2/images``,
        ``upload`` the ``PUT`` of the data, ``meta`` the record read
        afterwards.  Returns the id the default create answers.
        """
        image_id = image_id or str(uuid.uuid4())
        images = "/v2/images/%s" % image_id

        def default_create(answer):
            fields = answer.read_json()
            answer.json(record(image_id, status="queued", size=None,
                               name=fields.get("name"),
                               disk_format=fields.get("disk_format")),
                        status=201)

        def default_upload(answer):
            self.stored[image_id] = answer.receive()
            answer.start(204)

        def default_meta(answer):
            size, sha512 = self.stored.get(image_id, (None, None))
            answer.json(record(image_id, size=size, sha512=sha512,
                               status="active" if size else "queued"))

        def delete(answer):
            self.deleted.append(image_id)
            answer.start(204)

        self.routes[("POST", "/v2/images")] = create or default_create
        self.routes[("PUT", images + "/file")] = upload or default_upload
        self.routes[images] = meta or default_meta
        self.routes[("DELETE", images)] = delete
        return image_id
