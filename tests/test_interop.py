"""End-to-end tests: the real CLI against a real authorization server.

The server is interop/server.js: oidc-provider (a certified OpenID Connect
implementation, pinned in interop/package-lock.json) laid out like StandCloud,
with the StandCloud API routes beside it. Each test runs
``python standcloud_auth.py --url B --store S <command>`` as a subprocess and
plays the person's side of the device flow with interop/approve.py. One
server runs with the switches that give the running Authelia 4.39.20's
answers (a Deny is a 500 server_error; refused device authorizations have the
body {}); the last section checks that the Python fake (tests/fakeserver.py)
gives the same answers, and that it runs by hand as its banner says.

Needs Node.js and ``npm ci --prefix interop``; without them the tests are
skipped (the fake's tests still run), or fail when
STANDCLOUD_INTEROP_REQUIRED=1 (CI).
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

try:  # Python 3
    from queue import Empty, Queue
    from urllib.error import HTTPError
    from urllib.parse import urlencode
    from urllib.request import Request, urlopen
except ImportError:  # pragma: no cover
    raise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEROP = os.path.join(ROOT, "interop")
CLI = os.path.join(ROOT, "standcloud_auth.py")
sys.path.insert(0, INTEROP)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import approve as approve_mod  # noqa: E402  (interop/approve.py)
import fakeserver  # noqa: E402  (tests/fakeserver.py, beside this file)

CLIENT_ID = "hardpy-report-uploader"
REQUIRED = os.environ.get("STANDCLOUD_INTEROP_REQUIRED", "").strip() == "1"
CLI_TIMEOUT = 30  # seconds any one CLI run may take
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPE = "offline_access authelia.bearer.authz"
# What Authelia 4.39.20 answers a poll of a denied, redeemed or unknown device code.
MISCONFIGURED = {"error": "server_error", "error_description": fakeserver.MISCONFIGURED}


def _unavailable(reason):
    if REQUIRED:
        pytest.fail("interop: %s (STANDCLOUD_INTEROP_REQUIRED=1)" % reason, pytrace=False)
    pytest.skip("interop: %s" % reason)


# ==== the server =============================================================


class Server(object):
    """interop/server.js on a free loopback port, stopped by stop()."""

    def __init__(self, tmpdir, **env):
        node = shutil.which("node")
        if node is None:
            _unavailable("node (Node.js) is not on PATH; install Node.js 20.18 or newer")
        if not os.path.isdir(os.path.join(INTEROP, "node_modules", "oidc-provider")):
            _unavailable("interop/node_modules is missing; run: npm ci --prefix interop")
        full_env = dict(os.environ)
        full_env.update(POLL_INTERVAL="1", INTEROP_STATS="1", INTEROP_LOG="1")
        full_env.update(dict((k, str(v)) for k, v in env.items()))
        self.log_path = os.path.join(str(tmpdir), "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [node, os.path.join(INTEROP, "server.js"), "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            env=full_env, cwd=ROOT,
        )
        lines = Queue()
        reader = threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        try:
            first = lines.get(timeout=20).decode("utf-8", "replace").strip()
        except Empty:
            first = ""
        if not first.startswith("READY http://"):
            self.stop()
            pytest.fail("interop/server.js did not start (first line %r); its log:\n%s"
                        % (first, self.log()), pytrace=False)
        self.base = first.split()[1]
        self.api = self.base + "/hardpy/api/v1"
        self.token_url = self.base + "/auth/api/oidc/token"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()

    def log(self, tail=60):
        with open(self.log_path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-tail:])

    def stats(self):
        with urlopen(self.base + "/__stats", timeout=5) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def api_status(self, access_token, path="/healthcheck"):
        """The API's HTTP status for a request with this bearer token."""
        req = Request(self.api + path, headers={"Authorization": "Bearer " + access_token})
        try:
            with urlopen(req, timeout=5) as resp:
                return resp.status
        except HTTPError as e:
            if e.code == 401:
                assert 'error="invalid_token"' in e.headers.get("WWW-Authenticate", "")
            e.close()
            return e.code

    def token_endpoint(self, **fields):
        """POST to the token endpoint directly: (status, JSON body)."""
        fields.setdefault("client_id", CLIENT_ID)
        req = Request(self.token_url, data=urlencode(fields).encode("ascii"),
                      headers={"Accept": "application/json"})
        try:
            with urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read().decode("utf-8"))
        except HTTPError as e:
            body = e.read().decode("utf-8")
            e.close()
            return e.code, json.loads(body) if body else None


def _server(tmp_path_factory, name, **env):
    server = Server(tmp_path_factory.mktemp(name), **env)
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Like StandCloud: access tokens live an hour; access_denied is oidc-provider's 400."""
    s = _server(tmp_path_factory, "server")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_server(tmp_path_factory):
    """Access tokens live 2 s, device codes 3 s, and access_denied is a 403 as at Authelia."""
    s = _server(tmp_path_factory, "short", ACCESS_TOKEN_TTL=2, DEVICE_CODE_TTL=3,
                ACCESS_DENIED_STATUS=403)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def authelia_server(tmp_path_factory):
    """The running Authelia 4.39.20's answers: a Deny, a redeemed or an unknown
    device code get 500 server_error on every poll; a refused device
    authorization has the body {}."""
    s = _server(tmp_path_factory, "authelia", DENY_AS_SERVER_ERROR=1, EMPTY_DEVICE_AUTH_ERRORS=1)
    yield s
    s.stop()


# ==== the CLI ================================================================


def _env():
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("STANDCLOUD_"))
    env.pop("PYTHONWARNINGS", None)
    return env


class Run(object):
    def __init__(self, args, returncode, stdout, stderr):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr

    def __repr__(self):
        return "<exit %s of %s\n--- stdout:\n%s--- stderr:\n%s>" % (
            self.returncode, " ".join(self.args[2:]), self.stdout, self.stderr)


def cli_args(server, store, *args, **kwargs):
    url = kwargs.get("url") or server.base
    return [sys.executable, CLI, "--url", url, "--store", str(store)] + list(args)


def cli(server, store, *args, **kwargs):
    argv = cli_args(server, store, *args, url=kwargs.get("url"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), universal_newlines=True,
                            cwd=kwargs.get("cwd"))
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("hung: %r" % Run(argv, None, out, err))
    return Run(argv, proc.returncode, out, err)


class Login(object):
    """The outcome of one `login --no-qr --json`: exit code, events, stderr."""

    def __init__(self, run, events, authorize, seconds, timed_out=False):
        self.run, self.events, self.authorize, self.seconds = run, events, authorize, seconds
        self.returncode = run.returncode
        self.timed_out = timed_out  # killed: still running after `wait` seconds

    def __repr__(self):
        return repr(self.run)


def login(server, store, decision="approve", *extra, **options):
    """Run login; act as the person (approve, deny, or nobody) once it shows the code.

    ``after_decision()`` is called once the person has decided; ``wait`` is
    how many seconds the login may run on after that (default CLI_TIMEOUT)."""
    after_decision = options.get("after_decision")
    wait = options.get("wait", CLI_TIMEOUT)
    timed_out = False
    argv = cli_args(server, store, "login", "--no-qr", "--json", *extra)
    started = time.time()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), universal_newlines=True)
    lines = Queue()

    def read_stdout():
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
        lines.put(None)

    err_chunks = []
    threads = [threading.Thread(target=read_stdout),
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))]
    for t in threads:
        t.daemon = True
        t.start()
    out_lines = []
    authorize = None
    try:
        first = lines.get(timeout=CLI_TIMEOUT)
        if first is not None:
            out_lines.append(first)
            try:
                authorize = json.loads(first)
            except ValueError:
                authorize = None
        if isinstance(authorize, dict) and authorize.get("event") == "authorize" \
                and decision != "nobody":
            approve_mod.approve(authorize["verification_uri_complete"], authorize["user_code"],
                                deny=(decision == "deny"))
            if after_decision is not None:
                after_decision()
        proc.wait(timeout=wait)
    except (Empty, subprocess.TimeoutExpired):
        timed_out = True
        proc.kill()
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.wait()
        for t in threads:
            t.join(5)
        proc.stdout.close()
        proc.stderr.close()
    while True:
        try:
            line = lines.get_nowait()
        except Empty:
            break
        if line is not None:
            out_lines.append(line)
    run = Run(argv, proc.returncode, "".join(out_lines), "".join(err_chunks))
    events = []
    for line in out_lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail("login --json printed a line that is not JSON: %r\n%r" % (line, run))
    return Login(run, events, authorize, time.time() - started, timed_out)


def read_store(store):
    with open(str(store), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def entry(store, server):
    return read_store(store)["servers"].get(server.base)


def write_store(store, data):
    # Rewrite in place: the file keeps its 0600 mode.
    with open(str(store), "r+b") as f:
        f.truncate(0)
        f.write(json.dumps(data).encode("utf-8"))


def logged_in(server, tmp_path):
    store = tmp_path / "tokens.json"
    result = login(server, store)
    assert result.returncode == 0, result
    return store


# ==== the server alone (no CLI): is the setup sound? ==========================


def _form_post(url, fields):
    req = Request(url, data=urlencode(fields).encode("ascii"), headers={"Accept": "application/json"})
    try:
        with urlopen(req, timeout=5) as resp:
            body = resp.read().decode("utf-8")
            return resp.status, json.loads(body) if body else None
    except HTTPError as e:
        body = e.read().decode("utf-8")
        e.close()
        return e.code, json.loads(body) if body else None


def test_server_device_flow_by_hand(server):
    """Device flow, refresh, reuse detection and revocation, straight over HTTP."""
    status, flow = _form_post(server.base + "/auth/api/oidc/device-authorization", {
        "client_id": CLIENT_ID, "scope": "offline_access authelia.bearer.authz",
        "audience": server.api})
    assert status == 200 and flow["interval"] == 1, flow
    grant = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
             "device_code": flow["device_code"]}
    assert server.token_endpoint(**grant) == (400, {
        "error": "authorization_pending",
        "error_description": "authorization request is still pending as the end-user "
                             "hasn't yet completed the user interaction steps"})
    assert approve_mod.approve(flow["verification_uri_complete"], flow["user_code"]) == "done"
    time.sleep(1.05)
    status, tokens = server.token_endpoint(**grant)
    assert status == 200 and tokens["refresh_token"], tokens
    assert server.api_status(tokens["access_token"]) == 200
    status, rotated = server.token_endpoint(grant_type="refresh_token",
                                            refresh_token=tokens["refresh_token"])
    assert status == 200 and rotated["refresh_token"] != tokens["refresh_token"], rotated
    assert server.api_status(tokens["access_token"]) == 401  # revoked by the refresh
    assert server.api_status(rotated["access_token"]) == 200
    status, body = _form_post(server.base + "/auth/api/oidc/revocation", {
        "client_id": CLIENT_ID, "token": rotated["refresh_token"],
        "token_type_hint": "refresh_token"})
    assert status == 200, body
    assert server.api_status(rotated["access_token"]) == 401  # the whole grant


# ==== tests: login ===========================================================


@pytest.fixture(scope="module")
def session(server, tmp_path_factory):
    """One approved login shared by the read-only tests below."""
    store = tmp_path_factory.mktemp("session") / "tokens.json"
    before = server.stats()
    result = login(server, store)
    return store, result, before, server.stats()


def test_login_approved(server, session):
    store, result, before, after = session
    assert result.returncode == 0, result
    a = result.authorize
    assert isinstance(a, dict) and a.get("event") == "authorize", result
    assert a["verification_uri_complete"].startswith(server.base + "/auth/"), a
    assert a["user_code"] in a["verification_uri_complete"], a
    assert a["verification_uri"] == a["verification_uri_complete"].split("?")[0], a
    assert a["interval"] == 1, a
    assert 0 < a["expires_in"] <= 600, a
    last = result.events[-1]
    assert last["event"] == "logged_in", result
    assert last["url"] == server.base, result
    assert last["expires_at"] > time.time() + 3000, result
    # the token endpoint's slow_down (Authelia's rule) never fired: polls respect interval
    assert after["slow_down"] == before["slow_down"], (after, result)
    # the healthcheck after login reached the API with the new token
    assert after["api_ok"] > before["api_ok"], after
    e = entry(store, server)
    assert e["access_token"] and e["refresh_token"], e
    assert e["token_type"].lower() == "bearer", e
    assert server.api_status(e["access_token"]) == 200
    if os.name == "posix":
        assert os.stat(str(store)).st_mode & 0o077 == 0, oct(os.stat(str(store)).st_mode)


def test_token_prints_stored_token(server, session):
    store = session[0]
    before = server.stats()
    r = cli(server, store, "token")
    assert r.returncode == 0, r
    assert r.stdout == entry(store, server)["access_token"] + "\n", r
    assert server.stats()["refresh"] == before["refresh"], "a valid token must not be refreshed"


def test_token_json(server, session):
    store = session[0]
    r = cli(server, store, "token", "--json")
    assert r.returncode == 0, r
    data = json.loads(r.stdout)
    assert data["access_token"] == entry(store, server)["access_token"], r
    assert data["token_type"].lower() == "bearer", r
    assert 3000 < data["expires_in"] <= 3600, r


def test_status_json(server, session):
    store = session[0]
    r = cli(server, store, "status", "--json")
    assert r.returncode == 0, r
    data = json.loads(r.stdout)
    assert data["url"] == server.base and data["logged_in"] is True, r
    assert data["has_refresh_token"] is True, r
    assert entry(store, server)["access_token"] not in r.stdout + r.stderr, "status shows no secret"


def test_healthcheck(server, session):
    r = cli(server, session[0], "healthcheck")
    assert r.returncode == 0, r
    assert r.stdout.strip() == "ok", r


def test_api_test_report(server, session, tmp_path):
    report = {"name": "station 7", "tests": [{"name": "voltage", "ok": True, "value": 3.3}]}
    data = json.dumps(report).encode("utf-8")
    with open(str(tmp_path / "report.json"), "wb") as f:
        f.write(data)
    r = cli(server, session[0], "api", "/test_report", "-d", "@report.json", cwd=str(tmp_path))
    assert r.returncode == 0, r
    body = json.loads(r.stdout)
    assert body["ok"] is True and body["bytes"] == len(data), r
    assert body["report"] == report, r
    assert body["content_type"].startswith("application/json"), r


def test_login_when_logged_in_starts_no_flow(server, session):
    before = server.stats()
    r = cli(server, session[0], "login", "--no-qr")
    assert r.returncode == 0, r
    assert server.stats()["device_authorization"] == before["device_authorization"], r


def test_verbose_shows_requests_not_tokens(server, session):
    store = session[0]
    r = cli(server, store, "-v", "healthcheck")
    assert r.returncode == 0, r
    assert "/hardpy/api/v1/healthcheck" in r.stderr, r
    e = entry(store, server)
    for secret in (e["access_token"], e["refresh_token"]):
        assert secret not in r.stderr and secret not in r.stdout, r


@pytest.mark.parametrize("which", ["server", "short_server"])
def test_login_denied(which, request, tmp_path):
    """access_denied exits 3: oidc-provider answers it with 400, Authelia with 403."""
    server = request.getfixturevalue(which)
    store = tmp_path / "tokens.json"
    result = login(server, store, "deny")
    assert result.returncode == 3, result
    assert result.events[-1]["event"] == "error", result
    assert result.events[-1]["exit_code"] == 3, result
    assert not os.path.exists(str(store)) or entry(store, server) is None, result


def test_login_code_expires(short_server, tmp_path):
    """Nobody approves a code that lives 3 s: exit 3 and "run login again"."""
    store = tmp_path / "tokens.json"
    result = login(short_server, store, "nobody")
    assert result.returncode == 3, result
    assert result.authorize["expires_in"] <= 3, result
    assert result.seconds < 3 + 6, result
    assert result.events[-1]["event"] == "error", result
    text = (result.run.stderr + result.events[-1].get("message", "")).lower()
    assert "login again" in text, result
    assert not os.path.exists(str(store)) or entry(store, short_server) is None, result


# ==== tests: the running Authelia's answers (DENY_AS_SERVER_ERROR, EMPTY_DEVICE_AUTH_ERRORS)


def _start_flow(server, **fields):
    form = {"client_id": CLIENT_ID, "scope": SCOPE, "audience": server.api}
    form.update(fields)
    status, body = _form_post(server.base + "/auth/api/oidc/device-authorization", form)
    assert status == 200, body
    return body


def test_authelia_dead_device_codes_by_hand(authelia_server):
    """Denied, redeemed and unknown codes: 500 server_error on every poll, straight over HTTP."""
    server = authelia_server
    before = server.stats()
    denied = _start_flow(server)
    assert approve_mod.approve(denied["verification_uri_complete"], denied["user_code"], deny=True) == "denied"
    for _ in range(3):  # every later poll, at any rate
        assert server.token_endpoint(grant_type=DEVICE_GRANT, device_code=denied["device_code"]) \
            == (500, MISCONFIGURED)
    redeemed = _start_flow(server)
    assert approve_mod.approve(redeemed["verification_uri_complete"], redeemed["user_code"]) == "done"
    status, tokens = server.token_endpoint(grant_type=DEVICE_GRANT, device_code=redeemed["device_code"])
    assert status == 200 and tokens["access_token"], tokens
    for _ in range(2):
        assert server.token_endpoint(grant_type=DEVICE_GRANT, device_code=redeemed["device_code"]) \
            == (500, MISCONFIGURED)
    assert server.api_status(tokens["access_token"]) == 200  # not oidc-provider's replay revocation
    assert server.token_endpoint(grant_type=DEVICE_GRANT, device_code="no-such-code") == (500, MISCONFIGURED)
    # a code nobody decided on yet is still pending
    pending = _start_flow(server)
    status, body = server.token_endpoint(grant_type=DEVICE_GRANT, device_code=pending["device_code"])
    assert (status, body["error"]) == (400, "authorization_pending"), body
    after = server.stats()
    assert after["device_code_server_error"] - before["device_code_server_error"] == 6, after


@pytest.mark.parametrize("case, fields, status, error", [
    ("unknown client", {"client_id": "not-a-client"}, 401, "invalid_client"),
    ("empty form", None, 400, "invalid_request"),
    ("audience not allowed", {"audience": "https://elsewhere.example/hardpy/api/v1"}, 400, "invalid_target"),
])
def test_device_authorization_errors_by_hand(server, authelia_server, case, fields, status, error):
    """Refused device authorizations: the same status either way; the body {}
    with EMPTY_DEVICE_AUTH_ERRORS=1, oidc-provider's OAuth error without."""
    for which in (server, authelia_server):
        form = {}
        if fields is not None:
            form = {"client_id": CLIENT_ID, "scope": SCOPE, "audience": which.api}
            form.update(fields)
        got, body = _form_post(which.base + "/auth/api/oidc/device-authorization", form)
        assert got == status, (case, which.base, body)
        if which is authelia_server:
            assert body == {}, (case, body)
        else:
            assert body["error"] == error, (case, body)


def test_login_denied_authelia_ends_within_three_polls(authelia_server, tmp_path):
    """Deny at the consent page -> 500 server_error: exit 3 within three polls, "refused ... login again"."""
    server = authelia_server
    store = tmp_path / "tokens.json"
    at_decision = []
    result = login(server, store, "deny", after_decision=lambda: at_decision.append(server.stats()), wait=10)
    after = server.stats()
    assert at_decision, result
    polls = after["device_code_polls"] - at_decision[0]["device_code_polls"]
    assert not result.timed_out, "still polling 10 s after the Deny (%d polls since): %r" % (polls, result)
    assert result.returncode == 3, result
    assert 1 <= polls <= 3, (polls, result)
    assert after["device_code_server_error"] - at_decision[0]["device_code_server_error"] == polls, after
    errors = [line for line in result.run.stderr.splitlines() if line.startswith("standcloud-auth: error:")]
    assert len(errors) == 1, result
    assert re.search(r"refus", errors[0], re.I) and "login again" in errors[0], result
    assert "Traceback" not in result.run.stderr, result
    assert result.events[-1]["event"] == "error" and result.events[-1]["exit_code"] == 3, result
    assert not os.path.exists(str(store)) or entry(store, server) is None, result


def test_login_approved_authelia_mode(authelia_server, tmp_path):
    """The switches change only dead codes and refusals: an approved login works."""
    store = tmp_path / "tokens.json"
    result = login(authelia_server, store)
    assert result.returncode == 0, result
    assert authelia_server.api_status(entry(store, authelia_server)["access_token"]) == 200


def _localhost_is_loopback_v4(port):
    try:
        return any(info[4][0] == "127.0.0.1" for info in socket.getaddrinfo("localhost", port))
    except socket.gaierror:
        return False


def test_login_device_authorization_refused_empty_body(authelia_server, tmp_path):
    """An audience the server does not allow (the URL spelled `localhost`):
    400 with the body {}; the error line carries the HTTP status."""
    server = authelia_server
    port = int(server.base.rsplit(":", 1)[1])
    if not _localhost_is_loopback_v4(port):
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    url = "http://localhost:%d" % port
    store = tmp_path / "tokens.json"
    before = server.stats()
    r = cli(server, store, "login", "--no-qr", url=url)
    after = server.stats()
    assert after["device_authorization_refused"] == before["device_authorization_refused"] + 1, (after, r)
    assert after["device_code_polls"] == before["device_code_polls"], "no poll without a device code"
    assert r.returncode in (3, 5), r
    errors = [line for line in r.stderr.splitlines() if line.startswith("standcloud-auth: error:")]
    assert len(errors) == 1, r
    assert "400" in errors[0], r
    assert "Traceback" not in r.stderr, r
    assert not os.path.exists(str(store)), r


# ==== tests: refresh =========================================================


def test_refresh_after_expiry_rotates(short_server, tmp_path):
    """A 2 s access token: `token` refreshes, and the refresh token changes."""
    server = short_server
    store = logged_in(server, tmp_path)
    first = entry(store, server)
    time.sleep(2.5)
    assert server.api_status(first["access_token"]) == 401, "the server expired the token"
    before = server.stats()["refresh"]
    r = cli(server, store, "token")
    assert r.returncode == 0, r
    second = entry(store, server)
    assert r.stdout == second["access_token"] + "\n", r
    assert second["access_token"] != first["access_token"], second
    assert second["refresh_token"] != first["refresh_token"], "rotation: a new refresh token"
    assert server.stats()["refresh"] == before + 1
    assert server.api_status(second["access_token"]) == 200


def test_reused_refresh_token_ends_session(server, tmp_path):
    """Replaying a rotated refresh token revokes the whole login: `refresh` exits 3."""
    store = logged_in(server, tmp_path)
    first = entry(store, server)
    r = cli(server, store, "refresh")
    assert r.returncode == 0, r
    second = entry(store, server)
    assert second["refresh_token"] != first["refresh_token"], second
    # Authelia (emulated): a refresh revokes the older access token at once
    assert server.api_status(first["access_token"]) == 401
    status, body = server.token_endpoint(grant_type="refresh_token",
                                         refresh_token=first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant"), body
    assert server.api_status(second["access_token"]) == 401, "the whole family is revoked"
    r = cli(server, store, "refresh")
    assert r.returncode == 3, r
    assert "login" in r.stderr, r
    assert entry(store, server) is None, "invalid_grant ends the stored session"


def test_401_refreshes_once_and_retries(server, tmp_path):
    """The stored access token was revoked by the server: one refresh, one retry."""
    store = logged_in(server, tmp_path)
    stale = read_store(store)
    r = cli(server, store, "refresh")  # the server revokes the old access token
    assert r.returncode == 0, r
    data = read_store(store)
    current = data["servers"][server.base]
    current["access_token"] = stale["servers"][server.base]["access_token"]  # revoked, but "valid" for an hour
    write_store(store, data)
    before = server.stats()
    r = cli(server, store, "healthcheck")
    assert r.returncode == 0, r
    after = server.stats()
    assert after["refresh"] == before["refresh"] + 1, (before, after)
    assert after["api_unauthorized"] == before["api_unauthorized"] + 1, (before, after)


def test_concurrent_token_one_refresh(server, tmp_path):
    """20 `token` processes at expiry: one refresh, one token, the session lives on."""
    store = logged_in(server, tmp_path)
    data = read_store(store)
    old = dict(data["servers"][server.base])
    data["servers"][server.base]["expires_at"] = time.time() - 1  # at expiry
    write_store(store, data)
    before = server.stats()
    argv = cli_args(server, store, "token")
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env(), universal_newlines=True)
             for _ in range(20)]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=CLI_TIMEOUT * 2)
        runs.append(Run(argv, p.returncode, out, err))
    failed = [r for r in runs if r.returncode != 0]
    assert not failed, failed[0]
    tokens = set(r.stdout for r in runs)
    assert len(tokens) == 1, tokens
    new = entry(store, server)
    assert tokens == set([new["access_token"] + "\n"])
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"]
    after = server.stats()
    assert after["refresh"] == before["refresh"] + 1, (before, after)
    assert after["refresh_rejected"] == before["refresh_rejected"], (before, after)
    r = cli(server, store, "healthcheck")
    assert r.returncode == 0, r


# ==== tests: logout ==========================================================


def test_logout_revokes(server, tmp_path):
    store = logged_in(server, tmp_path)
    old = entry(store, server)
    before = server.stats()
    r = cli(server, store, "logout")
    assert r.returncode == 0, r
    assert server.stats()["revocation"] > before["revocation"], "logout calls the revocation endpoint"
    assert entry(store, server) is None
    assert server.api_status(old["access_token"]) == 401
    status, body = server.token_endpoint(grant_type="refresh_token",
                                         refresh_token=old["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant"), body
    r = cli(server, store, "token")
    assert r.returncode == 3, r
    r = cli(server, store, "logout")
    assert r.returncode == 0, "logout when logged out: %r" % r


# ==== the Python fake (tests/fakeserver.py) gives the same answers ============


def _fake_post(fake, path, fields):
    return _form_post(fake.base + path, fields)


@pytest.fixture
def fake():
    f = fakeserver.FakeStandCloud().start()
    f.interval = 0  # real clock: no slow_down between the polls below
    yield f
    f.stop()


def _fake_flow(fake):
    status, flow = _fake_post(fake, fakeserver.sca.DEVICE_PATH,
                              {"client_id": CLIENT_ID, "scope": SCOPE, "audience": fake.base + "/hardpy/api/v1"})
    assert status == 200, flow
    return flow


def _fake_poll(fake, device_code):
    return _fake_post(fake, fakeserver.sca.TOKEN_PATH,
                      {"client_id": CLIENT_ID, "grant_type": DEVICE_GRANT, "device_code": device_code})


def test_fake_dead_device_codes_are_server_error(fake):
    """The default Deny, a redeemed code and an unknown code: 500 server_error on every poll."""
    denied = _fake_flow(fake)
    assert fake.approve(denied["user_code"], deny=True) == 1
    assert fake.approve(denied["user_code"]) == 0, "a decision is final"
    assert [_fake_poll(fake, denied["device_code"]) for _ in range(3)] == [(500, MISCONFIGURED)] * 3
    redeemed = _fake_flow(fake)
    fake.approve(redeemed["user_code"])
    assert _fake_poll(fake, redeemed["device_code"])[0] == 200
    assert _fake_poll(fake, redeemed["device_code"]) == (500, MISCONFIGURED)
    assert _fake_poll(fake, "authelia_dc_unknown") == (500, MISCONFIGURED)


@pytest.mark.parametrize("status", [403, 400])
def test_fake_rfc_deny_style(fake, status):
    fake.deny_style, fake.denied_status = "rfc", status
    flow = _fake_flow(fake)
    fake.approve(deny=True)
    for _ in range(2):
        got, body = _fake_poll(fake, flow["device_code"])
        assert (got, body["error"]) == (status, "access_denied"), body


def test_fake_deny_style_is_checked():
    with pytest.raises(ValueError):
        fakeserver.FakeStandCloud(deny_style="403")


@pytest.mark.parametrize("case, form, status, error", [
    ("empty form", {}, 400, "invalid_request"),
    ("unknown client", {"client_id": "not-a-client", "scope": SCOPE}, 401, "invalid_client"),
    ("scope not allowed", {"client_id": CLIENT_ID, "scope": "offline_access admin"}, 400, "invalid_scope"),
    ("audience not allowed", {"client_id": CLIENT_ID, "scope": SCOPE, "audience": "https://x/hardpy/api/v1"},
     400, "invalid_target"),
])
@pytest.mark.parametrize("empty", [False, True])
def test_fake_device_authorization_errors(fake, case, form, status, error, empty):
    fake.empty_device_errors = empty
    fake.audiences = [fake.base + "/hardpy/api/v1"]
    got, body = _fake_post(fake, fakeserver.sca.DEVICE_PATH, form)
    assert got == status, (case, body)
    if empty:
        assert body == {}, (case, body)
    else:
        assert body["error"] == error and sorted(body) == ["error", "error_description"], (case, body)
    assert fake.devices == {}


def _read_lines_until(stream, pattern, seconds):
    """Lines from a pipe until one matches ``pattern`` (or ``seconds`` pass)."""
    lines = Queue()

    def pump():
        for line in iter(stream.readline, ""):
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump)
    reader.daemon = True
    reader.start()
    seen = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.time()))
        except Empty:
            break
        if line is None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen, lines
    return seen, lines


def test_fake_by_hand_prints_the_login_command(tmp_path):
    """`python tests/fakeserver.py --approve-after 1` from the repository root: the
    command it prints logs in as it is."""
    env = _env()
    env["PYTHONUNBUFFERED"] = "1"
    fake_proc = subprocess.Popen(
        [sys.executable, os.path.join("tests", "fakeserver.py"), "--port", "0", "--approve-after", "1",
         "--interval", "1"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, universal_newlines=True)
    try:
        seen, rest = _read_lines_until(fake_proc.stdout, r"standcloud_auth\.py .*login$", 15)
        assert seen and re.search(r" login$", seen[-1]), "".join(seen)
        words = shlex.split(seen[-1].strip())
        assert words[0] in ("python", "python3") and words[1] == "standcloud_auth.py", words
        assert words[2] == "--url" and re.match(r"^http://127\.0\.0\.1:\d+$", words[3]) and words[4:] == ["login"], words
        env_cli = _env()
        env_cli["STANDCLOUD_TOKEN_FILE"] = str(tmp_path / "tokens.json")
        run = subprocess.run([sys.executable] + words[1:] + ["--no-qr"], cwd=ROOT, env=env_cli,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=CLI_TIMEOUT)
        assert run.returncode == 0, (run.stdout, run.stderr)
        assert read_store(tmp_path / "tokens.json")["servers"][words[3]]["access_token"], run.stderr
        events = []
        deadline = time.time() + 5
        while time.time() < deadline and not any("tokens issued" in e for e in events):
            try:
                line = rest.get(timeout=0.2)
            except Empty:
                continue
            if line is None:
                break
            events.append(line)
        assert any("approved" in e for e in events) and any("tokens issued" in e for e in events), events
    finally:
        fake_proc.terminate()
        fake_proc.wait(10)
        fake_proc.stdout.close()
        fake_proc.stderr.close()
