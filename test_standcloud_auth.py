"""Tests for standcloud_auth: the suite's front door, in the module's order.

Sections as in the module, one prefix each: errors, config, store, http,
oauth, library, cli, qr_screen, main. Real HTTP over real sockets against the
fake StandCloud (tests/fakeserver.py), the fake clock on the module's seams
(a ten-poll login takes milliseconds), real files with real permissions.

Everything that parses input -- the command line, the token store, the
server's answers -- also runs through the real CLI in a fresh interpreter:
an in-process test sees a process that has already imported things
(conftest imports json first, which once hid a crash on CPython 3.10 and
3.11). Those tables run their interpreters side by side (run_cli_many) in a
module-scoped fixture, and each row is still a test of its own.
"""

import io
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

import standcloud_auth as sca
from conftest import (MODULE, assert_one_error, entry_for, error_lines, free_port, isolation, log_in, run_cli,
                      run_cli_many, write_store)
from fakeserver import FakeStandCloud, chunked, trickle

POSIX = sys.platform != "win32"
COMMANDS = ("login", "token", "refresh", "status", "healthcheck", "logout", "api")
ROOT = os.path.abspath(os.sep)  # "/" here, "C:\\" on Windows: absolute on every OS


def one_line_error(result, code):
    """assert_one_error, and that line itself: exit ``code``, nothing on stdout."""
    assert_one_error(result, code)
    assert result.out == "", result
    return error_lines(result.err)[0]


def answer_cut_off(body, length, announced=None):
    """A scripted answer: a 200 whose JSON body stops after ``length`` bytes.
    ``announced`` None: a complete HTTP message of a cut body; else the
    Content-Length it announces before the connection drops."""

    def answer(handler):
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(length if announced is None else announced))
        handler.end_headers()
        try:
            handler.wfile.write(body[:length])
            handler.wfile.flush()
        except OSError:
            pass

    return answer


# ==== §2 errors, the console =================================================


@pytest.mark.parametrize("error, code, parent", [
    (sca.ConfigError("bad flag", "see --help"), 2, sca.StandCloudError),
    (sca.StoreCorrupt("/s/tokens.json", "empty"), 2, sca.ConfigError),
    (sca.AuthError("refused", error="invalid_grant", description="gone"), 3, sca.StandCloudError),
    (sca.LoginRequired("not logged in"), 3, sca.AuthError),
    (sca.NetworkError("connection refused"), 4, sca.StandCloudError),
    (sca.ServerError("HTTP 502", status=502, body=b"<html>"), 5, sca.StandCloudError),
], ids=["config", "store-corrupt", "auth", "login-required", "network", "server"])
def test_errors_exit_codes_and_one_line_with_a_hint(error, code, parent):
    assert isinstance(error, parent)
    assert error.exit_code == code
    assert str(error) == "%s; %s" % (error.message, error.hint)  # always what to do next
    assert "\n" not in str(error)


def test_errors_carry_what_the_server_said():
    auth = sca.AuthError("refused", error="invalid_grant", description="gone")
    assert (auth.error, auth.description) == ("invalid_grant", "gone")
    assert "login" in auth.hint
    server = sca.ServerError("HTTP 502", status=502, body=b"<html>")
    assert (server.status, server.body) == (502, b"<html>")
    corrupt = sca.StoreCorrupt("/s/tokens.json", "empty")
    assert corrupt.path == "/s/tokens.json"
    assert corrupt.message == "the token store /s/tokens.json is unreadable (empty)"
    assert "login" in corrupt.hint  # login keeps it aside


def test_errors_console_levels():
    stream = io.StringIO()
    quiet = sca._Console(stream, quiet=True, verbose=False)
    quiet.info("hello")
    quiet.warn("careful")
    quiet.debug("GET x")
    quiet.warn("certificates not verified", always=True)
    quiet.error("bad")
    assert stream.getvalue() == ("standcloud-auth: warning: certificates not verified\n"
                                 "standcloud-auth: error: bad\n")
    stream = io.StringIO()
    loud = sca._Console(stream, quiet=False, verbose=True)
    loud.info("hello")
    loud.warn("careful")
    loud.debug("GET x")
    assert stream.getvalue() == "hello\nstandcloud-auth: warning: careful\nstandcloud-auth: GET x\n"


def test_errors_console_shows_untrusted_text_safely():
    stream = io.StringIO()
    sca._Console(stream).error("a\x1b[2Jb\u202ec\nd\ud800e")
    assert stream.getvalue() == "standcloud-auth: error: a?[2Jb?c?d?e\n"  # one line, no escape, no override


class _Full(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")


def _closed():
    stream = io.StringIO()
    stream.close()
    return stream


@pytest.mark.parametrize("stream", [_Full(), _closed()], ids=["full", "closed"])
def test_errors_console_full_or_closed_stderr_never_fails_the_command(stream):
    console = sca._Console(stream)
    console.info("hello")
    console.error("bad")  # no exception: a full or closed stderr loses text, never the command


def test_errors_console_degrades_text_the_terminal_cannot_encode():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    sca._Console(stream).info("caf\u00e9 \u2588")
    assert raw.getvalue() == b"caf? ?\n"


# ==== §3 configuration =======================================================


@pytest.mark.parametrize("given, expected", [
    ("company.standcloud.io", "https://company.standcloud.io"),
    ("https://company.standcloud.io/", "https://company.standcloud.io"),
    ("  HTTPS://Company.StandCloud.io//  ", "https://company.standcloud.io"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://host/prefix/", "https://host/prefix"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("https://host:443/", "https://host"),
    ("http://localhost:80", "http://localhost"),
    ("http://localhost:443", "http://localhost:443"),
    ("https://HOST:0443", "https://host"),
    ("https://host:", "https://host"),
    ("http://[::1]:", "http://[::1]"),
    ("HTTP://[FE80::1%25eth0]:8080/a/", "http://[fe80::1%25eth0]:8080/a"),
])
def test_config_normalize_url(given, expected):
    assert sca._normalize_url(given) == expected


@pytest.mark.parametrize("bad", [
    "", "ftp://host", "https://", "https://user@host", "https://host?x=1", "https://host#f",
    "https://host:99999", "https://host:port", "https://ho st", "https://host:0",
    # issue 11: each was exit 1 in version 1
    "https://[::1", "https://host:\u00b2", "http://[127.0.0.1]", "https://[company.standcloud.io]",
    "https://host\u202e.io", "https://" + "h" * 2050,
    # the base URL is split by hand (urllib.parse is kept off the `token` hot path): what urlsplit let through
    "http://x.example[::1]", "https://[::1]]", "https://[::1]x", "https://a:b:c", "https://:443", "https://host:+443",
    "https://host:\u0664\u0664\u0663", "https://b\u00fccher.example", "://host",
])
def test_config_normalize_url_rejects(bad):
    with pytest.raises(sca.ConfigError) as info:
        sca._normalize_url(bad)
    assert info.value.exit_code == 2 and "--url" in info.value.hint


@pytest.mark.parametrize("url, origin", [
    ("https://company.standcloud.io/hardpy/api/v1/x?y=1#z", "https://company.standcloud.io"),
    ("HTTPS://Company.StandCloud.io:443", "https://company.standcloud.io"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
    ("https://user@company.standcloud.io/", None),  # userinfo: no origin, so never "the same" one
    ("https://evil.example\\@company.standcloud.io/", None),
    ("javascript:alert(1)", None), ("ftp://company.standcloud.io", None), ("/relative", None),
])
def test_config_origin_of_a_redirect_or_api_url(url, origin):
    if origin is None:
        with pytest.raises(ValueError):
            sca._origin(url)
    else:
        assert sca._origin(url) == origin


def test_config_the_token_hot_path_imports_no_url_parser():
    # urllib.parse (and the ipaddress it imports) costs `token` 6-9 ms per start on 3.11+: only a request imports it.
    code = ("import sys, standcloud_auth as sca; sca._normalize_url('Company.StandCloud.io:443/x/');"
            "sca._origin('https://a.example/b?c'); print(sorted(m for m in ('urllib.parse', 'ipaddress') if m in sys.modules))")
    out = subprocess.check_output([sys.executable, "-c", code], cwd=os.path.dirname(MODULE))
    assert out.decode().strip() == "[]"


@pytest.mark.parametrize("url, allowed", [
    ("http://localhost:1", True),
    ("http://app.localhost", True),
    ("http://127.0.0.1", True),
    ("http://127.9.9.9:80", True),
    ("http://[::1]:80", True),
    ("http://company.standcloud.io", False),
    ("http://10.0.0.1", False),
    ("http://localhost.example.com", False),
    ("https://company.standcloud.io", True),
])
def test_config_plain_http_only_to_loopback(url, allowed):
    expected = sca._normalize_url(url)
    if allowed:
        assert sca.StandCloudAuth(url, environ={}).url == expected
        return
    with pytest.raises(sca.ConfigError) as info:
        sca.StandCloudAuth(url, environ={})
    assert info.value.exit_code == 2 and "STANDCLOUD_ALLOW_HTTP" in str(info.value)
    assert sca.StandCloudAuth(url, environ={"STANDCLOUD_ALLOW_HTTP": "1"}).url == expected


def test_config_http_refused_before_any_connection(cli, live_server, store_path):
    # A remote http:// URL: exit 2, and nothing is sent anywhere.
    result = cli("--url", "http://company.example:1", "login", "--no-qr")
    assert_one_error(result, 2)
    assert "STANDCLOUD_ALLOW_HTTP" in result.err
    assert live_server.requests == []


@pytest.mark.parametrize("raw, expected", [
    (b'{"a": [1, 2.5, null, true]}', {"a": [1, 2.5, None, True]}),
    (b' [1] \n', [1]),
    (b'"\\u00e9"', u"\u00e9"),
])
def test_config_loads_accepts_json(raw, expected):
    assert sca._loads(raw) == expected


@pytest.mark.parametrize("raw", [
    b"", b"   ", b"NaN", b'{"a": Infinity}', b'{"a": -Infinity}', b"[1] x", b"{'a': 1}", b"\xff\xfe",
    b"[" * 100000, b"<html>502 Bad Gateway</html>", b"\xef\xbb\xbf{}",
    b'{"version": 1, "servers": {"https://x": {"access_token": "ab',  # cut off inside a string
], ids=lambda raw: repr(raw[:40]))
def test_config_loads_rejects(raw):
    with pytest.raises(ValueError):
        sca._loads(raw)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", "3601"])
def test_config_bad_timeout_is_usage_error(cli, value):
    result = cli("--url", "https://h.example", "--timeout", value, "status")
    assert "--timeout" in one_line_error(result, 2)


def test_config_bad_timeout_in_the_environment_names_it(cli, monkeypatch):
    monkeypatch.setenv("STANDCLOUD_TIMEOUT", "abc")
    assert "STANDCLOUD_TIMEOUT" in one_line_error(cli("--url", "https://h.example", "status"), 2)


@pytest.mark.parametrize("name, url", [
    ("STANDCLOUD_QR", "http://127.0.0.1:1"),
    ("STANDCLOUD_INSECURE", "http://127.0.0.1:1"),
    ("STANDCLOUD_ALLOW_HTTP", "http://company.example:1"),
])
def test_config_a_switch_that_is_not_0_or_1_is_usage_error(cli, monkeypatch, store_path, name, url):
    monkeypatch.setenv(name, "maybe")
    line = one_line_error(cli("--url", url, "login", "--no-check"), 2)
    assert name + "=maybe" in line


def test_config_insecure_warns_on_every_run_even_quiet(cli, monkeypatch):
    monkeypatch.setenv("STANDCLOUD_INSECURE", "1")
    result = cli("-q", "--url", "https://h.example", "status")
    assert "standcloud-auth: warning: TLS certificates are not verified" in result.err


def test_config_flag_beats_environment(cli, server, store_path, clock, tmp_path, monkeypatch):
    tokens = log_in(server, store_path, clock.now())
    monkeypatch.setenv("STANDCLOUD_TIMEOUT", "abc")  # not read: the flag wins
    monkeypatch.setenv("STANDCLOUD_URL", "https://elsewhere.example")
    monkeypatch.setenv("STANDCLOUD_TOKEN_FILE", str(tmp_path / "nowhere" / "tokens.json"))
    result = cli("--timeout", "5", "--url", server.base, "--store", str(store_path), "token")
    assert result.out == tokens["access_token"] + "\n", result


H, X, A = (os.path.join(ROOT, name) for name in ("h", "x", "appdata"))


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {"HOME": H, "XDG_CONFIG_HOME": X}, os.path.join(X, "standcloud", "tokens.json")),
    ("linux", {"HOME": H}, os.path.join(H, ".config", "standcloud", "tokens.json")),
    ("linux", {"HOME": H, "XDG_CONFIG_HOME": "relative"}, os.path.join(H, ".config", "standcloud", "tokens.json")),
    ("freebsd12", {"HOME": H}, os.path.join(H, ".config", "standcloud", "tokens.json")),
    ("darwin", {"HOME": H, "XDG_CONFIG_HOME": X},
     os.path.join(H, "Library", "Application Support", "standcloud", "tokens.json")),
    ("win32", {"APPDATA": A, "HOME": H}, os.path.join(A, "standcloud", "tokens.json")),
    ("win32", {"USERPROFILE": H}, os.path.join(H, "AppData", "Roaming", "standcloud", "tokens.json")),
    ("win32", {"APPDATA": "relative", "USERPROFILE": H},
     os.path.join(H, "AppData", "Roaming", "standcloud", "tokens.json")),
])
def test_config_default_store_path(platform, env, expected):
    assert sca._default_store_path(env, platform) == expected


def test_config_default_store_is_used(cli, isolated_env, server, clock):
    expected = os.path.join(str(isolated_env), ".config", "standcloud", "tokens.json")
    result = cli("--url", server.base, "status", "--json")
    assert json.loads(result.out)["store"] == expected
    assert sca.StandCloudAuth(server.base).store.path == expected
    tokens = log_in(server, type(isolated_env)(expected), clock.now())
    assert cli("token").out == tokens["access_token"] + "\n"


def test_config_unusable_home_stops_only_what_needs_the_store(cli, monkeypatch):
    monkeypatch.setenv("HOME", "relative")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    with pytest.raises(sca.ConfigError):
        sca._default_store_path({"HOME": "relative"}, "linux")
    line = one_line_error(cli("--url", "https://h.example", "token"), 2)
    assert "HOME" in line and "--store" in line
    monkeypatch.setenv("STANDCLOUD_TOKEN", "static_token_1")  # needs no store
    assert cli("--url", "https://h.example", "token").out == "static_token_1\n"


# ==== §4 token store =========================================================


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_store_private_from_first_byte_under_umask_000(tmp_path, server, clock):
    path = tmp_path / "a" / "b" / "tokens.json"
    server.interval, server.approve_after = 1, 1
    old = os.umask(0)
    try:
        auth = sca.StandCloudAuth(server.base, store=str(path))
        auth.wait_for_login(auth.start_login())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path.parent)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(path.parent.parent)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_store_temp_file_is_created_with_0600(tmp_path, monkeypatch):
    # "create with the mode; do not chmod afterwards": watch os.open's mode.
    seen = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if str(path).endswith(".tmp"):
            seen.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after creation"))
    store = sca.TokenStore(str(tmp_path / "tokens.json"), sca._Console())
    store.save({"https://a.example": sca.Tokens("at_1", "rt_1", 1764400000.0, sca.SCOPE, 1764399000.0)})
    assert seen == [0o600]
    assert stat.S_IMODE(os.stat(str(tmp_path / "tokens.json")).st_mode) == 0o600


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_store_loose_permissions_warned_then_tightened(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    os.chmod(str(store_path), 0o644)
    result = cli("--url", server.base, "token")
    assert result.code == 0
    assert "standcloud-auth: warning:" in result.err and "644" in result.err
    assert cli("--url", server.base, "refresh").code == 0
    assert stat.S_IMODE(os.stat(str(store_path)).st_mode) == 0o600


def test_store_crash_between_write_and_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s" / "tokens.json"
    path.parent.mkdir(mode=0o700)
    store = sca.TokenStore(str(path), sca._Console())
    store.save({"https://a.example": sca.Tokens("old_token", "r")})
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(sca.ConfigError) as info:
        store.save({})
    assert "simulated crash" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json"]  # no temp file left


def test_store_write_is_atomic_for_readers(tmp_path):
    # A reader in another process never sees a torn file while we rewrite it.
    path = tmp_path / "tokens.json"
    store = sca.TokenStore(str(path), sca._Console())
    big = {"https://s%d.example" % i: sca.Tokens("a" * 500, "r", 1764400000.0, sca.SCOPE, 1764399000.0)
           for i in range(50)}
    store.save(big)
    reader = subprocess.Popen([sys.executable, "-c", (
        "import json,sys,time\n"
        "end=time.time()+0.3; n=0\n"
        "while time.time()<end:\n"
        "    with open(sys.argv[1], 'rb') as f: assert len(json.loads(f.read().decode())['servers']) == 50\n"
        "    n+=1\n"
        "print(n)\n"), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.time() + 0.3
    while time.time() < end:
        store.save(big)
    out, err = reader.communicate(timeout=10)
    assert reader.returncode == 0, err
    assert int(out) > 0


VALID_ENTRY = {"access_token": "at_abc", "refresh_token": "rt_abc", "token_type": "Bearer",
               "expires_at": 1764403600.0, "scope": sca.SCOPE, "updated_at": 1764400000.0}


def store_bytes(servers, version=1):
    return json.dumps({"version": version, "servers": servers}).encode()


MISSING = "(missing)"


def entry(**changes):
    """VALID_ENTRY with some fields changed (MISSING: removed)."""
    out = dict(VALID_ENTRY, **changes)
    return {k: v for k, v in out.items() if v is not MISSING}


@pytest.mark.parametrize("content, why", [
    # content, a word of the reason given in (...)
    (b"", "JSON"),
    (b"   \n", "JSON"),
    (b"{not json", "JSON"),
    (b'{"version": 1, "servers": {"https://a": {"access_token": "x"', "JSON"),
    (b"[]", "version"),
    (b'{"version": 2, "servers": {}}', "version"),
    (b'{"version": true, "servers": {}}', "version"),
    (b'{"version": 1.0, "servers": {}}', "version"),
    (b'{"version": "1", "servers": {}}', "version"),
    (b'{"version": 1, "servers": []}', "version"),
    (b'{"version": 1, "servers": {"https://a": {"access_token": 5}}}', "https://a"),
    (b'{"version": 1, "servers": {"https://a": "x"}}', "https://a"),
    (store_bytes({"https://A.example/": VALID_ENTRY}), "'https://A.example/'"),  # one spelling per server
    (store_bytes({"not a url": VALID_ENTRY}), "'not a url'"),
    (store_bytes({"https://a": entry(expires_at=10 ** 400)}), "https://a"),
    (store_bytes({"https://a": entry(expires_at=1e300)}), "https://a"),
    (store_bytes({"https://a": entry(scope="\ud800")}), "https://a"),
    (b"{" + b" " * (4 * 1024 * 1024) + b"}", "4 MiB"),
], ids=lambda value: value if isinstance(value, str) else repr(value[:30]))
def test_store_corrupt_is_reported_not_overwritten(cli, store_path, content, why):
    store_path.parent.mkdir(parents=True, mode=0o700)
    store_path.write_bytes(content)
    for command in ("token", "status", "refresh", "logout", "healthcheck"):
        line = one_line_error(cli("--url", "https://h.example", command), 2)
        assert "the token store %s is unreadable" % store_path in line and why in line, command
        assert store_path.read_bytes() == content
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["tokens.json"]  # no lock file either


@pytest.mark.parametrize("field, value", [
    ("access_token", MISSING), ("access_token", ""), ("access_token", "a b"), ("access_token", "caf\u00e9"),
    ("access_token", "a" * 16385), ("access_token", 5), ("refresh_token", ""), ("refresh_token", ["x"]),
    ("refresh_token", "r\x00t"), ("token_type", MISSING), ("token_type", 5), ("scope", "a\x1bb"),
    ("scope", "a\u202eb"), ("scope", "a\u2066b"), ("scope", "\ud800"), ("scope", "s" * 1025), ("scope", 5),
    ("expires_at", True), ("expires_at", "1764403600"), ("expires_at", -1), ("expires_at", 1e300),
    ("expires_at", 10 ** 400), ("expires_at", 32503680001), ("updated_at", False), ("updated_at", -0.5),
    ("updated_at", [1]),
])
def test_store_each_field_is_checked(field, value):
    with pytest.raises(sca.StoreCorrupt) as info:
        sca._parse_store(store_bytes({"https://a.example": entry(**{field: value})}), "/s/tokens.json")
    assert info.value.exit_code == 2 and "/s/tokens.json" in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("access_token", "a" * 16384), ("access_token", "!~"), ("refresh_token", None), ("scope", None),
    ("scope", "s" * 1024), ("scope", "caf\u00e9 \u4e2d"), ("expires_at", None), ("expires_at", 0),
    ("expires_at", 32503680000), ("expires_at", 1764403600), ("updated_at", None), ("token_type", "bearer"),
    ("id_token", "unknown fields are ignored"),
])
def test_store_accepts_what_it_could_have_written(field, value):
    servers = sca._parse_store(store_bytes({"https://a.example": entry(**{field: value})}), "/s/tokens.json")
    tokens = servers["https://a.example"]
    if field in ("access_token", "refresh_token", "scope"):
        assert getattr(tokens, field) == value
    if field in ("expires_at", "updated_at") and value is not None:
        assert getattr(tokens, field) == float(value) and type(getattr(tokens, field)) is float
    assert sca.Tokens.from_entry(tokens.entry()).entry() == tokens.entry()  # round trip


@pytest.mark.skipif(not POSIX, reason="FIFOs are POSIX")
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_store_that_is_not_a_regular_file_is_exit_2_never_a_hang(cli, store_path, kind):
    store_path.parent.mkdir(parents=True, mode=0o700)
    if kind == "fifo":
        os.mkfifo(str(store_path))
    else:
        store_path.mkdir()
    for command in ("token", "status"):
        assert str(store_path) in one_line_error(cli("--url", "https://h.example", command), 2)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_store_folder_writable_by_others_is_refused(cli, server, store_path, clock, mode):
    log_in(server, store_path, clock.now())
    os.chmod(str(store_path.parent), mode)
    line = one_line_error(cli("--url", server.base, "token"), 2)
    assert str(store_path.parent) in line


@pytest.mark.skipif(not POSIX, reason="symlinks and O_NOFOLLOW")
def test_store_lock_file_is_never_opened_through_a_symlink(cli, server, store_path, clock, tmp_path):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)  # a refresh is due: the lock is needed
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(str(target), str(store_path) + ".lock")
    line = one_line_error(cli("--url", server.base, "token"), 2)
    assert str(store_path) + ".lock" in line
    assert server.refreshes() == 0 and target.read_bytes() == b""


def test_store_unusable_lock_file_means_no_refresh_is_sent(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)
    before = store_path.read_bytes()
    os.mkdir(str(store_path) + ".lock")
    assert_one_error(cli("--url", server.base, "token"), 2)
    assert server.refreshes() == 0 and store_path.read_bytes() == before


def test_store_corrupt_kept_aside_by_login(cli, server, store_path, clock):
    store_path.parent.mkdir(parents=True, mode=0o700)
    store_path.write_bytes(b"{garbage")
    os.chmod(str(store_path), 0o644)
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    kept = [p for p in store_path.parent.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == b"{garbage"
    assert str(kept[0]) in result.err
    if POSIX:
        assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600  # it may hold tokens
    assert json.loads(store_path.read_text())["servers"][server.base]["access_token"]


def test_store_keeps_other_servers(cli, server, store_path, clock):
    other = entry_for({"access_token": "other", "refresh_token": "r2"}, clock.now())
    write_store(store_path, {"https://other.example": other})
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--no-qr", "--no-check").code == 0
    servers = json.loads(store_path.read_text())["servers"]
    assert servers["https://other.example"] == other
    assert set(servers) == {"https://other.example", server.base}


def test_store_schema_matches_contract(cli, server, store_path, clock):
    server.interval, server.approve_after = 1, 1
    sent = clock.now()
    assert cli("--url", server.base, "login", "--no-qr", "--no-check").code == 0
    doc = json.loads(store_path.read_text(encoding="utf-8"))
    assert doc["version"] == 1
    entry = doc["servers"][server.base]
    assert set(entry) == {"access_token", "refresh_token", "token_type", "expires_at", "scope", "updated_at"}
    assert entry["token_type"] == "Bearer"  # the server said "bearer"
    assert entry["access_token"].startswith("authelia_at_")
    assert entry["refresh_token"].startswith("authelia_rt_")
    assert sent < entry["expires_at"] <= clock.now() + 3600
    assert entry["scope"] == sca.SCOPE


def test_store_lock_serialises_processes(tmp_path):
    # While this process holds the lock, another process cannot take it.
    store = sca.TokenStore(str(tmp_path / "tokens.json"), sca._Console())
    code = ("import sys; sys.path.insert(0, %r); import standcloud_auth as s\n"
            "s.LOCK_TIMEOUT = 0.1\n"
            "t = s.TokenStore(%r, s._Console())\n"
            "try:\n"
            "    with t.lock(): print('got')\n"
            "except s.ConfigError as e: print('busy', e.exit_code)\n") % (os.path.dirname(MODULE), store.path)
    with store.lock():
        out = subprocess.check_output([sys.executable, "-c", code])
    assert out.split() == [b"busy", b"2"]
    out = subprocess.check_output([sys.executable, "-c", code])
    assert out.split() == [b"got"]


def test_store_read_only_commands_write_nothing(cli, store_path):
    assert "not logged in" in one_line_error(cli("--url", "https://h.example", "token"), 3)
    assert "login" in one_line_error(cli("--url", "https://h.example", "refresh"), 3)
    assert cli("--url", "https://h.example", "status").code == 3
    assert cli("--url", "https://h.example", "logout").code == 0
    assert not store_path.parent.exists()  # no folder, no lock file


def _leftover(store_path, servers, data=None):
    """A temporary store as a process killed before its rename leaves it."""
    path = store_path.parent / ("tokens.json.k1ll3d.tmp")
    path.write_bytes(data if data is not None else store_bytes(servers))
    later = os.stat(str(store_path)).st_mtime + 5
    os.utime(str(path), (later, later))
    return path


def test_store_complete_leftover_of_a_killed_process_is_adopted(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)  # the old, expired pair
    new = server.issue()  # the rotated pair that only the leftover holds
    leftover = _leftover(store_path, {server.base: entry_for(new, clock.now())})
    result = cli("--url", server.base, "token")
    assert result.out == new["access_token"] + "\n", result
    assert "recovered the tokens that a stopped process had saved in %s" % leftover in result.err
    assert server.refreshes() == 0 and not leftover.exists()


def test_store_incomplete_leftover_is_removed(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1)
    leftover = _leftover(store_path, None, b'{"version": 1, "servers": {"' + b" " * 1000)
    result = cli("--url", server.base, "token")
    assert result.code == 0 and "recovered" not in result.err
    assert server.refreshes() == 1 and not leftover.exists()


# ---- the store cut off, through the real CLI --------------------------------
# Version 1 parsed JSON with a private scanner: on CPython 3.10 and 3.11 a
# store cut off inside a string made token, status and login exit 1
# ("internal error (SystemError)"), hidden in-process because conftest
# imports json first.

GOOD_STORE = json.dumps({"version": 1, "servers": {
    "https://x": {"access_token": "abcdefghijklmnop", "refresh_token": "rt_qrstuvwxyz", "token_type": "Bearer",
                  "expires_at": 32503600000.0, "scope": sca.SCOPE, "updated_at": 1764400000.0},
    "https://y.example": {"access_token": "yyyyyyyy", "refresh_token": None, "token_type": "Bearer",
                          "expires_at": None, "scope": None, "updated_at": None}}}).encode()


def _at(marker, plus=0):
    return GOOD_STORE.index(marker) + plus


BAD_STORES = [  # more positions, and every byte, in the sweep below
    ("cut at 1", GOOD_STORE[:1]),
    ("cut inside a key", GOOD_STORE[:_at(b'"version"', 4)]),
    ("cut inside a string", GOOD_STORE[:_at(b'"abcdefghijklmnop"', 3)]),  # ... "access_token": "ab
    ("cut before the last brace", GOOD_STORE[:-1]),
]
assert GOOD_STORE[:_at(b'"abcdefghijklmnop"', 3)].endswith(b'{"version": 1, "servers": {"https://x": {"access_token": "ab')
STORE_COMMANDS = {  # argv, exit code for a bad store, for the good one
    "token": (["--url", "https://x", "token"], 2, 0),
    "status": (["status"], 2, 0),  # every stored server
    "login": (["--url", "http://127.0.0.1:{port}", "login", "--no-qr"], 4, 4),  # kept aside, then refused
}


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory):
    """Every bad store (and the good one) through every command, each in a
    fresh interpreter and a home of its own, side by side."""
    port, cases, argvs, envs = free_port(), [], [], []
    for name, data in BAD_STORES + [("good store", GOOD_STORE)]:
        for command, (argv, _, _) in sorted(STORE_COMMANDS.items()):
            home = tmp_path_factory.mktemp("store")
            path = home / "s" / "tokens.json"
            path.parent.mkdir(mode=0o700)
            path.write_bytes(data)
            os.chmod(str(path), 0o600)
            env = isolation(home)
            env["STANDCLOUD_TOKEN_FILE"] = str(path)
            cases.append((name, command, path))
            argvs.append([word.format(port=port) for word in argv])
            envs.append(env)
    results = run_cli_many(argvs, env=envs)
    return {(name, command): (path, result) for (name, command, path), result in zip(cases, results)}


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
@pytest.mark.parametrize("name, data", BAD_STORES, ids=[name for name, _ in BAD_STORES])
def test_store_bad_store_real_cli(store_runs, name, data, command):
    path, result = store_runs[(name, command)]
    line = one_line_error(result, STORE_COMMANDS[command][1])  # never 1, never a traceback
    if command == "login":  # kept aside, private, then the (refused) device flow
        kept = [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
        assert len(kept) == 1 and kept[0].read_bytes() == data
        assert str(kept[0]) in result.err and "refused" in line
    else:
        assert "the token store %s is unreadable" % path in line
        assert path.read_bytes() == data  # never overwritten


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
def test_store_good_store_real_cli(store_runs, command):
    # The control: uncut, the same store works (login: not logged in to that URL).
    path, result = store_runs[("good store", command)]
    assert result.code == STORE_COMMANDS[command][2], result
    assert "Traceback" not in result.err and ".corrupt-" not in result.err
    assert path.read_bytes() == GOOD_STORE
    if command == "token":
        assert result.out == "abcdefghijklmnop\n"


SWEEP = r"""
import sys
sys.path.insert(0, sys.argv[1])
import standcloud_auth as sca
for name in sys.argv[2:]:
    with open(name, "rb") as handle:
        data = handle.read()
    for n in range(len(data)):
        try:
            if name.endswith(".store"):
                sca._parse_store(data[:n], "STORE")
            else:
                sca._loads(data[:n])
            print("parsed", name, n)
        except sca.StoreCorrupt as exc:
            if exc.exit_code != 2 or "the token store STORE is unreadable" not in str(exc):
                print("wrong", name, n, repr(exc))
        except ValueError as exc:
            if name.endswith(".store"):
                print("wrong", name, n, repr(exc))
        except BaseException as exc:
            print("wrong", name, n, repr(exc))
print("done")
"""


def test_store_and_answers_cut_at_every_byte_fresh_interpreter(tmp_path):
    # Every prefix of a store and of each server answer, parsed in an
    # interpreter that imported nothing first; the real CLI runs the
    # positions above.
    names = []
    for name, data in [("two-servers.store", GOOD_STORE), ("device.json", DEVICE_ANSWER), ("token.json", TOKEN_ANSWER)]:
        (tmp_path / name).write_bytes(data)
        names.append(str(tmp_path / name))
    out = subprocess.check_output([sys.executable, "-c", SWEEP, os.path.dirname(MODULE)] + names, cwd=str(tmp_path))
    assert out.decode().split("\n") == ["done", ""]


# ==== §5 HTTP ================================================================


def test_http_headers_and_form(server, clock, store_path):
    auth = sca.StandCloudAuth(server.base)
    flow = auth.start_login()
    request = server.requests[0]
    assert request["path"] == "/auth/api/oidc/device-authorization"
    assert request["headers"]["Accept"] == "application/json"
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert request["headers"]["User-Agent"] == "standcloud-auth/%s Python/%d.%d" % (
        sca.__version__, sys.version_info[0], sys.version_info[1])
    assert request["form"] == {"client_id": "hardpy-report-uploader", "scope": "offline_access authelia.bearer.authz",
                               "audience": server.base + "/hardpy/api/v1"}
    assert flow.user_code and flow.interval == 5
    assert not store_path.parent.exists()  # the check that the tokens could be saved left nothing


def test_http_timeout_bounds_whole_request(server, store_path):
    # A server that trickles one byte every 0.05 s: every read succeeds, the
    # whole answer would take 5 s; --timeout 0.3 must end it.
    server.script(sca.DEVICE_PATH, trickle(100, 0.05))
    auth = sca.StandCloudAuth(server.base, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(sca.NetworkError) as info:
        auth.start_login()
    assert time.monotonic() - started < 1.5
    assert "timed out" in str(info.value)


def test_http_network_errors_map_to_exit_4(cli, store_path):
    line = one_line_error(cli("--url", "http://127.0.0.1:%d" % free_port(), "login", "--no-qr"), 4)
    assert "refused" in line


def test_http_body_over_1_mib_is_server_error(server, store_path):
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    server.script(sca.DEVICE_PATH, (200, {"Content-Type": "application/json"}, big))
    with pytest.raises(sca.ServerError) as info:
        sca.StandCloudAuth(server.base).start_login()
    assert "1 MiB" in str(info.value)


def test_http_chunked_body_over_1_mib_is_server_error(server, store_path):
    server.script(sca.DEVICE_PATH, chunked())
    with pytest.raises(sca.ServerError) as info:
        sca.StandCloudAuth(server.base).start_login()
    assert "1 MiB" in str(info.value)


def test_http_answer_cut_short_of_its_length_is_never_used(cli, server, store_path, clock):
    # The connection drops after 10 of the 1000 bytes announced: a network
    # failure (exit 4), never a short body passed off as the answer.
    log_in(server, store_path, clock.now())
    server.script(sca.API_PATH + "/report", answer_cut_off(b'{"rows": [' + b"1, " * 400 + b"1]}", 10, 1000))
    result = cli("--url", server.base, "api", "/report")
    assert_one_error(result, 4)
    assert result.out == ""


def test_http_oauth_endpoints_follow_no_redirect(server, store_path):
    server.script(sca.DEVICE_PATH, (302, {"Location": server.base + "/elsewhere"}, b""))
    with pytest.raises(sca.ServerError) as info:
        sca.StandCloudAuth(server.base).start_login()
    assert "redirect" in str(info.value)
    assert [r["path"] for r in server.requests] == [sca.DEVICE_PATH]


def test_http_verbose_is_one_line_per_request_and_never_a_token(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    result = cli("-v", "--url", server.base, "healthcheck")
    assert result.code == 0 and result.out == "ok\n"
    lines = [line for line in result.err.splitlines() if line.startswith("standcloud-auth: GET ")]
    assert len(lines) == 1 and lines[0].startswith("standcloud-auth: GET %s/hardpy/api/v1/healthcheck 200 " % server.base)
    assert tokens["access_token"] not in result.err and "Authorization" not in result.err


# ==== §6 OAuth 2.0 ===========================================================


def start(server):
    auth = sca.StandCloudAuth(server.base)
    return auth, auth.start_login()


def test_oauth_polls_no_sooner_than_interval_with_margin(server, clock, store_path):
    server.interval = 10
    server.approve_after = 4
    auth, flow = start(server)
    auth.wait_for_login(flow)
    polls = [r for r in server.requests if r["form"].get("grant_type") == sca.DEVICE_GRANT]
    assert len(polls) == 4
    assert all(10.0 < s <= 11.0 + 1e-9 for s in clock.sleeps)  # interval + ~10 %
    assert server.count(sca.TOKEN_PATH) == 4  # never a slow_down
    assert polls[0]["form"] == {"client_id": sca.CLIENT_ID, "grant_type": sca.DEVICE_GRANT,
                                "device_code": polls[0]["form"]["device_code"]}


def test_oauth_default_interval_is_5(server, clock, store_path):
    body = {"device_code": "dc", "user_code": "ABCD", "verification_uri": server.base + "/v", "expires_in": 60}
    server.script(sca.DEVICE_PATH, (200, {}, json.dumps(body).encode()))
    server.script(sca.TOKEN_PATH, (200, {}, json.dumps({"access_token": "at", "token_type": "Bearer"}).encode()))
    auth, flow = start(server)
    assert flow.interval == 5 and flow.verification_uri_complete is None
    auth.wait_for_login(flow)
    assert clock.sleeps == [pytest.approx(5.5)]


def test_oauth_slow_down_adds_5_seconds_for_the_rest(server, clock, store_path):
    server.interval = 5
    pending = (400, {}, b'{"error": "authorization_pending"}')
    slow = (400, {}, b'{"error": "slow_down"}')
    server.script(sca.TOKEN_PATH, slow, pending, slow, pending)
    server.approve_after = 0
    auth, flow = start(server)
    auth.wait_for_login(flow)
    # waits: 5, then 10 (slow_down), 10, then 15 (slow_down again), 15
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [5, 10, 10, 15, 15]


def test_oauth_fake_answers_an_early_poll_with_slow_down(server, clock, store_path):
    # The fake server is faithful: a poll a hair early is answered slow_down,
    # so the margin above matters.
    from urllib.error import HTTPError
    from urllib.parse import urlencode
    from urllib.request import urlopen

    auth, flow = start(server)
    clock.advance(4.99)
    form = urlencode({"client_id": sca.CLIENT_ID, "grant_type": sca.DEVICE_GRANT, "device_code": flow.device_code})
    with pytest.raises(HTTPError) as info:
        urlopen(server.base + sca.TOKEN_PATH, data=form.encode())
    with info.value:
        assert json.loads(info.value.read().decode())["error"] == "slow_down"


@pytest.mark.parametrize("answer, message", [
    ((403, {}, b'{"error": "access_denied", "error_description": "The resource owner denied the request"}'), "denied"),
    ((400, {}, b'{"error": "access_denied"}'), "denied"),
    ((400, {}, b'{"error": "expired_token"}'), "expired"),
    ((400, {}, b'{"error": "invalid_client", "error_description": "unknown client"}'), "invalid_client: unknown client"),
    ((401, {}, b'{"error": "invalid_client"}'), "invalid_client"),
    ((400, {}, b""), "HTTP 400"),
    ((401, {}, b"<html>no</html>"), "HTTP 401"),
])
def test_oauth_errors_exit_3(cli, server, store_path, answer, message):
    server.interval = 1
    server.script(sca.TOKEN_PATH, answer)
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 3)
    assert message in line
    assert "run login again: 'standcloud-auth --url %s login'" % server.base in line
    assert not store_path.exists()


def test_oauth_denied_by_person(cli, server, clock, store_path):
    # RFC 8628 (and the library Authelia is built on): access_denied, here with 403.
    server.interval, server.deny_style = 1, "rfc"
    clock.on_sleep = lambda c: server.approve(deny=True)
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "denied" in result.err


def test_flow_denied_by_person_authelia(cli, server, clock, store_path):
    # The running Authelia answers a Deny with 500 server_error on every later
    # poll: not a fault to retry; the login ends within three polls.
    server.interval = 1
    clock.on_sleep = lambda c: server.approve(deny=True)
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "refus" in result.err and "login again" in result.err
    assert 1 <= server.polls() <= 3
    assert clock.mono - 1000 <= 3 * 1.1 + 1e-6  # at the normal interval, no back-off
    assert not store_path.exists()


def test_oauth_server_error_body_is_polled_again_at_the_interval_then_ends(cli, server, clock, store_path):
    # Two 500 server_error answers, then approval: a passing fault, no back-off;
    # three in a row end the login (above).
    server.interval, server.approve_after = 2, 1
    refused = (500, {}, b'{"error": "server_error", "error_description": "Misconfigured code"}')
    server.script(sca.TOKEN_PATH, refused, refused)
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [2, 2, 2]


def test_oauth_client_enforces_expiry(cli, server, clock, store_path):
    # Authelia keeps answering authorization_pending after expiry.
    server.interval, server.expires_in = 5, 61
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 3)
    assert "expired" in line and "run login again" in line
    assert 55 <= clock.mono - 1000 <= 61
    assert server.polls() == 10  # 5.5 s apart within 60 s


def test_oauth_network_failure_and_5xx_back_off_then_succeed(server, clock, store_path):
    server.interval = 2
    down = (503, {}, b"<html>maintenance</html>")
    server.script(sca.TOKEN_PATH, down, down, down)
    server.approve_after = 1
    auth, flow = start(server)
    auth.wait_for_login(flow)
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [2, 4, 8, 16]


def test_oauth_backoff_is_capped_at_60(server, clock, store_path):
    server.interval, server.expires_in = 10, 3600
    server.script(sca.TOKEN_PATH, *[(500, {}, b"")] * 6)
    server.approve_after = 1
    auth, flow = start(server)
    auth.wait_for_login(flow)
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [10, 20, 40, 60, 60, 60, 60]


def test_oauth_connection_dropped_is_retried(server, clock, store_path):
    def hang_up(handler):
        handler.close_connection = True
        handler.connection.close()

    server.interval = 1
    server.script(sca.TOKEN_PATH, hang_up)
    server.approve_after = 1
    auth, flow = start(server)
    tokens = auth.wait_for_login(flow)
    assert tokens.access_token.startswith("authelia_at_")


def test_oauth_error_after_retried_poll_says_run_login_again(cli, server, clock, store_path):
    # The lost answer carried the tokens: the code is now used up (Authelia: server_error 500).
    server.interval = 1
    server.approve_after = 1

    def lose_answer(handler):
        handler._poll(handler.fake.requests[-1]["form"])  # the server issues tokens...
        handler.close_connection = True
        handler.connection.close()  # ...and the answer is lost

    server.script(sca.TOKEN_PATH, lose_answer, (400, {}, b'{"error": "invalid_grant"}'))
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 3)
    assert "the server no longer accepts this device code" in line and "run login again" in line
    assert not store_path.exists()


def test_oauth_server_text_is_made_safe_and_never_shows_the_device_code(cli, server, store_path):
    def echo(handler):
        code = handler.fake.requests[-1]["form"]["device_code"]
        description = "bad \x1b[2J code %s \u202edone\u2069" % code
        body = json.dumps({"error": "invalid_request\x07", "error_description": description}).encode()
        handler.send(400, {"Content-Type": "application/json"}, body)

    server.interval = 1
    server.script(sca.TOKEN_PATH, echo)
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 3)
    assert "invalid_request?: bad ?[2J code [redacted] ?done?" in line
    device_code = list(server.devices)[0]
    assert device_code not in line and "\x1b" not in line


@pytest.mark.parametrize("body", [
    b"not json", b"<html>Bad Gateway</html>", b"[]", b"{}", b'{"access_token": 5, "token_type": "Bearer"}',
    b'{"access_token": "a", "token_type": "mac"}', b'{"access_token": "a b", "token_type": "Bearer"}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": -5}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": 1e300}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": "3600"}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": true}',
    b'{"access_token": "a", "token_type": "Bearer", "refresh_token": ["x"]}',
    b'{"access_token": "' + b"a" * 16385 + b'", "token_type": "Bearer"}',
    b'{"access_token": "caf\\u00e9", "token_type": "Bearer"}',
    b'{"access_token": "a", "token_type": "Bearer", "scope": "' + b"s" * 1025 + b'"}',
    b'{"access_token": "a", "token_type": "Bearer", "scope": "a\\u001bb"}',
    b'{"access_token": "a", "token_type": "Bearer", "scope": "\\ud800"}',
    b"", b"[" * 50000,
], ids=lambda body: repr(body[:50]))
def test_oauth_malformed_token_answer_exit_5(cli, server, store_path, body):
    server.interval = 1
    server.script(sca.TOKEN_PATH, (200, {"Content-Type": "application/json"}, body))
    assert_one_error(cli("--url", server.base, "login", "--no-qr"), 5)
    assert not store_path.exists()


@pytest.mark.parametrize("body", [
    b"not json", b"<html>Bad Gateway</html>", b"[1]", b"{}", b"",
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": -1}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": 600, "interval": -1}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": 600, "interval": 1e9}',
    b'{"device_code": "d", "user_code": "U\\u001b[2J", "verification_uri": "https://v", "expires_in": 600}',
    b'{"device_code": "d", "user_code": "U\\u202e", "verification_uri": "https://v", "expires_in": 600}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "javascript:x", "expires_in": 600}',
    b'{"device_code": 7, "user_code": "U", "verification_uri": "https://v", "expires_in": 600}',
    b'{"user_code": "U", "verification_uri": "https://v", "expires_in": 600}',
], ids=lambda body: repr(body[:60]))
def test_oauth_malformed_device_answer_exit_5(cli, server, store_path, body):
    server.script(sca.DEVICE_PATH, (200, {"Content-Type": "application/json"}, body))
    assert_one_error(cli("--url", server.base, "login", "--no-qr"), 5)
    assert server.polls() == 0


def test_oauth_device_request_rejected_exit_3(cli, server, store_path):
    server.script(sca.DEVICE_PATH, (400, {}, b'{"error": "invalid_scope", "error_description": "bad scope"}'))
    assert "invalid_scope: bad scope" in one_line_error(cli("--url", server.base, "login", "--no-qr"), 3)


@pytest.mark.parametrize("status, body", [(400, b"{}"), (401, b""), (400, b"<html>no</html>"), (503, b'{"error": "x"}')])
def test_oauth_device_request_refused_without_oauth_error_exit_5(cli, server, store_path, status, body):
    # Authelia 4.39.20 answers a refused device authorization with {}: the status must speak.
    server.script(sca.DEVICE_PATH, (status, {"Content-Type": "application/json"}, body))
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 5)
    assert "the server refused to start a login (HTTP %d from %s%s)" % (status, server.base, sca.DEVICE_PATH) in line


def test_oauth_stalled_device_request_exit_4(cli, server, store_path):
    server.script(sca.DEVICE_PATH, lambda handler: time.sleep(1.0))
    started = time.monotonic()
    assert_one_error(cli("--url", server.base, "--timeout", "0.3", "login", "--no-qr"), 4)
    assert time.monotonic() - started < 1.0


def test_oauth_real_server_variants_work(server, clock, store_path):
    # token_type in lower case, unknown fields, a short opaque token, ?code= URIs.
    body = {"device_code": "dc", "user_code": "WDJB-MJHT", "verification_uri": server.base + "/device",
            "verification_uri_complete": server.base + "/device?code=WDJB-MJHT", "expires_in": 900, "interval": 1,
            "extra": {"x": 1}}
    tokens = {"access_token": "x1", "token_type": "bearer", "expires_in": 60, "iat": 1, "id_token": "e.y.j"}
    server.script(sca.DEVICE_PATH, (200, {}, json.dumps(body).encode()))
    server.script(sca.TOKEN_PATH, (200, {}, json.dumps(tokens).encode()))
    auth, flow = start(server)
    assert flow.verification_uri_complete.endswith("?code=WDJB-MJHT")
    got = auth.wait_for_login(flow)
    assert got.access_token == "x1" and got.refresh_token is None


# ---- server answers cut off, through the real CLI ----------------------------

DEVICE_ANSWER = json.dumps({
    "device_code": "authelia_dc_abcdefghijklmnopqrstuvwxyz", "user_code": "WDJBMJHT",
    "verification_uri": "http://127.0.0.1:1/consent/openid/device-authorization",
    "verification_uri_complete": "http://127.0.0.1:1/consent/openid/device-authorization?user_code=WDJBMJHT",
    "expires_in": 599, "interval": 1}).encode()
TOKEN_ANSWER = json.dumps({
    "access_token": "authelia_at_abcdefghijklmnopqrstuvwxyz", "token_type": "bearer", "expires_in": 3600,
    "scope": sca.SCOPE, "refresh_token": "authelia_rt_abcdefghijklmnopqrstuvwxyz"}).encode()


def _inside(body, marker):
    return body.index(marker) + 16  # inside that string


# endpoint, where, length, dropped (the connection closes short of the length announced), exit codes
CUT_ANSWERS = [
    ("device authorization", "inside a string", _inside(DEVICE_ANSWER, b'"authelia_dc_'), False, (5,)),
    ("device authorization", "before the last brace", len(DEVICE_ANSWER) - 1, False, (5,)),
    ("device authorization", "inside a string", _inside(DEVICE_ANSWER, b'"authelia_dc_'), True, (4, 5)),
    ("token poll", "inside a string", _inside(TOKEN_ANSWER, b'"authelia_at_'), False, (5,)),
    ("token poll", "before the last brace", len(TOKEN_ANSWER) - 1, False, (5,)),
    # a refresh answer that never arrived whole may have rotated the session: not "try again later"
    ("refresh", "inside a string", _inside(TOKEN_ANSWER, b'"authelia_at_'), False, (5,)),
    ("refresh", "inside a string", _inside(TOKEN_ANSWER, b'"authelia_at_'), True, (4,)),
]


@pytest.fixture(scope="module")
def answer_runs(tmp_path_factory):
    """Each cut answer from a fake StandCloud of its own, to a CLI in a fresh
    interpreter, side by side (a token poll waits the 1 s minimum interval)."""
    fakes, argvs, envs, stores = [], [], [], []
    try:
        for endpoint, _, length, dropped, _ in CUT_ANSWERS:
            fake = FakeStandCloud().start()
            fakes.append(fake)
            fake.interval = 1
            body = DEVICE_ANSWER if endpoint == "device authorization" else TOKEN_ANSWER
            path = sca.DEVICE_PATH if endpoint == "device authorization" else sca.TOKEN_PATH
            fake.script(path, answer_cut_off(body, length, len(body) if dropped else None))
            home = tmp_path_factory.mktemp("answer")
            store = home / "s" / "tokens.json"
            env = isolation(home)
            env["STANDCLOUD_TOKEN_FILE"] = str(store)
            if endpoint == "refresh":
                log_in(fake, store, time.time(), expires_at=time.time() - 10)
                argvs.append(["--url", fake.base, "token"])
            else:
                argvs.append(["--url", fake.base, "login", "--no-qr"])
            envs.append(env)
            stores.append((store, store.read_bytes() if store.exists() else None))
        results = run_cli_many(argvs, env=envs, jobs=len(argvs))
        yield {case[:4]: (fake, store, result) for case, fake, store, result in zip(CUT_ANSWERS, fakes, stores, results)}
    finally:
        for fake in fakes:
            fake.stop()


@pytest.mark.parametrize("endpoint, where, length, dropped, codes", CUT_ANSWERS,
                         ids=["%s-%s%s" % (case[0], case[1], "-dropped" if case[3] else "") for case in CUT_ANSWERS])
def test_oauth_answer_cut_off_real_cli(answer_runs, endpoint, where, length, dropped, codes):
    fake, (store, before), result = answer_runs[(endpoint, where, length, dropped)]
    assert result.code in codes, result  # never 1
    line = one_line_error(result, result.code)  # one line, never a traceback
    if endpoint == "refresh":
        assert store.read_bytes() == before  # the stored session is intact
        assert fake.refreshes() == 1
        if dropped:
            assert "the answer to the refresh sent to %s%s was lost" % (fake.base, sca.TOKEN_PATH) in line
    else:
        assert not store.exists()
        assert fake.polls() == (1 if endpoint == "token poll" else 0)


# ==== §7 StandCloudAuth ======================================================


def test_library_login_then_api_then_logout(server, clock, store_path):
    server.interval, server.approve_after = 1, 1
    auth = sca.StandCloudAuth(server.base)
    assert auth.url == server.base and auth.url_given and not auth.uses_env_token
    assert auth.store.path == str(store_path)
    assert auth.logged_in() is None
    flow = auth.start_login()
    assert isinstance(flow, sca.DeviceFlow) and flow.device_code not in repr(flow)
    waits = []
    tokens = auth.wait_for_login(flow, on_wait=waits.append)
    assert waits and all(0 < left <= flow.expires_in for left in waits)
    assert tokens.access_token not in repr(tokens) and tokens.refresh_token not in repr(tokens)
    assert auth.servers() == [server.base]
    assert auth.access_token() == tokens.access_token == auth.logged_in().access_token
    response = auth.request("POST", "/test_report", json={"ok": True})
    assert response.status == 200 and response.json()["method"] == "POST"
    assert server.requests[-1]["headers"]["Content-Type"] == "application/json"
    assert server.requests[-1]["body"] == b'{"ok": true}'
    assert auth.healthcheck() is True
    report = auth.status()
    assert report["logged_in"] is True and report["source"] == "file" and report["url"] == server.base
    new = auth.refresh()
    assert new.access_token != tokens.access_token and auth.access_token() == new.access_token
    assert auth.logout() is True and auth.logout() is False
    assert server.count(sca.REVOCATION_PATH) == 2  # the refresh token, then the access token
    assert auth.logged_in() is None
    with pytest.raises(sca.LoginRequired):
        auth.access_token()


def test_library_public_attributes(tmp_path):
    # V2-NOTES' public API: url, url_given, uses_env_token, store, store_path, servers(), for_server().
    store = str(tmp_path / "s" / "tokens.json")
    auth = sca.StandCloudAuth("company.standcloud.io", store=store, environ={})
    assert (auth.url, auth.url_given, auth.uses_env_token) == ("https://company.standcloud.io", True, False)
    assert isinstance(auth.store, sca.TokenStore) and auth.store.path == store
    assert auth.servers() == []
    static = sca.StandCloudAuth(environ={"STANDCLOUD_TOKEN": "static_1", "STANDCLOUD_URL": "h.example"})
    assert (static.url, static.url_given, static.uses_env_token) == ("https://h.example", True, True)
    assert not os.path.exists(os.path.dirname(store))


def test_library_login_approved_on_the_fake_page(server, store_path):
    # fakeserver.py doubles as a server to try the CLI on: its page approves.
    from urllib.request import urlopen

    auth, flow = start(server)
    with urlopen(flow.verification_uri_complete) as page:
        assert flow.user_code.encode() in page.read()
    form = ("user_code=%s&decision=allow" % flow.user_code).encode()
    with urlopen(flow.verification_uri, data=form) as page:
        assert b"Done: allow" in page.read()
    assert auth.wait_for_login(flow).access_token.startswith("authelia_at_")


def test_library_short_lived_token_is_not_refreshed_at_every_call(server, clock, store_path):
    # Default threshold: 60 s, or half the life of a token that lives < 120 s;
    # an explicit min_valid is exact.
    tokens = server.issue()
    now = clock.now()
    write_store(store_path, {server.base: entry_for(tokens, now, expires_at=now + 60, updated_at=now)})
    auth = sca.StandCloudAuth(server.base)
    clock.advance(29)  # 31 s left: more than half its life
    assert auth.access_token() == tokens["access_token"] and server.refreshes() == 0
    assert auth.access_token(min_valid=35) != tokens["access_token"] and server.refreshes() == 1
    stored = sca._parse_store(store_path.read_bytes(), "s")[server.base]
    assert stored.fresh() and stored.expires_in() == 3600


def test_library_tokens_entry_round_trip_and_repr():
    tokens = sca.Tokens("secret_access", "secret_refresh", 1764403600.0, sca.SCOPE, 1764400000.0)
    assert tokens.token_type == "Bearer"
    assert tokens.entry() == {"access_token": "secret_access", "refresh_token": "secret_refresh", "token_type": "Bearer",
                              "expires_at": 1764403600.0, "scope": sca.SCOPE, "updated_at": 1764400000.0}
    assert sca.Tokens.from_entry(tokens.entry()).entry() == tokens.entry()
    assert "secret" not in repr(tokens)
    assert sca.Tokens("a").fresh() and sca.Tokens("a").expires_in() is None  # no expiry known: valid until a 401
    with pytest.raises(ValueError):
        sca.Tokens.from_entry({"access_token": "a"})  # no token_type


def test_library_static_token_is_used_as_is_and_never_stored(server, clock, store_path):
    tokens = server.issue()
    auth = sca.StandCloudAuth(server.base, token=tokens["access_token"])
    assert auth.uses_env_token and auth.access_token() == tokens["access_token"]
    assert auth.healthcheck() is True
    assert auth.status()["source"] == "environment"
    for action in (auth.start_login, auth.refresh, auth.logout):
        with pytest.raises(sca.ConfigError):
            action()
    assert not store_path.parent.exists() and server.refreshes() == 0


def test_library_for_server_keeps_the_settings(tmp_path, server, clock):
    store = str(tmp_path / "s" / "tokens.json")
    auth = sca.StandCloudAuth(server.base, store=store, timeout=7)
    other = auth.for_server("b.example")
    assert other.url == "https://b.example" and other.store.path == auth.store.path == store
    assert auth.url == server.base
    # A stored plain-http server can be listed (status calls no server), but
    # its tokens are never sent over the network: revocation is refused.
    remote = auth.for_server("http://b.example")
    assert remote.url == "http://b.example" and remote.status()["logged_in"] is False
    with pytest.raises(sca.ConfigError, match="plain http"):
        sca._check_http_policy(remote.url, {})


def test_library_import_loads_neither_argparse_nor_the_network_stack():
    code = ("import sys; sys.path.insert(0, %r); import standcloud_auth\n"
            "print(sorted(m for m in ('argparse', 'ssl', 'http.client', 'urllib.request', 'socket') "
            "if m in sys.modules))") % os.path.dirname(MODULE)
    assert subprocess.check_output([sys.executable, "-I", "-c", code]).split() == [b"[]"]


# ==== §8 command line ========================================================


def test_cli_login_json_events(cli, server, store_path):
    server.interval, server.approve_after = 1, 2
    result = cli("--url", server.base, "login", "--json", "--no-qr")
    assert result.code == 0, result
    events = [json.loads(line) for line in result.out.splitlines()]
    assert [e["event"] for e in events] == ["authorize", "logged_in"]
    first = events[0]
    assert set(first) == {"event", "verification_uri", "verification_uri_complete", "user_code", "expires_in", "interval"}
    assert first["verification_uri_complete"].endswith("?user_code=" + first["user_code"])
    assert events[1]["url"] == server.base and events[1]["expires_at"] > 0
    assert server.count(sca.API_PATH + sca.HEALTHCHECK_PATH) == 1


def test_cli_login_json_error_event(cli, server, store_path):
    server.interval = 1
    server.script(sca.TOKEN_PATH, (403, {}, b'{"error": "access_denied"}'))
    result = cli("--url", server.base, "login", "--json", "--no-qr")
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[-1] == {"event": "error", "error": "access_denied", "message": events[-1]["message"], "exit_code": 3}
    assert result.code == 3


def test_cli_login_output_goes_to_stderr(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr")
    assert result.code == 0 and result.out == ""
    user_code = [r for r in server.devices.values()][0]["user_code"]
    assert user_code[:4] + "-" + user_code[4:] in result.err
    assert "?user_code=" + user_code in result.err
    assert "expires in 9 min" in result.err
    assert result.err.strip().splitlines()[-1].endswith(str(store_path))  # the last line: where the tokens are
    token = json.loads(store_path.read_text())["servers"][server.base]["access_token"]
    assert token not in result.err


def test_cli_login_quiet(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "-q", "login", "--no-qr")
    assert result.code == 0 and result.err == ""


def test_cli_login_check_failure_keeps_tokens(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    server.script(sca.API_PATH + sca.HEALTHCHECK_PATH, (500, {}, b"down"))
    line = one_line_error(cli("--url", server.base, "login", "--no-qr"), 5)
    assert "tokens are stored" in line
    assert json.loads(store_path.read_text())["servers"][server.base]


def test_cli_login_no_check_skips_healthcheck(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--no-qr", "--no-check").code == 0
    assert server.count(sca.API_PATH + sca.HEALTHCHECK_PATH) == 0


def test_cli_login_already_logged_in_then_force_revokes_the_old_session(cli, server, store_path, clock):
    old = log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "login")
    assert result.code == 0 and "Already logged in" in result.err
    assert server.count(sca.DEVICE_PATH) == 0
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--force", "--no-qr").code == 0
    assert server.count(sca.DEVICE_PATH) == 1
    assert server.count(sca.REVOCATION_PATH, token=old["refresh_token"]) == 1  # after the new one is stored
    new = json.loads(store_path.read_text())["servers"][server.base]
    assert new["access_token"] != old["access_token"] and server.token_ok(new["access_token"])


def test_cli_login_ctrl_c_exit_130(cli, server, clock, store_path):
    def interrupt(c):
        raise KeyboardInterrupt

    server.interval = 1
    clock.on_sleep = interrupt
    result = cli("--url", server.base, "login", "--no-qr")
    assert result.code == 130
    assert "login cancelled" in result.err
    assert not store_path.parent.exists()  # nothing half-written, no folder, no lock file


def test_cli_login_ctrl_c_real_process(live_server, tmp_path):
    # A real SIGINT while waiting: exit 130, nothing half-written.
    import signal

    if not POSIX:
        pytest.skip("SIGINT delivery is POSIX-specific")
    store = tmp_path / "s" / "tokens.json"
    env = dict(os.environ, STANDCLOUD_TOKEN_FILE=str(store))
    proc = subprocess.Popen([sys.executable, MODULE, "--url", live_server.base, "login", "--no-qr"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 10
    while not live_server.devices and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert b"login cancelled" in err and b"Traceback" not in err
    assert not store.parent.exists()


def test_cli_status_json(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "status", "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report == {
        "url": server.base, "store": str(store_path), "source": "file", "logged_in": True,
        "access_token_expires_at": report["access_token_expires_at"], "access_token_expires_in": 3600,
        "has_refresh_token": True, "refreshed_at": clock.now(), "scope": sca.SCOPE}
    assert server.requests == []  # calls no server


def test_cli_status_human_never_shows_secrets(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    result = cli("status")  # every stored server: here one
    assert result.code == 0
    assert server.base in result.out and str(store_path) in result.out
    if POSIX:
        assert "mode 600" in result.out
    for secret in (tokens["access_token"], tokens["refresh_token"]):
        assert secret not in result.out + result.err


def test_cli_status_not_logged_in_exit_3(cli, store_path):
    result = cli("--url", "https://h.example", "status", "--json")
    assert result.code == 3
    report = json.loads(result.out)
    assert report["logged_in"] is False and report["source"] is None


def test_cli_status_expired_access_but_refresh_token_is_logged_in(cli, server, store_path, clock):
    tokens = server.issue()
    write_store(store_path, {server.base: entry_for(tokens, clock.now(), expires_at=clock.now() - 10)})
    result = cli("--url", server.base, "status", "--json")
    assert result.code == 0 and json.loads(result.out)["access_token_expires_in"] == -10


def test_cli_status_lists_every_stored_server(cli, server, store_path, clock):
    now = clock.now()
    good, stale = server.issue(), "https://b.example"
    write_store(store_path, {server.base: entry_for(good, now),
                             stale: entry_for({"access_token": "b"}, now, refresh_token=None, expires_at=now - 5)})
    result = cli("status", "--json")
    reports = json.loads(result.out)
    assert [r["url"] for r in reports] == sorted([server.base, stale])
    assert [r["logged_in"] for r in reports] == [r["url"] == server.base for r in reports]
    assert_one_error(result, 3)  # one is not usable
    assert stale in error_lines(result.err)[0] and server.base not in error_lines(result.err)[0]
    text = cli("status")
    assert text.code == 3 and server.base in text.out and stale in text.out
    write_store(store_path, {server.base: entry_for(good, now)})
    one = cli("status", "--json")
    assert one.code == 0 and [r["url"] for r in json.loads(one.out)] == [server.base]  # an array even for one
    assert isinstance(json.loads(cli("--url", server.base, "status", "--json").out), dict)  # one server asked
    store_path.unlink()
    empty = cli("status", "--json")
    assert empty.code == 3 and empty.out == "[]\n"
    assert server.requests == []


def test_cli_logout_all(cli, server, store_path, clock):
    a, b = server.issue(), server.issue()
    other = server.base.replace("127.0.0.1", "localhost")  # the same fake under another name
    write_store(store_path, {server.base: entry_for(a, clock.now()), other: entry_for(b, clock.now())})
    assert_one_error(cli("logout"), 2)  # several servers, no URL
    result = cli("logout", "--all")
    assert result.code == 0
    assert server.base in result.err and other in result.err
    assert json.loads(store_path.read_text())["servers"] == {}
    assert not server.token_ok(a["access_token"]) and not server.token_ok(b["access_token"])  # revoked
    assert cli("logout", "--all").code == 0  # nothing left: nothing to do


def test_cli_url_resolution(cli, server, store_path, clock, monkeypatch):
    # none in the store: exit 2 naming --url
    assert "--url" in one_line_error(cli("token"), 2)
    # several: exit 2 naming --url and the servers
    write_store(store_path, {"https://a.example": entry_for({"access_token": "a"}, 0.0, expires_at=None),
                             "https://b.example": entry_for({"access_token": "b"}, 0.0, expires_at=None)})
    for command in ("token", "refresh", "healthcheck", "logout", "api"):
        line = one_line_error(cli(command, *(["/x"] if command == "api" else [])), 2)
        assert "--url" in line and "https://a.example, https://b.example" in line, command
    # the environment beats the store, the flag beats the environment
    monkeypatch.setenv("STANDCLOUD_URL", "a.example")
    assert cli("token").out == "a\n"
    assert cli("--url", "https://b.example", "token").out == "b\n"
    # the only server in the store is the default
    write_store(store_path, {"https://b.example": entry_for({"access_token": "b"}, 0.0, expires_at=None)})
    monkeypatch.delenv("STANDCLOUD_URL")
    assert cli("token").out == "b\n"


def test_cli_token_refused_in_the_environment_says_so(cli, server, store_path, monkeypatch):
    monkeypatch.setenv("STANDCLOUD_TOKEN", "not_a_live_token")
    for argv in (["healthcheck"], ["api", "/thing"]):
        result = cli("--url", server.base, *argv)
        assert_one_error(result, 3)
        line = error_lines(result.err)[0]
        assert "the token in STANDCLOUD_TOKEN was refused by %s" % server.base in line
        assert "login again" not in line  # login would refuse to run while it is set
    assert "STANDCLOUD_TOKEN" in one_line_error(cli("--url", server.base, "login"), 2)
    assert server.refreshes() == 0 and not store_path.parent.exists()


def test_cli_advice_names_the_program_and_what_it_needs(cli, server, store_path, tmp_path):
    line = one_line_error(cli("--url", server.base, "token"), 3)
    assert "run 'standcloud-auth --url %s login'" % server.base in line
    other = tmp_path / "other.json"
    line = one_line_error(cli("token", "--store", str(other), "--url", server.base + "/"), 3)
    assert "run 'standcloud-auth --url %s --store %s login'" % (server.base, other) in line
    line = one_line_error(cli("--store", str(other), "status"), 3)  # no URL anywhere: the advice gives one
    assert "--url https://company.standcloud.io login'" in line


@pytest.mark.parametrize("argv", [
    ["--bogus", "status"], ["status", "--bogus"], ["frobnicate"], ["token", "--min-valid"],
    ["token", "--min-valid", "abc"], ["login", "--qr", "--no-qr"], ["status", "extra"],
    ["--insecure=1", "status"], ["api"], ["--timeout"], [],
])
def test_cli_bad_usage_is_one_line_exit_2(cli, store_path, argv):
    one_line_error(cli(*argv), 2)
    one_line_error(cli("--url", "https://h.example", *argv), 2)


def test_cli_globals_before_or_after_command(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    assert cli("--url", server.base, "token").out == tokens["access_token"] + "\n"
    assert cli("token", "--url", server.base).out == tokens["access_token"] + "\n"
    assert cli("token", "--url=" + server.base).out == tokens["access_token"] + "\n"
    assert cli("-qv", "token", "--min", "10").out == tokens["access_token"] + "\n"


def test_cli_help_and_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out == "standcloud-auth %s\n" % sca.__version__ and result.err == ""
    result = cli("--help")
    assert result.code == 0 and result.out.startswith("usage: standcloud-auth")
    for command in COMMANDS:
        assert command in result.out
        sub = cli(command, "--help")
        assert sub.code == 0 and sub.out.startswith("usage: standcloud-auth") and sub.err == ""


# ---- the command line through the real CLI -----------------------------------
# Each row runs in a fresh interpreter (python standcloud_auth.py ...), all
# rows side by side against one fake StandCloud and one station home: a
# store with a live session (mode 644, so -q has a warning to hide) at the
# default path, and a second store with another session for --store.

ARGV_FORMS = [
    # argv ({url}; {store}: the second store), what stdout carries
    (["-qv", "--url", "{url}", "healthcheck"], "ok, quiet and verbose"),  # combined flags, globals before
    (["healthcheck", "-vq", "--url={url}"], "ok, quiet and verbose"),  # globals after, --opt=value
    (["token", "--min", "10"], "token"),  # an abbreviation; and the warning that -q hides above
    (["--store={store}", "token", "--js"], "the other token, as JSON"),
    (["token", "--store", "{store}", "--timeout=5"], "the other token"),
    (["--url", "  HTTP://127.0.0.1:{port}//  ", "status", "--json"], "status"),  # the URL normalised
    (["-h"], "usage"),
] + [([command, "-h"], "usage") for command in COMMANDS]

ARGV_ERRORS = [
    # argv, what the one error line says
    (["tokn"], ["invalid choice", "tokn", "choose from"] + list(COMMANDS)),
    (["token", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["token", "--min-valid"], ["--min-valid", "expected one argument"]),
    (["login", "--qr", "--no-qr"], ["--no-qr", "not allowed with", "--qr"]),
    (["token", "--min-valid", "abc"], ["--min-valid", "abc"]),
    (["token", "--min-valid", "-1"], ["--min-valid", "-1"]),
    (["token", "--min-valid", "nan"], ["--min-valid", "nan"]),
    (["--timeout", "0", "token"], ["--timeout", "0"]),
    (["token", "--timeout", "abc"], ["--timeout", "abc"]),
    (["--url", "https://[::1", "status"], ["'https://[::1' is not a StandCloud URL"]),
    (["--url", "https://host:\u00b2", "status"], ["is not a StandCloud URL"]),
    (["--url", "http://[127.0.0.1]", "status"], ["'http://[127.0.0.1]' is not a StandCloud URL"]),
    (["--url", "ftp://x", "status"], ["'ftp://x' is not a StandCloud URL"]),
    (["--url", "http://user@host", "status"], ["'http://user@host' is not a StandCloud URL"]),
    ([], ["no command given", "--help'"]),
]


@pytest.fixture(scope="module")
def argv_runs(tmp_path_factory):
    fake = FakeStandCloud().start()
    try:
        home = tmp_path_factory.mktemp("station")
        store = home / ".config" / "standcloud" / "tokens.json"  # the default store
        mine = log_in(fake, store, time.time())
        os.chmod(str(store), 0o644)  # a warning that -q hides
        other = home / "other" / "tokens.json"
        theirs = log_in(fake, other, time.time())
        port = fake.base.rsplit(":", 1)[1]

        def fill(argv):
            return [word.format(url=fake.base, store=other, port=port) for word in argv]

        rows = [argv for argv, _ in ARGV_FORMS + ARGV_ERRORS]
        results = run_cli_many([fill(argv) for argv in rows], env=isolation(home))
        yield {"base": fake.base, "mine": mine, "theirs": theirs, "store": store,
               "results": dict(zip([tuple(argv) for argv in rows], results))}
    finally:
        fake.stop()


@pytest.mark.parametrize("argv, carries", ARGV_FORMS, ids=[" ".join(argv) for argv, _ in ARGV_FORMS])
def test_cli_argv_forms_real_cli(argv_runs, argv, carries):
    result = argv_runs["results"][tuple(argv)]
    assert result.code == 0 and error_lines(result.err) == [] and "Traceback" not in result.err, result
    base, warning = argv_runs["base"], "standcloud-auth: warning: the token store"
    assert (warning in result.err) == (carries in ("token", "status"))  # the store is mode 644; -q hides it
    if carries == "token":
        assert result.out == argv_runs["mine"]["access_token"] + "\n"
    elif carries == "the other token":
        assert result.out == argv_runs["theirs"]["access_token"] + "\n"
    elif carries == "the other token, as JSON":
        doc = json.loads(result.out)
        assert doc["access_token"] == argv_runs["theirs"]["access_token"] and 3500 < doc["expires_in"] <= 3600
    elif carries == "ok, quiet and verbose":
        assert result.out == "ok\n"
        assert "standcloud-auth: GET %s/hardpy/api/v1/healthcheck 200 " % base in result.err  # -v
    elif carries == "status":
        report = json.loads(result.out)
        assert report["url"] == base and report["logged_in"] is True  # the stored server's one spelling
    else:
        assert result.out.startswith("usage: python ") and "standcloud_auth.py" in result.out.split("\n")[0]
        assert ("COMMAND" in result.out) == (len(argv) == 1)  # the command's own help, or the top-level one


@pytest.mark.parametrize("argv, says", ARGV_ERRORS, ids=[" ".join(argv) or "(none)" for argv, _ in ARGV_ERRORS])
def test_cli_argv_errors_real_cli(argv_runs, argv, says):
    result = argv_runs["results"][tuple(argv)]
    line = one_line_error(result, 2)  # one line, no traceback, nothing on stdout
    for word in says:
        assert word in line, (word, line)
    assert line.count("standcloud-auth: error:") == 1 and argv_runs["mine"]["access_token"] not in line


# ==== §8 command line: the login screen, and §9 QR code =======================


def _login_screen(cli, server, *args, **kwargs):
    """Run a login that is approved at its first poll: its stderr, the address, the user code."""
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-check", *args, **kwargs)
    assert result.code == 0, result
    device = list(server.devices.values())[-1]
    uri = "%s/consent/openid/device-authorization?user_code=%s" % (server.base, device["user_code"])
    return result.err, uri, device["user_code"]


@pytest.fixture
def utf8(monkeypatch):
    for name in ("LC_ALL", "LC_CTYPE", "LANG", "NO_COLOR", "STANDCLOUD_QR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")


def test_qr_screen_what_the_operator_reads(cli, server, store_path, monkeypatch, utf8):
    err, uri, code = _login_screen(cli, server, "--no-qr")
    lines = err.splitlines()
    at = lines.index("To log in, open this address on a phone or a computer:")
    assert lines[at + 2] == uri  # on a line of its own, not indented: it copies whole
    assert lines[at + 4] == "and check that the page shows the code   %s-%s" % (code[:4], code[4:])
    assert "The code expires in 9 min. Waiting for approval (Ctrl-C to cancel)..." in lines
    assert "\r" not in err and "\u2588" not in err and "\x1b" not in err  # off a terminal: no countdown, no art


def test_qr_screen_on_an_80x24_terminal(cli, server, store_path, monkeypatch, utf8):
    err, uri, code = _login_screen(cli, server, tty=True)  # the QR code is wanted on a terminal
    assert "and check that the page shows the code   %s-%s\n" % (code[:4], code[4:]) in err
    assert "\r  9:5" in err  # the live countdown
    qr = sca._qr_render(sca._qr_encode(uri.encode())[0], True, True)
    assert qr[3] not in err  # 80 x 24 has no room for it beside the address and the code
    rows = len(qr) + len(err.split("\r")[0].rstrip("\n").split("\n"))  # the hint's lines: a blank, the QR code's + 1
    assert "\nA QR code of this address needs a terminal of 80 x %d or more.\n" % rows in err
    before_countdown = err.split("\r")[0]
    assert len(before_countdown.rstrip("\n").split("\n")) < 24 and uri in before_countdown


def test_qr_screen_qr_code_where_it_fits(cli, server, store_path, monkeypatch, utf8):
    err, uri, _ = _login_screen(cli, server, tty=True, size=(120, 60))
    matrix = sca._qr_encode(uri.encode())[0]
    assert "\n".join(sca._qr_render(matrix, True, True)) in err  # exactly the encoder's matrix, in colour
    assert "A QR code" not in err  # no hint when it is drawn
    rows = len(err.split("\r")[0].rstrip("\n").split("\n")) + 1  # and the countdown's line
    err, uri, _ = _login_screen(cli, server, "--force", tty=True, size=(120, rows))  # just tall enough
    assert "\n".join(sca._qr_render(sca._qr_encode(uri.encode())[0], True, True)) in err
    err, _, _ = _login_screen(cli, server, "--force", tty=True, size=(120, rows - 1))  # one line short
    assert "A QR code of this address needs a terminal of 120 x %d or more." % rows in err
    monkeypatch.setenv("NO_COLOR", "1")
    err, uri, _ = _login_screen(cli, server, "--force", tty=True, size=(120, 60))
    assert "\n".join(sca._qr_render(sca._qr_encode(uri.encode())[0], True, False)) in err
    assert "\x1b" not in err  # NO_COLOR: no escape sequence at all


def test_qr_screen_ascii_terminal(cli, server, store_path, monkeypatch, utf8):
    monkeypatch.setenv("LC_ALL", "C")
    err, uri, _ = _login_screen(cli, server, tty=True, size=(120, 60))
    assert all(ord(c) < 128 for c in err)  # no block glyphs
    assert "\n".join(sca._qr_render(sca._qr_encode(uri.encode())[0], False, True)) in err  # colour cells scan
    monkeypatch.setenv("NO_COLOR", "1")
    err, uri, _ = _login_screen(cli, server, "--force", tty=True, size=(120, 60))
    assert "##" not in err and "\x1b" not in err and "A QR code" not in err  # no art that would not scan
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    err, _, _ = _login_screen(cli, server, "--force", tty=True, encoding="ascii")
    assert "\u2588" not in err and "\u2580" not in err  # the stream cannot encode them either


def test_qr_screen_qr_switch_and_environment(cli, server, store_path, monkeypatch, utf8):
    monkeypatch.setenv("STANDCLOUD_QR", "0")
    err, uri, _ = _login_screen(cli, server, tty=True, size=(120, 60))
    assert sca._qr_render(sca._qr_encode(uri.encode())[0], True, True)[3] not in err  # no QR on a terminal
    assert "A QR code" not in err
    monkeypatch.setenv("STANDCLOUD_QR", "1")
    err, uri, _ = _login_screen(cli, server, "--force")  # off a terminal, plain
    assert "\n".join(sca._qr_render(sca._qr_encode(uri.encode())[0], True, False)) in err
    monkeypatch.delenv("STANDCLOUD_QR")
    err, uri, _ = _login_screen(cli, server, "--force", "--qr")
    assert "\n".join(sca._qr_render(sca._qr_encode(uri.encode())[0], True, False)) in err


def test_qr_screen_open_uses_webbrowser_and_never_blocks(cli, server, store_path, monkeypatch):
    import webbrowser

    opened, release = [], threading.Event()

    def browser(uri):  # a console browser: it returns when the person quits it
        opened.append(uri)
        release.wait(10)
        return True

    monkeypatch.setattr(webbrowser, "open", browser)
    try:
        _, uri, _ = _login_screen(cli, server, "--no-qr", "--open")  # ends while the browser runs
        deadline = time.time() + 5
        while not opened and time.time() < deadline:
            time.sleep(0.01)
        assert opened == [uri]
    finally:
        release.set()


def test_qr_screen_open_says_when_no_browser_opens(cli, server, store_path, monkeypatch, clock):
    import webbrowser

    monkeypatch.setattr(webbrowser, "open", lambda uri: False)
    warning = b"standcloud-auth: warning: no web browser could be opened; open the address by hand"

    def wait_for_the_warning(c):
        deadline = time.time() + 5
        while warning not in sys.stderr.buffer.getvalue() and time.time() < deadline:
            time.sleep(0.01)

    clock.on_sleep = wait_for_the_warning
    err, _, _ = _login_screen(cli, server, "--no-qr", "--open")
    assert warning.decode() in err


# ==== §10 entry point ========================================================


def test_main_version_in_every_form(tmp_path):
    expected = ("standcloud-auth %s\n" % sca.__version__).encode()
    for argv in ([sys.executable, MODULE, "--version"], [sys.executable, "-m", "standcloud_auth", "--version"]):
        assert subprocess.check_output(argv, cwd=os.path.dirname(MODULE)) == expected


def test_main_advice_names_the_program_as_it_was_run(live_server, tmp_path):
    env = dict(os.environ, STANDCLOUD_TOKEN_FILE=str(tmp_path / "tokens.json"))
    for prefix, named in (([MODULE.replace(os.path.dirname(MODULE) + os.sep, "")], "python standcloud_auth.py"),
                          (["-m", "standcloud_auth"], "python -m standcloud_auth")):
        proc = subprocess.Popen([sys.executable] + prefix + ["--url", live_server.base, "token"], env=env,
                                cwd=os.path.dirname(MODULE), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3 and out == b""
        assert "run '%s --url %s login'" % (named, live_server.base) in err.decode(), err


def test_main_internal_error_is_one_line_exit_1(cli, monkeypatch, store_path):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("secret-ish detail")

    monkeypatch.setattr(sca.StandCloudAuth, "status", boom)
    line = one_line_error(cli("--url", "https://h.example", "status"), 1)
    assert "internal error (ZeroDivisionError)" in line and sca.ISSUES in line
    assert "secret-ish" not in line
    result = cli("--url", "https://h.example", "-v", "status")
    assert result.code == 1 and "Traceback" in result.err


def test_main_login_then_every_command_real_cli(live_server, tmp_path):
    live_server.interval, live_server.approve_after = 1, 1
    env = {"STANDCLOUD_TOKEN_FILE": str(tmp_path / "tokens.json")}
    result = run_cli("--url", live_server.base, "login", "--no-qr", env=env)
    assert result.code == 0, result
    assert "Logged in" in result.err
    token, status, healthcheck, api = run_cli_many(  # none of them refreshes: side by side
        [["token"], ["status"], ["healthcheck"], ["api", "/test_report", "-d", '{"ok": true}']], env=env)
    assert token.code == 0 and token.out.startswith("authelia_at_")
    assert status.code == 0 and live_server.base in status.out
    assert healthcheck.code == 0 and healthcheck.out == "ok\n"
    assert api.code == 0 and json.loads(api.out) == {"ok": True, "method": "POST", "bytes": 12}
    assert run_cli("refresh", env=env).code == 0
    assert run_cli("logout", env=env).code == 0
    assert run_cli("--url", live_server.base, "token", env=env).code == 3


def test_main_vendored_copy_imports_cleanly(tmp_path):
    # Proof that it vendors: a copy in an empty folder, isolated mode, warnings as errors.
    import shutil

    shutil.copy(MODULE, str(tmp_path / "standcloud_auth.py"))
    out = subprocess.check_output([sys.executable, "-I", "-W", "error", "-c",
                                   "import sys; sys.path.insert(0, '.'); import standcloud_auth as s; print(s.__version__)"],
                                  cwd=str(tmp_path))
    assert out.split()[0] == sca.__version__.encode()
    for name in sca.__all__:
        assert hasattr(sca, name)
