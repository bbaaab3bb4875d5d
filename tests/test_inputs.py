"""Every input of issue 11 point 6 (and point 7's server text), through the
real CLI in a fresh interpreter, on every interpreter.

Each of these exited 1 ("internal error") in version 1 somewhere between 3.6
and 3.13. Each case here runs ``python standcloud_auth.py ...`` as a real
subprocess (nothing the test process imported can hide a bug) and asserts
the exit code (never 1), exactly one ``standcloud-auth: error:`` line (none
where the command succeeds), no traceback, and the token store unchanged --
byte for byte, and nothing else left in its folder but the lock file.

The inputs: the store's fields (huge numbers, keys that are not URLs, lone
surrogates, JSON cut off inside a string: CPython 3.10/3.11's crash), the
store or its lock being a FIFO, a folder, unreadable or a symlink; a server
answering with text that cannot be shown; HOME unusable; stdout and stderr
closed, full or unable to encode the store's path; URLs that urlsplit lets
through; ``api`` arguments that are not ASCII or not UTF-8; and (point 7)
server text with control characters, bidirectional overrides and our own
tokens echoed back.
"""

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, entry_for, error_lines, free_port, write_store
from test_hardening import unprivileged

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes, FIFOs, /dev/full and modes")

JSON = {"Content-Type": "application/json"}
NOW = time.time()
UNSHOWABLE = ["\x1b", "\x07", "\x9b", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
              "\u2069", "\ud800"]  # what server text must never bring to a terminal


# ==== running the CLI ========================================================


class Run(object):
    """A finished CLI process: code, out and err as text, raw_out and raw_err as bytes."""

    def __init__(self, code, out, err):
        self.code, self.raw_out, self.raw_err = code, out or b"", err or b""
        self.out = self.raw_out.decode("utf-8", "replace")
        self.err = self.raw_err.decode("utf-8", "replace")

    def __repr__(self):
        return "Run(argv=%r, code=%r, out=%r, err=%r)" % (getattr(self, "argv", None), self.code, self.raw_out[:2000],
                                                          self.raw_err[:2000])


def start(*argv, **kwargs):
    """Start ``python standcloud_auth.py *argv`` in a fresh interpreter; finish() it.

    env: variables to set (str; a lone surrogate from os.fsdecode stands for
    bytes that are not UTF-8); unset: names to remove; shell: a redirection
    such as '>&-' applied by sh; stdout: a file descriptor in place of a
    pipe; prefix: a command to run it through (setpriv); timeout: seconds
    before the test fails with "hung"."""
    env = dict(os.environ)
    for name in kwargs.pop("unset", ()):
        env.pop(name, None)
    env.update(kwargs.pop("env", {}))
    command = [sys.executable, MODULE] + list(argv)
    shell = kwargs.pop("shell", None)
    if shell is not None:
        command = ["sh", "-c", 'exec "$0" "$@" ' + shell] + command
    command = list(kwargs.pop("prefix", [])) + command
    stdout = kwargs.pop("stdout", subprocess.PIPE)
    timeout = kwargs.pop("timeout", 30)
    assert not kwargs, kwargs
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, env=env)
    proc.argv, proc.timeout = argv, timeout
    return proc


def finish(proc):
    try:
        out, err = proc.communicate(timeout=proc.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the CLI hung: %s still running after %g s" % (proc.argv, proc.timeout))
    result = Run(proc.returncode, out, err)
    result.argv = proc.argv
    return result


def run(*argv, **kwargs):
    """Run the CLI once; a Run."""
    return finish(start(*argv, **kwargs))


def run_all(*runs):
    """Several independent runs at once (each (argv, kwargs)): the suite's
    time is mostly interpreter start-up, and these cases share nothing."""
    return [finish(proc) for proc in [start(*argv, **kwargs) for argv, kwargs in runs]]


def check(result, code, *needles):
    """Exit ``code`` (never 1), one error line (none for 0) holding each
    needle, no traceback, nothing unshowable on stderr; the error line."""
    assert result.code != 1, result
    assert result.code == code, result
    errors = error_lines(result.err)
    assert len(errors) == (1 if code else 0), result
    assert b"Traceback" not in result.raw_err + result.raw_out, result
    assert not [c for c in UNSHOWABLE if c in result.err], result
    for needle in needles:
        assert needle in errors[0], (needle, result)
    return errors[0] if errors else None


def snapshot(folder):
    """What a folder holds, to compare before and after: name -> kind and content."""
    found, folder = {}, str(folder)
    if not os.path.lexists(folder):
        return found
    if not os.path.isdir(folder):
        with open(folder, "rb") as handle:
            return {None: (stat.S_IMODE(os.stat(folder).st_mode), handle.read())}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            found[name] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[name] = ("dir", stat.S_IMODE(info.st_mode), snapshot(path))
        elif stat.S_ISFIFO(info.st_mode):
            found[name] = ("fifo", stat.S_IMODE(info.st_mode))
        else:
            with open(path, "rb") as handle:
                found[name] = ("file", stat.S_IMODE(info.st_mode), handle.read())
    return found


def assert_unchanged(before, folder, lock_may_appear=True):
    """The store's folder as it was: same files, same bytes; at most an
    empty lock file more (a command that took the lock), no temporary file."""
    after = snapshot(folder)
    if lock_may_appear and "tokens.json.lock" not in before and "tokens.json.lock" in after:
        assert after.pop("tokens.json.lock") == ("file", 0o600, b""), after
    assert after == before


# ==== fixtures =================================================================


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The store's path (STANDCLOUD_TOKEN_FILE points at it); its folder exists, 0700."""
    folder = tmp_path / "store"
    folder.mkdir(mode=0o700)
    path = folder / "tokens.json"
    monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", str(path))
    return path


def logged_in(server, path, **changes):
    """A live session for ``server`` in the store at ``path``; its tokens."""
    tokens = server.issue()
    write_store(path, {server.base: entry_for(tokens, time.time(), **changes)})
    return tokens


def nowhere():
    """A URL where nothing listens: a command that sent anything would exit 4."""
    return "http://127.0.0.1:%d" % free_port()


# ==== the store's fields =====================================================

VALID = {"access_token": "at_input_0123456789", "refresh_token": "rt_input_0123456789", "token_type": "Bearer",
         "expires_at": NOW + 3600, "scope": sca.SCOPE, "updated_at": NOW}


def store_text(key="https://a.example", **changes):
    entry = dict(VALID)
    entry.update(changes)
    return json.dumps({"version": 1, "servers": {key: entry}}).encode()


def with_literal(field, literal):
    """A store whose ``field`` is the raw JSON ``literal`` (400 digits, 1e300)."""
    return store_text(**{field: "@@"}).replace(b'"@@"', literal.encode())


CUT = b'{"version": 1, "servers": {"https://x": {"access_token": "ab'  # issue 10: 3.10/3.11 exit 1

STORES = [
    ("expires_at-400-digits", with_literal("expires_at", "1" + "0" * 399)),
    ("updated_at-400-digits", with_literal("updated_at", "9" * 400)),
    ("expires_at-5000-digits", with_literal("expires_at", "7" * 5000)),  # over 3.11+'s int limit
    ("expires_at-1e300", with_literal("expires_at", "1e300")),
    ("expires_at-minus-1e300", with_literal("expires_at", "-1e300")),
    ("updated_at-1e300", with_literal("updated_at", "1e300")),
    ("key-not-a-url", store_text(key="not a url")),
    ("key-empty", store_text(key="")),
    ("key-ftp", store_text(key="ftp://a.example")),
    ("key-bad-port", store_text(key="https://a.example:99999")),
    ("key-bare-host", store_text(key="a.example")),
    ("key-default-port", store_text(key="https://a.example:443")),
    ("key-upper-case", store_text(key="https://A.Example")),
    ("key-trailing-slash", store_text(key="https://a.example/")),
    ("key-bracketed-ipv4", store_text(key="http://[127.0.0.1]")),
    ("key-control", store_text(key="https://a.example/\x1b[2J")),
    ("access_token-surrogate", store_text(access_token="\ud800")),
    ("access_token-surrogate-inside", store_text(access_token="at_\ud800_0123456789")),
    ("refresh_token-surrogate", store_text(refresh_token="\ud800")),
    ("scope-surrogate", store_text(scope="offline_access \ud800")),
    ("scope-bidi", store_text(scope="offline_access \u202e")),
    ("scope-escape", store_text(scope="\x1b[2J")),
    ("json-cut-in-a-string", CUT),
    ("json-cut-after-a-backslash", CUT + b"\\"),
    ("json-cut-in-an-escape", CUT + b"\\u00"),
]
STORE_IDS = [name for name, _ in STORES]
CRASHES = ["json-cut-in-a-string", "json-cut-after-a-backslash", "json-cut-in-an-escape"]


READERS = [["token"], ["status"], ["status", "--json"]]  # status: every stored server


@pytest.mark.parametrize("content, argv", [(c, READERS[i % 3]) for i, (_, c) in enumerate(STORES)],
                         ids=["%s-%s" % (name, "-".join(READERS[i % 3])) for i, name in enumerate(STORE_IDS)])
def test_store_field_is_exit_2(store, content, argv):
    store.write_bytes(content)
    before = snapshot(store.parent)
    check(run(*argv), 2, "the token store %s is unreadable (" % store, "login")
    assert_unchanged(before, store.parent, lock_may_appear=False)


WRITERS = [["refresh"], ["logout"], ["api", "/x"], ["healthcheck"], ["token", "--min-valid", "0"]]


@pytest.mark.parametrize("name", CRASHES + ["expires_at-400-digits", "key-not-a-url", "scope-surrogate"])
def test_store_field_is_exit_2_for_commands_that_would_write_or_send(store, name):
    # Anything sent would be exit 4 (nothing listens); login is below. Every
    # such command for the JSON crashes, two for the others.
    store.write_bytes(dict(STORES)[name])
    before = snapshot(store.parent)
    writers = WRITERS if name in CRASHES else WRITERS[::2]
    for result in run_all(*[(["--url", nowhere()] + argv, {}) for argv in writers]):
        check(result, 2, "the token store %s is unreadable (" % store)
        assert result.out == "", result
    assert_unchanged(before, store.parent)


@pytest.mark.parametrize("name", ["expires_at-400-digits", "key-not-a-url", "access_token-surrogate", "scope-bidi"] + CRASHES)
def test_store_field_login_keeps_it_aside(live_server, store, name):
    # Contract: login keeps an unreadable store as tokens.json.corrupt-<time>,
    # then starts the device flow (here refused, to stay fast: exit 3).
    content = dict(STORES)[name]
    store.write_bytes(content)
    live_server.script(sca.DEVICE_PATH, (400, JSON, b'{"error": "invalid_client", "error_description": "no"}'))
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    check(result, 3, "the server refused to start a login (HTTP 400, invalid_client: no)")
    kept = [p for p in store.parent.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == content, kept
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    assert kept[0].name in result.err and "warning" in result.err
    assert not store.exists()


def test_store_cut_in_a_string_login_logs_in(live_server, store):
    # Issue 10: login is the README's cure for a damaged store; on 3.10 and
    # 3.11 it exited 1. The whole way: kept aside, device flow, tokens stored.
    store.write_bytes(CUT)
    live_server.interval, live_server.approve_after = 1, 1
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    check(result, 0)
    kept = [p for p in store.parent.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == CUT
    assert list(json.loads(store.read_text())["servers"]) == [live_server.base]
    check(run("--url", live_server.base, "token"), 0)


# ==== what the store is ======================================================


def make_fifo(path):
    os.mkfifo(str(path), 0o600)


def make_dir(path):
    os.mkdir(str(path), 0o700)


@pytest.mark.parametrize("argv", [["token"], ["status"], ["refresh"], ["login", "--no-qr", "--no-check"]],
                         ids=["token", "status", "refresh", "login"])
@pytest.mark.parametrize("make", [make_fifo, make_dir], ids=["fifo", "folder"])
def test_store_not_a_regular_file_is_exit_2(store, make, argv):
    # A FIFO made `token` hang for ever in version 1: a short timeout here.
    make(store)
    before = snapshot(store.parent)
    result = run("--url", nowhere(), *argv, timeout=15)
    check(result, 2, str(store))
    assert "not a regular file" in result.err or "Is a directory" in result.err, result
    assert result.out == ""
    assert_unchanged(before, store.parent)


@pytest.mark.parametrize("argv", [["token"], ["status"], ["login", "--no-qr", "--no-check"]], ids=["token", "status", "login"])
def test_store_unreadable_is_exit_2(tmp_path, argv):
    # Real permissions: as root, without CAP_DAC_OVERRIDE (or as nobody);
    # else as the user. Unreadable is not corrupt: login stops too.
    import tempfile

    preexec, owner = unprivileged()
    top = tmp_path if owner is None else type(tmp_path)(tempfile.mkdtemp())
    path = top / "store" / "tokens.json"
    try:
        write_store(path, {"https://a.example": VALID})
        before = snapshot(path.parent)
        os.chmod(str(path), 0)
        if owner is not None:
            os.chmod(str(top), 0o755)
            for each in (path.parent, path):
                os.chown(str(each), owner, -1)
        command = [sys.executable, MODULE, "--store", str(path), "--url", nowhere()] + argv
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=preexec, cwd=str(top))
        result = Run(None, *proc.communicate(timeout=30))
        result.code = proc.returncode
        check(result, 2, "cannot read the token store %s (Permission denied)" % path)
        os.chmod(str(path), 0o600)
        if owner is not None:
            for each in (path.parent, path):
                os.chown(str(each), os.geteuid(), -1)
        assert_unchanged(before, path.parent)
    finally:
        if owner is not None:
            shutil.rmtree(str(top), ignore_errors=True)


# ==== the lock file ==========================================================


def lock_fifo(store, tmp_path):
    os.mkfifo(str(store) + ".lock", 0o600)


def lock_dir(store, tmp_path):
    os.mkdir(str(store) + ".lock", 0o700)


def lock_symlink(store, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"another file: never opened, truncated or locked\n")
    os.chmod(str(victim), 0o640)
    os.symlink(str(victim), str(store) + ".lock")


LOCKS = [lock_fifo, lock_dir, lock_symlink]


@pytest.mark.parametrize("make", LOCKS, ids=["fifo", "folder", "symlink"])
def test_lock_file_unusable_is_exit_2_and_nothing_sent(live_server, store, tmp_path, make):
    # Every command that takes the lock: refresh, logout, token that must
    # refresh, api after a 401 (which re-reads the store under the lock).
    logged_in(live_server, store)
    live_server.script(sca.API_PATH + "/x", (401, {"Content-Type": "text/plain"}, b"no"))
    make(store, tmp_path)
    before, outside = snapshot(store.parent), snapshot(tmp_path / "victim.txt")
    runs = [["refresh"], ["logout"], ["token", "--min-valid", "7200"], ["api", "/x"]]
    for result in run_all(*[(["--url", live_server.base] + argv, {"timeout": 15}) for argv in runs]):
        check(result, 2, "cannot use the lock file %s.lock (" % store)
    assert live_server.refreshes() == 0 and live_server.count(sca.REVOCATION_PATH) == 0
    assert_unchanged(before, store.parent, lock_may_appear=False)
    assert snapshot(tmp_path / "victim.txt") == outside  # the symlink's target: untouched, same mode


@pytest.mark.parametrize("make", LOCKS, ids=["fifo", "folder", "symlink"])
def test_lock_file_unusable_login_stops_before_the_device_flow(live_server, store, tmp_path, make):
    make(store, tmp_path)
    before = snapshot(store.parent)
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check", timeout=15)
    check(result, 2, "cannot use the lock file %s.lock (" % store)
    assert live_server.requests == []
    assert_unchanged(before, store.parent, lock_may_appear=False)


@pytest.mark.parametrize("make", LOCKS, ids=["fifo", "folder", "symlink"])
def test_lock_file_unusable_token_still_works_when_valid(live_server, store, tmp_path, make):
    # A valid token needs no lock (the hot path): the broken lock file is not even opened.
    tokens = logged_in(live_server, store)
    make(store, tmp_path)
    before = snapshot(store.parent)
    result = run("--url", live_server.base, "token", timeout=15)
    check(result, 0)
    assert result.out == tokens["access_token"] + "\n"
    assert_unchanged(before, store.parent, lock_may_appear=False)


# ==== HOME ===================================================================

NO_HOME = ("HOME", "XDG_CONFIG_HOME", "APPDATA", "USERPROFILE", "STANDCLOUD_TOKEN_FILE")


def home_unset(tmp_path):
    return {}, NO_HOME


def home_a_file(tmp_path):
    path = tmp_path / "home-is-a-file"
    path.write_bytes(b"not a folder\n")
    return {"HOME": str(path)}, NO_HOME[1:]


def home_relative(tmp_path):
    return {"HOME": "relative/home"}, NO_HOME[1:]


def home_empty(tmp_path):
    return {"HOME": ""}, NO_HOME[1:]


HOMES = [home_unset, home_a_file, home_relative, home_empty]
HOME_IDS = ["unset", "a-file", "relative", "empty"]


NO_STORE = [
    (["token"], "st_static_token_0123\n"),
    (["status", "--json"], '"source": "environment"'),
    (["--version"], "standcloud-auth %s\n" % sca.__version__),
    (["token", "--help"], "usage:"),
]


@pytest.mark.parametrize("home", HOMES, ids=HOME_IDS)
def test_home_unusable_commands_that_need_no_store_work(tmp_path, home):
    # token and status with STANDCLOUD_TOKEN, --version, --help: no store, so HOME does not matter.
    env, unset = home(tmp_path)
    env["STANDCLOUD_TOKEN"] = "st_static_token_0123"
    before = snapshot(tmp_path)
    results = run_all(*[(argv, {"env": env, "unset": unset}) for argv, _ in NO_STORE])
    for result, (_, out) in zip(results, NO_STORE):
        check(result, 0)
        assert out in result.out, result
    assert snapshot(tmp_path) == before  # nothing written anywhere


def _uid_without_passwd_entry():
    for uid in range(54321, 54400):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no free uid")


def _without_a_passwd_entry():
    """A command prefix that runs the CLI as a uid with no passwd entry, so
    that HOME unset has no fallback; skip where that cannot be done."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("HOME unset falls back to the passwd entry: needs root and setpriv to run as a uid without one")
    uid = _uid_without_passwd_entry()
    # The interpreter may live in root's 0700 home: keep the right to read and search.
    caps = "+dac_read_search,+dac_override"
    return [setpriv, "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups", "--inh-caps=" + caps,
            "--ambient-caps=" + caps]


@pytest.mark.parametrize("home", HOMES, ids=HOME_IDS)
def test_home_unusable_commands_that_need_the_store_name_it(tmp_path, home):
    # Exit 2 naming --store (and STANDCLOUD_TOKEN_FILE), never a store in a
    # surprising place: HOME="" must not mean "/" (expanduser's answer).
    # Read-only commands first: were HOME="" taken as "/", login would write there.
    env, unset = home(tmp_path)
    prefix = _without_a_passwd_entry() if home is home_unset else []
    before = snapshot(tmp_path)
    runs = [["token"], ["status", "--json"]]
    for result in run_all(*[(["--url", nowhere()] + argv, {"env": env, "unset": unset, "prefix": prefix}) for argv in runs]):
        check(result, 2, "--store")
        assert result.out == "", result
    check(run("--url", nowhere(), "login", "--no-qr", "--no-check", env=env, unset=unset, prefix=prefix), 2, "--store")
    assert snapshot(tmp_path) == before


# ==== stdout and stderr ======================================================


@pytest.mark.parametrize("argv, shell, words", [
    (["token"], ">&-", "stdout is closed"),
    (["token", "--json"], ">&-", "stdout is closed"),
    (["status"], ">&-", "stdout is closed"),
    (["--version"], ">&-", "stdout is closed"),
    (["token"], ">/dev/full", "cannot write to stdout ("),
    (["status", "--json"], ">/dev/full", "cannot write to stdout ("),
    (["--version"], ">/dev/full", "cannot write to stdout ("),
    (["--help"], ">/dev/full", "cannot write to stdout ("),
    (["api", "/x"], ">/dev/full", "cannot write to stdout ("),
], ids=["token-closed", "token-json-closed", "status-closed", "version-closed", "token-full", "status-json-full",
        "version-full", "help-full", "api-full"])
def test_stdout_closed_or_full_is_exit_2(live_server, store, argv, shell, words):
    logged_in(live_server, store)
    before = snapshot(store.parent)
    result = run("--url", live_server.base, *argv, shell=shell)
    check(result, 2, words)
    assert_unchanged(before, store.parent, lock_may_appear=False)


@pytest.mark.parametrize("argv", [["token"], ["status", "--json"], ["api", "/x"], ["--help"]],
                         ids=["token", "status-json", "api", "help"])
def test_stdout_reader_gone_is_exit_0(live_server, store, argv):
    # `| head -c 0`: the reader chose to stop reading; not an error.
    logged_in(live_server, store)
    before = snapshot(store.parent)
    read, write = os.pipe()
    os.close(read)  # gone before anything is written: EPIPE, deterministically
    try:
        result = run("--url", live_server.base, *argv, stdout=write)
    finally:
        os.close(write)
    check(result, 0)
    assert_unchanged(before, store.parent, lock_may_appear=False)


@pytest.mark.parametrize("shell", ["2>&-", "2>/dev/full", ">&- 2>&-"], ids=["closed", "full", "both-closed"])
def test_stderr_closed_or_full_after_a_successful_refresh_is_exit_0(live_server, store, shell):
    tokens = logged_in(live_server, store)
    result = run("--url", live_server.base, "refresh", shell=shell)
    assert result.code == 0, result
    assert live_server.refreshes() == 1
    entry = json.loads(store.read_text())["servers"][live_server.base]
    assert entry["refresh_token"] != tokens["refresh_token"] and live_server.token_ok(entry["access_token"])
    assert sorted(p.name for p in store.parent.iterdir()) == ["tokens.json", "tokens.json.lock"]


@pytest.mark.parametrize("shell, code", [("2>&-", 3), ("2>/dev/full", 3)], ids=["closed", "full"])
def test_stderr_closed_or_full_keeps_the_exit_code(store, shell, code):
    result = run("--url", nowhere(), "token", shell=shell)  # not logged in
    assert result.code == code, result
    assert not store.exists()


# ==== a store path that stdout cannot encode =================================

# Built from bytes, so that a test process in a C locale can name them too.
FOLDERS = [("non-ascii", os.fsdecode(b"st\xc3\xb6re-\xe6\xbc\xa2")), ("not-utf-8", os.fsdecode(b"st\xffre"))]
ENCODINGS = [("ascii", {"PYTHONIOENCODING": "ascii"}), ("c-locale", {"LANG": "C", "LC_ALL": "C"})]


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("env", [e for _, e in ENCODINGS], ids=[n for n, _ in ENCODINGS])
@pytest.mark.parametrize("folder", [f for _, f in FOLDERS], ids=[n for n, _ in FOLDERS])
def test_store_path_stdout_cannot_encode(live_server, tmp_path, folder, env, json_out):
    path = tmp_path / folder / "tokens.json"
    os.mkdir(str(path.parent), 0o700)
    logged_in(live_server, path)
    before = snapshot(path.parent)
    unset = ["PYTHONIOENCODING", "LC_CTYPE", "LANGUAGE"] if "LANG" in env else []
    result = run(*(["status", "--json"] if json_out else ["status"]), env=dict(env, STANDCLOUD_TOKEN_FILE=str(path)),
                 unset=unset)
    check(result, 0)
    if json_out:
        report = json.loads(result.out)  # JSON escapes what ASCII lacks
        assert len(report) == 1 and report[0]["logged_in"] is True
        assert os.fsencode(report[0]["store"]) == os.fsencode(str(path))
    else:
        assert "Token store" in result.out and "Logged in       yes" in result.out, result
    assert snapshot(path.parent) == before


@pytest.mark.parametrize("env", [e for _, e in ENCODINGS], ids=[n for n, _ in ENCODINGS])
@pytest.mark.parametrize("folder", [f for _, f in FOLDERS], ids=[n for n, _ in FOLDERS])
def test_store_path_stderr_cannot_encode(tmp_path, folder, env):
    # The error line names the store: on an ASCII stderr it is degraded, not lost.
    path = tmp_path / folder / "tokens.json"
    os.mkdir(str(path.parent), 0o700)
    path.write_bytes(CUT)
    unset = ["PYTHONIOENCODING", "LC_CTYPE", "LANGUAGE"] if "LANG" in env else []
    result = run("--url", nowhere(), "token", env=dict(env, STANDCLOUD_TOKEN_FILE=str(path)), unset=unset)
    check(result, 2, "is unreadable")
    assert result.out == ""


# ==== URLs ===================================================================

BAD_URLS = ["https://[::1", "https://host:\u00b2", "http://[127.0.0.1]", "https://host:99999", "https://[::1]x",
            "https://exa mple.com", "https://\u202eevil.example", "https://a.example:0", "https://user@a.example",
            "https://a.example?x=1", "https://a.example#x", "ftp://a.example", "https://", "https://a.example/\x1b[2J",
            "https://[fe80::1%25eth0", "https://a.example:-1", "https://host" + os.fsdecode(b"\xff") + ".example"]


@pytest.mark.parametrize("url", BAD_URLS, ids=[u.encode("ascii", "backslashreplace").decode() for u in BAD_URLS])
def test_url_malformed_is_exit_2(store, url):
    # --url and STANDCLOUD_URL; for token, status and login (the issue's
    # three; one run for the others). (The last URL: bytes that are not
    # UTF-8, as a shell passes them: a lone surrogate inside.)
    runs = [(["--url", url, "token"], {}), (["token"], {"env": {"STANDCLOUD_URL": url}}),
            (["status", "--json"], {"env": {"STANDCLOUD_URL": url}}), (["--url", url, "login", "--no-qr"], {})]
    for result in run_all(*(runs if url in BAD_URLS[:3] else runs[:1])):
        check(result, 2, "is not a StandCloud URL", "--url")
    assert snapshot(store.parent) == {}


# ==== api arguments ==========================================================


@pytest.mark.parametrize("data", [b"\xff\xfe not UTF-8 \x80", b"caf\xe9=1&x=\xc3\x28"], ids=["latin", "broken-utf8"])
@pytest.mark.parametrize("how", ["argv", "file", "stdin-file"])
def test_api_data_not_utf8_is_sent_as_given(live_server, store, tmp_path, data, how):
    logged_in(live_server, store)
    before = snapshot(store.parent)
    if how == "argv":
        argv = [b"-d", data]
    else:
        (tmp_path / "body.bin").write_bytes(data)
        argv = ["-d", "@" + str(tmp_path / "body.bin")]
    env = {"LANG": "C", "LC_ALL": "C"} if how == "stdin-file" else {}
    result = run("--url", live_server.base, "api", "/x", *argv, env=env)
    check(result, 0)
    sent = [r for r in live_server.requests if r["path"] == sca.API_PATH + "/x"]
    assert len(sent) == 1 and sent[0]["body"] == data and sent[0]["method"] == "POST"
    assert sent[0]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert json.loads(result.out)["bytes"] == len(data)
    assert_unchanged(before, store.parent, lock_may_appear=False)


@pytest.mark.parametrize("argv, words", [
    (["/with space"], "spaces or characters that are not ASCII"),
    (["/caf\u00e9"], "spaces or characters that are not ASCII"),
    (["/tab\there"], "spaces or characters that are not ASCII"),
    (["/x", "-X", "P\u00d6ST"], "is not an HTTP method"),
    (["/x", "-X", "GET /y HTTP/1.1"], "is not an HTTP method"),
    (["/x", "-H", "X-Name: \u00fc"], "is not ASCII"),
    (["/x", "-H", "X-Name: a\r\nInjected: 1"], "is not ASCII"),
    (["/x", "-H", "X Name: v"], "is not ASCII"),
    (["/x", "-H", "X-\u00dc: v"], "is not ASCII"),
    (["/x", "-H", "no colon"], "'Name: value'"),
    (["relative"], "neither a path"),
], ids=["space", "non-ascii-path", "tab", "non-ascii-method", "method-with-spaces", "non-ascii-header-value",
        "header-crlf", "header-name-space", "non-ascii-header-name", "header-no-colon", "relative-path"])
def test_api_local_usage_error_is_exit_2_before_anything_is_sent(live_server, store, argv, words):
    logged_in(live_server, store, expires_at=time.time() - 10)  # a request would start with a refresh
    before = snapshot(store.parent)
    result = run("--url", live_server.base, "api", *argv)
    check(result, 2, words)
    assert live_server.requests == []
    assert result.out == ""
    assert_unchanged(before, store.parent, lock_may_appear=False)


# ==== server answers that cannot be shown or kept ============================


def token_answer(**changes):
    body = {"access_token": "at_new_0123456789abcdef", "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": "rt_new_0123456789abcdef", "scope": sca.SCOPE}
    body.update(changes)
    return json.dumps(body).encode()


BAD_SCOPES = ["\ud800", "offline_access \u202e", "\x1b[2J", "a\nb", "s" * 1025]


@pytest.mark.parametrize("scope", BAD_SCOPES, ids=["surrogate", "bidi", "escape", "newline", "too-long"])
def test_refresh_answer_scope_unshowable_is_refused(live_server, store, scope):
    tokens = logged_in(live_server, store)
    before = snapshot(store.parent)
    live_server.script(sca.TOKEN_PATH, (200, JSON, token_answer(scope=scope)))
    check(run("--url", live_server.base, "refresh"), 5, "the refresh answer has a malformed scope")
    assert_unchanged(before, store.parent)
    # Nothing was stored: every later command still works (v1: every later status failed).
    status = run("status", "--json")
    check(status, 0)
    assert json.loads(status.out)[0]["scope"] == sca.SCOPE
    if scope == BAD_SCOPES[0]:
        check(run("status"), 0)
        assert run("--url", live_server.base, "token").out == tokens["access_token"] + "\n"


def test_login_answer_scope_surrogate_is_refused_and_nothing_stored(live_server, store):
    live_server.interval = 1
    live_server.script(sca.TOKEN_PATH, (200, JSON, token_answer(scope="\ud800")))
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    check(result, 5, "the token answer has a malformed scope")
    assert snapshot(store.parent) == {}
    check(run("status"), 3, "not logged in")
    check(run("status", "--json"), 3)


@pytest.mark.parametrize("field, value", [
    ("access_token", "at_\ud800"), ("access_token", "at with space"), ("access_token", "a" * 16385),
    ("refresh_token", "rt_\u202e"), ("refresh_token", "rt\x1b[2J"), ("token_type", "Bearer\ud800"),
], ids=["access-surrogate", "access-space", "access-too-long", "refresh-bidi", "refresh-escape", "type-surrogate"])
def test_refresh_answer_token_unstorable_is_refused(live_server, store, field, value):
    logged_in(live_server, store)
    before = snapshot(store.parent)
    live_server.script(sca.TOKEN_PATH, (200, JSON, token_answer(**{field: value})))
    check(run("--url", live_server.base, "refresh"), 5, "the refresh answer has ")
    assert_unchanged(before, store.parent)


DEVICE = {"device_code": "dc_input_0123456789abcdef", "user_code": "BCDFGHJK",
          "verification_uri": "https://v.example/device",
          "verification_uri_complete": "https://v.example/device?user_code=BCDFGHJK", "expires_in": 600, "interval": 1}


@pytest.mark.parametrize("field, value", [
    ("user_code", "\ud800"), ("user_code", "BCDF\u202eGHJK"), ("user_code", "\x1b[2JBCDF"), ("user_code", " "),
    ("verification_uri", "https://v.example/\x1b]8;;x\x07"), ("verification_uri", "https://v.example/\u2066x"),
    ("verification_uri", "javascript:alert(1)"), ("verification_uri_complete", "https://v.example/?c=\x9b31m"),
    ("verification_uri_complete", "https://v.example/\ud800"),
], ids=["code-surrogate", "code-bidi", "code-escape", "code-blank", "uri-osc", "uri-isolate", "uri-javascript",
        "complete-csi", "complete-surrogate"])
def test_device_answer_unshowable_is_refused(live_server, store, field, value):
    live_server.script(sca.DEVICE_PATH, (200, JSON, json.dumps(dict(DEVICE, **{field: value})).encode()))
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    check(result, 5, "the device authorization answer has a malformed %s" % field)
    assert live_server.polls() == 0
    assert snapshot(store.parent) == {}


@pytest.mark.parametrize("endpoint", ["refresh", "device", "poll"])
def test_answer_cut_in_a_string_is_exit_5(live_server, store, endpoint):
    # Issue 10: a server answer cut off inside a string crashed 3.10/3.11.
    cut = b'{"access_token": "ab' if endpoint != "device" else b'{"device_code": "ab'
    if endpoint == "refresh":
        logged_in(live_server, store)
        argv = ["refresh"]
    else:
        argv, live_server.interval = ["login", "--no-qr", "--no-check"], 1
    before = snapshot(store.parent)
    live_server.script(sca.DEVICE_PATH if endpoint == "device" else sca.TOKEN_PATH, (200, JSON, cut))
    check(run("--url", live_server.base, *argv), 5, "not valid JSON")
    assert_unchanged(before, store.parent)


# ==== point 7: server text shown safely ======================================

HOSTILE = "bad \x1b[31mred\x1b[0m \x07 \u202eevil\u202c \u2066iso\u2069 \ud800 \x9b2J\r\nstandcloud-auth: error: forged"


def hostile_error(error, secrets, status=400):
    description = HOSTILE + " | " + " | ".join(secrets)
    return status, JSON, json.dumps({"error": error, "error_description": description}).encode()


def assert_safe(result, *secrets):
    """No token, no control character, no bidi override on stdout or stderr;
    the secrets redacted where the text was shown."""
    for text in (result.out, result.err):
        for secret in secrets:
            assert secret not in text, (secret, result)
        assert not [c for c in UNSHOWABLE if c in text], result
        assert not [c for c in text if ord(c) < 32 and c != "\n"], result
    assert "[redacted]" in result.err, result


@pytest.mark.parametrize("error", ["invalid_request", "invalid_grant", "unauthorized_client"])
def test_refresh_error_description_is_shown_safely(live_server, store, error):
    tokens = logged_in(live_server, store)
    before = snapshot(store.parent)
    live_server.script(sca.TOKEN_PATH, hostile_error(error, [tokens["refresh_token"], tokens["access_token"]]))
    result = run("--url", live_server.base, "refresh")
    line = check(result, 3, error)
    assert_safe(result, tokens["refresh_token"], tokens["access_token"])  # every token the client knows
    assert "bad ?[31mred" in line and "?evil?" in line and "?iso?" in line, line  # shown, made safe
    if error == "invalid_grant":  # contract: only invalid_grant ends the stored session
        assert "the session has ended" in line
        assert json.loads(store.read_text())["servers"] == {}
    else:
        assert_unchanged(before, store.parent)


def test_refresh_error_name_itself_is_shown_safely(live_server, store):
    tokens = logged_in(live_server, store)
    before = snapshot(store.parent)
    body = json.dumps({"error": "\u202einvalid\x1b[0m " + tokens["refresh_token"], "error_description": 7}).encode()
    live_server.script(sca.TOKEN_PATH, (400, JSON, body))
    result = run("--url", live_server.base, "refresh")
    check(result, 3)
    assert_safe(result, tokens["refresh_token"])
    assert_unchanged(before, store.parent)


def test_poll_error_description_echoing_the_device_code_is_redacted(live_server, store):
    live_server.script(sca.DEVICE_PATH, (200, JSON, json.dumps(DEVICE).encode()))
    live_server.script(sca.TOKEN_PATH, hostile_error("invalid_request", [DEVICE["device_code"]]))
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    line = check(result, 3, "invalid_request")
    assert_safe(result, DEVICE["device_code"])
    assert "?evil?" in line
    assert snapshot(store.parent) == {}


def test_device_authorization_error_description_is_shown_safely(live_server, store):
    live_server.script(sca.DEVICE_PATH, hostile_error("invalid_client", [], status=401))
    result = run("--url", live_server.base, "login", "--no-qr", "--no-check")
    line = check(result, 3, "invalid_client")
    for text in (result.out, result.err):
        assert not [c for c in UNSHOWABLE if c in text] and not [c for c in text if ord(c) < 32 and c != "\n"]
    assert "?evil?" in line
    assert snapshot(store.parent) == {}


def test_revocation_error_description_is_a_safe_warning(live_server, store):
    tokens = logged_in(live_server, store)
    secrets = [tokens["refresh_token"], tokens["access_token"]]
    live_server.script(sca.REVOCATION_PATH, hostile_error("invalid_request", secrets), hostile_error("invalid_request", secrets))
    result = run("--url", live_server.base, "logout")
    check(result, 0)
    assert_safe(result, *secrets)
    warnings = [line for line in result.err.splitlines() if line.startswith("standcloud-auth: warning:")]
    assert len(warnings) == 2 and all("could not revoke" in w and "?evil?" in w for w in warnings), result
    assert json.loads(store.read_text())["servers"] == {}


def test_verbose_redirect_location_is_shown_safely(live_server, store):
    # -v logs each request and the Location of a redirect: server text too.
    logged_in(live_server, store)
    before = snapshot(store.parent)

    def redirect(handler):
        handler.close_connection = True
        handler.wfile.write(b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/\x1b[2J\xe2\x80\xae\x9b31m\r\n"
                            b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    live_server.script(sca.API_PATH + "/x", redirect)
    result = run("-v", "--url", live_server.base, "api", "/x")
    check(result, 5, "redirect")
    assert "elsewhere.example" in result.err  # the Location is shown with -v, made safe
    assert not [c for c in result.err if ord(c) < 32 and c != "\n" or 0x7f <= ord(c) < 0xa0], result
    assert_unchanged(before, store.parent, lock_may_appear=False)


def raw_redirect(location):
    """A redirect whose Location urlsplit cannot parse, written raw (latin-1 bytes)."""

    def answer(handler):
        handler.close_connection = True
        handler.wfile.write(b"HTTP/1.1 302 Found\r\nLocation: " + location.encode("latin-1") +
                            b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    return answer


@pytest.mark.parametrize("location", ["http://[::1", "http://[127.0.0.1]/"], ids=["open-bracket", "bracketed-ipv4"])
@pytest.mark.parametrize("endpoint", ["device", "refresh", "api", "healthcheck", "logout"])
def test_redirect_to_an_unparsable_location_is_a_clean_error(live_server, store, endpoint, location):
    # A Location that urljoin/urlsplit refuses (ValueError "Invalid IPv6 URL")
    # is a server error like any redirect that is not followed: exit 5, and
    # for logout a warning (revocation is best effort).
    path = {"device": sca.DEVICE_PATH, "refresh": sca.TOKEN_PATH, "api": sca.API_PATH + "/x",
            "healthcheck": sca.API_PATH + sca.HEALTHCHECK_PATH, "logout": sca.REVOCATION_PATH}[endpoint]
    argv = {"device": ["login", "--no-qr", "--no-check"], "refresh": ["refresh"], "api": ["api", "/x"],
            "healthcheck": ["healthcheck"], "logout": ["logout"]}[endpoint]
    if endpoint != "device":
        logged_in(live_server, store)
    before = snapshot(store.parent)
    live_server.script(path, raw_redirect(location), raw_redirect(location))
    result = run("-v", "--url", live_server.base, *argv)
    if endpoint == "logout":
        check(result, 0)
        warnings = [line for line in result.err.splitlines() if line.startswith("standcloud-auth: warning:")]
        assert len(warnings) == 2 and all("redirect" in w for w in warnings), result
        assert json.loads(store.read_text())["servers"] == {}
        return
    check(result, 5, "redirect")
    assert_unchanged(before, store.parent)
