"""Tests for authenticated API access (issue 4, and v2's issues 11 and 12):
healthcheck, api (local usage errors before anything is sent, -d bytes as
given), the library API, redirects, TLS, proxies, -v, timeouts (a refresh's
answer awaited REFRESH_WAIT once sent), several stored servers, and
STANDCLOUD_TOKEN refusals.

Real sockets throughout: the fake StandCloud from conftest.py (plain HTTP and
HTTPS with the test CA in fixtures/tls/), a second fake server on another
port for cross-origin redirects, and a small CONNECT proxy defined here.
"""

import json
import os
import re
import select
import socket
import ssl
import sys
import threading
import time
from socketserver import BaseRequestHandler, TCPServer, ThreadingMixIn

import pytest

import standcloud_auth as sca
from conftest import MODULE, assert_one_error, entry_for, error_lines, free_port, listing, log_in, run_cli, write_store
from fakeserver import FakeStandCloud, stall, trickle

HERE = os.path.dirname(os.path.abspath(__file__))
TLS = os.path.join(HERE, "fixtures", "tls")
CA_PEM = os.path.join(TLS, "ca.pem")
HEALTH = sca.API_PATH + sca.HEALTHCHECK_PATH
JSON_HEADERS = {"Content-Type": "application/json"}


# ==== helpers ===============================================================


def stored(store_path, base):
    return json.loads(store_path.read_text())["servers"].get(base)


def api_requests(server, path=None):
    return [r for r in server.requests if r["path"].startswith(path or sca.API_PATH)]


def revoke_access(server, token):
    server.access_tokens[token]["active"] = False


def tls_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(TLS, "server.pem"), os.path.join(TLS, "server.key"))
    return context


def port_of(fake):
    return fake.httpd.server_address[1]


@pytest.fixture
def other(clock):
    """A second fake server: another origin (another port)."""
    fake = FakeStandCloud(clock).start()
    yield fake
    fake.stop()


@pytest.fixture
def tls_server(clock):
    """The fake StandCloud over HTTPS, certificate from the test CA."""
    fake = FakeStandCloud(clock).start(ssl_context=tls_context())
    yield fake
    fake.stop()


@pytest.fixture
def live_tls_server():
    fake = FakeStandCloud().start(ssl_context=tls_context())
    yield fake
    fake.stop()


class _ProxyServer(ThreadingMixIn, TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # clients that hang up are normal here
        pass


class ConnectProxy(object):
    """An HTTP proxy that only tunnels (CONNECT), as corporate proxies do for
    https. Records each tunnel's target and the CONNECT request's headers."""

    def __init__(self):
        self.tunnels = []  # "host:port" per CONNECT
        self.connect_headers = []  # lower-case header names per CONNECT
        proxy = self

        class Handler(BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        self.server = _ProxyServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handle(self, client):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            byte = client.recv(1)  # byte by byte: nothing of the tunnel is read here
            if not byte:
                return
            head += byte
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.connect_headers.append([line.split(":", 1)[0].lower() for line in lines[1:] if line])
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        try:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._pump(client, upstream)
        finally:
            upstream.close()

    @staticmethod
    def _pump(client, upstream):
        peers = {client: upstream, upstream: client}
        while True:
            ready, _, _ = select.select(list(peers), [], [], 5)
            if not ready:
                return
            for sock in ready:
                try:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                except OSError:
                    return


@pytest.fixture
def proxy():
    p = ConnectProxy()
    yield p
    p.stop()


# ==== healthcheck ===========================================================


def test_healthcheck_ok_on_stdout_exit_0(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "healthcheck")
    assert result.code == 0, result
    assert result.out == "ok\n"
    assert result.err == ""
    assert [r["path"] for r in server.requests] == [HEALTH]
    assert server.requests[0]["method"] == "GET"


@pytest.mark.parametrize("status, ok, code", [
    (200, True, 0),
    (204, True, 0),
    (404, False, 5),
    (500, False, 5),
])
def test_healthcheck_json(cli, server, store_path, clock, status, ok, code):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, (status, {}, b""))
    result = cli("--url", server.base, "healthcheck", "--json")
    assert result.code == code, result
    assert json.loads(result.out) == {"status": status, "ok": ok}


def test_healthcheck_401_uses_token_another_process_stored(cli, server, store_path, clock):
    old = log_in(server, store_path, clock.now())
    new = {}

    def other_process_refreshed(handler):
        # Between our read of the store and our request, another process
        # refreshed: the server revoked our access token, the store has a new one.
        new.update(server.issue())
        revoke_access(server, old["access_token"])
        write_store(store_path, {server.base: entry_for(new, clock.now())})
        handler.send(401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, b"unauthorized")

    server.script(HEALTH, other_process_refreshed)
    result = cli("--url", server.base, "healthcheck")
    assert result.code == 0, result
    assert result.out == "ok\n"
    assert server.refreshes() == 0
    auths = [r["headers"]["Authorization"] for r in api_requests(server)]
    assert auths == ["Bearer " + old["access_token"], "Bearer " + new["access_token"]]


def test_healthcheck_401_with_same_token_refreshes_once(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    revoke_access(server, tokens["access_token"])  # revoked, though not expired by the clock
    result = cli("--url", server.base, "healthcheck")
    assert result.code == 0, result
    assert server.refreshes() == 1
    assert len(api_requests(server)) == 2
    assert stored(store_path, server.base)["access_token"] != tokens["access_token"]


def test_healthcheck_401_after_the_retry_exit_3(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    unauthorized = (401, {"WWW-Authenticate": "Bearer"}, b"no")
    server.script(HEALTH, unauthorized, unauthorized, unauthorized)
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert result.out == ""
    assert len(api_requests(server)) == 2  # one retry, never more
    assert server.refreshes() == 1


def test_healthcheck_403_exit_3_at_once(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, (403, {}, b"forbidden"))
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert len(api_requests(server)) == 1
    assert server.refreshes() == 0


@pytest.mark.parametrize("status", [400, 404, 429, 500, 502, 503])
def test_healthcheck_other_errors_exit_5(cli, server, store_path, clock, status):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, (status, {"Content-Type": "text/html"}, b"<html>down</html>"))
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 5)
    assert str(status) in result.err
    assert result.out == ""
    assert server.refreshes() == 0


def test_healthcheck_not_logged_in_exit_3(cli, server, store_path):
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert "login" in result.err
    assert server.requests == []


# ==== api: method, data, headers ============================================


@pytest.mark.parametrize("argv, method", [
    ([], "GET"),
    (["-d", "x=1"], "POST"),
    (["-X", "PUT"], "PUT"),
    (["-X", "PUT", "-d", '{"a": 1}'], "PUT"),
    (["-X", "delete"], "DELETE"),
    (["--method=PUT", "--data=x"], "PUT"),
])
def test_api_method(cli, server, store_path, clock, argv, method):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/things", *argv)
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["method"] == method
    assert request["path"] == sca.API_PATH + "/things"


@pytest.mark.parametrize("data, is_json", [
    ('{"serial": "A1", "passed": true}', True),
    ("[1, 2, 3]", True),
    ('"text"', True),
    ("a=1&b=2", False),
    ("not json {", False),
    ("", False),
])
def test_api_data_inline_content_type(cli, server, store_path, clock, data, is_json):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/test_report", "-d", data)
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["method"] == "POST"
    assert request["body"] == data.encode()
    content_type = request["headers"].get("Content-Type", "")
    assert (content_type == "application/json") is is_json, content_type


@pytest.mark.parametrize("content, is_json", [
    (b'{"serial": "A1", "steps": [{"name": "v", "value": 3.3}]}\n', True),
    (b"\x00\x01\x02\xff binary", False),
    ("r\u00e9sum\u00e9 \u2713".encode("utf-8"), False),
])
def test_api_data_from_file(cli, server, store_path, clock, tmp_path, content, is_json):
    log_in(server, store_path, clock.now())
    path = tmp_path / "report.bin"
    path.write_bytes(content)
    result = cli("--url", server.base, "api", "/test_report", "-d", "@" + str(path))
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["body"] == content
    assert (request["headers"].get("Content-Type") == "application/json") is is_json


@pytest.mark.parametrize("content, is_json", [
    (b'{"from": "stdin"}', True),
    (b"plain words", False),
])
def test_api_data_from_stdin(cli, server, store_path, clock, content, is_json):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/test_report", "-d", "@-", stdin=content)
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["method"] == "POST"
    assert request["body"] == content
    assert (request["headers"].get("Content-Type") == "application/json") is is_json


def test_api_data_file_missing_exit_2(cli, server, store_path, clock, tmp_path):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/test_report", "-d", "@" + str(tmp_path / "missing.json"))
    assert_one_error(result, 2)
    assert "missing.json" in result.err
    assert server.requests == []


def test_api_repeated_headers_reach_the_server(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/things", "-H", "X-Station: bench-7",
                 "-H", "X-Trace:abc 123", "--header", "Accept-Language: de")
    assert result.code == 0, result
    headers = api_requests(server)[0]["headers"]
    assert headers["X-Station"] == "bench-7"
    assert headers["X-Trace"] == "abc 123"
    assert headers["Accept-Language"] == "de"


def test_api_content_type_header_wins_over_detection(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/things", "-d", '{"a": 1}', "-H", "Content-Type: text/plain")
    assert result.code == 0, result
    assert api_requests(server)[0]["headers"]["Content-Type"] == "text/plain"


@pytest.mark.parametrize("header", [
    "NoColon",
    ": no name",
    "Bad Name: x",
    "X-Evil: a\r\nX-Injected: b",
])
def test_api_bad_header_exit_2_no_request(cli, server, store_path, clock, header):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/things", "-H", header)
    assert_one_error(result, 2)
    assert server.requests == []


@pytest.mark.parametrize("header", ["Authorization: Bearer forged", "authorization: Basic Zm9vOmJhcg=="])
def test_api_authorization_from_h_is_overridden(cli, server, store_path, clock, header):
    tokens = log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/things", "-H", header)
    assert result.code == 0, result
    headers = api_requests(server)[0]["headers"]
    assert [k for k in headers if k.lower() == "authorization"] == ["Authorization"]
    assert headers["Authorization"] == "Bearer " + tokens["access_token"]


# ==== api: output and exit codes ============================================


@pytest.mark.parametrize("status, body, code", [
    (200, b'{"id": 42}', 0),
    (201, "cr\u00e9\u00e9 \u2713 no newline".encode("utf-8"), 0),
    (204, b"", 0),
    (400, b'{"detail": "bad report"}', 5),
    (403, b'{"detail": "not yours"}', 3),
    (404, b"<html>not found</html>\n", 5),
    (409, b"conflict", 5),
    (500, b"Internal Server Error\n", 5),
])
def test_api_body_on_stdout_as_is(cli, server, store_path, clock, status, body, code):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/test_report", (status, {"Content-Type": "text/plain"}, body))
    result = cli("--url", server.base, "api", "/test_report", "-d", "{}")
    assert result.code == code, result
    assert result.out.encode("utf-8") == body
    if code:
        assert_one_error(result, code)
    else:
        assert result.err == ""


def test_api_401_after_retry_exit_3_body_on_stdout(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", (401, {}, b"first"), (401, {}, b"second"))
    result = cli("--url", server.base, "api", "/x")
    assert_one_error(result, 3)
    assert result.out == "second"
    assert len(api_requests(server)) == 2
    assert server.refreshes() == 1


def test_api_401_retry_resends_the_same_body(cli, server, store_path, clock, tmp_path):
    tokens = log_in(server, store_path, clock.now())
    revoke_access(server, tokens["access_token"])
    report = tmp_path / "report.json"
    report.write_bytes(b'{"serial": "A1", "passed": true}')
    result = cli("--url", server.base, "api", "-X", "PUT", "/test_report", "-d", "@" + str(report),
                 "-H", "X-Station: 7")
    assert result.code == 0, result
    first, second = api_requests(server)
    assert first["method"] == second["method"] == "PUT"
    assert first["body"] == second["body"] == report.read_bytes()
    for name in ("Content-Type", "X-Station"):
        assert first["headers"][name] == second["headers"][name]
    assert first["headers"]["Authorization"] != second["headers"]["Authorization"]
    assert server.refreshes() == 1


def test_api_401_then_refresh_rejected_exit_3_says_login(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    revoke_access(server, tokens["access_token"])
    server.refresh_tokens.pop(tokens["refresh_token"])  # the server forgot the session
    result = cli("--url", server.base, "api", "/x", "-d", "{}")
    assert_one_error(result, 3)
    assert "login" in result.err
    assert len(api_requests(server)) == 1 and server.refreshes() == 1
    assert stored(store_path, server.base) is None  # invalid_grant ends the stored session


def test_api_401_retry_resends_stdin_body(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    revoke_access(server, tokens["access_token"])
    result = cli("--url", server.base, "api", "/test_report", "-d", "@-", stdin=b'{"n": 1}')
    assert result.code == 0, result
    assert [r["body"] for r in api_requests(server)] == [b'{"n": 1}', b'{"n": 1}']


# ==== api: what PATH may be =================================================


def test_api_full_url_on_the_api_origin(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", server.base + sca.API_PATH + "/things?page=2")
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["target"] == sca.API_PATH + "/things?page=2"


@pytest.mark.parametrize("which", ["other port", "other host", "other scheme"])
def test_api_full_url_on_another_origin_exit_2_no_request(cli, server, other, store_path, clock, which):
    log_in(server, store_path, clock.now())
    port = port_of(server)
    url = {
        "other port": other.base + sca.API_PATH + "/things",
        "other host": "http://localhost:%d%s/things" % (port, sca.API_PATH),
        "other scheme": "https://127.0.0.1:%d%s/things" % (port, sca.API_PATH),
    }[which]
    result = cli("--url", server.base, "api", url)
    assert_one_error(result, 2)
    assert server.requests == [] and other.requests == []


@pytest.mark.parametrize("path", ["test_report", "hardpy/api/v1/healthcheck", "", "127.0.0.1/x"])
def test_api_path_without_leading_slash_exit_2(cli, server, store_path, clock, path):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", path)
    assert_one_error(result, 2)
    assert server.requests == []


def test_api_full_url_same_origin_spelled_differently(cli, server, store_path, clock):
    base = "http://localhost:%d" % port_of(server)
    log_in(server, store_path, clock.now(), base=base)
    result = cli("--url", base, "api", "HTTP://LOCALHOST:%d%s/things" % (port_of(server), sca.API_PATH))
    assert result.code == 0, result
    assert [r["path"] for r in api_requests(server)] == [sca.API_PATH + "/things"]


def test_api_static_token_401_is_final(cli, server, store_path, monkeypatch):
    monkeypatch.setenv("STANDCLOUD_TOKEN", "static-api-key")
    result = cli("--url", server.base, "api", "/x")
    assert_one_error(result, 3)
    assert result.out == "unauthorized"
    (request,) = server.requests
    assert request["headers"]["Authorization"] == "Bearer static-api-key"
    assert not store_path.exists() and not store_path.parent.exists()


def refusal_line(result):
    """The error line of a STANDCLOUD_TOKEN refusal (v2, issue 12 point 4):
    it names the variable and does not send the user to `login`, which would
    refuse to run while the variable is set."""
    assert_one_error(result, 3)
    line = error_lines(result.err)[0]
    assert "the token in STANDCLOUD_TOKEN was refused" in line, line
    assert "login" not in line and "run '" not in line, line
    return line


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("argv", [["api", "/x"], ["api", "/x", "-d", "{}"], ["healthcheck"], ["healthcheck", "--json"]])
def test_env_token_refused_says_so_not_run_login(cli, server, store_path, monkeypatch, tmp_path, argv, status):
    monkeypatch.setenv("STANDCLOUD_TOKEN", "static-api-key")
    files = listing(tmp_path)
    for path in (sca.API_PATH + "/x", HEALTH):
        server.script(path, (status, {"WWW-Authenticate": "Bearer"}, b"refused"))
    result = cli("--url", server.base, *argv)
    line = refusal_line(result)
    assert "HTTP %d" % status in line
    assert len(server.requests) == 1 and server.refreshes() == 0
    assert listing(tmp_path) == files


def test_env_token_refused_as_a_subprocess(live_server, tmp_path):
    files = listing(tmp_path)
    result = run_cli("--url", live_server.base, "api", "/x", env={"STANDCLOUD_TOKEN": "static-api-key"})
    line = refusal_line(result)
    assert "HTTP 401" in line and result.out == "unauthorized"
    assert len(live_server.requests) == 1
    assert listing(tmp_path) == files


def test_env_token_unset_401_still_says_run_login(cli, server, store_path, clock):
    # The same 401 with a stored session: the advice is `login` (the other branch).
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", (401, {}, b"no"), (401, {}, b"no"))
    result = cli("--url", server.base, "api", "/x")
    assert_one_error(result, 3)
    line = error_lines(result.err)[0]
    assert "STANDCLOUD_TOKEN" not in line and "run login again: 'standcloud-auth --url %s login'" % server.base in line


# ==== api: local usage errors, nothing sent =================================


USAGE_ERRORS = [
    ("path-with-space", ["/with space"]),
    ("path-non-ascii", ["/r\u00e9sum\u00e9"]),
    ("path-newline", ["/x\nHost: evil"]),
    ("method-non-ascii", ["/x", "-X", "P\u00d6ST"]),
    ("method-non-ascii-uppercasing-to-ascii", ["/x", "-X", "po\u017ft"]),  # "ſ".upper() == "S"
    ("method-with-space", ["/x", "-X", "GET /admin HTTP/1.1"]),
    ("header-value-non-ascii", ["/x", "-H", "X-A: \u00e9"]),
    ("header-name-non-ascii", ["/x", "-H", "X-\u00c9: a"]),
    ("header-value-control", ["/x", "-H", "X-A: a\x01b"]),
    ("url-open-bracket", ["http://[::1/hardpy/api/v1/x"]),
    ("url-two-ports", ["http://127.0.0.1:{port}:1/hardpy/api/v1/x"]),
    ("url-superscript-port", ["http://127.0.0.1:\u00b2/hardpy/api/v1/x"]),
    ("url-ipv4-in-brackets", ["http://[127.0.0.1]:{port}/hardpy/api/v1/x"]),
    ("url-no-host", ["http:///hardpy/api/v1/x"]),
    ("url-same-origin-non-ascii", ["http://127.0.0.1:{port}/hardpy/api/v1/\u00fc"]),
    ("url-same-origin-space", ["http://127.0.0.1:{port}/hardpy/api/v1/a b"]),
]


def usage_argv(argv, server, as_bytes=False):
    """The argv with the server's port; ``as_bytes``: UTF-8 bytes, as a shell
    passes them (Popen would otherwise encode str with the locale's codec,
    which is ASCII under LANG=C on 3.6)."""
    argv = [a.replace("{port}", str(port_of(server))) for a in argv]
    return [a.encode("utf-8") for a in argv] if as_bytes and sys.platform != "win32" else argv


@pytest.mark.parametrize("argv", [u[1] for u in USAGE_ERRORS], ids=[u[0] for u in USAGE_ERRORS])
def test_api_local_usage_error_exit_2_nothing_sent(cli, server, store_path, clock, argv):
    # Issue 11 point 6: exit 2 before anything is sent -- not even the refresh
    # that the expired token would need -- never exit 5 "did not answer with
    # valid HTTP" or 1.
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    result = cli("--url", server.base, "api", *usage_argv(argv, server))
    assert_one_error(result, 2)
    assert result.out == ""
    assert server.requests == []
    assert store_path.read_bytes() == before


# Through the real CLI: one case per kind of argv (each a fresh interpreter).
IN_SUBPROCESS = ["path-with-space", "path-non-ascii", "method-non-ascii", "method-non-ascii-uppercasing-to-ascii",
                 "header-value-non-ascii", "header-name-non-ascii", "url-open-bracket", "url-superscript-port",
                 "url-ipv4-in-brackets", "url-same-origin-non-ascii"]


@pytest.mark.parametrize("argv", [u[1] for u in USAGE_ERRORS if u[0] in IN_SUBPROCESS],
                         ids=[u[0] for u in USAGE_ERRORS if u[0] in IN_SUBPROCESS])
def test_api_local_usage_error_as_a_subprocess(live_server, store_path, argv):
    log_in(live_server, store_path, time.time(), expires_at=time.time() - 10)
    result = run_cli("--url", live_server.base, "api", *usage_argv(argv, live_server, as_bytes=True))
    assert_one_error(result, 2)
    assert live_server.requests == []


def test_api_library_usage_errors_are_config_errors(server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    for method, path, headers in [("GET", "/with space", None), ("P\u00d6ST", "/x", None),
                                  ("GET", "/x", {"X-A": "\u00e9"})]:
        with pytest.raises(sca.ConfigError):
            auth.request(method, path, headers=headers)
    assert server.requests == []


NOT_UTF8 = b"caf\xe9 \xff\xfe\x80 {"  # Latin-1 and stray bytes: not UTF-8, not JSON


@pytest.mark.skipif(sys.platform == "win32", reason="argv is not bytes on Windows")
def test_api_data_not_utf8_sent_as_given_as_a_subprocess(live_server, tmp_path):
    store = tmp_path / "tokens.json"
    log_in(live_server, store, time.time())
    code, out, err = _run_bytes(["--url", live_server.base, "api", "/test_report", b"-d", NOT_UTF8],
                                {"STANDCLOUD_TOKEN_FILE": str(store)})
    assert code == 0, err
    assert b"Traceback" not in err
    (request,) = api_requests(live_server)
    assert request["method"] == "POST"
    assert request["body"] == NOT_UTF8
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert json.loads(out.decode()) == {"ok": True, "method": "POST", "bytes": len(NOT_UTF8)}


def test_api_data_not_utf8_sent_as_given(cli, server, store_path, clock):
    # In-process, argv as Python gives it: the bytes decoded with surrogateescape.
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/test_report", "-d", os.fsdecode(NOT_UTF8))
    assert result.code == 0, result
    (request,) = api_requests(server)
    assert request["body"] == NOT_UTF8


# ==== several stored servers, no URL ========================================


@pytest.mark.parametrize("argv", [["api", "/x"], ["api", "/x", "-d", "{}"], ["healthcheck"], ["healthcheck", "--json"]])
def test_several_servers_and_no_url_exit_2_naming_them(cli, server, other, store_path, clock, tmp_path, argv):
    log_in(server, store_path, clock.now(), others={other.base: entry_for(other.issue(), clock.now())})
    before, files = store_path.read_bytes(), listing(tmp_path)
    result = cli(*argv)
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert server.base in line and other.base in line and "--url" in line, line
    assert result.out == ""
    assert server.requests == [] and other.requests == []
    assert store_path.read_bytes() == before and listing(tmp_path) == files
    result = cli("--url", other.base, *argv)  # --url settles it
    assert result.code == 0, result
    assert len(other.requests) == 1 and server.requests == []


def test_several_servers_and_no_url_as_a_subprocess(live_server, tmp_path):
    store = tmp_path / "tokens.json"
    other = "https://other.standcloud.example"
    log_in(live_server, store, time.time(), others={other: entry_for(
        {"access_token": "other_at", "refresh_token": "other_rt"}, time.time())})
    result = run_cli("healthcheck", env={"STANDCLOUD_TOKEN_FILE": str(store)})
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert live_server.base in line and other in line and "--url" in line, line
    assert live_server.requests == []


def test_api_needs_exactly_one_path(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    assert_one_error(cli("--url", server.base, "api"), 2)
    assert_one_error(cli("--url", server.base, "api", "/a", "/b"), 2)
    assert server.requests == []


def test_api_upload_report_as_a_subprocess(live_server, tmp_path):
    store = tmp_path / "tokens.json"
    log_in(live_server, store, time.time())
    report = b'{"name": "board test", "serial": "SN-0001", "status": "passed"}'
    (tmp_path / "report.json").write_bytes(report)
    result = run_cli("--url", live_server.base, "api", "/test_report", "-d", "@report.json",
                     env={"STANDCLOUD_TOKEN_FILE": str(store)}, cwd=str(tmp_path))
    assert result.code == 0, result
    assert json.loads(result.out) == {"ok": True, "method": "POST", "bytes": len(report)}
    assert result.err == ""
    (request,) = api_requests(live_server)
    assert request["path"] == sca.API_PATH + "/test_report"
    assert request["body"] == report
    assert request["headers"]["Content-Type"] == "application/json"


def test_api_binary_body_on_stdout_as_a_subprocess(live_server, tmp_path):
    store = tmp_path / "tokens.json"
    log_in(live_server, store, time.time())
    body = bytes(range(256))
    live_server.script(sca.API_PATH + "/blob", (500, {"Content-Type": "application/octet-stream"}, body))
    env = {"STANDCLOUD_TOKEN_FILE": str(store)}
    proc_result = _run_bytes(["--url", live_server.base, "api", "/blob"], env)
    code, out, err = proc_result
    assert code == 5
    assert out == body
    assert b"Traceback" not in err


def _run_bytes(argv, env):
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env)
    proc = subprocess.Popen([sys.executable, MODULE] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=full_env)
    out, err = proc.communicate(b"", timeout=30)
    return proc.returncode, out, err


# ==== redirects =============================================================


def test_redirect_device_endpoint_not_followed(cli, server, store_path):
    server.script(sca.DEVICE_PATH, (307, {"Location": "/elsewhere"}, b""))
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 5)
    assert [r["path"] for r in server.requests] == [sca.DEVICE_PATH]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_token_endpoint_not_followed(cli, server, other, store_path, clock, status):
    tokens = log_in(server, store_path, clock.now())
    before = store_path.read_bytes()
    server.script(sca.TOKEN_PATH, (status, {"Location": other.base + sca.TOKEN_PATH}, b""))
    result = cli("--url", server.base, "refresh")
    assert_one_error(result, 5)
    assert other.requests == []  # the refresh token went nowhere else
    assert server.count(sca.TOKEN_PATH) == 1
    assert store_path.read_bytes() == before
    assert tokens["refresh_token"] in before.decode()


@pytest.mark.parametrize("status, method, data", [
    (301, "GET", None),
    (302, "GET", None),
    (307, "GET", None),
    (308, "GET", None),
    (307, "POST", '{"kept": true}'),
    (308, "PUT", '{"kept": true}'),
])
def test_redirect_api_followed_within_the_origin(cli, server, store_path, clock, status, method, data):
    tokens = log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/old", (status, {"Location": sca.API_PATH + "/new"}, b""))
    argv = ["--url", server.base, "api", "-X", method, "/old"] + (["-d", data] if data else [])
    result = cli(*argv)
    assert result.code == 0, result
    old, new = api_requests(server)
    assert (old["path"], new["path"]) == (sca.API_PATH + "/old", sca.API_PATH + "/new")
    assert new["method"] == method
    assert new["headers"]["Authorization"] == "Bearer " + tokens["access_token"]
    if data:
        assert new["body"] == data.encode()
    assert json.loads(result.out)["method"] == method


def test_redirect_api_absolute_location_on_same_origin_followed(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, (302, {"Location": server.base + sca.API_PATH + "/healthcheck2"}, b""))
    result = cli("--url", server.base, "api", "/healthcheck")
    assert result.code == 0, result
    assert [r["path"] for r in api_requests(server)] == [HEALTH, sca.API_PATH + "/healthcheck2"]


@pytest.mark.parametrize("argv", [
    ["api", "/x"],
    ["api", "-X", "POST", "/x", "-d", '{"a": 1}'],
    ["healthcheck"],
])
@pytest.mark.parametrize("status", [302, 307])
def test_redirect_api_to_another_origin_not_followed(cli, server, other, store_path, clock, argv, status):
    log_in(server, store_path, clock.now())
    target = other.base + sca.API_PATH + "/stolen"
    for path in (sca.API_PATH + "/x", HEALTH):
        server.script(path, (status, {"Location": target}, b""))
    result = cli("--url", server.base, *argv)
    assert_one_error(result, 5)
    assert other.requests == []  # no request at all, so no Authorization either
    assert len(api_requests(server)) == 1


@pytest.mark.parametrize("location", [
    "//127.0.0.1:{other}/x",  # scheme-relative
    "http://localhost:{port}/hardpy/api/v1/x2",  # the same socket, another origin
    "https://127.0.0.1:{port}/hardpy/api/v1/x2",  # another scheme
    "http://127.0.0.1:{other}/hardpy/api/v1/x2",
    "http://user@127.0.0.1:{other}/x",
])
def test_redirect_location_spellings_of_another_origin(cli, server, other, store_path, clock, location):
    log_in(server, store_path, clock.now())
    target = location.format(port=port_of(server), other=port_of(other))
    server.script(sca.API_PATH + "/x", (302, {"Location": target}, b""))
    result = cli("--url", server.base, "api", "/x")
    assert_one_error(result, 5)
    assert other.requests == []
    assert len(server.requests) == 1


def test_redirect_loop_within_the_origin_ends_exit_5(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    loop = (302, {"Location": sca.API_PATH + "/x"}, b"")
    server.script(sca.API_PATH + "/x", *([loop] * 50))
    result = cli("--url", server.base, "api", "/x")
    assert_one_error(result, 5)
    assert 2 <= len(server.requests) <= 21


def test_redirect_chain_leaving_the_origin_not_followed(cli, server, other, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/a", (302, {"Location": sca.API_PATH + "/b"}, b""))
    server.script(sca.API_PATH + "/b", (302, {"Location": other.base + "/c"}, b""))
    result = cli("--url", server.base, "api", "/a")
    assert_one_error(result, 5)
    assert other.requests == []
    assert len(api_requests(server)) == 2


def test_redirect_library_to_another_origin_raises(server, other, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", (302, {"Location": other.base + "/x"}, b""))
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    with pytest.raises(sca.ServerError) as info:
        auth.request("GET", "/x")
    assert info.value.exit_code == 5
    assert other.requests == []


# ==== library API ===========================================================


def test_library_all_names_exist():
    for name in sca.__all__:
        assert hasattr(sca, name), name
    for name in ("StandCloudAuth", "StandCloudError", "ConfigError", "AuthError", "LoginRequired",
                 "NetworkError", "ServerError", "main"):
        assert name in sca.__all__


@pytest.mark.parametrize("cls, code", [
    ("StandCloudError", 1),
    ("ConfigError", 2),
    ("AuthError", 3),
    ("LoginRequired", 3),
    ("NetworkError", 4),
    ("ServerError", 5),
])
def test_library_exceptions_and_exit_codes(cls, code):
    exc_type = getattr(sca, cls)
    assert issubclass(exc_type, sca.StandCloudError)
    assert issubclass(exc_type, Exception)
    assert exc_type.exit_code == code
    if cls == "LoginRequired":
        assert issubclass(exc_type, sca.AuthError)


def test_library_error_attributes():
    auth = sca.AuthError("denied", error="access_denied", description="the user said no")
    assert (auth.error, auth.description, auth.exit_code) == ("access_denied", "the user said no", 3)
    server = sca.ServerError("HTTP 500", status=500, body=b"down")
    assert (server.status, server.body, server.exit_code) == (500, b"down", 5)


def test_library_login_flow_and_calls(server, store_path, clock):
    server.approve_after = 1
    auth = sca.StandCloudAuth(server.base, store=str(store_path), ca_file=None, insecure=False, timeout=5)
    flow = auth.start_login()
    assert flow.verification_uri.startswith("http://127.0.0.1:")
    assert flow.verification_uri_complete == flow.verification_uri + "?user_code=" + flow.user_code
    assert flow.expires_in == server.expires_in - 1
    assert flow.interval == server.interval
    auth.wait_for_login(flow)
    entry = stored(store_path, server.base)
    assert entry and entry["refresh_token"]

    token = auth.access_token()
    assert isinstance(token, str) and token == entry["access_token"]

    resp = auth.request("POST", "/test_report", json={"serial": "A1", "passed": True})
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert isinstance(resp.body, bytes)
    assert resp.json() == {"ok": True, "method": "POST", "bytes": len(api_requests(server)[-1]["body"])}
    request = api_requests(server)[-1]
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"serial": "A1", "passed": True}
    assert request["headers"]["Authorization"] == "Bearer " + token

    assert auth.healthcheck() is True
    auth.logout()
    assert stored(store_path, server.base) is None
    assert server.count(sca.REVOCATION_PATH) >= 1
    assert not server.token_ok(token)
    with pytest.raises(sca.LoginRequired) as info:
        auth.access_token()
    assert info.value.exit_code == 3


def test_library_request_data_and_headers(server, store_path, clock):
    log_in(server, store_path, clock.now())
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    resp = auth.request("PUT", "/blob", data=b"\x00raw", headers={"X-Station": "7", "Content-Type": "text/csv"})
    assert resp.status == 200
    request = api_requests(server)[-1]
    assert (request["method"], request["body"]) == ("PUT", b"\x00raw")
    assert request["headers"]["X-Station"] == "7"
    assert request["headers"]["Content-Type"] == "text/csv"


def test_library_request_returns_error_statuses(server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", (500, {}, b"not json"))
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    resp = auth.request("GET", "/x")
    assert (resp.status, resp.body) == (500, b"not json")
    with pytest.raises(sca.ServerError) as info:
        resp.json()
    assert info.value.exit_code == 5


@pytest.mark.parametrize("expires_in, life, min_valid, refreshes", [
    (3600, 3600, None, 0),
    (30, 3600, None, 1),  # default: 60 s before the expiry
    (30, None, None, 1),  # no updated_at stored: the same
    (31, 60, None, 0),  # a 60 s token: half its life (v2, issue 11 point 9)
    (29, 60, None, 1),
    (30, 3600, 10, 0),
    (50, 60, 55, 1),  # an explicit min_valid is exact
    (20, 60, 10, 0),
    (300, 3600, 600, 1),
])
def test_library_access_token_min_valid(server, store_path, clock, expires_in, life, min_valid, refreshes):
    expires_at = clock.now() + expires_in
    tokens = log_in(server, store_path, clock.now(), expires_at=expires_at,
                    updated_at=None if life is None else expires_at - life)
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    token = auth.access_token() if min_valid is None else auth.access_token(min_valid=min_valid)
    assert server.refreshes() == refreshes
    assert (token == tokens["access_token"]) is (refreshes == 0)
    fresh = sca.Tokens.from_entry(stored(store_path, server.base)).fresh(min_valid)
    assert fresh  # what access_token() returned is good by the same rule


def test_library_healthcheck_auth_errors(server, store_path, clock):
    log_in(server, store_path, clock.now())
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    server.script(HEALTH, (403, {}, b""))
    with pytest.raises(sca.AuthError):
        auth.healthcheck()
    server.script(HEALTH, (401, {}, b""), (401, {}, b""))
    with pytest.raises(sca.AuthError):
        auth.healthcheck()


def test_library_errors_have_the_contract_types(server, store_path, clock):
    with pytest.raises(sca.ConfigError) as config:
        sca.StandCloudAuth("ftp://example.com", store=str(store_path))
    assert config.value.exit_code == 2
    refused = sca.StandCloudAuth("http://127.0.0.1:%d" % free_port(), store=str(store_path))
    with pytest.raises(sca.NetworkError) as network:
        refused.start_login()
    assert network.value.exit_code == 4
    server.script(sca.TOKEN_PATH, (403, JSON_HEADERS, b'{"error": "access_denied", "error_description": "no"}'))
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    with pytest.raises(sca.AuthError) as denied:
        auth.wait_for_login(auth.start_login())
    assert (denied.value.error, denied.value.description, denied.value.exit_code) == ("access_denied", "no", 3)


def test_library_main_returns_the_exit_code(server, store_path, capsys):
    assert sca.main(["--version"]) == 0
    assert sca.main(["no-such-command"]) == 2
    assert sca.main(["--url", server.base, "token"]) == 3
    capsys.readouterr()


def test_library_reprs_never_show_secrets(server, store_path, clock):
    server.approve_after = 1
    auth = sca.StandCloudAuth(server.base, store=str(store_path))
    flow = auth.start_login()
    tokens = auth.wait_for_login(flow)
    resp = auth.request("GET", "/things")
    secrets = [flow.device_code, tokens.access_token, tokens.refresh_token]
    assert all(secrets)
    for obj in (auth, flow, tokens, resp):
        text = repr(obj) + str(obj)
        for secret in secrets:
            assert secret not in text, (type(obj).__name__, text)


# ==== TLS ===================================================================


def test_tls_fails_without_ca_file_exit_4_names_ca_file(cli, tls_server, store_path, clock):
    log_in(tls_server, store_path, clock.now())
    result = cli("--url", tls_server.base, "healthcheck")
    assert_one_error(result, 4)
    assert "--ca-file" in result.err
    assert tls_server.requests == []


@pytest.mark.parametrize("how", ["flag", "env", "flag after command", "library"])
def test_tls_passes_with_ca_file(cli, tls_server, store_path, clock, monkeypatch, how):
    log_in(tls_server, store_path, clock.now())
    if how == "library":
        auth = sca.StandCloudAuth(tls_server.base, store=str(store_path), ca_file=CA_PEM)
        assert auth.healthcheck() is True
        return
    if how == "env":
        monkeypatch.setenv("STANDCLOUD_CA_FILE", CA_PEM)
        result = cli("--url", tls_server.base, "healthcheck")
    elif how == "flag":
        result = cli("--url", tls_server.base, "--ca-file", CA_PEM, "healthcheck")
    else:
        result = cli("--url", tls_server.base, "healthcheck", "--ca-file", CA_PEM)
    assert result.code == 0, result
    assert result.out == "ok\n"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_host_names_in_the_certificate(cli, tls_server, store_path, clock, host):
    base = "https://%s:%d" % (host, port_of(tls_server))
    log_in(tls_server, store_path, clock.now(), base=base)
    result = cli("--url", base, "--ca-file", CA_PEM, "api", "/things")
    assert result.code == 0, result


@pytest.mark.parametrize("how", ["flag", "env", "library"])
def test_tls_insecure_passes_with_a_warning(cli, tls_server, store_path, clock, monkeypatch, how):
    log_in(tls_server, store_path, clock.now())
    if how == "library":
        auth = sca.StandCloudAuth(tls_server.base, store=str(store_path), insecure=True)
        assert auth.healthcheck() is True
        return
    if how == "env":
        monkeypatch.setenv("STANDCLOUD_INSECURE", "1")
        result = cli("--url", tls_server.base, "healthcheck")
    else:
        result = cli("--url", tls_server.base, "--insecure", "healthcheck")
    assert result.code == 0, result
    assert result.out == "ok\n"
    warnings = [line for line in result.err.splitlines() if line.startswith("standcloud-auth: warning:")]
    assert len(warnings) == 1, result.err


def test_tls_insecure_warns_even_with_quiet_absent_on_every_run(cli, tls_server, store_path, clock):
    log_in(tls_server, store_path, clock.now())
    for argv in (["token"], ["status"], ["healthcheck"]):
        result = cli("--url", tls_server.base, "--insecure", *argv)
        assert result.code == 0, result
        assert "standcloud-auth: warning:" in result.err, argv


@pytest.mark.parametrize("kind", ["missing", "not pem", "a directory", "empty"])
def test_tls_unusable_ca_file_exit_2(cli, tls_server, store_path, clock, tmp_path, kind):
    log_in(tls_server, store_path, clock.now())
    path = tmp_path / "ca.pem"
    if kind == "not pem":
        path.write_text("this is not a certificate\n")
    elif kind == "a directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    result = cli("--url", tls_server.base, "--ca-file", str(path), "healthcheck")
    assert_one_error(result, 2)
    assert tls_server.requests == []


def test_tls_wrong_ca_file_is_a_tls_failure_exit_4(cli, tls_server, store_path, clock, tmp_path):
    # A readable CA file that did not sign the server's certificate.
    log_in(tls_server, store_path, clock.now())
    result = cli("--url", tls_server.base, "--ca-file", os.path.join(TLS, "server.pem"), "healthcheck")
    if result.code != 0:  # OpenSSL may accept a self-listed leaf with PARTIAL_CHAIN
        assert_one_error(result, 4)


def test_tls_ssl_cert_file_keeps_working_as_a_subprocess(live_tls_server, tmp_path):
    store = tmp_path / "tokens.json"
    log_in(live_tls_server, store, time.time())
    env = {"STANDCLOUD_TOKEN_FILE": str(store)}
    without = run_cli("--url", live_tls_server.base, "healthcheck", env=env)
    assert without.code == 4, without
    env["SSL_CERT_FILE"] = CA_PEM
    result = run_cli("--url", live_tls_server.base, "healthcheck", env=env)
    assert result.code == 0, result
    assert result.out == "ok\n"


# ==== proxies ===============================================================


@pytest.mark.parametrize("env, tunnelled", [
    ({"HTTPS_PROXY": "{proxy}"}, True),
    ({"https_proxy": "{proxy}"}, True),
    ({"HTTPS_PROXY": "{proxy}", "NO_PROXY": "localhost"}, False),
    ({"https_proxy": "{proxy}", "no_proxy": "example.com,localhost"}, False),
    ({"HTTP_PROXY": "{proxy}"}, False),  # an https URL uses HTTPS_PROXY only
])
def test_proxy_https_connect_tunnel(cli, tls_server, proxy, store_path, clock, monkeypatch, env, tunnelled):
    base = "https://localhost:%d" % port_of(tls_server)
    tokens = log_in(tls_server, store_path, clock.now(), base=base)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(proxy=proxy.url))
    result = cli("--url", base, "--ca-file", CA_PEM, "api", "/things", "-d", '{"a": 1}')
    assert result.code == 0, result
    assert json.loads(result.out)["method"] == "POST"
    if tunnelled:
        assert proxy.tunnels == ["localhost:%d" % port_of(tls_server)]
        # The bearer token travels inside the tunnel, never in the CONNECT.
        assert "authorization" not in proxy.connect_headers[0]
    else:
        assert proxy.tunnels == []
    (request,) = api_requests(tls_server)
    assert request["headers"]["Authorization"] == "Bearer " + tokens["access_token"]


def test_proxy_refresh_goes_through_the_tunnel_too(cli, tls_server, proxy, store_path, clock, monkeypatch):
    base = "https://localhost:%d" % port_of(tls_server)
    log_in(tls_server, store_path, clock.now(), base=base, expires_at=clock.now() - 1)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    result = cli("--url", base, "--ca-file", CA_PEM, "healthcheck")
    assert result.code == 0, result
    assert tls_server.refreshes() == 1
    assert len(proxy.tunnels) == 2  # the refresh, then the healthcheck


def test_proxy_as_a_subprocess(live_tls_server, proxy, tmp_path):
    base = "https://localhost:%d" % port_of(live_tls_server)
    store = tmp_path / "tokens.json"
    log_in(live_tls_server, store, time.time(), base=base)
    env = {"STANDCLOUD_TOKEN_FILE": str(store), "STANDCLOUD_CA_FILE": CA_PEM, "HTTPS_PROXY": proxy.url}
    result = run_cli("--url", base, "api", "/things", env=env)
    assert result.code == 0, result
    assert len(proxy.tunnels) == 1
    env["NO_PROXY"] = "localhost"
    result = run_cli("--url", base, "api", "/things", env=env)
    assert result.code == 0, result
    assert len(proxy.tunnels) == 1
    assert len(api_requests(live_tls_server)) == 2


def test_proxy_credentials_go_only_to_the_proxy(cli, tls_server, proxy, store_path, clock, monkeypatch):
    base = "https://localhost:%d" % port_of(tls_server)
    log_in(tls_server, store_path, clock.now(), base=base)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://station:s3cret@"))
    result = cli("--url", base, "--ca-file", CA_PEM, "healthcheck")
    assert result.code == 0, result
    assert len(proxy.tunnels) == 1
    assert "proxy-authorization" in proxy.connect_headers[0]
    assert not [name for name in api_requests(tls_server)[0]["headers"] if name.lower().startswith("proxy-")]


def test_proxy_that_never_answers_exit_4_within_timeout(cli, tls_server, store_path, clock, monkeypatch):
    base = "https://localhost:%d" % port_of(tls_server)
    log_in(tls_server, store_path, clock.now(), base=base)
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # connections complete in the backlog; nobody answers
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:%d" % silent.getsockname()[1])
        started = time.monotonic()
        result = cli("--url", base, "--ca-file", CA_PEM, "--timeout", "0.2", "healthcheck")
    finally:
        silent.close()
    assert_one_error(result, 4)
    assert time.monotonic() - started < 0.9
    assert tls_server.requests == []


def test_proxy_unreachable_is_a_network_error(cli, tls_server, store_path, clock, monkeypatch):
    base = "https://localhost:%d" % port_of(tls_server)
    log_in(tls_server, store_path, clock.now(), base=base)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:%d" % free_port())
    result = cli("--url", base, "--ca-file", CA_PEM, "healthcheck")
    assert_one_error(result, 4)


# ==== -v ====================================================================


REQUEST_LINE = re.compile(r"^standcloud-auth: (GET|POST|PUT|DELETE) (https?://\S+) (\d{3}) (\d+) ms$")


def test_verbose_never_prints_a_secret(cli, server, store_path, clock, tmp_path):
    server.interval, server.approve_after = 1, 1
    report = tmp_path / "report.json"
    report.write_text('{"serial": "A1"}')
    runs = []

    def run(*argv, **kwargs):
        result = cli("-v", "--url", server.base, *argv, **kwargs)
        runs.append((argv, result))
        return result

    assert run("login", "--no-qr").code == 0
    assert run("login", "--no-qr", "--force", "--json").code == 0
    assert run("token").code == 0
    assert run("token", "--json").code == 0
    assert run("refresh").code == 0
    assert run("status").code == 0
    assert run("status", "--json").code == 0
    assert run("healthcheck").code == 0
    assert run("healthcheck", "--json").code == 0
    assert run("api", "/test_report", "-d", "@" + str(report)).code == 0
    assert run("api", "/test_report", "-d", "@-", stdin=b'{"a": 1}').code == 0
    revoke_access(server, stored(store_path, server.base)["access_token"])
    assert run("api", "/things").code == 0  # a 401, a refresh, a retry
    server.script(sca.TOKEN_PATH, (400, JSON_HEADERS, b'{"error": "invalid_request"}'))
    assert run("refresh").code == 3  # an error path
    assert run("logout").code == 0
    assert run("logout").code == 0
    assert run("token").code == 3

    secrets = list(server.access_tokens) + list(server.refresh_tokens) + list(server.devices)
    assert len(server.devices) == 2 and len(server.refresh_tokens) >= 4
    for argv, result in runs:
        shown = result.err if argv[0] == "token" else result.out + result.err
        for secret in secrets:
            assert secret not in shown, (argv, secret)
        assert "Authorization" not in shown and "Bearer " not in shown, argv
    assert sum(1 for _, r in runs for line in r.err.splitlines() if REQUEST_LINE.match(line)) == len(server.requests)


def test_verbose_one_line_per_request(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    revoke_access(server, tokens["access_token"])
    result = cli("--url", server.base, "-v", "healthcheck")
    assert result.code == 0, result
    lines = [REQUEST_LINE.match(line) for line in result.err.splitlines()]
    assert all(lines), result.err
    assert [(m.group(1), m.group(2), m.group(3)) for m in lines] == [
        ("GET", server.base + HEALTH, "401"),
        ("POST", server.base + sca.TOKEN_PATH, "200"),
        ("GET", server.base + HEALTH, "200"),
    ]
    assert len(lines) == len(server.requests)


def test_verbose_api_status_on_stderr_body_on_stdout(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", (418, {}, b"teapot"))
    result = cli("--url", server.base, "api", "/x", "-v")
    assert result.code == 5
    assert result.out == "teapot"
    assert any(REQUEST_LINE.match(line) and " 418 " in line for line in result.err.splitlines()), result.err


def test_verbose_off_by_default(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "api", "/x")
    assert result.code == 0 and result.err == ""


# ==== timeouts ==============================================================


@pytest.mark.parametrize("command, answer", [
    (["healthcheck"], stall(1.5)),
    (["api", "/x"], stall(1.5, partial=b'{"partial": ')),
    (["api", "/x", "-d", "{}"], trickle(40, 0.1)),
    (["healthcheck"], trickle(40, 0.1)),
], ids=["healthcheck stall before headers", "api stall mid body", "api trickle", "healthcheck trickle"])
def test_timeout_bounds_the_whole_request_exit_4(cli, server, store_path, clock, command, answer):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, answer)
    server.script(sca.API_PATH + "/x", answer)
    started = time.monotonic()
    result = cli("--url", server.base, "--timeout", "0.2", *command)
    elapsed = time.monotonic() - started
    assert_one_error(result, 4)
    assert "timed out" in result.err
    assert 0.15 <= elapsed < 0.9, elapsed


def test_timeout_from_the_environment(cli, server, store_path, clock, monkeypatch):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, trickle(40, 0.1))
    monkeypatch.setenv("STANDCLOUD_TIMEOUT", "0.2")
    started = time.monotonic()
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 4)
    assert time.monotonic() - started < 0.9


def test_timeout_during_refresh_keeps_the_store(cli, server, store_path, clock, monkeypatch):
    # v2: the refresh's answer is awaited max(REFRESH_WAIT, --timeout) once
    # sent (patched here to 0.3 s; 30 s as shipped); lost, it says so.
    monkeypatch.setattr(sca, "REFRESH_WAIT", 0.3)
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)
    before = store_path.read_bytes()
    server.script(sca.TOKEN_PATH, trickle(40, 0.1))
    started = time.monotonic()
    result = cli("--url", server.base, "--timeout", "0.2", "healthcheck")
    assert_one_error(result, 4)
    assert 0.25 <= time.monotonic() - started < 0.9
    line = error_lines(result.err)[0]
    assert "the answer to the refresh sent to %s%s was lost" % (server.base, sca.TOKEN_PATH) in line, line
    assert "may already have rotated the session" in line, line
    assert store_path.read_bytes() == before
    assert api_requests(server) == []  # no healthcheck without a token


def test_timeout_refresh_answer_after_timeout_is_used(server, store_path, clock, monkeypatch):
    # The library: a refresh answer slower than timeout= but within REFRESH_WAIT
    # is used, and the API call that needed it goes on (bounded by timeout= again).
    monkeypatch.setattr(sca, "REFRESH_WAIT", 3.0)
    old = log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)
    server.refresh_delay = 0.3
    auth = sca.StandCloudAuth(server.base, store=str(store_path), timeout=0.1)
    assert auth.healthcheck() is True
    new = stored(store_path, server.base)
    assert new["refresh_token"] != old["refresh_token"] and server.refresh_tokens[new["refresh_token"]]["active"]
    assert api_requests(server)[0]["headers"]["Authorization"] == "Bearer " + new["access_token"]
    server.script(HEALTH, trickle(40, 0.1))
    with pytest.raises(sca.NetworkError):  # not a refresh: --timeout bounds it
        auth.healthcheck()


def test_timeout_refresh_answer_after_timeout_is_used_as_a_subprocess(live_server, tmp_path):
    # REFRESH_WAIT as shipped (30 s): the server holds the refresh 1 s, longer
    # than --timeout 0.3; the answer is used, then the healthcheck runs.
    store = tmp_path / "tokens.json"
    old = log_in(live_server, store, time.time(), expires_at=time.time() - 1)
    live_server.refresh_delay = 1.0
    started = time.monotonic()
    result = run_cli("--url", live_server.base, "--timeout", "0.3", "healthcheck",
                     env={"STANDCLOUD_TOKEN_FILE": str(store)})
    assert time.monotonic() - started >= 1.0
    assert result.code == 0 and result.out == "ok\n", result
    new = stored(store, live_server.base)
    assert new["refresh_token"] != old["refresh_token"] and live_server.refresh_tokens[new["refresh_token"]]["active"]
    assert live_server.refreshes() == 1
    assert api_requests(live_server)[0]["headers"]["Authorization"] == "Bearer " + new["access_token"]


def test_timeout_library(server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/x", trickle(40, 0.1))
    auth = sca.StandCloudAuth(server.base, store=str(store_path), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(sca.NetworkError) as info:
        auth.request("GET", "/x")
    assert info.value.exit_code == 4
    assert time.monotonic() - started < 0.9
