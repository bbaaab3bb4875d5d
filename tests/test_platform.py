"""Windows and macOS code paths, tested on any OS with copies of the module.

What this proves on a Linux CI: the per-OS default store paths
(``_default_store_path(environ, platform)``); that the ``msvcrt`` branch of
§4 (``_try_lock``/``_unlock``, defined at import when ``sys.platform ==
"win32"``) calls ``msvcrt.locking`` the way Windows wants, turns a held lock
into a clean exit 2, and leaves the rest of the module working; that the
shared ``_replace`` retries while Windows refuses it, and syncs the folder
where POSIX allows; and that a CLI run on macOS uses ``~/Library/Application
Support``. A copy is the module imported a second time with ``sys.platform``
patched (and a fake ``msvcrt``), as a process on that OS imports it. What it
cannot prove: the real ``msvcrt`` and NTFS semantics (mandatory byte-range
locks, os.replace over an open file, no POSIX modes) -- those need a Windows
runner.
"""

import importlib.util
import io
import json
import os
import stat
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
#
# v2: _default_store_path(environ, platform), with platform defaulting to the
# sys.platform of the import (a process never changes platform; the copies
# below are imported with another one). The paths are the host's os.path: a
# "Windows" row on Linux uses a POSIX absolute path where Windows has C:\.

WIN_TAIL = ("standcloud", "tokens.json")
ROOT = os.path.abspath(os.sep)  # "/" here, "C:\\" on Windows
APPDATA = os.path.join(ROOT, "Users", "op", "AppData", "Roaming")
PROFILE = os.path.join(ROOT, "Users", "op")


@pytest.mark.parametrize("platform, env, expected", [
    # Windows: %APPDATA%, else the roaming profile under the home folder.
    ("win32", {"APPDATA": APPDATA, "HOME": "/h"}, os.path.join(APPDATA, *WIN_TAIL)),
    ("win32", {"HOME": "/h"}, os.path.join("/h", "AppData", "Roaming", *WIN_TAIL)),
    ("win32", {"APPDATA": "", "USERPROFILE": PROFILE}, os.path.join(PROFILE, "AppData", "Roaming", *WIN_TAIL)),
    ("win32", {"APPDATA": "AppData", "USERPROFILE": PROFILE}, os.path.join(PROFILE, "AppData", "Roaming", *WIN_TAIL)),
    ("win32", {"APPDATA": APPDATA, "XDG_CONFIG_HOME": "/xdg", "HOME": "/h"}, os.path.join(APPDATA, *WIN_TAIL)),
    # macOS: never XDG, even when it is set; never APPDATA.
    ("darwin", {"HOME": "/Users/op"}, "/Users/op/Library/Application Support/standcloud/tokens.json"),
    ("darwin", {"HOME": "/Users/op", "XDG_CONFIG_HOME": "/x", "APPDATA": APPDATA},
     "/Users/op/Library/Application Support/standcloud/tokens.json"),
    # Linux and the BSDs: $XDG_CONFIG_HOME, else ~/.config; a relative or empty one is ignored.
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": "/xdg"}, "/xdg/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op"}, "/home/op/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": ""}, "/home/op/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op", "XDG_CONFIG_HOME": "rel/dir"}, "/home/op/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/home/op", "APPDATA": APPDATA}, "/home/op/.config/standcloud/tokens.json"),
    ("freebsd13", {"HOME": "/home/op"}, "/home/op/.config/standcloud/tokens.json"),
], ids=["win-appdata", "win-no-appdata", "win-empty-appdata-userprofile", "win-relative-appdata", "win-ignores-xdg",
        "darwin", "darwin-ignores-xdg-and-appdata", "linux-xdg", "linux-no-xdg", "linux-empty-xdg",
        "linux-relative-xdg", "linux-ignores-appdata", "freebsd"])
@pytest.mark.skipif(sys.platform == "win32", reason="the rows use POSIX paths for HOME")
def test_default_store_path(platform, env, expected):
    assert sca._default_store_path(env, platform) == expected


@pytest.mark.parametrize("platform", ["win32", "darwin", "linux"])
@pytest.mark.parametrize("home", ["relative/home", "~"])
def test_default_store_path_without_a_usable_home_names_store(platform, home):
    # A home that is not absolute (3.8+ expanduser("~") gives "~" for a user
    # without a passwd entry): exit 2 naming --store, never a relative store.
    with pytest.raises(sca.ConfigError) as info:
        sca._default_store_path({"HOME": home}, platform)
    assert info.value.exit_code == 2
    assert "--store" in str(info.value) and sca.ENV_STORE in str(info.value) and "\n" not in str(info.value)


def test_default_store_path_reads_the_environment_at_call_time(monkeypatch, isolated_env, tmp_path):
    # Not at import: the caller's environ, and with neither HOME nor
    # USERPROFILE in it, this process's home folder.
    linux = os.path.join(str(isolated_env), ".config", *WIN_TAIL)
    assert sca._default_store_path({}, "linux") == linux
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert sca._default_store_path({}, "linux") == os.path.join(str(tmp_path / "elsewhere"), ".config", *WIN_TAIL)
    # The platform defaults to the one this module was imported on.
    assert sca._default_store_path({"HOME": "/home/op"}) == sca._default_store_path({"HOME": "/home/op"}, HOST_PLATFORM)


def test_darwin_copy_defaults_to_application_support(darwin, isolated_env):
    assert darwin._default_store_path(dict(os.environ)) == os.path.join(
        str(isolated_env), "Library", "Application Support", *WIN_TAIL)


@pytest.mark.skipif(sys.platform == "win32", reason="needs fcntl")
def test_darwin_copy_locks_with_fcntl(darwin, tmp_path, monkeypatch):
    import fcntl

    calls = []
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: calls.append(op))
    store = darwin.TokenStore(str(tmp_path / "standcloud" / "tokens.json"), darwin._Console())
    with _Platform("darwin"), store.lock():
        pass
    assert calls == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN]


def test_darwin_cli_uses_application_support(darwin, isolated_env, live_server):
    # A whole CLI run on "macOS" (a copy of the module imported with
    # sys.platform == "darwin"): the store is found under ~/Library/Application Support.
    path = isolated_env / "Library" / "Application Support" / "standcloud" / "tokens.json"
    tokens = live_server.issue()
    write_store(path, {live_server.base: entry_for(tokens, time.time())})
    code, out, err = _run(darwin, "--url", live_server.base, "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["store"] == str(path)
    assert report["source"] == "file" and report["logged_in"] is True
    code, out, err = _run(darwin, "refresh")  # the one stored server; lock, write, rename
    assert code == 0, err
    assert live_server.refreshes() == 1
    assert json.loads(path.read_text())["servers"][live_server.base]["access_token"] != tokens["access_token"]
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


def _copy_as(platform, monkeypatch, msvcrt=None):
    """A second copy of standcloud_auth imported with sys.platform ==
    ``platform`` (and a fake msvcrt); the real module and sys.modules are
    left as they were. Run the copy's code inside ``_Platform(platform)``
    too: a branch may be taken at import or at the call."""
    # Import what the copy imports lazily, so that no stdlib module is first
    # imported while sys.platform lies.
    import argparse  # noqa: F401
    import base64  # noqa: F401
    import copy  # noqa: F401
    import http.client  # noqa: F401
    import ipaddress  # noqa: F401
    import shutil  # noqa: F401
    import signal  # noqa: F401
    import ssl  # noqa: F401
    import tempfile  # noqa: F401
    import threading  # noqa: F401
    import traceback  # noqa: F401
    import urllib.parse  # noqa: F401
    import urllib.request  # noqa: F401

    if msvcrt is not None:
        monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    name = "standcloud_auth_" + platform
    spec = importlib.util.spec_from_file_location(name, MODULE)
    module = importlib.util.module_from_spec(spec)
    with _Platform(platform):
        spec.loader.exec_module(module)
    module.platform = platform
    assert name not in sys.modules
    return module


@pytest.fixture
def win(monkeypatch):
    """The module as imported on Windows, with a fake msvcrt; fcntl must not be used."""
    fake = FakeMsvcrt()
    module = _copy_as("win32", monkeypatch, fake)
    module.fake_msvcrt = fake
    if HOST_PLATFORM != "win32":
        import fcntl

        def no_fcntl(*args):
            raise AssertionError("fcntl.flock called on Windows")

        monkeypatch.setattr(fcntl, "flock", no_fcntl)
    return module


@pytest.fixture
def darwin(monkeypatch):
    return _copy_as("darwin", monkeypatch)


def _win_store(win, tmp_path):
    return win.TokenStore(str(tmp_path / "standcloud" / "tokens.json"), win._Console())


def test_win_store_lock_round_trip(win, tmp_path):
    # The msvcrt branch: one byte locked without waiting, at offset 0, then unlocked.
    store = _win_store(win, tmp_path)
    fake = win.fake_msvcrt
    with _Platform("win32"):
        with store.lock():
            assert [call[1:] for call in fake.calls] == [(fake.LK_NBLCK, 1, 0)]
    assert [call[1:] for call in fake.calls] == [(fake.LK_NBLCK, 1, 0), (fake.LK_UNLCK, 1, 0)]
    assert len({call[0] for call in fake.calls}) == 1  # the same descriptor
    assert os.path.exists(store.lock_path)  # the lock file is never deleted
    assert sys.platform == HOST_PLATFORM


@pytest.mark.skipif(sys.platform == "win32", reason="the host's own branch is fcntl")
def test_host_store_lock_uses_fcntl_not_msvcrt(win, tmp_path, monkeypatch):
    # The real module on this host: fcntl, never the (fake) msvcrt.
    import fcntl

    calls = []
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: calls.append(op))
    store = sca.TokenStore(str(tmp_path / "standcloud" / "tokens.json"), sca._Console())
    with store.lock():
        pass
    assert calls == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN]
    assert win.fake_msvcrt.calls == []


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_win_held_lock_times_out_with_exit_2(win, tmp_path, monkeypatch):
    win.fake_msvcrt.held = True
    monkeypatch.setattr(win, "LOCK_TIMEOUT", 0.2)  # 30 s in use
    store = _win_store(win, tmp_path)
    fds = _open_fds()
    with _Platform("win32"), pytest.raises(win.ConfigError) as info, store.lock():
        pytest.fail("the lock was taken although it is held")
    assert info.value.exit_code == 2
    message = str(info.value)
    assert store.lock_path in message and "another standcloud-auth process" in message and "0.2 s" in message
    assert "\n" not in message
    assert len(win.fake_msvcrt.calls) > 1  # it kept trying until the timeout
    assert all(call[1] == win.fake_msvcrt.LK_NBLCK for call in win.fake_msvcrt.calls)
    assert _open_fds() == fds  # the lock file's descriptor was closed


def test_win_held_lock_is_one_error_line_from_the_cli(win, tmp_path, monkeypatch):
    # `refresh` needs the lock: a held one is exit 2, one line, no traceback.
    path = tmp_path / "store" / "tokens.json"
    write_store(path, {"https://h.example": entry_for({"access_token": "at", "refresh_token": "rt"}, time.time())})
    win.fake_msvcrt.held = True
    monkeypatch.setattr(win, "LOCK_TIMEOUT", 0.2)  # 30 s in use
    code, out, err = _run(win, "--store", str(path), "refresh")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("standcloud-auth: error:")]
    assert len(errors) == 1 and str(path) + ".lock" in errors[0], err
    assert "Traceback" not in err and out == ""


def _tokens(module):
    return {"https://h.example": module.Tokens("at_platform", "rt_platform", 1764403600.0, module.SCOPE, 1764400000.0)}


def _entries(servers):
    return {url: tokens.entry() for url, tokens in servers.items()}


def test_win_save_survives_a_folder_that_cannot_be_opened(win, tmp_path, monkeypatch):
    # Windows cannot open a folder (os.open raises PermissionError): the fsync
    # that makes a rename durable on POSIX is skipped, and the save is done.
    real_open, refused, synced = os.open, [], []

    def windows_open(path, flags, *args):
        if os.path.isdir(path):
            refused.append(path)
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    store = win.TokenStore(str(tmp_path / "store" / "tokens.json"), win._Console())
    write_store(tmp_path / "store" / "tokens.json", {})
    monkeypatch.setattr(os, "open", windows_open)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)))
    with _Platform("win32"):
        store.save(_tokens(win))
    monkeypatch.undo()
    assert _entries(store.load()) == _entries(_tokens(win))
    assert synced == [False]  # the file only
    assert refused in ([], [store.folder])  # tried and refused, or not tried: no error either way
    assert sorted(os.listdir(store.folder)) == ["tokens.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX: a folder can be opened and synced")
def test_posix_save_fsyncs_the_file_and_then_the_folder(tmp_path, monkeypatch):
    # Contract: "flushed and fsynced, then os.replace" -- and on POSIX the
    # rename itself is durable only once the folder is synced: without it, a
    # power cut after a refresh can bring back the old file, whose refresh
    # token the server has already retired (the session is lost).
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    store = sca.TokenStore(str(tmp_path / "store" / "tokens.json"), sca._Console())
    write_store(tmp_path / "store" / "tokens.json", {})
    monkeypatch.setattr(os, "fsync", fsync)
    store.save(_tokens(sca))
    monkeypatch.undo()
    assert _entries(store.load()) == _entries(_tokens(sca))
    assert synced == ["file", "folder"]


def _run(module, *argv):
    """main(argv) of a copy of the module, with sys.platform as at its import for the run."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    # Keep the wrappers referenced: a collected TextIOWrapper closes its buffer.
    out_text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    err_text = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    sys.stdout, sys.stderr = out_text, err_text
    try:
        with _Platform(module.platform):
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


@pytest.mark.parametrize("platform", ["win32", HOST_PLATFORM])
def test_replace_retries_while_a_reader_holds_the_store(win, monkeypatch, tmp_path, platform):
    # Windows refuses os.replace while another process has the file open;
    # the store retries instead of losing a freshly rotated refresh token.
    # (_replace is shared: the host's copy retries too.)
    module = win if platform == "win32" else sca
    calls = []
    real_replace = os.replace

    def busy_twice(source, target):
        calls.append(target)
        if len(calls) <= 2:
            raise PermissionError(13, "Access is denied")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", busy_twice)
    folder = tmp_path / "store"
    folder.mkdir()
    store = module.TokenStore(str(folder / "tokens.json"), module._Console())
    with _Platform(platform):
        store.save(_tokens(module))
    assert calls == [store.path] * 3
    assert _entries(store.load()) == _entries(_tokens(module))
    assert sorted(os.listdir(str(folder))) == ["tokens.json"]  # the temporary file was renamed


def test_replace_gives_up_after_a_while_with_exit_2(win, monkeypatch, tmp_path):
    # A reader that never lets go: about a second of retries (time.sleep is
    # faked here), then a clean exit 2, the old store intact, no temporary file.
    sleeps, tries = [], []
    monkeypatch.setattr(time, "sleep", sleeps.append)

    def always_busy(source, target):
        tries.append(target)
        raise PermissionError(13, "Access is denied")

    path = tmp_path / "store" / "tokens.json"
    write_store(path, {})
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", always_busy)
    store = win.TokenStore(str(path), win._Console())
    with _Platform("win32"), pytest.raises(win.ConfigError) as info:
        store.save({"https://h.example": win.Tokens("at_windows", "rt_windows")})
    assert info.value.exit_code == 2 and str(path) in str(info.value)
    assert 0.5 <= sum(sleeps) <= 3 and len(tries) == len(sleeps) + 1
    assert path.read_bytes() == before
    assert sorted(os.listdir(str(path.parent))) == ["tokens.json"]
