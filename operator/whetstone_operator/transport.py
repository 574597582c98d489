"""The operator's short API requests (get, list, create, patch, delete) over HTTP/1.1 keep-alive connections
of its own. Through the kubernetes client each request went through its ApiClient, urllib3's pool manager and
http.client's email-based header parser: ~1.2 ms of CPU a request, most of the operator's CPU when many jobs
start at once, on nodes where the API server needs the same cores. Here a request is one `sendall` and the
answer is read with a buffered reader: status line, headers, then a Content-Length or chunked body.

It takes everything else from the kubernetes client's Configuration, as loaded from the kubeconfig or the
pod's service account: the server, the CA, client certificates, SNI, and the bearer token on every request
(so the client's refresh hooks, in-cluster token rotation and exec plugins alike, still run). A configuration
this module does not handle (a proxy, a scheme other than http/https) gets None from `for_configuration`, and
the operator keeps the client's own path. Watches stay on that path too: they are few and long.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client.rest import should_bypass_proxies

MAX_LINE = 65536
MAX_HEADERS = 200
# A connection unused this long is closed rather than reused: load balancers in front of an API server drop
# idle connections (often after 60 s or more), and a request on a dropped one would fail its first try.
IDLE_SECONDS = 30.0
DEFAULT_TIMEOUT = 60.0


class Response:
    """An answer, as Kube and the client's ApiException read it (status, reason, data, headers)."""

    __slots__ = ("status", "reason", "headers", "data")

    def __init__(self, status: int, reason: str, headers: dict[str, str], data: bytes) -> None:
        self.status, self.reason, self.headers, self.data = status, reason, headers, data


class _Stale(ConnectionError):
    """A reused connection the server had closed: nothing of the request was answered."""


# What sending on a connection the peer closed raises (over TLS: an EOF in violation of the protocol).
_DROPPED = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


def _closed_by_peer(conn: _Connection) -> bool:
    """Whether a pooled connection was closed by the server while idle (or holds bytes nobody asked for):
    readable when no answer is due, as urllib3 checks before it reuses one."""
    if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
        return True
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=65536)
        self.used = time.monotonic()

    def close(self) -> None:
        for part in (self.rfile, self.sock):
            with contextlib.suppress(OSError):
                part.close()


class Transport:
    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        server_hostname: str,
        prefix: str,
        configuration: Any,
        pool_size: int = 64,
    ) -> None:
        self.host, self.port, self.tls, self.server_hostname = host, port, tls, server_hostname
        self.prefix = prefix
        self.configuration = configuration
        self.pool_size = pool_size
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal (urlsplit drops its brackets)
        self.host_header = name if port == (443 if tls is not None else 80) else f"{name}:{port}"
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    @classmethod
    def for_configuration(cls, configuration: Any) -> Transport | None:
        """A transport for the kubernetes client's Configuration; None where the client's path must stay."""
        url = urlsplit(configuration.host)
        if url.scheme not in ("http", "https") or not url.hostname:
            return None
        if configuration.proxy and not should_bypass_proxies(
            configuration.host, configuration.no_proxy or ""
        ):
            return None
        tls = None
        if url.scheme == "https":
            tls = ssl.create_default_context(
                cafile=configuration.ssl_ca_cert, cadata=configuration.ca_cert_data
            )
            if not configuration.verify_ssl:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
            elif configuration.assert_hostname is False:
                tls.check_hostname = False
            if configuration.cert_file:
                tls.load_cert_chain(configuration.cert_file, configuration.key_file)
        port = url.port or (443 if url.scheme == "https" else 80)
        return cls(
            url.hostname,
            port,
            tls,
            configuration.tls_server_name or url.hostname,
            url.path.rstrip("/"),
            configuration,
            pool_size=configuration.connection_pool_maxsize or 64,
        )

    # --- requests

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Response:
        """One request (`path` with its query, from the API root); the whole answer, whatever its status."""
        lines = [
            f"{method} {self.prefix}{path} HTTP/1.1",
            f"Host: {self.host_header}",
            "Accept: application/json",
            "User-Agent: whetstone-operator",
        ]
        token = self.configuration.auth_settings().get("BearerToken")
        if token and token.get("value"):
            lines.append(f"Authorization: {token['value']}")
        if body is not None:
            lines.append(f"Content-Type: {content_type or 'application/json'}")
            lines.append(f"Content-Length: {len(body)}")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        conn, reused = self._checkout(timeout)
        while True:
            sent = False
            try:
                conn.sock.settimeout(timeout)
                try:
                    conn.sock.sendall(message)
                except _DROPPED as e:
                    raise _Stale(str(e)) from e
                sent = True
                response, keep = _read_response(conn.rfile, method)
            except _Stale:
                conn.close()
                # A pooled connection the server dropped after the check at checkout: once more, on a new
                # connection, where the server cannot have acted on it (nothing sent, or a read).
                if reused and (not sent or method in ("GET", "HEAD")):
                    conn, reused = self._connect(timeout), False
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if keep:
                self._checkin(conn)
            else:
                conn.close()
            return response

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- the pool

    def _checkout(self, timeout: float) -> tuple[_Connection, bool]:
        now = time.monotonic()
        stale: list[_Connection] = []
        found = None
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.used < IDLE_SECONDS and not _closed_by_peer(conn):
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        if found is not None:
            return found, True
        return self._connect(timeout), False

    def _checkin(self, conn: _Connection) -> None:
        conn.used = time.monotonic()
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout: float) -> _Connection:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)


def _read_line(rfile: Any) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ConnectionError("a line of the API server's answer is too long")
    return line


def _read_response(rfile: Any, method: str) -> tuple[Response, bool]:
    """The answer on `rfile` and whether the connection can carry another request."""
    while True:
        try:
            status_line = _read_line(rfile)
        except ConnectionResetError as e:
            raise _Stale(str(e)) from e
        if not status_line:
            raise _Stale("the API server closed the connection")
        version, _, rest = status_line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        while True:
            line = _read_line(rfile)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(headers) >= MAX_HEADERS:
                raise ConnectionError("too many header lines in the API server's answer")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:  # an interim answer (never asked for): the real one follows
            continue
        break
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304):
        data = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        data = _read_chunked(rfile)
    elif "content-length" in headers:
        length = _size(headers["content-length"], 10)
        data = rfile.read(length)
        if len(data) != length:
            raise ConnectionError(f"the answer ended after {len(data)} of {length} bytes")
    else:
        data, keep = rfile.read(), False  # delimited by the end of the connection
    return Response(status, reason, headers, data), keep


def _size(text: str, base: int) -> int:
    """A length from the answer's framing; a malformed one is a broken connection, as a cut one is."""
    try:
        size = int(text.strip(), base)
    except ValueError:
        size = -1
    if size < 0:
        raise ConnectionError(f"malformed length {text[:40]!r} in the API server's answer")
    return size


def _read_chunked(rfile: Any) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = _read_line(rfile).split(b";", 1)[0].strip()
        if not size_line:
            raise ConnectionError("the chunked answer ended early")
        size = _size(size_line.decode("latin-1"), 16)
        if size == 0:
            while _read_line(rfile) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        chunk = rfile.read(size)
        if len(chunk) != size:
            raise ConnectionError("the chunked answer ended early")
        parts.append(chunk)
        _read_line(rfile)  # the CRLF after the chunk
