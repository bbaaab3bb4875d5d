"""The habits of the shell (issue 12, points 1 and 3 to 6; point 2, the
screen, is test_screen.py's).

- Advice names the program as it was run: ``python standcloud_auth.py``
  (argv[0] as typed), ``python -m standcloud_auth``, the console script
  ``standcloud-auth`` (installed into a throwaway virtual environment once
  per session) and in-process main(); with ``--url`` (normalized) and
  ``--store`` when they were given on the command line, never when the URL
  came from STANDCLOUD_URL or the store. The advice is read back as a POSIX
  shell reads it, so it must also paste into one. With STANDCLOUD_TOKEN a
  refusal blames the variable, and ``login`` names it.
- Read-only commands write nothing: the whole HOME is compared before and
  after (names, sizes, inodes, mtimes); a login cancelled by a real SIGINT
  leaves no folder, lock file or temporary file.
- Several servers: ``status`` lists each (text and a JSON array), ``logout
  --all`` revokes at each, ``token``/``api`` and the rest refuse to guess.
- NO_COLOR, ``--open`` with a browser that blocks or that does not exist,
  and the Deny of Authelia 4.39.20 (500 server_error) against a proxy's 502:
  timing on the fake clock in-process, and one real process each.

Speed: what takes real time runs in background threads from this module's
first test on: the real processes that wait for real polls (at least 1 s
apart: the module's floor), all together in ``batch`` (about 4 s), and the
console script's install (about 10 s); the tests that read them wait. The
other real processes run eight at a time (``processes``).
"""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import standcloud_auth as sca
from conftest import HERE, MODULE, Result, assert_one_error, entry_for, error_lines, free_port, isolation, run_cmd, write_store
from fakeserver import CONSENT_PATH, FakeStandCloud
from terminal import looks_like_qr_art, read_qr, run_in_pty

POSIX = os.name == "posix"
BARE, BARE_URL = "company.standcloud.io", "https://company.standcloud.io"
LOOPBACK_TYPED, LOOPBACK_URL = "HTTP://127.0.0.1:8765/", "http://127.0.0.1:8765"
ADVICE = re.compile(r"run (?:login again: )?'(.*)'$")
SGR = re.compile(rb"\x1b\[[0-9;:]*m")
COUNTDOWN = re.compile(r"(\d+):(\d\d) left")
STATUS_KEYS = {"url", "store", "source", "logged_in", "access_token_expires_at", "access_token_expires_in",
               "has_refresh_token", "refreshed_at", "scope"}
HTML_502 = (502, {"Content-Type": "text/html"}, b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>")
needs_posix = pytest.mark.skipif(not POSIX, reason="POSIX shells, signals and pseudo-terminals")


# == helpers ====================================================================


def run_py(*args, **kwargs):
    return run_cmd([sys.executable] + list(args), **kwargs)


def shell_words(command):
    """The words a POSIX shell makes of ``command`` (as pasted by a person)."""
    if POSIX and os.path.exists("/bin/sh"):
        out = subprocess.check_output(["/bin/sh", "-c", 'printf "%s\\n" ' + command], env={"PATH": os.defpath})
        return out.decode("utf-8").splitlines()
    return shlex.split(command)


def advised(result):
    """The command that the one error line advises, as shell words."""
    lines = error_lines(result.err)
    assert len(lines) == 1, result
    found = ADVICE.search(lines[0])
    assert found, "no advice ('run ...') in %r" % lines[0]
    return shell_words(found.group(1))


def check_advice(result, program, options, command="login"):
    """The advice is ``program [options] command``: options in any order,
    each given once, none other."""
    words = advised(result)
    why = "advice %r in %r" % (words, error_lines(result.err))
    assert words[:len(program)] == program, why
    rest = words[len(program):]
    assert rest and rest[-1] == command, why
    pairs = rest[:-1]
    assert len(pairs) % 2 == 0 and len(pairs) // 2 == len(options), why
    assert dict(zip(pairs[0::2], pairs[1::2])) == options, why


def snapshot(folder):
    """``folder`` and everything under it: type, size, permissions, inode
    and modification time (ns) of each, by relative path."""
    folder, found = str(folder), {}

    def record(path):
        info = os.lstat(path)
        found[os.path.relpath(path, folder)] = (stat.S_IFMT(info.st_mode), info.st_size, stat.S_IMODE(info.st_mode),
                                                info.st_ino, info.st_mtime_ns)

    record(folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            record(os.path.join(root, name))
    return found


def names(folder):
    return set(snapshot(folder)) - {"."}


def age(folder, seconds=86400 * 2):
    """Set every mtime under ``folder`` into the past, so that a write shows."""
    then = time.time() - seconds
    for root, dirs, files in os.walk(str(folder)):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (then, then))
    os.utime(str(folder), (then, then))


def default_store(home):
    return os.path.join(str(home), ".config", "standcloud", "tokens.json")


def write_default_store(home, servers, lock=False):
    """A store where the module looks by default (XDG_CONFIG_HOME=HOME/.config),
    with a lock file beside it when ``lock`` (as a login leaves it)."""
    path = default_store(home)
    os.makedirs(os.path.dirname(path), 0o700)
    with open(path, "w") as handle:
        handle.write(json.dumps({"version": 1, "servers": servers}))
    os.chmod(path, 0o600)
    if lock:
        with open(path + ".lock", "wb"):
            pass
        os.chmod(path + ".lock", 0o600)
    return path


def live_entry(now, **overrides):
    return entry_for({"access_token": "authelia_at_" + "a" * 20, "refresh_token": "authelia_rt_" + "r" * 20}, now,
                     **overrides)


def dead_entry(now):
    """Not usable: the access token has expired and there is no refresh token."""
    return entry_for({"access_token": "authelia_at_" + "d" * 20}, now, refresh_token=None, expires_at=now - 100)


class Stamped(list):
    """A fake's request log that stamps each request with ``clock()``."""

    def __init__(self, clock):
        list.__init__(self)
        self.clock = clock

    def append(self, record):
        record["at"] = self.clock()
        list.append(self, record)


def poll_times(fake):
    return [r["at"] for r in fake.requests if r["path"] == sca.TOKEN_PATH and r["form"].get("grant_type") == sca.DEVICE_GRANT]


def started_at(fake):
    return [r["at"] for r in fake.requests if r["path"] == sca.DEVICE_PATH][0]


def gaps(fake):
    times = [started_at(fake)] + poll_times(fake)
    return [later - earlier for earlier, later in zip(times, times[1:])]


def stored_servers(path):
    with open(str(path)) as handle:
        return json.loads(handle.read())["servers"]


def revocations(fake):
    return [(r["form"].get("token"), r["form"].get("token_type_hint")) for r in fake.requests
            if r["path"] == sca.REVOCATION_PATH]


def qr_matrix(uri):
    encode = getattr(sca, "_qr_encode", None) or sca._qr_module()._qr_encode
    return encode(uri.encode("utf-8"))[0]


# == real processes, run together ======================================================
#
# Each case is the CLI in a fresh interpreter with a HOME of its own; the first
# test that asks for one runs them all, eight at a time (one at a time, the
# interpreter start-ups add up).


class Case(object):
    """``argv`` after the interpreter; "{folder}" in argv and env is the
    case's folder; ``cwd`` "repo" (the checkout) or "folder"; ``setup(folder,
    home)`` runs first."""

    def __init__(self, argv, env=None, cwd="folder", setup=None):
        self.argv, self.env, self.cwd, self.setup = argv, env or {}, cwd, setup


class CaseRun(object):
    def __init__(self, result, before, after, folder, home):
        self.result, self.before, self.after, self.folder, self.home = result, before, after, folder, home

    def written(self):
        return sorted(set(self.after) ^ set(self.before)) or sorted(
            k for k in self.after if self.after[k] != self.before.get(k))


def _run_case(case, folder):
    home = os.path.join(folder, "home")
    os.makedirs(home)
    if case.setup is not None:
        case.setup(folder, home)
    age(home)
    env = isolation(home)
    env.update((k, v.replace("{folder}", folder)) for k, v in case.env.items())
    before = snapshot(home)
    result = run_py(*[a.replace("{folder}", folder) for a in case.argv], env=env,
                    cwd=HERE if case.cwd == "repo" else folder)
    return CaseRun(result, before, snapshot(home), folder, home)


def _copy_into(name):
    def setup(folder, home):
        os.mkdir(os.path.join(folder, name))
        shutil.copy(MODULE, os.path.join(folder, name, "standcloud_auth.py"))
    return setup


def _store_setup(servers, lock=False):
    def setup(folder, home):
        write_default_store(home, servers(time.time()), lock=lock)
    return setup


COPIED = ["station files", "O'Brien's bench", "line$7 tools"]

# id -> (case, program words, --url/--store in the advice)
ADVICE_CASES = {
    "file-from-its-folder": (Case(["standcloud_auth.py", "--url", LOOPBACK_TYPED, "token"], cwd="repo"),
                             ["python", "standcloud_auth.py"], {"--url": LOOPBACK_URL}),
    "file-from-elsewhere": (Case([MODULE, "token", "--url", BARE]), ["python", MODULE], {"--url": BARE_URL}),
    "file-url-abbreviated": (Case([MODULE, "token", "--ur=" + BARE + "/"]), ["python", MODULE], {"--url": BARE_URL}),
    "module": (Case(["-m", "standcloud_auth", "--url", BARE, "token"], cwd="repo"),
               ["python", "-m", "standcloud_auth"], {"--url": BARE_URL}),
    "file-url-from-env": (Case(["standcloud_auth.py", "token"], {"STANDCLOUD_URL": BARE}, cwd="repo"),
                          ["python", "standcloud_auth.py"], {}),
    "module-url-from-env": (Case(["-m", "standcloud_auth", "token"], {"STANDCLOUD_URL": BARE}, cwd="repo"),
                            ["python", "-m", "standcloud_auth"], {}),
    "url-from-the-store": (Case(["standcloud_auth.py", "token"], cwd="repo",
                                setup=_store_setup(lambda now: {BARE_URL: dead_entry(now)}, lock=True)),
                           ["python", "standcloud_auth.py"], {}),
    "flag-beats-env": (Case([MODULE, "--url", BARE, "token"], {"STANDCLOUD_URL": "other.example"}),
                       ["python", MODULE], {"--url": BARE_URL}),
    "store-flag": (Case([MODULE, "--store", "station store/tokens.json", "token", "--url", BARE]),
                   ["python", MODULE], {"--url": BARE_URL, "--store": "station store/tokens.json"}),
    "store-flag-after-command": (Case([MODULE, "token", "--store=station store/tokens.json"], {"STANDCLOUD_URL": BARE}),
                                 ["python", MODULE], {"--store": "station store/tokens.json"}),
    "store-from-env": (Case([MODULE, "token", "--url", BARE], {"STANDCLOUD_TOKEN_FILE": "{folder}/env store/tokens.json"}),
                       ["python", MODULE], {"--url": BARE_URL}),
}
for _name in COPIED:
    ADVICE_CASES["copied-into " + _name] = (
        Case([os.path.join(_name, "standcloud_auth.py"), "--url", BARE, "token"], setup=_copy_into(_name)),
        ["python", os.path.join(_name, "standcloud_auth.py")], {"--url": BARE_URL})

_OTHER = _store_setup(lambda now: {"https://other.example": live_entry(now)}, lock=True)
_DEAD_NO_LOCK = _store_setup(lambda now: {BARE_URL: dead_entry(now)})
_VALID = _store_setup(lambda now: {BARE_URL: live_entry(now)}, lock=True)

# id -> (case, exit code): commands that only read, in real processes
READ_ONLY_CASES = {
    "token": (Case([MODULE, "--url", BARE, "token"]), 3),
    "status --json (every server)": (Case([MODULE, "status", "--json"]), 3),
    "status --url": (Case([MODULE, "--url", BARE, "status"]), 3),
    "refresh": (Case([MODULE, "--url", BARE, "refresh"]), 3),
    "healthcheck": (Case([MODULE, "--url", BARE, "healthcheck"]), 3),
    "api": (Case([MODULE, "--url", BARE, "api", "/test_report", "-d", "{}"]), 3),
    "logout": (Case([MODULE, "--url", BARE, "logout"]), 0),
    "logout --all": (Case([MODULE, "logout", "--all"]), 0),
    "token, another server stored": (Case([MODULE, "--url", BARE, "token"], setup=_OTHER), 3),
    "logout, another server stored": (Case([MODULE, "--url", BARE, "logout"], setup=_OTHER), 0),
    "token, a dead session copied without its lock file": (Case([MODULE, "token"], setup=_DEAD_NO_LOCK), 3),
    "token, valid": (Case([MODULE, "token"], setup=_VALID), 0),
    "token --json, valid": (Case([MODULE, "token", "--json"], setup=_VALID), 0),
    "status, valid": (Case([MODULE, "status"], setup=_VALID), 0),
}

PROCESS_CASES = dict([("advice: " + k, v[0]) for k, v in ADVICE_CASES.items()]
                     + [("read-only: " + k, v[0]) for k, v in READ_ONLY_CASES.items()])


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("processes"))
    with ThreadPoolExecutor(8) as pool:
        futures = dict((name, pool.submit(_run_case, case, os.path.join(folder, "case-%02d" % number)))
                       for number, (name, case) in enumerate(sorted(PROCESS_CASES.items())))
    return dict((name, future.exception() or future.result()) for name, future in futures.items())


def ran(processes, name):
    found = processes[name]
    if isinstance(found, BaseException):
        raise found
    return found


# == 1. advice names the program as it was run ======================================
#
# `token` when not logged in: exit 3, one line, and the advice. The URL is
# never contacted (not logged in is known from the store).


@pytest.mark.parametrize("name", sorted(ADVICE_CASES))
def test_advice_names_the_program_as_run(processes, name):
    _, program, options = ADVICE_CASES[name]
    run = ran(processes, "advice: " + name)
    assert_one_error(run.result, 3)
    assert BARE_URL in run.result.err or LOOPBACK_URL in run.result.err
    check_advice(run.result, program, options)  # read back as a POSIX shell reads it
    assert run.result.out == ""
    assert run.after == run.before, "written: %s" % run.written()  # a read-only question
    assert not os.path.exists(os.path.join(run.folder, "station store"))
    assert not os.path.exists(os.path.join(run.folder, "env store"))


@pytest.mark.parametrize("argv, env, options", [
    (["--url", BARE, "token"], {}, {"--url": BARE_URL}),
    (["token"], {"STANDCLOUD_URL": BARE}, {}),
    (["token", "--url", LOOPBACK_TYPED, "--store", "s/tokens.json"], {}, {"--url": LOOPBACK_URL, "--store": "s/tokens.json"}),
], ids=["url-flag", "url-env", "url-and-store-flags"])
def test_advice_in_process_main_names_standcloud_auth(cli, monkeypatch, tmp_path, argv, env, options):
    monkeypatch.chdir(str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = cli(*argv)
    assert_one_error(result, 3)
    check_advice(result, ["standcloud-auth"], options)
    assert not (tmp_path / "s").exists()


# -- STANDCLOUD_TOKEN ------------------------------------------------------------


def no_login_advice(err):
    return "run '" not in err and "run login again" not in err and "login'" not in err


@pytest.mark.parametrize("argv", [["healthcheck"], ["api", "/test_report", "-d", '{"ok": true}']],
                         ids=["healthcheck", "api"])
def test_env_token_refused_says_so_real_process(live_server, isolated_env, argv):
    before = snapshot(isolated_env)
    result = run_py(MODULE, "--url", live_server.base, *argv, env={"STANDCLOUD_TOKEN": "static-api-key-0123456789"})
    assert_one_error(result, 3)
    line = error_lines(result.err)[0]
    assert "the token in STANDCLOUD_TOKEN was refused" in line and "401" in line, line
    assert no_login_advice(result.err), line
    assert "static-api-key-0123456789" not in result.err
    assert [r["path"] for r in live_server.requests] == [sca.API_PATH + argv[1] if argv[0] == "api"
                                                         else sca.API_PATH + sca.HEALTHCHECK_PATH]
    assert snapshot(isolated_env) == before


def test_env_token_forbidden_says_so(cli, server, monkeypatch):
    monkeypatch.setenv("STANDCLOUD_TOKEN", server.issue()["access_token"])
    server.script(sca.API_PATH + sca.HEALTHCHECK_PATH, (403, {"Content-Type": "text/plain"}, b"forbidden"))
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    line = error_lines(result.err)[0]
    assert "the token in STANDCLOUD_TOKEN was refused" in line and "403" in line, line
    assert no_login_advice(result.err)


def test_env_token_control_a_stored_token_refused_does_say_run_login(cli, server, store_path, clock):
    # The same 401 without the variable: the advice to log in again is there
    # (so the check above can tell the two apart).
    tokens = server.issue()
    write_store(store_path, {server.base: entry_for(tokens, clock.now(), refresh_token=None)})
    server.script(sca.API_PATH + sca.HEALTHCHECK_PATH, (401, {}, b""), (401, {}, b""))
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert not no_login_advice(result.err)


@pytest.mark.parametrize("how", ["url-flag", "url-env", "no-url"])
def test_env_token_login_exits_2_naming_the_variable(live_server, isolated_env, how):
    env = {"STANDCLOUD_TOKEN": "static-api-key-0123456789"}
    argv = ["login", "--no-qr"]
    if how == "url-flag":
        argv = ["--url", live_server.base] + argv
    elif how == "url-env":
        env["STANDCLOUD_URL"] = live_server.base
    before = snapshot(isolated_env)
    result = run_py(MODULE, *argv, env=env)
    assert_one_error(result, 2)
    assert "STANDCLOUD_TOKEN" in error_lines(result.err)[0]
    assert live_server.requests == []
    assert snapshot(isolated_env) == before


# == 2. read-only commands write nothing ================================================


@pytest.mark.parametrize("name", sorted(READ_ONLY_CASES))
def test_read_only_writes_nothing_real_process(processes, name):
    """No folder, no lock file, nothing touched: the whole HOME compared
    (names, sizes, inodes, mtimes)."""
    run = ran(processes, "read-only: " + name)
    assert run.result.code == READ_ONLY_CASES[name][1], run.result
    assert "Traceback" not in run.result.err
    assert run.after == run.before, "written: %s" % run.written()


READ_ONLY = [
    # argv after --url B, exit code when not logged in
    (["token"], 3), (["token", "--json"], 3), (["token", "--min-valid", "30"], 3), (["status"], 3),
    (["status", "--json"], 3), (["refresh"], 3), (["healthcheck"], 3), (["api", "/test_report", "-d", '{"ok": true}'], 3),
    (["logout"], 0), (["logout", "--no-revoke"], 0),
]
STORES = {
    "none": lambda home, now: None,
    "another-server": lambda home, now: write_default_store(home, {"https://other.example": live_entry(now)}, lock=True),
    "dead-session": lambda home, now: write_default_store(home, {BARE_URL: dead_entry(now)}, lock=True),
    "dead-session-copied-without-lock": lambda home, now: write_default_store(home, {BARE_URL: dead_entry(now)}),
}


# A dead session is stored: logout removes it (a write, rightly).
NOT_LOGGED_IN = [(store, argv, code) for store in sorted(STORES) for argv, code in READ_ONLY
                 if not (store.startswith("dead") and argv[0] == "logout")]


@pytest.mark.parametrize("store, argv, code", NOT_LOGGED_IN,
                         ids=["%s-%s" % (" ".join(a[:2]), s) for s, a, _ in NOT_LOGGED_IN])
def test_not_logged_in_writes_nothing(cli, isolated_env, store, argv, code):
    STORES[store](isolated_env, time.time())
    age(isolated_env)
    before = snapshot(isolated_env)
    result = cli("--url", BARE, *argv)
    assert result.code == code, result
    after = snapshot(isolated_env)
    assert after == before, "written: %s" % sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))


@pytest.mark.parametrize("argv, code", [(["status"], 3), (["status", "--json"], 3), (["logout", "--all"], 0),
                                        (["token"], 2), (["api", "/x"], 2), (["healthcheck"], 2), (["refresh"], 2)])
def test_no_url_and_no_store_writes_nothing(cli, isolated_env, argv, code):
    result = cli(*argv)
    assert result.code == code, result
    assert names(isolated_env) == set()


@pytest.mark.parametrize("argv", [["token"], ["token", "--json"], ["token", "--min-valid", "30"], ["status"],
                                  ["status", "--json"], ["healthcheck"], ["api", "/test_report"]],
                         ids=lambda a: " ".join(a))
def test_valid_token_leaves_everything_as_it_was(cli, server, clock, isolated_env, argv):
    """mtimes too: the store is not rewritten, the lock file not touched."""
    tokens = server.issue()
    write_default_store(isolated_env, {server.base: entry_for(tokens, clock.now())}, lock=True)
    age(isolated_env)
    before = snapshot(isolated_env)
    result = cli(*argv)
    assert result.code == 0, result
    if argv[0] == "token":
        assert tokens["access_token"] in result.out
    assert server.refreshes() == 0
    assert snapshot(isolated_env) == before


def test_valid_token_control_a_refresh_does_write(cli, server, clock, isolated_env):
    # The comparison above sees a write: an expired token is refreshed and saved.
    tokens = server.issue()
    write_default_store(isolated_env, {server.base: entry_for(tokens, clock.now(), expires_at=clock.now() - 5)},
                        lock=True)
    age(isolated_env)
    before = snapshot(isolated_env)
    result = cli("token")
    assert result.code == 0 and server.refreshes() == 1, result
    assert snapshot(isolated_env) != before


class _Reader(object):
    """Collects a pipe's bytes in a thread; ``wait_for(text)``."""

    def __init__(self, pipe):
        self.pipe, self.data, self.lock = pipe, bytearray(), threading.Lock()
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True
        self.thread.start()

    def _run(self):
        while True:
            chunk = os.read(self.pipe.fileno(), 65536)
            if not chunk:
                return
            with self.lock:
                self.data.extend(chunk)

    def text(self):
        with self.lock:
            return self.data.decode("utf-8", "replace")

    def wait_for(self, text, timeout=10.0):
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self):
        self.thread.join(10)
        self.pipe.close()


@needs_posix
@pytest.mark.parametrize("store", ["none", "another-server"])
def test_login_cancelled_with_sigint_leaves_nothing(live_server, isolated_env, store):
    if store == "another-server":
        write_default_store(isolated_env, {"https://other.example": live_entry(time.time())}, lock=True)
    files_before = {k: v for k, v in snapshot(isolated_env).items() if stat.S_ISREG(v[0])}
    names_before = names(isolated_env)
    proc = subprocess.Popen([sys.executable, MODULE, "--url", live_server.base, "login", "--no-qr"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        assert err.wait_for("Waiting for approval", 20), err.text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        out.close()
        err.close()
    result = Result(code, out.text(), err.text())
    assert code == 130, result
    assert_one_error(result, 130)
    assert "login cancelled" in error_lines(result.err)[0]
    assert live_server.polls() == 0  # it was waiting, not polling
    assert names(isolated_env) == names_before, "left behind: %s" % sorted(names(isolated_env) - names_before)
    assert {k: v for k, v in snapshot(isolated_env).items() if stat.S_ISREG(v[0])} == files_before


# == 3. several servers ===================================================================

A, B = "https://a.example", "https://b.example"


def status_blocks(out):
    return [block for block in out.split("\n\n") if block.strip()]


@pytest.mark.parametrize("dead", [[], [A], [A, B]], ids=["all-usable", "one-not", "none-usable"])
def test_status_lists_every_server(cli, store_path, clock, dead):
    now = clock.now()
    write_store(store_path, {url: dead_entry(now) if url in dead else live_entry(now) for url in (A, B)})
    before = snapshot(store_path.parent)
    result = cli("status", "--json")
    assert result.code == (3 if dead else 0), result
    reports = json.loads(result.out)
    assert isinstance(reports, list) and len(reports) == 2
    assert sorted(r["url"] for r in reports) == [A, B]
    for report in reports:
        assert set(report) == STATUS_KEYS, report
        assert report["store"] == str(store_path) and report["source"] == "file"
        assert report["logged_in"] is (report["url"] not in dead)
        assert report["has_refresh_token"] is (report["url"] not in dead)
    if dead:
        assert_one_error(result, 3)
        line = error_lines(result.err)[0]
        assert all(url in line for url in dead) and all(url not in line for url in (A, B) if url not in dead), line
    else:
        assert result.err == ""
    text = cli("status")
    assert text.code == result.code and text.err == result.err
    blocks = status_blocks(text.out)
    assert len(blocks) == 2, text.out
    for url in (A, B):
        mine = [block for block in blocks if url in block]
        assert len(mine) == 1, text.out
        assert re.search(r"Logged in\s+%s" % ("no" if url in dead else "yes"), mine[0]), mine[0]
    assert snapshot(store_path.parent) == before


def test_status_one_server_is_still_an_array(cli, store_path, clock):
    write_store(store_path, {A: live_entry(clock.now())})
    result = cli("status", "--json")
    assert result.code == 0
    reports = json.loads(result.out)
    assert isinstance(reports, list) and [r["url"] for r in reports] == [A]


@pytest.mark.parametrize("how", ["no-file", "empty-file"])
def test_status_empty_store_exits_3(cli, store_path, how):
    if how == "empty-file":
        write_store(store_path, {})
    result = cli("status", "--json")
    assert_one_error(result, 3)
    assert json.loads(result.out) == []
    text = cli("status")
    assert_one_error(text, 3)
    assert status_blocks(text.out) == []


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("url, code", [(A, 0), ("https://c.example", 3)], ids=["stored", "not-stored"])
def test_status_with_a_url_gives_one_object(cli, store_path, clock, monkeypatch, how, url, code):
    write_store(store_path, {A: live_entry(clock.now()), B: live_entry(clock.now())})
    if how == "env":
        monkeypatch.setenv("STANDCLOUD_URL", url)
    result = cli(*((["--url", url] if how == "flag" else []) + ["status", "--json"]))
    assert result.code == code, result
    report = json.loads(result.out)
    assert isinstance(report, dict) and set(report) == STATUS_KEYS and report["url"] == url
    text = cli(*((["--url", url] if how == "flag" else []) + ["status"]))
    assert len(status_blocks(text.out)) == 1 and url in text.out


def test_status_lists_every_server_real_process(store_path):
    now = time.time()
    write_store(store_path, {A: live_entry(now), B: dead_entry(now)})
    result = run_py(MODULE, "status", "--json")
    assert_one_error(result, 3)
    reports = json.loads(result.out)
    assert sorted((r["url"], r["logged_in"]) for r in reports) == [(A, True), (B, False)]
    assert all(set(r) == STATUS_KEYS for r in reports)
    text = run_py(MODULE, "status")
    assert text.code == 3 and len(status_blocks(text.out)) == 2
    write_store(store_path, {A: live_entry(now), B: live_entry(now)})
    assert run_py(MODULE, "status").code == 0


def test_status_lists_a_stored_plain_http_server(store_path):
    """A lab station logged in to http://10.x with STANDCLOUD_ALLOW_HTTP=1;
    later, `status` in a shell without the variable. It calls no server, so
    there is nothing for the http rule to protect: it lists both."""
    now = time.time()
    write_store(store_path, {"http://10.1.2.3": live_entry(now), B: live_entry(now)})
    result = run_py(MODULE, "status", "--json")
    assert result.code == 0, result
    assert sorted(r["url"] for r in json.loads(result.out)) == ["http://10.1.2.3", B]


@pytest.fixture
def second_server(clock):
    fake = FakeStandCloud(clock).start()
    yield fake
    fake.stop()


def test_logout_all_revokes_at_each_server(cli, server, second_server, store_path, clock):
    first, second = server.issue(), second_server.issue()
    unreachable = "http://127.0.0.1:%d" % free_port()
    write_store(store_path, {server.base: entry_for(first, clock.now()),
                             second_server.base: entry_for(second, clock.now()),
                             unreachable: live_entry(clock.now())})
    result = cli("logout", "--all")
    assert result.code == 0, result
    assert stored_servers(store_path) == {}
    for fake, tokens in ((server, first), (second_server, second)):
        assert revocations(fake) == [(tokens["refresh_token"], "refresh_token"), (tokens["access_token"], "access_token")]
        assert not fake.token_ok(tokens["access_token"])
    for url in (server.base, second_server.base, unreachable):
        assert "Logged out of %s" % url in result.err, result.err
    assert "could not revoke" in result.err  # the unreachable one: a warning, and still removed
    assert error_lines(result.err) == [] and result.out == ""


def test_logout_all_no_revoke_sends_nothing(cli, server, second_server, store_path, clock):
    write_store(store_path, {server.base: entry_for(server.issue(), clock.now()),
                             second_server.base: entry_for(second_server.issue(), clock.now())})
    result = cli("logout", "--all", "--no-revoke")
    assert result.code == 0 and stored_servers(store_path) == {}
    assert server.requests == [] and second_server.requests == []


def test_logout_all_real_process(live_server, store_path):
    other = FakeStandCloud().start()
    try:
        first, second = live_server.issue(), other.issue()
        write_store(store_path, {live_server.base: entry_for(first, time.time()),
                                 other.base: entry_for(second, time.time())})
        result = run_py(MODULE, "logout", "--all")
        assert result.code == 0, result
        assert stored_servers(store_path) == {}
        assert [t for t, _ in revocations(live_server)] == [first["refresh_token"], first["access_token"]]
        assert [t for t, _ in revocations(other)] == [second["refresh_token"], second["access_token"]]
    finally:
        other.stop()


SEVERAL_REFUSED = [["token"], ["token", "--json"], ["api", "/test_report"], ["api", "/test_report", "-d", "{}"],
                   ["healthcheck"], ["refresh"], ["logout"]]


def check_several_refused(result, before, after):
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert A in line and B in line and "--url" in line, line
    assert result.out == ""
    assert after == before


@pytest.mark.parametrize("argv", SEVERAL_REFUSED, ids=lambda a: " ".join(a))
def test_several_servers_and_no_url_exit_2(cli, store_path, clock, argv):
    write_store(store_path, {A: live_entry(clock.now()), B: live_entry(clock.now())})
    before = snapshot(store_path.parent)
    result = cli(*argv)
    check_several_refused(result, before, snapshot(store_path.parent))


@pytest.mark.parametrize("argv", [["token"], ["api", "/test_report", "-d", "{}"]], ids=["token", "api"])
def test_several_servers_and_no_url_exit_2_real_process(store_path, argv):
    write_store(store_path, {A: live_entry(time.time()), B: live_entry(time.time())})
    before = snapshot(store_path.parent)
    result = run_py(MODULE, *argv)
    check_several_refused(result, before, snapshot(store_path.parent))


# == 4. the Deny, and a proxy's 5xx: in-process on the fake clock ======================


def deny_line(result):
    assert_one_error(result, 3)
    return error_lines(result.err)[0]


@pytest.mark.parametrize("interval", [1, 5, 10])
@pytest.mark.parametrize("pending", [0, 2], ids=["deny-before-the-first-poll", "deny-after-two-polls"])
def test_deny_authelia_ends_within_three_polls(cli, server, clock, store_path, interval, pending):
    """Authelia 4.39.20 answers every poll after a Deny with 500
    server_error: at most three polls after it, each at the normal interval;
    exit 3, one line, nothing stored."""
    server.interval = interval
    server.requests = Stamped(clock.monotonic)
    denied_after = []

    def person(_):
        if not denied_after and server.polls() >= pending:
            denied_after.append(server.polls())
            server.approve(deny=True)

    clock.on_sleep = person
    result = cli("--url", server.base, "login", "--no-qr")
    line = deny_line(result)
    assert "refused the code" in line and "denied" in line and "login again" in line, line
    check_advice(result, ["standcloud-auth"], {"--url": server.base})
    after = server.polls() - denied_after[0]
    assert 1 <= after <= 3, "%d polls after the Deny" % after
    for gap in gaps(server):  # the normal interval (and its small margin): no back-off
        assert interval <= gap <= interval * 1.25, gaps(server)
    assert clock.mono == poll_times(server)[-1]  # it ended at the last poll, without waiting on
    assert not store_path.parent.exists()


@pytest.mark.parametrize("status", [403, 400])
def test_deny_rfc_ends_at_once(cli, server, clock, store_path, status):
    server.interval, server.deny_style, server.denied_status = 5, "rfc", status
    server.requests = Stamped(clock.monotonic)
    server.deny_after = 2
    result = cli("--url", server.base, "login", "--no-qr")
    line = deny_line(result)
    assert "denied" in line and "login again" in line, line
    assert server.polls() == 2  # the first answer after the Deny ends it
    assert clock.mono == poll_times(server)[-1]
    assert not store_path.parent.exists()


@pytest.mark.parametrize("count", [1, 2])
def test_a_passing_oauth_5xx_is_polled_again_at_the_normal_interval(cli, server, clock, store_path, count):
    """Fewer than three 500 server_error in a row, then the person approves:
    the login goes on at the normal interval and succeeds."""
    server.interval = 5
    server.requests = Stamped(clock.monotonic)
    server.script(sca.TOKEN_PATH, *[(500, {"Content-Type": "application/json"},
                                     b'{"error": "server_error", "error_description": "busy"}')] * count)
    server.approve_after = 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert server.polls() == count + 1
    assert all(5 <= gap <= 5 * 1.25 for gap in gaps(server)), gaps(server)
    assert server.base in stored_servers(store_path)


PROXY_ANSWERS = [
    HTML_502,
    (503, {}, b""),
    (500, {"Content-Type": "text/plain"}, b"Internal Server Error"),
    (500, {"Content-Type": "application/json"}, b"{}"),
    (504, {"Content-Type": "application/json"}, b'{"message": "upstream timed out"}'),
]


@pytest.mark.parametrize("answer", PROXY_ANSWERS, ids=["502-html", "503-empty", "500-text", "500-empty-json",
                                                       "504-json-not-oauth"])
def test_a_proxy_5xx_is_retried_with_back_off(cli, server, clock, store_path, answer):
    server.interval = 5
    server.requests = Stamped(clock.monotonic)
    server.script(sca.TOKEN_PATH, answer, answer)
    server.approve_after = 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert server.polls() == 3
    first, second, third = gaps(server)
    assert 5 <= first <= 5 * 1.25  # the normal interval
    assert second >= 2 * first * 0.99 and third >= 2 * second * 0.99, gaps(server)  # then doubled, twice
    assert server.base in stored_servers(store_path)


def test_deny_json_events_end_with_the_error(cli, server, clock, store_path):
    server.interval, server.deny_after = 1, 1
    result = cli("--url", server.base, "login", "--json")
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[0]["event"] == "authorize"
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 3 and result.code == 3


# == 5. NO_COLOR in-process (a terminal of 200 x 80) ===================================


@pytest.mark.parametrize("no_color, qr", [("1", []), ("1", ["--qr"]), ("true", []), ("0", []), (None, []), ("", [])],
                         ids=["1", "1-qr", "true", "0", "unset", "empty"])
def test_no_color_in_process(cli, server, clock, store_path, monkeypatch, no_color, qr):
    for name in ("LC_ALL", "LC_CTYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-check", *qr, tty=True, size=(200, 80))
    assert result.code == 0, result
    assert COUNTDOWN.search(result.err) and "\u2588" * 15 in result.err  # on a terminal, with a QR code
    escapes = SGR.findall(result.err.encode("utf-8"))
    if no_color:  # any non-empty value
        assert escapes == [] and "\x1b" not in result.err
    else:
        assert escapes, "no colour without NO_COLOR: the check above could not fail"


# == 6. real processes that wait for real polls, together ===========================
#
# Each scenario has its own fake StandCloud (real clock, interval 1 s: the
# module's floor), HOME and environment, and runs in a thread of its own.

SCRUBBED = ("LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LANGUAGE", "NO_COLOR", "FORCE_COLOR", "CLICOLOR", "CLICOLOR_FORCE",
            "COLUMNS", "LINES", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE", "BROWSER", "DISPLAY",
            "WAYLAND_DISPLAY", "PYTHONPATH", "PYTHONSTARTUP")


class Outcome(object):
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self):
        shown = dict((k, v) for k, v in self.__dict__.items() if k not in ("screen", "raw", "fake"))
        return "Outcome(%r)" % shown


_BASE_ENV = {}  # os.environ as the batch started: tests change os.environ while it runs


def _scenario_env(folder, **extra):
    home = os.path.join(folder, "home")
    os.makedirs(home)
    env = dict((k, v) for k, v in _BASE_ENV.items() if k not in SCRUBBED and not k.startswith("STANDCLOUD_")
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir"))
    env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"), APPDATA=os.path.join(home, "AppData"),
               LANG="C.UTF-8", TERM="xterm")
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env, home


def _fake(interval=1, **attrs):
    fake = FakeStandCloud().start()
    fake.interval = interval
    fake.requests = Stamped(time.monotonic)
    for name, value in attrs.items():
        setattr(fake, name, value)
    return fake


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(pidfile):
    try:
        with open(pidfile) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _kill_browser(pidfile):
    """End the fake browser that this scenario started (by its id)."""
    pid = _read_pid(pidfile)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pid


def _run_piped(argv, env, pidfile=None, timeout=30):
    """The CLI in a real process with stdin a pipe held open (as a terminal
    would be); a browser it started may outlive it and hold its pipes."""
    proc = subprocess.Popen([sys.executable] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    browser_alive = None
    try:
        code = proc.wait(timeout)
        if pidfile is not None:
            pid = _read_pid(pidfile)
            browser_alive = pid is not None and _alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pidfile is not None:
            _kill_browser(pidfile)
        proc.stdin.close()
        out.close()
        err.close()
    return code, out.text(), err.text(), browser_alive


def _script(path, body):
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def _login_piped(folder, fake, extra_args=(), env_extra=None, pidfile=None):
    env, home = _scenario_env(folder, **(env_extra or {}))
    before = names(home)
    try:
        code, out, err, browser_alive = _run_piped([MODULE, "--url", fake.base, "login", "--no-check"]
                                                   + list(extra_args), env, pidfile)
    finally:
        fake.stop()
    store = default_store(home)
    return Outcome(code=code, out=out, err=err, fake=fake, base=fake.base, names_before=before, names_after=names(home),
                   stored=stored_servers(store) if os.path.exists(store) else None, browser_alive=browser_alive,
                   browser_pid=_read_pid(pidfile) if pidfile else None)


def scenario_deny_authelia(folder):
    return _login_piped(folder, _fake(deny_after=1), ["--no-qr"])


def scenario_deny_rfc(folder):
    return _login_piped(folder, _fake(deny_after=1, deny_style="rfc"), ["--no-qr"])


def scenario_proxy_502(folder):
    fake = _fake(approve_after=1)
    fake.script(sca.TOKEN_PATH, HTML_502)
    return _login_piped(folder, fake, ["--no-qr"])


def _sleep_command():
    return shutil.which("sleep") or "/bin/sleep"


def scenario_open_sleeping_browser(folder):
    os.makedirs(folder)
    pidfile = os.path.join(folder, "browser.pid")
    browser = _script(os.path.join(folder, "slow-browser"), 'echo $$ > "%s"\nexec %s 60\n' % (pidfile, _sleep_command()))
    empty = os.path.join(folder, "empty-bin")
    os.mkdir(empty)
    return _login_piped(folder, _fake(approve_after=2), ["--no-qr", "--open"],
                        {"BROWSER": browser, "PATH": empty}, pidfile)


def scenario_open_missing_browser(folder):
    os.makedirs(folder)
    empty = os.path.join(folder, "empty-bin")
    os.mkdir(empty)
    return _login_piped(folder, _fake(approve_after=2), ["--no-qr", "--open"],
                        {"BROWSER": "no-such-browser-standcloud", "PATH": empty})


def scenario_open_console_browser(folder):
    """In a pseudo-terminal: a 'console browser' that reads the terminal.
    A shell around the CLI prints EXIT=<code> once the CLI has ended."""
    os.makedirs(folder)
    pidfile = os.path.join(folder, "browser.pid")
    browser = _script(os.path.join(folder, "console-browser"), 'echo $$ > "%s"\nread line\n' % pidfile)
    empty = os.path.join(folder, "empty-bin")
    os.mkdir(empty)
    env, home = _scenario_env(folder, BROWSER=browser, PATH=empty)
    fake = _fake(approve_after=2)
    seen = {}

    def ended(screen):
        if any("EXIT=" in line for line in screen.text_lines()):
            pid = _read_pid(pidfile)
            seen["browser_alive"] = pid is not None and _alive(pid)
            return True
        return False

    try:
        screen, raw, code = run_in_pty(["/bin/sh", "-c", '"$@"; echo "EXIT=$?"', "sh", sys.executable, MODULE, "--url",
                                        fake.base, "login", "--no-check", "--no-qr", "--open"],
                                       rows=40, cols=100, env=env, stop_when=ended, timeout=20)
    finally:
        fake.stop()
    pid = _read_pid(pidfile)  # ended by run_in_pty with the terminal's process group
    store = default_store(home)
    exits = re.findall(r"EXIT=(\d+)", "\n".join(screen.with_scrollback().text_lines()))
    return Outcome(code=int(exits[0]) if exits else None, screen=screen, raw=raw, fake=fake, base=fake.base,
                   stored=stored_servers(store) if os.path.exists(store) else None,
                   browser_alive=seen.get("browser_alive"), browser_pid=pid)


def scenario_open_failing_browser_pty(folder):
    """On a terminal, where the countdown runs: a browser command that fails
    after a moment (as xdg-open does on a station without a desktop)."""
    os.makedirs(folder)
    browser = _script(os.path.join(folder, "xdg-open-here"), "%s 0.5\nexit 3\n" % _sleep_command())
    empty = os.path.join(folder, "empty-bin")
    os.mkdir(empty)
    env, home = _scenario_env(folder, BROWSER=browser, PATH=empty)
    fake = _fake(approve_after=3)
    try:
        screen, raw, code = run_in_pty([sys.executable, MODULE, "--url", fake.base, "login", "--no-check", "--open"],
                                       rows=40, cols=100, env=env, timeout=20)
    finally:
        fake.stop()
    store = default_store(home)
    return Outcome(code=code, screen=screen, raw=raw, fake=fake, base=fake.base,
                   stored=stored_servers(store) if os.path.exists(store) else None)


def _waiting_screen(folder, lang="C.UTF-8", no_color=None, qr=()):
    """The login waiting on a 120 x 50 terminal (interval 60: no poll comes)."""
    os.makedirs(folder)
    env, _ = _scenario_env(folder, LANG=lang, NO_COLOR=no_color)
    fake = _fake(interval=60)
    try:
        screen, raw, code = run_in_pty([sys.executable, MODULE, "--url", fake.base, "login", "--no-check"] + list(qr),
                                       rows=50, cols=120, env=env, timeout=20,
                                       stop_when=lambda s: any(COUNTDOWN.search(line) for line in s.text_lines()))
        codes = [state["user_code"] for state in fake.devices.values()]
    finally:
        fake.stop()
    uri = fake.base + CONSENT_PATH + "?user_code=" + codes[0] if codes else None
    return Outcome(code=code, screen=screen, raw=raw, uri=uri, user_code=codes[0] if codes else None)


SCENARIOS = {
    "deny-authelia": scenario_deny_authelia,
    "deny-rfc": scenario_deny_rfc,
    "proxy-502": scenario_proxy_502,
}
if POSIX:  # BROWSER scripts for /bin/sh, pseudo-terminals
    SCENARIOS.update({
        "open-sleeping-browser": scenario_open_sleeping_browser,
        "open-missing-browser": scenario_open_missing_browser,
        "open-console-browser": scenario_open_console_browser,
        "open-failing-browser-pty": scenario_open_failing_browser_pty,
        "colour": lambda folder: _waiting_screen(folder),
        "colour-no-color-empty": lambda folder: _waiting_screen(folder, no_color=""),
        "no-color-1": lambda folder: _waiting_screen(folder, no_color="1"),
        "no-color-1-qr": lambda folder: _waiting_screen(folder, no_color="1", qr=["--qr"]),
        "no-color-yes-qr-c-locale": lambda folder: _waiting_screen(folder, lang="C", no_color="yes", qr=["--qr"]),
    })


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every scenario, started at once in threads (by _start_early, when this
    module's first test runs: they mostly wait for polls); outcome() waits."""
    _BASE_ENV.clear()
    _BASE_ENV.update(os.environ)
    folder = str(tmp_path_factory.mktemp("shell-batch"))
    pool = ThreadPoolExecutor(len(SCENARIOS))
    try:
        yield dict((name, pool.submit(run, os.path.join(folder, name))) for name, run in SCENARIOS.items())
    finally:
        pool.shutdown(wait=True)


def outcome(batch, name):
    error = batch[name].exception(timeout=180)
    if error is not None:
        raise error
    return batch[name].result()


def real_gaps(run):
    return gaps(run.fake)


def test_real_deny_authelia_ends_within_three_polls(batch):
    run = outcome(batch, "deny-authelia")
    result = Result(run.code, run.out, run.err)
    line = deny_line(result)
    assert "refused the code" in line and "denied" in line and "login again" in line, line
    check_advice(result, ["python", MODULE], {"--url": run.base})
    assert 1 <= run.fake.polls() <= 3  # deny_after=1: the Deny came before the first poll (timing: in-process)
    assert run.names_after == run.names_before == set() and run.stored is None


def test_real_deny_rfc_ends_at_once(batch):
    run = outcome(batch, "deny-rfc")
    line = deny_line(Result(run.code, run.out, run.err))
    assert "denied" in line and "login again" in line, line
    assert run.fake.polls() == 1
    assert run.names_after == run.names_before == set()


def test_real_proxy_502_is_retried_with_back_off(batch):
    run = outcome(batch, "proxy-502")
    assert run.code == 0, run
    assert run.fake.polls() == 2
    first, second = real_gaps(run)
    assert second >= 2.2 - 0.01, real_gaps(run)  # the wait doubled after the 502 (the normal one is 1.1)
    assert list(run.stored) == [run.base]


def check_polled_normally_and_logged_in(run, polls):
    assert run.code == 0, run
    assert run.fake.polls() == polls
    # 1.1 s, with room for a busy host: a browser that blocked the login would take 60 s or forever.
    assert all(1.1 - 0.01 <= gap <= 4.0 for gap in real_gaps(run)), real_gaps(run)
    assert list(run.stored) == [run.base]


@needs_posix
def test_real_open_with_a_browser_that_never_returns(batch):
    run = outcome(batch, "open-sleeping-browser")
    assert run.browser_pid is not None, "the BROWSER script never ran: %r" % run
    assert run.browser_alive, "the browser had ended before the login: nothing was proved"
    check_polled_normally_and_logged_in(run, 2)
    assert "no web browser could be opened" not in run.err


@needs_posix
def test_real_open_with_no_browser_warns_and_logs_in(batch):
    run = outcome(batch, "open-missing-browser")
    assert "standcloud-auth: warning: no web browser could be opened" in run.err, run.err
    check_polled_normally_and_logged_in(run, 2)


@needs_posix
def test_real_open_with_a_console_browser_on_the_terminal(batch):
    run = outcome(batch, "open-console-browser")
    text = "\n".join(run.screen.with_scrollback().text_lines())
    assert run.browser_pid is not None, "the console browser never ran:\n" + text
    assert run.browser_alive, "the console browser had ended before the login:\n" + text
    check_polled_normally_and_logged_in(run, 2)
    counted = set(COUNTDOWN.findall(run.raw.decode("utf-8", "replace")))
    assert len(counted) >= 2, "the countdown stood still: %r" % counted


@needs_posix
def test_real_open_failing_on_a_terminal_warns_on_a_line_of_its_own(batch):
    """Output rule: a warning is a line starting 'standcloud-auth: warning:',
    also when it comes while the countdown is drawn."""
    run = outcome(batch, "open-failing-browser-pty")
    check_polled_normally_and_logged_in(run, 3)
    lines = run.screen.with_scrollback().text_lines()
    assert any("no web browser could be opened" in line for line in lines), "\n".join(lines)
    assert any(line.startswith("standcloud-auth: warning: no web browser could be opened") for line in lines), \
        [line for line in lines if "no web browser" in line]


def check_waiting(run):
    text = run.screen.text_lines()
    assert run.uri and any(COUNTDOWN.search(line) for line in text), run.screen.dump()
    assert any(run.uri in line for line in run.screen.logical_lines()), run.screen.dump()


@needs_posix
@pytest.mark.parametrize("name", ["no-color-1", "no-color-1-qr", "no-color-yes-qr-c-locale"])
def test_real_no_color_means_no_colour_escape(batch, name):
    run = outcome(batch, name)
    check_waiting(run)
    assert SGR.findall(run.raw) == [], "colour with NO_COLOR: %r" % SGR.findall(run.raw)[:4]
    whole = run.screen.with_scrollback()
    assert all(cell[1:] == (None, None) for row in whole.grid for cell in row)
    if name != "no-color-yes-qr-c-locale":  # UTF-8: the QR code is still drawn, and scans
        assert read_qr(run.screen) == qr_matrix(run.uri), run.screen.dump()
    else:  # ASCII without colour: no QR art at all
        assert not looks_like_qr_art(whole) and all(b < 128 for b in run.raw)


@needs_posix
@pytest.mark.parametrize("name", ["colour", "colour-no-color-empty"])
def test_real_without_no_color_the_qr_uses_colour(batch, name):
    run = outcome(batch, name)
    check_waiting(run)
    assert SGR.findall(run.raw), "no colour on a big terminal: the NO_COLOR check could not fail"
    assert read_qr(run.screen) == qr_matrix(run.uri), run.screen.dump()


# == 7. the console script, installed into a throwaway venv ===========================

_OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
            "Name or service not known", "Network is unreachable", "No route to host", "ConnectTimeout",
            "ReadTimeoutError", "ProxyError", "Could not fetch URL", "SSLError", "connection broken")


class _Install(object):
    """python -m venv, bring its pip up to date, pip install the checkout:
    in a thread, so that the other tests run meanwhile."""

    TIMEOUT = 600

    def __init__(self, folder):
        self.folder, self.venv = folder, os.path.join(folder, "venv")
        self.env = dict((k, v) for k, v in os.environ.items()
                        if not k.startswith("STANDCLOUD_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"))
        self.script = self.skip = self.failure = None
        self.thread = threading.Thread(target=self._run, name="console-script install")
        self.thread.daemon = True
        self.thread.start()

    def _step(self, argv):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=self.env, cwd=self.folder, timeout=self.TIMEOUT)
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    def _run(self):
        try:
            code, text = self._step([sys.executable, "-m", "venv", self.venv])
            if code:
                self.skip = "cannot make a virtual environment here: %s" % text.strip()[-500:]
                return
            bin_dir = os.path.join(self.venv, "Scripts" if os.name == "nt" else "bin")
            python = os.path.join(bin_dir, "python")
            pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            code, text = self._step([python, "-m", "pip", "--version"])
            found = re.match(r"pip (\d+)\.(\d+)", text)
            if code or not found:
                self.skip = "the fresh venv has no working pip: %s" % text.strip()[-500:]
                return
            if (int(found.group(1)), int(found.group(2))) < (21, 3):
                # 3.6 comes with pip 18.1, which cannot build a pyproject-only project:
                # the pip the README names for it (the last one that runs on 3.6).
                code, text = self._step(pip + ["pip==21.3.1"])
                if code:
                    self.skip = "cannot bring pip up to date in a fresh venv (no package index?): %s" % text.strip()[-800:]
                    return
            code, text = self._step(pip + [HERE])
            if code:
                if any(mark in text for mark in _OFFLINE):
                    self.skip = "pip cannot reach a package index for the build backend: %s" % text.strip()[-800:]
                else:
                    self.failure = "pip install %s failed:\n%s" % (HERE, text[-3000:])
                return
            script = os.path.join(bin_dir, "standcloud-auth" + (".exe" if os.name == "nt" else ""))
            if not os.path.exists(script):
                self.failure = "pip install %s made no standcloud-auth in %s: %s" % (HERE, bin_dir, os.listdir(bin_dir))
                return
            self.script = script
        except subprocess.TimeoutExpired as exc:
            self.skip = "installing into a venv took over %d s: %s" % (self.TIMEOUT, exc.cmd)
        except Exception as exc:  # noqa: BLE001 - reported by the test that needs it
            self.failure = "installing into a venv: %r" % (exc,)

    def get(self):
        self.thread.join(self.TIMEOUT * 3 + 60)
        if self.thread.is_alive():
            pytest.skip("the install into a venv has not finished")
        if self.skip:
            pytest.skip(self.skip)
        if self.failure:
            pytest.fail(self.failure)
        return self.script


@pytest.fixture(scope="session")
def console_script_install(tmp_path_factory):
    return _Install(str(tmp_path_factory.mktemp("console-script")))


@pytest.fixture(scope="module", autouse=True)
def _start_early(request):
    """When this module's first test runs, start what takes real time and
    runs by itself (the scenarios, the install), if a test of it is to run."""
    mine = [item.name for item in request.session.items if getattr(item, "module", None) is request.module]
    if any(name.startswith("test_real_") for name in mine):
        request.getfixturevalue("batch")
    if any("console_script" in name for name in mine):
        request.getfixturevalue("console_script_install")


@pytest.mark.parametrize("argv, env, options", [
    (["--url", BARE, "token"], {}, {"--url": BARE_URL}),
    (["token"], {"STANDCLOUD_URL": BARE}, {}),
    (["token", "--url", LOOPBACK_TYPED, "--store", "station store/tokens.json"], {},
     {"--url": LOOPBACK_URL, "--store": "station store/tokens.json"}),
], ids=["url-flag", "url-env", "url-and-store-flags"])
def test_console_script_names_itself(console_script_install, isolated_env, tmp_path, argv, env, options):
    script = console_script_install.get()
    before = snapshot(isolated_env)
    result = run_cmd([script] + argv, env=env, cwd=tmp_path)
    assert_one_error(result, 3)
    check_advice(result, ["standcloud-auth"], options)
    assert snapshot(isolated_env) == before and not (tmp_path / "station store").exists()


def test_console_script_runs_the_installed_copy(console_script_install, tmp_path):
    script = console_script_install.get()
    result = run_cmd([script, "--version"], cwd=tmp_path)
    assert result.code == 0 and result.out == "standcloud-auth %s\n" % sca.__version__, result
