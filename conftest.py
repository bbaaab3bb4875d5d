"""Shared fixtures: the fake StandCloud (fakeserver.py) started per test,
a fake clock on the module's seams, an isolated environment, and CLI
runners (in-process and as a real subprocess).
"""

import io
import json
import os
import signal
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

# A shell starts a background job (`pytest &`) with SIGINT ignored, and a child
# inherits that: Python would then never raise KeyboardInterrupt, and every test
# that presses Ctrl-C in a real process would wait for its timeout. A handler
# (unlike "ignore") is reset to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- fixtures ------------------------------------------------------------------


def _foreign(name):
    """A variable that would let the caller's settings into a test."""
    return name.startswith("STANDCLOUD_") or name.lower() in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir")


def isolation(home):
    """The environment changes that isolate a process in ``home`` (a folder):
    for ``run_cli(env=...)`` from fixtures wider than one test, which
    ``isolated_env`` has not yet reached. A None value removes the variable."""
    home = str(home)
    env = {name: None for name in os.environ if _foreign(name)}
    env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"), APPDATA=os.path.join(home, "AppData"))
    return env


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test touches a real store, a real proxy or the caller's settings."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in isolation(home).items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
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
    if not path.parent.exists():  # a folder of our own, as the module wants it (whatever the umask)
        path.parent.mkdir(parents=True, mode=0o700)
    path.write_text(json.dumps({"version": 1, "servers": servers}))
    os.chmod(str(path), mode)
    return path


def entry_for(tokens, now, **overrides):
    entry = {"access_token": tokens["access_token"], "refresh_token": tokens.get("refresh_token"),
             "token_type": "Bearer", "expires_at": now + tokens.get("expires_in", 3600),
             "scope": sca.SCOPE, "updated_at": now}
    entry.update(overrides)
    return entry


def listing(folder):
    """Every path under ``folder`` (files and folders), relative."""
    found = set()
    for root, dirs, files in os.walk(str(folder)):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), str(folder)))
    return found


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


_HELD_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


@pytest.fixture
def cli():
    """Run main(argv) in-process; returns Result(code, out, err) as text.

    ``tty=True`` makes stderr look like a terminal of ``size=(columns,
    lines)``, 80 x 24 unless given (the login screen asks
    shutil.get_terminal_size, which honours COLUMNS and LINES); ``encoding=``
    sets stderr's encoding; ``stdin=`` gives bytes to read. Whatever main()
    changes for the process is put back: sys.stdin/stdout/stderr, COLUMNS
    and LINES, the module's ``_run_as``; and a signal handler that main()
    left changed fails the test."""

    def run(*argv, **kwargs):
        out, err = io.BytesIO(), io.BytesIO()
        stdin = io.TextIOWrapper(io.BytesIO(kwargs.get("stdin", b"")), encoding="utf-8")
        out_text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        err_text = (_Terminal if kwargs.get("tty") else io.TextIOWrapper)(err, encoding=kwargs.get("encoding", "utf-8"),
                                                                         write_through=True)
        size = kwargs.get("size", (80, 24) if kwargs.get("tty") else None)
        saved = sys.stdout, sys.stderr, sys.stdin
        saved_env = {name: os.environ.get(name) for name in ("COLUMNS", "LINES")}
        saved_run_as = sca._run_as
        handlers = [signal.getsignal(signum) for signum in _HELD_SIGNALS]
        if size is not None:
            os.environ["COLUMNS"], os.environ["LINES"] = str(size[0]), str(size[1])
        sys.stdout, sys.stderr, sys.stdin = out_text, err_text, stdin
        try:
            code = sca.main(list(argv))
        finally:
            sys.stdout, sys.stderr, sys.stdin = saved
            sca._run_as = saved_run_as
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            changed = [signum for signum, handler in zip(_HELD_SIGNALS, handlers) if signal.getsignal(signum) != handler]
            for signum, handler in zip(_HELD_SIGNALS, handlers):
                if signum in changed and handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)
        assert not changed, "main() left the handler of signal(s) %s changed" % changed
        return Result(code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8"))

    return run


def _environ(overrides):
    env = dict(os.environ)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def start_cmd(cmd, env=None, cwd=None):
    """Start ``cmd`` as a real process with this test's (isolated) environment
    updated by ``env`` (a None value removes a variable); ``finish_cli``
    collects it."""
    return subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_environ(env), cwd=None if cwd is None else str(cwd))


def run_cmd(cmd, env=None, cwd=None, stdin=b"", timeout=30):
    """Run ``cmd`` (see start_cmd) -> Result."""
    return finish_cli(start_cmd(cmd, env, cwd), stdin, timeout)


def start_cli(*argv, **kwargs):
    """Start the CLI as a real subprocess (``sys.executable MODULE argv``)
    and return the Popen; ``finish_cli`` collects it. ``env=`` updates the
    environment (a None value removes a variable)."""
    return start_cmd([sys.executable, MODULE] + list(argv), kwargs.get("env"), kwargs.get("cwd"))


def finish_cli(proc, stdin=b"", timeout=30):
    """Wait for a process from start_cli (killed after ``timeout``) -> Result."""
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Result(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def run_cli(*argv, **kwargs):
    """Run the CLI as a real subprocess; returns Result. ``env=`` updates the
    environment (a None value removes a variable); ``stdin=`` bytes,
    ``timeout=`` seconds, ``cwd=``."""
    proc = start_cli(*argv, env=kwargs.get("env"), cwd=kwargs.get("cwd"))
    return finish_cli(proc, kwargs.get("stdin", b""), kwargs.get("timeout", 30))


def run_cli_many(argvs, env=None, timeout=30, cwd=None, jobs=8):
    """Run the CLI once for each argv in ``argvs``, up to ``jobs`` processes
    at a time, each a fresh interpreter; the Results in the same order. For
    tables of cases: one by one, interpreter start-ups add up. ``env`` is
    one dict for all, or a list of one per argv."""
    envs = env if isinstance(env, list) else [env] * len(argvs)
    results = []
    for start in range(0, len(argvs), jobs):
        procs = []
        try:
            for argv, each in zip(argvs[start:start + jobs], envs[start:start + jobs]):
                procs.append(start_cli(*argv, env=each, cwd=cwd))
            for proc in list(procs):
                results.append(finish_cli(proc, timeout=timeout))
                procs.remove(proc)
        finally:
            for proc in procs:  # a failure above: leave no process behind
                if proc.returncode is None:
                    proc.kill()
                    proc.communicate()
    return results


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
