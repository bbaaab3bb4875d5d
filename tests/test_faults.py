"""Faults made to happen (issue 11, point 10): each of the six ways that
version 1 lost a session, caused for real, through the real CLI in real
processes, against the Authelia-like fake whose rotation and reuse detection
are real -- a refresh token sent again kills the whole family, so a rotation
that never reached the disk shows up afterwards as exit 3.

1. SIGINT, SIGTERM, SIGHUP while the server has rotated and holds its answer;
2. a --timeout shorter than the held answer;
3. the process stopped (SIGSTOP) past its deadline with the answer in its socket;
4. a full disk (a small tmpfs), a read-only folder (remount ro, or 0500 and
   the user nobody), RLIMIT_FSIZE: exit 2 and NOTHING sent; also for login;
5. SIGKILL between writing the temporary store and renaming it: adopted next;
   an incomplete, garbage or older temporary store is removed, not adopted;
6. sizes: answers with tokens at the 16 KiB cap (full of JSON escapes) are
   stored and read back by every command; one over the cap is exit 5.
Plus point 8: the store's folder must be ours, the lock file no symlink, a
store kept aside private.

After each fault the test asks: does the next `token` work without a new
login (and does the server still accept the stored refresh token)?

What the environment cannot do is skipped with the reason (mounting needs
root on Linux; signals, SIGSTOP and setuid need POSIX), never passed.
"""

import inspect
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, Result, error_lines, listing, log_in, run_cli, write_store

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals, SIGSTOP, mounts and setuid are POSIX only")

ROOT = os.path.dirname(MODULE)
SAVING = "standcloud-auth: saving the new tokens, one moment"
RECOVERED = "recovered the tokens that a stopped process had saved in "
NOTHING_SENT = "nothing was sent to the server"
JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}
NOBODY = 65534


# ==== helpers ===============================================================


def _default_signals():
    """In the child before exec: SIGINT, SIGTERM and SIGHUP at their defaults,
    whatever the runner ignores (a background job ignores SIGINT, and Python
    then installs no KeyboardInterrupt handler)."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


def wrapped(patch, drop_to=None):
    """Source for ``python -c``: import the module, apply ``patch`` (Python
    lines that may use ``sca``, ``os``, ``signal``, ``sys``), optionally
    become another user, then run main() on the arguments."""
    lines = ["import os, signal, sys", "sys.path.insert(0, %r)" % ROOT, "import standcloud_auth as sca", patch]
    if drop_to is not None:
        # The interpreter lives under /root (0700) here: load what main()
        # imports lazily while still root, then drop to the other user.
        lines += ["import importlib",
                  "for name in %r:" % (LAZY_IMPORTS,),
                  "    importlib.import_module(name)",
                  "os.setgroups([]); os.setgid(%d); os.setuid(%d)" % (drop_to, drop_to)]
    lines.append("sys.exit(sca.main(sys.argv[1:]))")
    return "\n".join(lines) + "\n"


# What main() may import lazily, loaded before the process becomes nobody
# (who cannot read this interpreter's library here: it lives under /root).
LAZY_IMPORTS = ("argparse", "base64", "contextlib", "copy", "difflib", "encodings.idna", "fcntl", "gettext",
                "http.client", "ipaddress", "json", "linecache", "locale", "random", "shlex", "shutil", "signal",
                "socket", "ssl", "stat", "tempfile", "textwrap", "threading", "tokenize", "traceback", "unicodedata",
                "urllib.parse", "urllib.request", "webbrowser")


_running = []


@pytest.fixture(autouse=True)
def _reap():
    """A test that failed half-way leaves no process behind (stopped, or
    waiting on a held answer), nor an unclosed pipe."""
    yield
    while _running:
        proc = _running.pop()
        if proc.popen.returncode is None and proc.popen.poll() is None:
            proc.popen.kill()
        proc.finish()


class Proc(object):
    """The CLI in a real process, its stdout and stderr read as they come
    (so a test can wait for a line before it acts)."""

    def __init__(self, argv, source=None, env=None, preexec_fn=_default_signals):
        cmd = [sys.executable] + (["-c", source] if source else [MODULE]) + list(argv)
        full = dict(os.environ)
        full.update(env or {})
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=full, preexec_fn=preexec_fn)
        self.pid = self.popen.pid
        _running.append(self)
        self._out, self._err = [], []
        self._pumps = [threading.Thread(target=self._pump, args=(self.popen.stdout, self._out)),
                       threading.Thread(target=self._pump, args=(self.popen.stderr, self._err))]
        for pump in self._pumps:
            pump.daemon = True
            pump.start()

    @staticmethod
    def _pump(stream, chunks):
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return
            chunks.append(chunk)

    def err_text(self):
        return b"".join(self._err).decode("utf-8", "replace")

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait_for(self, text, count=1, timeout=10.0):
        """Whether ``text`` shows ``count`` times on stderr before the process
        ends (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.err_text().count(text) >= count:
                return True
            if self.popen.poll() is not None:
                self._pumps[1].join(5)
                return self.err_text().count(text) >= count
            time.sleep(0.005)
        return False

    def finish(self, timeout=30):
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise
        finally:
            for pump in self._pumps:
                pump.join(5)
            self.popen.stdout.close()
            self.popen.stderr.close()
            if self in _running:
                _running.remove(self)
        return Result(self.popen.returncode, b"".join(self._out).decode("utf-8", "replace"), self.err_text())


class Held(object):
    """A scripted token-endpoint answer: the fake's own (a refresh rotates at
    once, a poll issues the tokens), then ``before()``, then held until
    ``release`` is set (at most ``hold`` s); with ``answer=False`` the
    connection is closed without an answer."""

    def __init__(self, hold=15.0, before=None, answer=True):
        self.rotated, self.release, self.sent = threading.Event(), threading.Event(), threading.Event()
        self.hold, self.before, self.answer_it = hold, before, answer
        self.answer = None

    def __call__(self, handler):
        record = handler.fake.requests[-1]
        status, headers, body = handler._behave(record["path"], record["form"])
        self.answer = json.loads(body.decode("utf-8"))
        self.rotated.set()
        if self.before is not None:
            self.before()
        self.release.wait(self.hold)
        handler.close_connection = True
        if self.answer_it:
            try:
                handler.send(status, headers, body)
                handler.wfile.flush()
            except OSError:
                pass
        self.sent.set()


def expired_login(server, store_path):
    """A stored session whose access token has expired: `token` refreshes."""
    return log_in(server, store_path, time.time(), expires_at=time.time() - 10)


def stored(store_path, base):
    return json.loads(store_path.read_text())["servers"].get(base)


def leftovers(folder):
    return sorted(name for name in os.listdir(str(folder)) if name.endswith(".tmp"))


def one_error(result, code):
    assert result.code == code, result
    assert "Traceback" not in result.err, result.err
    lines = error_lines(result.err)
    assert len(lines) == 1, result.err
    return lines[0]


def assert_saved(store_path, base, answer):
    """The store holds the tokens the server issued, privately, and no
    temporary file is left beside it."""
    entry = stored(store_path, base)
    assert entry["access_token"] == answer["access_token"]
    assert entry["refresh_token"] == answer["refresh_token"]
    assert stat.S_IMODE(os.stat(str(store_path)).st_mode) == 0o600
    assert leftovers(store_path.parent) == []


def assert_answer_used(result, server, store_path, answer):
    """`token` printed the token of the answer the server held back, saved it,
    and the session lives on."""
    assert result.code == 0, result
    assert result.out == answer["access_token"] + "\n"
    assert_saved(store_path, server.base, answer)
    assert_session_survives(server, store_path, answer)


def assert_session_survives(server, store_path, answer=None):
    """The next `token` works without logging in, and the stored refresh
    token is the live one at the server: `token --min-valid 3600` must
    refresh with it (a lost rotation: exit 3, "the session has ended")."""
    entry = stored(store_path, server.base)
    if answer is not None:
        assert entry["refresh_token"] == answer["refresh_token"]
    before = server.refreshes()
    result = run_cli("--url", server.base, "token", "--min-valid", "3600")
    assert result.code == 0, result
    assert server.refreshes() == before + 1
    sent = [r["form"].get("refresh_token") for r in server.requests if r["form"].get("grant_type") == "refresh_token"]
    assert sent[-1] == entry["refresh_token"]
    assert result.out.strip() == stored(store_path, server.base)["access_token"]
    assert server.token_ok(result.out.strip()), "the printed access token is dead at the server"


# ==== 1. signals while the rotated answer is held ===========================

SIGNALS = [("SIGINT", 130), ("SIGTERM", -signal.SIGTERM), ("SIGHUP", -signal.SIGHUP)]


@pytest.mark.parametrize("name, code", SIGNALS)
def test_signal_while_the_rotated_answer_is_held_saves_then_acts(live_server, store_path, name, code):
    old = expired_login(live_server, store_path)
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "token"])
    try:
        assert held.rotated.wait(10), "the refresh never reached the server"
        proc.signal(getattr(signal, name))
        # The process must still be alive and say that it holds the signal.
        assert proc.wait_for(SAVING), "%s was not held: %r" % (name, proc.err_text())
    finally:
        held.release.set()
    result = proc.finish()
    assert result.code == code, result
    assert result.out == ""
    assert result.err.count(SAVING) == 1
    assert "Traceback" not in result.err
    if name == "SIGINT":
        assert error_lines(result.err) == ["standcloud-auth: error: interrupted"]
    assert held.answer["refresh_token"] != old["refresh_token"]
    assert live_server.refreshes() == 1
    assert_saved(store_path, live_server.base, held.answer)
    assert_session_survives(live_server, store_path, held.answer)


def test_second_sigint_while_held_says_so_again_and_still_saves(live_server, store_path):
    expired_login(live_server, store_path)
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "token"])
    try:
        assert held.rotated.wait(10)
        proc.signal(signal.SIGINT)
        assert proc.wait_for(SAVING, 1), proc.err_text()
        proc.signal(signal.SIGINT)
        assert proc.wait_for(SAVING, 2), proc.err_text()
    finally:
        held.release.set()
    result = proc.finish()
    assert result.code == 130, result
    assert result.err.count(SAVING) == 2
    assert_saved(store_path, live_server.base, held.answer)
    assert_session_survives(live_server, store_path, held.answer)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGINT"])
def test_signal_the_caller_ignores_is_still_ignored_after_the_hold(live_server, store_path, name):
    # Under nohup (SIGHUP ignored) or started in the background by a shell
    # (SIGINT ignored), the held signal must not turn into a death.
    expired_login(live_server, store_path)
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)

    def ignoring():
        _default_signals()
        signal.signal(getattr(signal, name), signal.SIG_IGN)

    proc = Proc(["--url", live_server.base, "token"], preexec_fn=ignoring)
    try:
        assert held.rotated.wait(10)
        proc.signal(getattr(signal, name))
        time.sleep(0.1)
    finally:
        held.release.set()
    result = proc.finish()
    assert result.code == 0, result
    assert result.out == held.answer["access_token"] + "\n"
    assert_saved(store_path, live_server.base, held.answer)


def test_sigterm_while_the_login_tokens_are_held_saves_them(live_server, store_path):
    # The poll that returns the login's tokens is guarded the same way.
    live_server.interval, live_server.approve_after = 1, 1
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "login", "--no-qr", "--no-check"])
    try:
        assert held.rotated.wait(10), proc.err_text()
        assert "access_token" in held.answer  # the fake issued the tokens to this poll
        proc.signal(signal.SIGTERM)
        assert proc.wait_for(SAVING), proc.err_text()
    finally:
        held.release.set()
    result = proc.finish()
    assert result.code == -signal.SIGTERM, result
    assert_saved(store_path, live_server.base, held.answer)
    assert_session_survives(live_server, store_path, held.answer)


# ==== 2. a deadline shorter than the held answer ============================


def test_timeout_shorter_than_the_held_answer_uses_the_answer(live_server, store_path):
    assert sca.REFRESH_WAIT >= 30  # what the CLI below runs with
    expired_login(live_server, store_path)
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "--timeout", "0.2", "token"])
    try:
        assert held.rotated.wait(10)
        time.sleep(0.6)  # real time: the answer comes 0.6 s after the request, past --timeout 0.2
    finally:
        held.release.set()
    assert_answer_used(proc.finish(), live_server, store_path, held.answer)


def test_timeout_longer_than_refresh_wait_is_the_wait(live_server, store_path):
    # max(REFRESH_WAIT, --timeout): with REFRESH_WAIT cut to 0.2 s, --timeout 3 still waits.
    expired_login(live_server, store_path)
    held = Held()
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "--timeout", "3", "token"], source=wrapped("sca.REFRESH_WAIT = 0.2"))
    try:
        assert held.rotated.wait(10)
        time.sleep(0.7)
    finally:
        held.release.set()
    result = proc.finish()
    assert result.code == 0, result
    assert_saved(store_path, live_server.base, held.answer)


def _lost_answer(live_server, store_path):
    """A refresh the server accepted and never answered: REFRESH_WAIT cut to
    0.3 s in the process, --timeout 0.2."""
    old = expired_login(live_server, store_path)
    before = store_path.read_bytes()
    held = Held(answer=False)
    live_server.script(sca.TOKEN_PATH, held)
    proc = Proc(["--url", live_server.base, "--timeout", "0.2", "token"], source=wrapped("sca.REFRESH_WAIT = 0.3"))
    try:
        result = proc.finish()
    finally:
        held.release.set()
    assert held.rotated.is_set()
    return old, before, result


def test_answer_really_lost_says_the_session_may_have_rotated(live_server, store_path):
    old, before, result = _lost_answer(live_server, store_path)
    line = one_error(result, 4)
    url = live_server.base + sca.TOKEN_PATH
    assert "the answer to the refresh sent to %s was lost" % url in line
    assert "the server may already have rotated the session" in line
    assert "run 'standcloud-auth --url %s token' again" % live_server.base in line
    assert "'standcloud-auth --url %s login'" % live_server.base in line
    assert "try again later" not in line
    assert store_path.read_bytes() == before  # nothing invented
    assert leftovers(store_path.parent) == []
    # The server did rotate: the station's next try meets reuse detection.
    # Nothing a client can do (the contract says so); the message said it.
    again = run_cli("--url", live_server.base, "token")
    assert "the session has ended" in one_error(again, 3)


def test_answer_really_lost_names_the_wait_it_really_had(live_server, store_path):
    # The refresh was awaited max(REFRESH_WAIT, --timeout) = 0.3 s: a message
    # that says "no answer in 0.2 s" (the --timeout) understates it; with the
    # defaults it says "no answer in 10 s" after a 30 s wait.
    old, before, result = _lost_answer(live_server, store_path)
    line = one_error(result, 4)
    assert "no answer in 0.3 s" in line, line


# ==== 3. the process paused past its deadline ===============================


def _stopped(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return None  # no /proc: cannot tell


@pytest.mark.parametrize("refresh_wait", [None, 0.2], ids=["timeout-passes", "refresh-wait-passes"])
def test_paused_past_the_deadline_with_the_answer_in_the_socket_uses_it(live_server, store_path, refresh_wait):
    # The server takes the request, stops the process (SIGSTOP), answers into
    # its socket; the test lets every deadline pass, then SIGCONT. With
    # refresh_wait, the process's REFRESH_WAIT is 0.2 s, so the refresh's own
    # deadline passes while it is stopped, not only --timeout.
    expired_login(live_server, store_path)
    ready = threading.Event()
    pid = []

    def stop():
        ready.wait(10)
        os.kill(pid[0], signal.SIGSTOP)
        deadline = time.monotonic() + 2
        while _stopped(pid[0]) is False and time.monotonic() < deadline:
            time.sleep(0.002)

    held = Held(before=stop)
    held.release.set()  # answer as soon as the process is stopped
    live_server.script(sca.TOKEN_PATH, held)
    source = None if refresh_wait is None else wrapped("sca.REFRESH_WAIT = %r" % refresh_wait)
    proc = Proc(["--url", live_server.base, "--timeout", "0.2", "token"], source=source)
    pid.append(proc.pid)
    ready.set()
    try:
        assert held.sent.wait(10), "the server never answered"
        time.sleep(0.5)  # real time: past --timeout and REFRESH_WAIT, while stopped
        assert _stopped(proc.pid) is not False, "the process was not stopped"
    finally:
        proc.signal(signal.SIGCONT)
    assert_answer_used(proc.finish(), live_server, store_path, held.answer)


def test_deadline_fires_while_the_whole_answer_waits_unread_the_answer_is_used(live_server, store_path):
    # The other order of the race that SIGCONT starts: the deadline's timer
    # runs first and shuts the socket down, then the main thread reads the
    # answer that had arrived in full. Made deterministic: REFRESH_WAIT is
    # 0.2 s and the main thread sleeps 0.6 s before it reads the answer.
    expired_login(live_server, store_path)
    patch = ("import http.client, time\n"
             "real = http.client.HTTPConnection.getresponse\n"
             "def getresponse(self):\n"
             "    time.sleep(0.6)\n"
             "    return real(self)\n"
             "http.client.HTTPConnection.getresponse = getresponse\n"
             "sca.REFRESH_WAIT = 0.2\n")
    result = Proc(["--url", live_server.base, "--timeout", "0.2", "token"], source=wrapped(patch)).finish()
    assert result.code == 0, result
    assert live_server.refreshes() == 1
    entry = stored(store_path, live_server.base)
    assert result.out == entry["access_token"] + "\n"
    assert_session_survives(live_server, store_path)


# ==== 4. a full disk, a read-only folder ====================================


def _run(*cmd):
    return subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.fixture
def small_fs(tmp_path, monkeypatch):
    """A 1 MiB tmpfs holding the store folder (STANDCLOUD_TOKEN_FILE
    points into it); skipped with the reason where it cannot be mounted."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a small filesystem is mounted as tmpfs: Linux only")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI's sandbox runs as root)")
    where = tmp_path / "fs"
    where.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where))
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.strip())
    monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", str(where / "store" / "tokens.json"))
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def _remount(where, how):
    done = _run("mount", "-o", "remount," + how, str(where))
    assert done.returncode == 0, done.stderr


def fill(folder, leave):
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free
    (0: until a write fails)."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        left = free - leave
        while left > 0:
            left -= os.write(fd, b"\0" * min(left, 65536))
        while leave == 0:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


FILL = inspect.getsource(fill)  # the same fill() in the processes that run it


def test_full_disk_fixture_leaves_less_than_the_room_a_refresh_takes(small_fs):
    fill(str(small_fs), 32 * 1024)
    st = os.statvfs(str(small_fs))
    assert st.f_bavail * st.f_frsize < sca.ENTRY_ROOM


@pytest.mark.parametrize("command", ["token", "refresh"])
def test_full_disk_refuses_before_sending_then_works_once_freed(live_server, small_fs, command):
    store = small_fs / "store" / "tokens.json"
    expired_login(live_server, store)
    fill(str(small_fs), 32 * 1024)
    before = store.read_bytes()
    line = one_error(run_cli("--url", live_server.base, command), 2)
    assert "cannot write the token store in %s" % store.parent in line
    assert "No space left on device" in line and NOTHING_SENT in line
    assert live_server.refreshes() == 0 and live_server.requests == []
    assert store.read_bytes() == before
    assert leftovers(store.parent) == []
    os.unlink(str(small_fs / "filler"))  # the fault is fixed
    assert_session_survives(live_server, store)


def test_disk_filling_up_after_the_check_cannot_lose_the_answer(live_server, small_fs):
    # The space is taken before the refresh is sent: a disk that fills up
    # while the answer is on its way does not matter.
    store = small_fs / "store" / "tokens.json"
    expired_login(live_server, store)
    patch = FILL + ("real = sca._refresh_tokens\n"
                    "def _refresh_tokens(*args):\n"
                    "    fill(%r, 0)\n"
                    "    st = os.statvfs(%r)\n"
                    "    sys.stderr.write('free: %%d\\n' %% (st.f_bavail * st.f_frsize))\n"
                    "    return real(*args)\n"
                    "sca._refresh_tokens = _refresh_tokens\n" % (str(small_fs), str(small_fs)))
    result = Proc(["--url", live_server.base, "token"], source=wrapped(patch)).finish()
    assert "free: 0\n" in result.err, result  # the disk really was full when the refresh was sent
    assert result.code == 0, result
    entry = stored(store, live_server.base)
    assert result.out == entry["access_token"] + "\n" and live_server.token_ok(entry["access_token"])
    assert leftovers(store.parent) == []
    os.unlink(str(small_fs / "filler"))
    assert_session_survives(live_server, store)


@pytest.mark.parametrize("lock_file", [True, False], ids=["lock-file-there", "no-lock-file"])
def test_read_only_store_folder_refuses_before_sending_then_works(live_server, small_fs, lock_file):
    store = small_fs / "store" / "tokens.json"
    expired_login(live_server, store)
    if lock_file:  # as any earlier run leaves it
        os.close(os.open(str(store) + ".lock", os.O_CREAT | os.O_RDWR, 0o600))
    before = store.read_bytes()
    _remount(small_fs, "ro")
    line = one_error(run_cli("--url", live_server.base, "token"), 2)
    assert "Read-only file system" in line and str(store.parent) in line
    assert live_server.refreshes() == 0 and live_server.requests == []
    assert store.read_bytes() == before
    _remount(small_fs, "rw")
    assert leftovers(store.parent) == []
    assert_session_survives(live_server, store)


def test_read_only_store_folder_message_says_nothing_was_sent(live_server, small_fs):
    # V2-NOTES: "a full disk / read-only folder / unusable lock file -> exit 2
    # ('cannot write the token store in ...; nothing was sent to the server')".
    store = small_fs / "store" / "tokens.json"
    expired_login(live_server, store)
    os.close(os.open(str(store) + ".lock", os.O_CREAT | os.O_RDWR, 0o600))
    _remount(small_fs, "ro")
    line = one_error(run_cli("--url", live_server.base, "token"), 2)
    assert NOTHING_SENT in line, line
    assert "remove it" not in line, line  # removing the lock file cannot fix a read-only disk


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_login_on_a_full_or_read_only_disk_fails_before_the_device_flow(live_server, small_fs, monkeypatch, fault):
    live_server.expires_in = 2  # should a flow start after all, it ends at once
    monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", str(small_fs / "a" / "b" / "tokens.json"))
    if fault == "full":
        fill(str(small_fs), 32 * 1024)
    else:
        _remount(small_fs, "ro")
    line = one_error(run_cli("--url", live_server.base, "login", "--no-qr"), 2)
    assert ("No space left on device" if fault == "full" else "Read-only file system") in line
    assert live_server.count(sca.DEVICE_PATH) == 0 and live_server.requests == []
    assert listing(small_fs) == ({"filler"} if fault == "full" else set())  # no folder, lock or temporary file


# -- a folder the user may not write (0500), as the user nobody ---------------


@pytest.fixture
def nobody_store(monkeypatch):
    """A store folder owned by nobody, in a folder nobody can reach."""
    if not hasattr(os, "setuid") or os.geteuid() != 0:
        pytest.skip("running the CLI as the user nobody needs root")
    base = tempfile.mkdtemp(prefix="sca-nobody-")
    try:
        os.chmod(base, 0o755)
        folder = os.path.join(base, "store")
        os.mkdir(folder, 0o700)
        os.chown(folder, NOBODY, NOBODY)
        path = os.path.join(folder, "tokens.json")
        monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", path)
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv):
    return Proc(argv, source=wrapped("", drop_to=NOBODY)).finish()


def _give_to_nobody(*paths):
    for path in paths:
        os.chown(path, NOBODY, NOBODY)


@pytest.mark.parametrize("lock_file", [True, False], ids=["lock-file-there", "no-lock-file"])
def test_folder_nobody_may_not_write_refuses_before_sending_then_works(live_server, nobody_store, lock_file):
    store = pathlib.Path(nobody_store)
    expired_login(live_server, store)
    _give_to_nobody(str(store))
    if lock_file:
        os.close(os.open(str(store) + ".lock", os.O_CREAT | os.O_RDWR, 0o600))
        _give_to_nobody(str(store) + ".lock")
    os.chmod(str(store.parent), 0o500)
    before = store.read_bytes()
    line = one_error(as_nobody("--url", live_server.base, "token"), 2)
    assert "Permission denied" in line and str(store.parent) in line
    if lock_file:
        assert "cannot write the token store in %s" % store.parent in line and NOTHING_SENT in line
    assert live_server.refreshes() == 0 and live_server.requests == []
    assert store.read_bytes() == before and leftovers(store.parent) == []
    os.chmod(str(store.parent), 0o700)  # the fault is fixed
    result = as_nobody("--url", live_server.base, "token")
    assert result.code == 0, result
    assert live_server.refreshes() == 1 and live_server.token_ok(result.out.strip())


def test_login_in_a_folder_nobody_may_not_write_fails_before_the_device_flow(live_server, nobody_store):
    live_server.expires_in = 2  # should a flow start after all, it ends at once
    folder = os.path.dirname(nobody_store)
    os.chmod(folder, 0o500)
    line = one_error(as_nobody("--url", live_server.base, "login", "--no-qr"), 2)
    assert "Permission denied" in line
    assert live_server.requests == []
    assert os.listdir(folder) == []


# -- RLIMIT_FSIZE: a write that fails, anywhere -------------------------------


def _small_files():
    import resource

    _default_signals()
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_file_size_limit_refuses_before_sending_then_works(live_server, store_path):
    expired_login(live_server, store_path)
    before = store_path.read_bytes()
    result = Proc(["--url", live_server.base, "token"], preexec_fn=_small_files).finish()
    line = one_error(result, 2)
    assert "cannot write the token store in %s (File too large)" % store_path.parent in line and NOTHING_SENT in line
    assert live_server.refreshes() == 0 and live_server.requests == []
    assert store_path.read_bytes() == before and leftovers(store_path.parent) == []
    assert_session_survives(live_server, store_path)


def test_file_size_limit_login_fails_before_the_device_flow_and_leaves_nothing(live_server, store_path, tmp_path):
    live_server.expires_in = 2  # should a flow start after all, it ends at once
    result = Proc(["--url", live_server.base, "login", "--no-qr"], preexec_fn=_small_files).finish()
    assert "File too large" in one_error(result, 2)
    assert live_server.requests == []
    assert not store_path.parent.exists()


# ==== 5. SIGKILL between writing and renaming ===============================

KILL_AT = {
    "rename": ("real = sca._replace\n"
               "def _replace(source, target):\n"
               "    if source.endswith('.tmp') and target == os.path.abspath(os.environ['STANDCLOUD_TOKEN_FILE']):\n"
               "        os.kill(os.getpid(), signal.SIGKILL)\n"
               "    return real(source, target)\n"
               "sca._replace = _replace\n"),
    "fsync": ("def _fsync(fd):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "os.fsync = _fsync\n"),
}


def _killed(store_path, base, at, *argv):
    """Run the CLI, SIGKILLed between filling the temporary store and
    renaming it; return the new entry found in the one file left behind."""
    result = Proc(["--url", base] + list(argv), source=wrapped(KILL_AT[at])).finish()
    assert result.code == -signal.SIGKILL, result
    left = leftovers(store_path.parent)
    assert len(left) == 1, left
    return store_path.parent / left[0], json.loads((store_path.parent / left[0]).read_text())["servers"][base]


@pytest.mark.parametrize("at", sorted(KILL_AT))
def test_killed_before_the_rename_the_next_token_adopts_the_tokens(live_server, store_path, at):
    old = expired_login(live_server, store_path)
    left, new = _killed(store_path, live_server.base, at, "token")
    assert live_server.refreshes() == 1
    assert new["refresh_token"] != old["refresh_token"]
    assert stored(store_path, live_server.base)["refresh_token"] == old["refresh_token"]  # not renamed
    result = run_cli("--url", live_server.base, "token")
    assert result.code == 0, result
    assert result.out == new["access_token"] + "\n"
    assert RECOVERED + str(left) in result.err
    assert live_server.refreshes() == 1  # used, not refreshed again
    assert_saved(store_path, live_server.base, new)
    assert_session_survives(live_server, store_path, new)


def test_killed_refresh_of_a_live_token_the_next_token_is_the_new_one(live_server, store_path):
    # `refresh` (or a 401 retry) with an access token that has not expired:
    # the server revoked it when it rotated, so `token` must not go on
    # printing it from the store while the new one sits in the leftover.
    log_in(live_server, store_path, time.time())
    left, new = _killed(store_path, live_server.base, "rename", "refresh")
    result = run_cli("--url", live_server.base, "token")
    assert result.code == 0, result
    assert result.out == new["access_token"] + "\n", "printed the access token the server revoked at the rotation"
    assert_session_survives(live_server, store_path, new)


def test_killed_login_the_next_token_uses_its_session(live_server, store_path):
    # Contract: "The same holds for the poll that returns the login's tokens."
    live_server.interval, live_server.approve_after = 1, 1
    left, new = _killed(store_path, live_server.base, "rename", "login", "--no-qr", "--no-check")
    assert live_server.polls() == 1
    result = run_cli("--url", live_server.base, "token")
    assert result.code == 0, result  # 3 "not logged in": the operator must find a phone again
    assert result.out == new["access_token"] + "\n"
    assert_session_survives(live_server, store_path, new)


def _store_doc(base, access, refresh):
    return json.dumps({"version": 1, "servers": {base: {
        "access_token": access, "refresh_token": refresh, "token_type": "Bearer",
        "expires_at": time.time() + 3600, "scope": sca.SCOPE, "updated_at": time.time()}}}).encode()


def test_leftovers_not_complete_valid_and_newer_are_removed_not_adopted(live_server, store_path, tmp_path):
    old = expired_login(live_server, store_path)
    folder = store_path.parent
    stale = _store_doc(live_server.base, "authelia_at_stale", "authelia_rt_stale")
    outside = tmp_path / "outside.json"
    outside.write_bytes(stale)
    kinds = {"truncated": stale[:len(stale) // 2],  # killed while writing (no preallocation)
             "spaces": b" " * 4096,  # prepared, never filled (killed while the refresh was out)
             "empty": b"", "garbage": b"\x00\xff\xfe garbage", "not-a-store": b'{"version": 2, "servers": {}}',
             "older": stale, "symlink": None}
    then = os.stat(str(store_path)).st_mtime - 60
    for index, (kind, content) in enumerate(sorted(kinds.items())):
        leftover = folder / ("tokens.json.%06x.tmp" % index)
        if content is None:
            os.symlink(str(outside), str(leftover))  # complete, valid, newer: but not a regular file
        else:
            leftover.write_bytes(content)
        if kind == "older":
            os.utime(str(leftover), (then, then))
    assert len(leftovers(folder)) == len(kinds)
    result = run_cli("--url", live_server.base, "token")
    assert result.code == 0, result
    assert RECOVERED not in result.err
    assert leftovers(folder) == [], "not removed: %s" % leftovers(folder)
    entry = stored(store_path, live_server.base)
    assert live_server.refreshes() == 1  # with the stored refresh token, as if nothing were there
    assert [r["form"]["refresh_token"] for r in live_server.requests] == [old["refresh_token"]]
    assert result.out == entry["access_token"] + "\n" and live_server.token_ok(entry["access_token"])
    assert outside.read_bytes() == stale  # a symlink's target is never touched


# ==== 6. sizes that always round-trip =======================================


class Big(object):
    """The fake's refresh answer, with both tokens grown to MAX_TOKEN
    characters of JSON escapes (each " and \\ takes two bytes in the store);
    the fake keeps honouring them."""

    def __init__(self):
        self.answers = []

    def __call__(self, handler):
        fake, record = handler.fake, handler.fake.requests[-1]
        status, headers, body = handler._behave(record["path"], record["form"])
        obj = json.loads(body.decode("utf-8"))
        with fake.lock:
            for name, table in (("access_token", fake.access_tokens), ("refresh_token", fake.refresh_tokens)):
                big = (obj[name] + '"\\' * sca.MAX_TOKEN)[:sca.MAX_TOKEN]
                table[big] = table.pop(obj[name])
                obj[name] = big
        self.answers.append(obj)
        handler.send(status, headers, json.dumps(obj).encode())


def test_two_answers_at_the_token_cap_are_read_back_by_every_command(live_server, store_path):
    expired_login(live_server, store_path)
    big = Big()
    live_server.script(sca.TOKEN_PATH, big, big)
    for _ in range(2):
        result = run_cli("--url", live_server.base, "refresh")
        assert result.code == 0, result
    assert live_server.refreshes() == 2 and len(big.answers) == 2
    assert_saved(store_path, live_server.base, big.answers[1])
    assert store_path.stat().st_size > 4 * sca.MAX_TOKEN  # escapes doubled both tokens
    base = live_server.base
    for argv in (["status"], ["--url", base, "token"], ["--url", base, "healthcheck"], ["--url", base, "login", "--no-qr"]):
        result = run_cli(*argv)
        assert result.code == 0, (argv, result)
        assert "unreadable" not in result.err
        if "token" in argv:
            assert result.out == big.answers[1]["access_token"] + "\n"
    assert [name for name in os.listdir(str(store_path.parent)) if ".corrupt-" in name] == []
    assert_session_survives(live_server, store_path)  # the big refresh token is sent, and accepted


@pytest.mark.parametrize("field, value", [
    ("access_token", "a" * (sca.MAX_TOKEN + 1024)),
    ("refresh_token", "r" * (sca.MAX_TOKEN + 1)),
    ("scope", "s" * (sca.MAX_SCOPE + 1)),
])
def test_answer_over_the_cap_exit_5_nothing_stored_store_still_readable(live_server, store_path, field, value):
    expired_login(live_server, store_path)
    before = store_path.read_bytes()
    answer = {"access_token": "authelia_at_x", "refresh_token": "authelia_rt_x", "token_type": "bearer",
              "expires_in": 3600, "scope": sca.SCOPE}
    answer[field] = value
    live_server.script(sca.TOKEN_PATH, (200, JSON, json.dumps(answer).encode()))
    line = one_error(run_cli("--url", live_server.base, "token"), 5)
    assert field in line and value[:50] not in line
    assert store_path.read_bytes() == before and leftovers(store_path.parent) == []
    status = run_cli("--url", live_server.base, "status", "--json")
    assert status.code == 0 and json.loads(status.out)["logged_in"] is True, status
    assert_session_survives(live_server, store_path)  # the canned answer rotated nothing


def test_a_store_near_the_limit_is_never_rewritten_past_it(live_server, store_path):
    # A store that another tool wrote (json.dumps' default spacing, whole
    # numbers) just small enough that a refresh is allowed: whatever the
    # refresh writes must still be readable -- or the refresh refused before
    # it is sent. (8,000 servers: each entry grows ~22 bytes when rewritten.)
    tokens = expired_login(live_server, store_path)
    servers = json.loads(store_path.read_text())["servers"]
    filler = {"access_token": "a" * 210, "refresh_token": "r" * 210, "token_type": "Bearer",
              "expires_at": 1764400000, "scope": None, "updated_at": 1764400000}
    room = sca.MAX_STORE - sca.ENTRY_ROOM - 2048
    step = len(json.dumps({"https://s000000.example": filler}))  # with ", " for the braces
    for index in range(room // step):
        servers["https://s%06d.example" % index] = filler
    data = json.dumps({"version": 1, "servers": servers}).encode()
    assert sca.MAX_STORE - 8192 < len(data) + sca.ENTRY_ROOM <= sca.MAX_STORE  # a refresh is allowed, just
    store_path.write_bytes(data)
    result = run_cli("--url", live_server.base, "refresh")
    if result.code == 2:  # refused: then before sending anything
        assert live_server.refreshes() == 0 and store_path.read_bytes() == data
        return
    assert result.code == 0, result
    assert live_server.refreshes() == 1
    size = store_path.stat().st_size
    status = run_cli("--url", live_server.base, "status", "--json")
    assert status.code == 0, "the refresh wrote %d bytes (the reader takes %d): %s" % (size, sca.MAX_STORE, status.err)
    assert stored(store_path, live_server.base)["refresh_token"] != tokens["refresh_token"]


# ==== 8. the store's folder is ours =========================================


@pytest.mark.parametrize("mode, command", [(0o777, "token"), (0o777, "status"), (0o777, "login"), (0o770, "token"),
                                           (0o702, "token")], ids=lambda v: "%04o" % v if isinstance(v, int) else v)
def test_folder_writable_by_others_is_refused(live_server, store_path, mode, command):
    log_in(live_server, store_path, time.time())
    os.chmod(str(store_path.parent), mode)
    before, names = store_path.read_bytes(), sorted(os.listdir(str(store_path.parent)))
    line = one_error(run_cli("--url", live_server.base, command, *(["--no-qr"] if command == "login" else [])), 2)
    assert "the token store's folder %s" % store_path.parent in line
    assert "writable by others (mode %03o)" % mode in line and "chmod go-w" in line
    assert live_server.requests == []
    assert store_path.read_bytes() == before and sorted(os.listdir(str(store_path.parent))) == names


@pytest.mark.parametrize("command", ["token", "status", "login"])
def test_folder_owned_by_another_user_is_refused(live_server, store_path, command):
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    log_in(live_server, store_path, time.time())
    os.chown(str(store_path.parent), NOBODY, NOBODY)
    before, names = store_path.read_bytes(), sorted(os.listdir(str(store_path.parent)))
    line = one_error(run_cli("--url", live_server.base, command, *(["--no-qr"] if command == "login" else [])), 2)
    assert "the token store's folder %s belongs to another user" % store_path.parent in line
    assert "a folder of your own" in line
    assert live_server.requests == []
    assert store_path.read_bytes() == before and sorted(os.listdir(str(store_path.parent))) == names


@pytest.mark.parametrize("target_exists", [True, False], ids=["target", "dangling"])
@pytest.mark.parametrize("command", ["token", "login"])
def test_lock_file_symlink_is_refused_and_its_target_untouched(live_server, store_path, tmp_path, target_exists, command):
    expired_login(live_server, store_path)
    target = tmp_path / "elsewhere" / "precious"
    target.parent.mkdir()
    if target_exists:
        target.write_bytes(b"precious\n")
        os.chmod(str(target), 0o644)
    lock = str(store_path) + ".lock"
    os.symlink(str(target), lock)
    before = store_path.read_bytes()
    line = one_error(run_cli("--url", live_server.base, command, *(["--no-qr"] if command == "login" else [])), 2)
    assert "cannot use the lock file %s" % lock in line
    assert live_server.requests == []
    assert os.path.islink(lock) and os.readlink(lock) == str(target)
    assert store_path.read_bytes() == before
    if target_exists:
        assert target.read_bytes() == b"precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    else:
        assert not target.exists()


def test_store_kept_aside_as_corrupt_is_private(live_server, store_path):
    garbage = b'{"version": 1, "servers": {"https://a.example": '
    write_store(store_path, {})
    store_path.write_bytes(garbage)
    os.chmod(str(store_path), 0o644)
    live_server.script(sca.DEVICE_PATH, (400, JSON, b'{"error": "invalid_client"}'))  # end the login there
    result = run_cli("--url", live_server.base, "login", "--no-qr")
    one_error(result, 3)
    aside = [name for name in os.listdir(str(store_path.parent)) if name.startswith("tokens.json.corrupt-")]
    assert len(aside) == 1, os.listdir(str(store_path.parent))
    path = store_path.parent / aside[0]
    assert path.read_bytes() == garbage
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "kept it as %s" % path in result.err
