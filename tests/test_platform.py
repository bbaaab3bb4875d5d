"""Windows and macOS code paths, tested on any OS by monkeypatching the platform.

What this proves on a Linux CI: the per-OS default store paths; that the
``msvcrt`` branch of §5 (taken at import when ``sys.platform == "win32"``)
calls ``msvcrt.locking`` the way Windows wants, turns a held lock into a
clean exit 2, and leaves the rest of the module working; and that a CLI run
on macOS uses ``~/Library/Application Support``. What it cannot prove: the
real ``msvcrt`` and NTFS semantics (mandatory byte-range locks, os.replace
over an open file, no POSIX modes) -- those need a Windows runner.
"""

import importlib.util
import io
import json
import os
import sys
import time
import types

import pytest

import standcloud_auth as sca
from conftest import MODULE, entry_for, write_store

HOST_PLATFORM = sys.platform

class _Platform(object):
    """Set sys.platform for a block, whatever happens in it."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved, sys.platform = sys.platform, self.name

    def __exit__(self, *exc_info):
        sys.platform = self.saved


# ==== default store paths ====================================================

WIN_TAIL = ("standcloud", "tokens.json")


@pytest.mark.parametrize("platform, env, expected", [
    # Windows: %APPDATA%, else the roaming profile under the home folder.
    ("win32", {"APPDATA": "C:\\Users\\op\\AppData\\Roaming", "HOME": "/h"},
     os.path.join("C:\\Users\\op\\AppData\\Roaming", *WIN_TAIL)),
    ("win32", {"HOME": "/h"}, os.path.join("/h", "AppData", "Roaming", *WIN_TAIL)),
    ("win32", {"APPDATA": "", "USERPROFILE": "C:\\Users\\op"},
     os.path.join("C:\\Users\\op", "AppData", "Roaming", *WIN_TAIL)),
    # macOS: never XDG, even when it is set.
    ("darwin", {"HOME": "/Users/op"}, "/Users/op/Library/Application Support/standcloud/tokens.json"),
    ("darwin", {"HOME": "/Users/op", "XDG_CONFIG_HOME": "/x"},
     "/Users/op/Library/Application Support/standcloud/tokens.json"),
    # Linux and the BSDs: $XDG_CONFIG_HOME, else ~/.config; a relative or empty one is ignored.
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": "/xdg"}, "/xdg/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op"}, "/home/op/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": ""}, "/home/op/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": "rel/dir"}, "/home/op/.config/standcloud/tokens.json"),
    ("freebsd13", {"HOME": "/home/op"}, "/home/op/.config/standcloud/tokens.json"),
], ids=["win-appdata", "win-no-appdata", "win-empty-appdata-userprofile", "darwin", "darwin-ignores-xdg",
        "linux-xdg", "linux-no-xdg", "linux-empty-xdg", "linux-relative-xdg", "freebsd"])
def test_default_store_path(platform, env, expected):
    assert sca.default_store_path(env, platform) == expected


def test_default_store_path_defaults_to_this_process(monkeypatch, isolated_env):
    # No arguments: os.environ and sys.platform, read at call time (not at import).
    monkeypatch.setattr(sys, "platform", "darwin")
    assert sca.default_store_path() == os.path.join(str(isolated_env), "Library", "Application Support", *WIN_TAIL)
    monkeypatch.setattr(sys, "platform", "win32")
    assert sca.default_store_path() == os.path.join(str(isolated_env), "AppData", *WIN_TAIL)


def test_darwin_cli_uses_application_support(cli, monkeypatch, isolated_env, server, clock):
    # A whole CLI run on "macOS": the store is found under ~/Library/Application Support.
    path = isolated_env / "Library" / "Application Support" / "standcloud" / "tokens.json"
    write_store(path, {server.base: entry_for(server.issue(), clock.now())})
    with _Platform("darwin"):
        result = cli("--url", server.base, "status", "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    assert report["store"] == str(path)
    assert report["source"] == "file" and report["logged_in"] is True
    assert not (isolated_env / ".config").exists()  # the Linux default was never touched


# ==== the msvcrt branch ======================================================


class FakeMsvcrt(types.ModuleType):
    """The three names §5 uses from msvcrt; records every locking() call with
    the file position it saw, and refuses LK_NBLCK while ``held``."""

    LK_UNLCK = 0
    LK_LOCK = 1
    LK_NBLCK = 2
    LK_RLCK = 3
    LK_NBRLCK = 4

    def __init__(self):
        super().__init__("msvcrt")
        self.calls = []  # (fd, mode, nbytes, position)
        self.held = False

    def locking(self, fd, mode, nbytes):
        self.calls.append((fd, mode, nbytes, os.lseek(fd, 0, os.SEEK_CUR)))
        if mode == self.LK_NBLCK and self.held:
            raise PermissionError(13, "Permission denied")  # what Windows raises for a held region


@pytest.fixture
def win(monkeypatch):
    """A second copy of standcloud_auth imported as on Windows (with a fake
    msvcrt); the real module and sys.modules are left as they were."""
    # Import what the copy will import lazily, so that no stdlib module is
    # first imported while sys.platform says win32.
    import http.client  # noqa: F401
    import ssl  # noqa: F401
    import urllib.request  # noqa: F401

    fake = FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    spec = importlib.util.spec_from_file_location("standcloud_auth_win", MODULE)
    module = importlib.util.module_from_spec(spec)
    with _Platform("win32"):
        spec.loader.exec_module(module)
    module.fake_msvcrt = fake
    assert "standcloud_auth_win" not in sys.modules
    return module


def test_win_copy_took_the_msvcrt_branch(win):
    assert win.msvcrt is win.fake_msvcrt
    assert not hasattr(win, "fcntl")
    assert hasattr(sca, "fcntl") and not hasattr(sca, "msvcrt")  # the real module is untouched
    assert sys.platform == HOST_PLATFORM


def test_win_try_lock_seeks_to_0_and_locks_one_byte(win, tmp_path):
    fd = os.open(str(tmp_path / "tokens.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"xyz")  # the position is now 3: the lock must still be on byte 0
        assert win._try_lock(fd) is True
        assert win.fake_msvcrt.calls == [(fd, win.fake_msvcrt.LK_NBLCK, 1, 0)]
        os.lseek(fd, 2, os.SEEK_SET)
        win._unlock(fd)
        assert win.fake_msvcrt.calls[-1] == (fd, win.fake_msvcrt.LK_UNLCK, 1, 0)
    finally:
        os.close(fd)


def test_win_try_lock_false_when_held(win, tmp_path):
    win.fake_msvcrt.held = True
    fd = os.open(str(tmp_path / "tokens.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert win._try_lock(fd) is False
        assert [call[1] for call in win.fake_msvcrt.calls] == [win.fake_msvcrt.LK_NBLCK]
    finally:
        os.close(fd)


def test_win_store_lock_round_trip(win, tmp_path):
    store = win.TokenStore(str(tmp_path / "standcloud" / "tokens.json"))
    with store.lock():
        assert [call[1] for call in win.fake_msvcrt.calls] == [win.fake_msvcrt.LK_NBLCK]
    assert [call[1:3] for call in win.fake_msvcrt.calls] == [(win.fake_msvcrt.LK_NBLCK, 1), (win.fake_msvcrt.LK_UNLCK, 1)]
    assert os.path.exists(store.lock_path)  # the lock file is never deleted


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_win_held_lock_times_out_with_exit_2(win, tmp_path):
    win.fake_msvcrt.held = True
    store = win.TokenStore(str(tmp_path / "standcloud" / "tokens.json"))
    fds = _open_fds()
    with pytest.raises(win.ConfigError) as info, store.lock(timeout=0.2):
        pytest.fail("the lock was taken although it is held")
    assert info.value.exit_code == 2
    message = str(info.value)
    assert store.lock_path in message and "another standcloud-auth process" in message
    assert "\n" not in message
    assert len(win.fake_msvcrt.calls) > 1  # it kept trying until the timeout
    assert all(call[1] == win.fake_msvcrt.LK_NBLCK for call in win.fake_msvcrt.calls)
    assert _open_fds() == fds  # the lock file's descriptor was closed


def test_win_held_lock_is_one_error_line_from_the_cli(win, tmp_path, monkeypatch):
    # `refresh` needs the lock: a held one is exit 2, one line, no traceback.
    path = tmp_path / "store" / "tokens.json"
    write_store(path, {"https://h.example": entry_for({"access_token": "at", "refresh_token": "rt"}, time.time())})
    win.fake_msvcrt.held = True
    monkeypatch.setattr(win.TokenStore.lock, "__defaults__", (0.2,))  # LOCK_TIMEOUT is 30 s
    code, out, err = _run(win, "--store", str(path), "refresh")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("standcloud-auth: error:")]
    assert len(errors) == 1 and str(path) + ".lock" in errors[0], err
    assert "Traceback" not in err and out == ""


def test_win_fsync_dir_is_a_no_op(win, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    # Windows cannot open a folder: nothing is opened, not even a missing one.
    assert win._fsync_dir(str(tmp_path / "does-not-exist")) is None
    assert win._fsync_dir(str(tmp_path)) is None
    assert calls == []


def _run(module, *argv):
    """main(argv) of ``module`` with sys.platform == "win32" for the run."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    # Keep the wrappers referenced: a collected TextIOWrapper closes its buffer.
    out_text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    err_text = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    sys.stdout, sys.stderr = out_text, err_text
    try:
        with _Platform("win32"):
            code = module.main(list(argv))
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8")


def test_win_status_token_and_refresh_work(win, isolated_env, live_server):
    # The rest of the module on "Windows": the %APPDATA% store found by
    # default, status (no POSIX mode shown), token (no lock, no network) and
    # refresh (lock, atomic write, no folder fsync) against the fake server.
    path = isolated_env / "AppData" / "standcloud" / "tokens.json"
    tokens = live_server.issue()
    write_store(path, {live_server.base: entry_for(tokens, time.time())}, mode=0o644)

    code, out, err = _run(win, "--url", live_server.base, "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["store"] == str(path) and report["logged_in"] is True
    assert "warning" not in err  # POSIX modes mean nothing on Windows: no warning

    code, out, err = _run(win, "--url", live_server.base, "status")
    assert code == 0 and str(path) + " (exists)" in out, out

    code, out, err = _run(win, "--url", live_server.base, "token")
    assert code == 0 and out == tokens["access_token"] + "\n", err
    assert win.fake_msvcrt.calls == []  # a valid token needs no lock

    code, out, err = _run(win, "--url", live_server.base, "refresh")
    assert code == 0, err
    assert live_server.refreshes() == 1
    stored = json.loads(path.read_text())["servers"][live_server.base]
    assert stored["access_token"] != tokens["access_token"]
    modes = [call[1] for call in win.fake_msvcrt.calls]
    assert modes == [win.fake_msvcrt.LK_NBLCK, win.fake_msvcrt.LK_UNLCK]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json", "tokens.json.lock"]


def test_win_replace_retries_while_a_reader_holds_the_store(win, monkeypatch, tmp_path):
    # Windows refuses os.replace while another process has the file open;
    # the store retries instead of losing a freshly rotated refresh token.
    calls = []
    real_replace = os.replace

    def busy_twice(source, target):
        calls.append(target)
        if len(calls) <= 2:
            raise PermissionError(13, "Access is denied")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", busy_twice)
    store = win.TokenStore(str(tmp_path / "tokens.json"))
    store.save({"version": 1, "servers": {}})
    assert len(calls) == 3
    assert store.load() == {"version": 1, "servers": {}}

