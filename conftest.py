"""Shared fixtures: the fake StandCloud (fakeserver.py) started per test,
a fake clock on the module's seams, an isolated environment, and CLI
runners (in-process and as a real subprocess).
"""

import io
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "standcloud_auth.py")
TESTS = os.path.join(HERE, "tests")
sys.path.insert(0, HERE)
sys.path.insert(0, TESTS)

import standcloud_auth as sca  # noqa: E402
from fakeserver import FakeClock, FakeStandCloud  # noqa: E402,F401


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test touches a real store, a real proxy or the caller's settings."""
    for name in list(os.environ):
        if name.startswith("STANDCLOUD_") or name.lower() in (
            "http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir"
        ):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("APPDATA", str(home / "AppData"))
    return home


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(sca, "_now", fake.now)
    monkeypatch.setattr(sca, "_monotonic", fake.monotonic)
    monkeypatch.setattr(sca, "_sleep", fake.sleep)
    return fake


@pytest.fixture(scope="module")
def _running_server():
    fake = FakeStandCloud().start()
    yield fake
    fake.stop()


@pytest.fixture
def server(_running_server, clock):
    """A fake StandCloud that shares the fake clock (in-process tests).

    One HTTP server runs per test module; each test gets fresh state behind
    it (starting and stopping a server for each of ~900 tests cost seconds).
    """
    fresh = FakeStandCloud(clock)
    fresh.httpd, fresh.base, fresh.thread = _running_server.httpd, _running_server.base, _running_server.thread
    _running_server.httpd.RequestHandlerClass.fake = fresh
    return fresh


@pytest.fixture
def live_server():
    """A fake StandCloud on the real clock (for subprocess tests)."""
    fake = FakeStandCloud().start()
    yield fake
    fake.stop()


@pytest.fixture
def store_path(tmp_path, monkeypatch):
    path = tmp_path / "store" / "tokens.json"
    monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", str(path))
    return path


def write_store(path, servers, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "servers": servers}))
    os.chmod(str(path), mode)
    return path


def entry_for(tokens, now, **overrides):
    entry = {"access_token": tokens["access_token"], "refresh_token": tokens.get("refresh_token"),
             "token_type": "Bearer", "expires_at": now + tokens.get("expires_in", 3600),
             "scope": sca.SCOPE, "updated_at": now}
    entry.update(overrides)
    return entry


def error_lines(err):
    """The contract's error lines in a stderr text."""
    return [line for line in err.splitlines() if line.startswith("standcloud-auth: error:")]


def assert_one_error(result, code):
    """Exit ``code``, exactly one error line, no traceback."""
    assert result.code == code, result
    assert len(error_lines(result.err)) == 1, result.err
    assert "Traceback" not in result.err


def log_in(server, store_path, now, base=None, others=None, **overrides):
    """Store a live token pair for ``base`` (default: the server's URL),
    beside ``others``' entries."""
    tokens = server.issue()
    servers = dict(others or {})
    servers[base or server.base] = entry_for(tokens, now, **overrides)
    write_store(store_path, servers)
    return tokens


class Result(object):
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __iter__(self):
        return iter((self.code, self.out, self.err))

    def __repr__(self):
        return "Result(code=%r, out=%r, err=%r)" % (self.code, self.out, self.err)


class _Terminal(io.TextIOWrapper):
    """stderr as a terminal would look to the module."""

    def isatty(self):
        return True


@pytest.fixture
def cli():
    """Run main(argv) in-process; returns Result(code, out, err) as text.

    ``tty=True`` makes stderr look like a terminal; ``encoding=`` sets its
    encoding; ``stdin=`` gives bytes to read."""

    def run(*argv, **kwargs):
        out, err = io.BytesIO(), io.BytesIO()
        stdin = io.TextIOWrapper(io.BytesIO(kwargs.get("stdin", b"")), encoding="utf-8")
        out_text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        err_text = (_Terminal if kwargs.get("tty") else io.TextIOWrapper)(err, encoding=kwargs.get("encoding", "utf-8"),
                                                                         write_through=True)
        saved = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr, sys.stdin = out_text, err_text, stdin
        try:
            code = sca.main(list(argv))
        finally:
            sys.stdout, sys.stderr, sys.stdin = saved
        return Result(code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8"))

    return run


def run_cli(*argv, **kwargs):
    """Run the CLI as a real subprocess; returns Result."""
    env = dict(os.environ)
    env.update(kwargs.pop("env", {}))
    timeout = kwargs.pop("timeout", 30)
    stdin = kwargs.pop("stdin", b"")
    cmd = [sys.executable, MODULE] + list(argv)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=kwargs.pop("cwd", None))
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Result(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
