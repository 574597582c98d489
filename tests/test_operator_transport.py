"""The operator's own HTTP/1.1 transport (transport.py) against scripted servers: every way an answer can be
framed (length, chunks, end of connection, none), a keep-alive connection the server closed while idle, an
answer cut short, the token read for every request (rotation), and TLS with the cluster's CA and a client
certificate. tests/test_operator_kube.py runs every Kube call through it against an HTTP server as well."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from whetstone_operator.transport import Transport

GUARD = 10.0


class Scripted:
    """A server that answers each request with the next scripted reply (raw bytes), then closes the
    connection when the reply says so; records every request it read (method, path, headers, body)."""

    def __init__(self, replies: list[tuple[bytes, bool]]) -> None:
        self.replies = list(replies)
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released each time the server has closed a connection
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        finally:
            conn.close()
            self.closed.release()

    def _answer(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        with rfile:
            while self.replies:
                line = rfile.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := rfile.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = rfile.read(int(headers.get("content-length", 0)))
                self.seen.append({"method": method, "path": path, "headers": headers, "body": body})
                reply, close = self.replies.pop(0)
                conn.sendall(reply)
                if close:
                    return

    def close(self) -> None:
        self.sock.close()


def transport_for(port: int, scheme: str = "http", **settings: Any) -> Transport:
    config = kubernetes.client.Configuration(host=f"{scheme}://127.0.0.1:{port}")
    config.api_key = {"BearerToken": "tok"}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    for key, value in settings.items():
        setattr(config, key, value)
    transport = Transport.for_configuration(config)
    assert transport is not None
    return transport


def reply(status: str, body: bytes, *headers: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def make(replies: list[tuple[bytes, bool]]) -> Scripted:
        servers.append(Scripted(replies))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


CHUNKED = b'4\r\n{"b"\r\n5;ext=1\r\n: 2}\n\r\n0\r\nX-Trailer: t\r\n\r\n'  # with an extension, a trailer


def test_every_framing_of_an_answer_is_read_whole_and_the_connection_kept_when_it_can_be(scripted) -> None:
    server = scripted(
        [
            (reply("200 OK", b'{"a": 1}', "Content-Length: 8"), False),
            (
                reply(
                    "200 OK",
                    b'4\r\n{"b"\r\n5;ext=1\r\n: 2}\n\r\n0\r\nX-Trailer: t\r\n\r\n',
                    "Transfer-Encoding: chunked",
                ),
                False,
            ),
            (reply("100 Continue", b"") + reply("201 Created", b"{}", "Content-Length: 2"), False),
            (reply("204 No Content", b""), False),
            (reply("200 OK", b'{"c": 3}', "Content-Length: 8", "Connection: close"), True),
            (reply("200 OK", b'{"d": 4}'), True),  # no length: the body ends with the connection
            (reply("404 Not Found", b'{"code": 404}', "Content-Length: 13"), False),
        ]
    )
    t = transport_for(server.port)
    answers = [t.request("GET", f"/r{i}" + ("?x=1" if i == 0 else "")) for i in range(4)]
    assert [(a.status, a.data) for a in answers] == [
        (200, b'{"a": 1}'),
        (200, b'{"b": 2}\n'),
        (201, b"{}"),
        (204, b""),
    ]
    assert server.connections == 1  # four answers on one keep-alive connection
    assert t.request("GET", "/r4").data == b'{"c": 3}'
    assert t.request("GET", "/r5").data == b'{"d": 4}'
    missing = t.request("GET", "/r6")
    assert (missing.status, json.loads(missing.data)) == (404, {"code": 404})
    assert server.connections == 3  # a new one after each that the server closed
    assert [s["path"] for s in server.seen] == ["/r0?x=1", "/r1", "/r2", "/r3", "/r4", "/r5", "/r6"]


def test_a_request_carries_its_body_type_length_and_a_fresh_token_each_time(scripted) -> None:
    ok = (reply("200 OK", b"{}", "Content-Length: 2"), False)
    server = scripted([ok, ok, ok])
    t = transport_for(server.port)
    tokens = iter(["first", "rotated"])
    # The client's refresh hook (in-cluster token rotation, exec plugins) runs before every request.
    t.configuration.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken=next(tokens))
    t.request("POST", "/api/v1/namespaces/ns/pods", b'{"kind": "Pod"}', "application/json")
    t.request("PATCH", "/x", b"{}", "application/merge-patch+json")
    t.configuration.refresh_api_key_hook = None
    t.configuration.api_key = {}
    t.request("DELETE", "/y")
    first, second, third = server.seen
    assert first["method"] == "POST" and first["body"] == b'{"kind": "Pod"}'
    assert first["headers"]["content-type"] == "application/json"
    assert first["headers"]["content-length"] == "15"
    assert first["headers"]["authorization"] == "Bearer first"
    assert second["headers"]["authorization"] == "Bearer rotated"
    assert second["headers"]["content-type"] == "application/merge-patch+json"
    assert "authorization" not in third["headers"] and "content-type" not in third["headers"]
    assert first["headers"]["host"] == f"127.0.0.1:{server.port}"


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_once_not_resent_twice(
    scripted,
) -> None:
    # The server answers, then drops the connection without saying so (an idle timeout).
    server = scripted(
        [
            (reply("200 OK", b"{}", "Content-Length: 2"), True),
            (reply("201 Created", b"{}", "Content-Length: 2"), False),
        ]
    )
    t = transport_for(server.port)
    assert t.request("GET", "/a").status == 200
    assert server.closed.acquire(timeout=GUARD)  # closed before the next request is sent
    assert t.request("POST", "/b", b"{}").status == 201
    assert [s["path"] for s in server.seen] == ["/a", "/b"]  # /b sent once, on a fresh connection
    assert server.connections == 2


def test_a_request_the_server_may_have_acted_on_is_never_sent_twice_a_read_is_retried_once(scripted) -> None:
    ok = (reply("200 OK", b"{}", "Content-Length: 2"), False)
    gone = (b"", True)  # the server reads the request, then closes without an answer
    server = scripted([ok, gone, ok, gone, ok])
    t = transport_for(server.port)
    t.request("GET", "/a")
    with pytest.raises(ConnectionError):
        t.request("POST", "/b", b"{}")  # written whole on a pooled connection: perhaps created; not resent
    t.request("GET", "/c")
    assert t.request("GET", "/d").status == 200  # a read: once more, on a new connection
    assert [s["path"] for s in server.seen] == ["/a", "/b", "/c", "/d", "/d"]


def test_an_answer_cut_short_or_garbled_is_an_error_not_a_short_document(scripted) -> None:
    server = scripted(
        [
            (reply("200 OK", b'{"a": ', "Content-Length: 50"), True),
            (reply("200 OK", b"3\r\nab", "Transfer-Encoding: chunked"), True),
            (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", True),
            (reply("200 OK", b"{}", "Content-Length: -5"), True),
            (reply("200 OK", b"zz\r\n", "Transfer-Encoding: chunked"), True),
        ]
    )
    t = transport_for(server.port)
    with pytest.raises(ConnectionError, match="ended after 6 of 50 bytes"):
        t.request("GET", "/a")
    with pytest.raises(ConnectionError, match="ended early"):
        t.request("GET", "/b")
    with pytest.raises(ConnectionError, match="not an HTTP answer"):
        t.request("GET", "/c")
    for path in ("/d", "/e"):  # a malformed length is a broken answer (an OSError), never a ValueError
        with pytest.raises(ConnectionError, match="malformed length"):
            t.request("GET", path)


def test_a_server_that_never_answers_times_out(scripted) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        t = transport_for(server.getsockname()[1])
        with pytest.raises(TimeoutError):
            t.request("GET", "/slow", timeout=0.2)
    finally:
        server.close()


# --- TLS, as against a real API server


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *ext, cwd=d)  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
             "-days", "1", "-subj", "/CN=other-ca", cwd=d)  # fmt: skip
    return d


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    connections: set[int] = set()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Echo.connections.add(self.client_address[1])
        # /bye: answer, then drop the connection without saying so (as an idle timeout does)
        self.close_connection = self.path == "/bye"
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        data = json.dumps({"client": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(pki: Path) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.load_verify_locations(pki / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED  # as kube-apiserver with --client-ca-file, for this test
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()


def test_tls_verifies_the_server_against_the_clusters_ca_and_presents_the_client_certificate(
    pki: Path, tls_server: int
) -> None:
    client = {"cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key")}
    t = transport_for(tls_server, "https", ssl_ca_cert=str(pki / "ca.crt"), **client)
    assert json.loads(t.request("GET", "/version").data) == {"client": "client"}
    assert json.loads(t.request("GET", "/version").data) == {"client": "client"}  # the same connection
    # The server drops a pooled TLS connection while it is idle: found closed before the next request.
    Echo.connections.clear()
    assert t.request("GET", "/bye").status == 200
    assert t.request("GET", "/version").status == 200
    assert len(Echo.connections) == 2
    # A server whose certificate the configured CA did not sign is refused.
    wrong = transport_for(tls_server, "https", ssl_ca_cert=str(pki / "other.crt"), **client)
    with pytest.raises(ssl.SSLCertVerificationError):
        wrong.request("GET", "/version")
    # insecure-skip-tls-verify, as the kubeconfig can ask.
    insecure = transport_for(tls_server, "https", verify_ssl=False, **client)
    assert insecure.request("GET", "/version").status == 200
