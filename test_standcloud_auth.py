"""Tests for standcloud_auth, following the module's sections.

Real HTTP over real sockets against the fake StandCloud in conftest.py, the
fake clock on the module's seams (polling tests take milliseconds), real
files with real permissions, and real subprocesses for the command line.
"""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, assert_one_error, entry_for, log_in, run_cli, write_store
from fakeserver import chunked, trickle

POSIX = sys.platform != "win32"




# ==== §4 utilities ==========================================================


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
])
def test_utilities_normalize_url(given, expected):
    assert sca.normalize_url(given) == expected


@pytest.mark.parametrize("bad", [
    "", "ftp://host", "https://", "https://user@host", "https://host?x=1", "https://host#f",
    "https://host:99999", "https://host:port", "https://ho st",
])
def test_utilities_normalize_url_rejects(bad):
    with pytest.raises(sca.ConfigError):
        sca.normalize_url(bad)


@pytest.mark.parametrize("url, allowed", [
    ("http://localhost:1", True),
    ("http://127.0.0.1", True),
    ("http://127.9.9.9:80", True),
    ("http://[::1]:80", True),
    ("http://company.standcloud.io", False),
    ("http://10.0.0.1", False),
    ("https://company.standcloud.io", True),
])
def test_utilities_http_only_to_loopback(url, allowed):
    if allowed:
        sca._check_http_policy(url, {})
    else:
        with pytest.raises(sca.ConfigError) as info:
            sca._check_http_policy(url, {})
        assert info.value.exit_code == 2
        sca._check_http_policy(url, {"STANDCLOUD_ALLOW_HTTP": "1"})


def test_utilities_http_refused_before_any_connection(cli, live_server, store_path):
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
def test_utilities_loads_accepts_json(raw, expected):
    assert sca._loads(raw, "x") == expected


@pytest.mark.parametrize("raw", [
    b"", b"   ", b"NaN", b'{"a": Infinity}', b"[1] x", b"{'a': 1}", b"\xff\xfe", b"[" * 100000,
    b"<html>502 Bad Gateway</html>", b"\xef\xbb\xbf{}",
])
def test_utilities_loads_rejects(raw):
    with pytest.raises(ValueError):
        sca._loads(raw, "x")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", "3601"])
def test_utilities_bad_timeout_is_usage_error(cli, value):
    result = cli("--url", "https://h.example", "--timeout", value, "status")
    assert_one_error(result, 2)


def test_utilities_env_flag_rejects_garbage():
    with pytest.raises(sca.ConfigError):
        sca._env_flag("STANDCLOUD_QR", {"STANDCLOUD_QR": "maybe"})
    assert sca._env_flag("STANDCLOUD_QR", {"STANDCLOUD_QR": "0"}) is False
    assert sca._env_flag("STANDCLOUD_QR", {}) is None


# ==== §5 platform ===========================================================


@pytest.mark.parametrize("platform, env, tail", [
    ("linux", {"HOME": "/h", "XDG_CONFIG_HOME": "/x"}, "/x/standcloud/tokens.json"),
    ("linux", {"HOME": "/h"}, "/h/.config/standcloud/tokens.json"),
    ("linux", {"HOME": "/h", "XDG_CONFIG_HOME": "relative"}, "/h/.config/standcloud/tokens.json"),
    ("freebsd12", {"HOME": "/h"}, "/h/.config/standcloud/tokens.json"),
    ("darwin", {"HOME": "/h"}, "/h/Library/Application Support/standcloud/tokens.json"),
])
def test_platform_default_store_path(platform, env, tail):
    assert sca.default_store_path(env, platform) == tail


def test_platform_default_store_path_windows():
    path = sca.default_store_path({"APPDATA": "C:\\Users\\op\\AppData\\Roaming"}, "win32")
    assert path.replace("\\", "/").endswith("AppData/Roaming/standcloud/tokens.json")


def test_platform_default_store_is_used(cli, isolated_env, server):
    server.issue()
    result = cli("--url", server.base, "status", "--json")
    report = json.loads(result.out)
    assert report["store"] == sca.default_store_path()
    assert report["store"].startswith(str(isolated_env))


# ==== §6 token store ========================================================



@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_store_private_from_first_byte_under_umask_000(tmp_path, server, clock):
    path = tmp_path / "a" / "b" / "tokens.json"
    old = os.umask(0)
    try:
        auth = sca.StandCloudAuth(server.base, store=str(path))
        with auth._store.lock():
            auth._store.set_entry(server.base, entry_for(server.issue(), clock.now()))
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
    store = sca.TokenStore(str(tmp_path / "tokens.json"))
    store.save({"version": 1, "servers": {}})
    assert seen == [0o600]


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
    store = sca.TokenStore(str(path))
    store.save({"version": 1, "servers": {"https://a": entry_for({"access_token": "old", "refresh_token": "r"}, 0.0)}})
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save({"version": 1, "servers": {}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json"]  # no temp file left


def test_store_write_is_atomic_for_readers(tmp_path):
    # A reader in another process never sees a torn file while we rewrite it.
    path = tmp_path / "tokens.json"
    store = sca.TokenStore(str(path))
    big = {"version": 1, "servers": {"https://s%d" % i: entry_for({"access_token": "a" * 500, "refresh_token": "r"}, 0.0)
                                     for i in range(50)}}
    store.save(big)
    reader = subprocess.Popen([sys.executable, "-c", (
        "import json,sys,time\n"
        "end=time.time()+1.0; n=0\n"
        "while time.time()<end:\n"
        "    json.load(open(sys.argv[1])); n+=1\n"
        "print(n)\n"), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.time() + 1.0
    while time.time() < end:
        store.save(big)
    out, err = reader.communicate(timeout=10)
    assert reader.returncode == 0, err
    assert int(out) > 0


@pytest.mark.parametrize("content, why", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"version": 1, "servers": {"https://a": {"access_token": "x"', "truncated"),
    (b"[]", "not a version"),
    (b'{"version": 2, "servers": {}}', "not a version"),
    (b'{"version": 1, "servers": []}', "servers"),
    (b'{"version": 1, "servers": {"https://a": {"access_token": 5}}}', "access_token"),
    (b'{"version": 1, "servers": {"https://a": "x"}}', "not an object"),
])
def test_store_corrupt_is_reported_not_overwritten(cli, store_path, content, why):
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(content)
    for command in ("token", "status", "refresh", "logout", "healthcheck"):
        result = cli("--url", "https://h.example", command)
        assert_one_error(result, 2)
        assert str(store_path) in result.err
        assert store_path.read_bytes() == content


def test_store_corrupt_kept_aside_by_login(cli, server, store_path, clock):
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(b"{garbage")
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    kept = [p for p in store_path.parent.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == b"{garbage"
    assert kept[0].name in result.err
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
    store = sca.TokenStore(str(tmp_path / "tokens.json"))
    code = ("import sys; sys.path.insert(0, %r); import standcloud_auth as s\n"
            "t = s.TokenStore(%r)\n"
            "try:\n"
            "    with t.lock(timeout=0.3): print('got')\n"
            "except s.ConfigError as e: print('busy', e.exit_code)\n") % (os.path.dirname(MODULE), store.path)
    with store.lock():
        out = subprocess.check_output([sys.executable, "-c", code])
    assert out.split() == [b"busy", b"2"]
    out = subprocess.check_output([sys.executable, "-c", code])
    assert out.split() == [b"got"]


# ==== §7 HTTP ===============================================================


def test_http_headers_and_form(server, clock):
    auth = sca.StandCloudAuth(server.base, store=str(clock and "unused"))
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


def test_http_timeout_bounds_whole_request(server, store_path):
    # A server that trickles one byte every 0.05 s: every read succeeds, the
    # whole answer would take seconds; --timeout 0.5 must end it.
    server.script(sca.DEVICE_PATH, trickle(100, 0.05))
    auth = sca.StandCloudAuth(server.base, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(sca.NetworkError) as info:
        auth.start_login()
    assert time.monotonic() - started < 2.0
    assert "timed out" in str(info.value)


def test_http_network_errors_map_to_exit_4(cli, store_path):
    from conftest import free_port

    result = cli("--url", "http://127.0.0.1:%d" % free_port(), "login", "--no-qr")
    assert_one_error(result, 4)
    assert "refused" in result.err


def test_http_body_over_1_mib_is_server_error(server, store_path):
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    server.script(sca.DEVICE_PATH, (200, {"Content-Type": "application/json"}, big))
    with pytest.raises(sca.ServerError) as info:
        sca.StandCloudAuth(server.base).start_login()
    assert "1 MiB" in str(info.value)


def test_http_chunked_body_over_1_mib_is_server_error(server, store_path):
    server.script(sca.DEVICE_PATH, chunked())
    with pytest.raises(sca.ServerError):
        sca.StandCloudAuth(server.base).start_login()


def test_http_oauth_endpoints_follow_no_redirect(server, store_path):
    server.script(sca.DEVICE_PATH, (302, {"Location": server.base + "/elsewhere"}, b""))
    with pytest.raises(sca.ServerError) as info:
        sca.StandCloudAuth(server.base).start_login()
    assert "redirect" in str(info.value)
    assert [r["path"] for r in server.requests] == [sca.DEVICE_PATH]


# ==== §8 OAuth 2.0: the device flow ========================================


def start(server):
    auth = sca.StandCloudAuth(server.base)
    return auth, auth.start_login()


def test_flow_polls_no_sooner_than_interval_with_margin(server, clock, store_path):
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


def test_flow_default_interval_is_5(server, clock, store_path):
    body = {"device_code": "dc", "user_code": "ABCD", "verification_uri": server.base + "/v", "expires_in": 60}
    server.script(sca.DEVICE_PATH, (200, {}, json.dumps(body).encode()))
    server.script(sca.TOKEN_PATH, (200, {}, json.dumps({"access_token": "at", "token_type": "Bearer"}).encode()))
    auth, flow = start(server)
    assert flow.interval == 5 and flow.verification_uri_complete is None
    auth.wait_for_login(flow)
    assert clock.sleeps == [pytest.approx(5.5)]


def test_flow_slow_down_adds_5_seconds_for_the_rest(server, clock, store_path):
    server.interval = 5
    pending = (400, {}, b'{"error": "authorization_pending"}')
    slow = (400, {}, b'{"error": "slow_down"}')
    server.script(sca.TOKEN_PATH, slow, pending, slow, pending)
    server.approve_after = 0
    auth, flow = start(server)
    auth.wait_for_login(flow)
    # waits: 5, then 10 (slow_down), 10, then 15 (slow_down again), 15
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [5, 10, 10, 15, 15]


def test_flow_early_poll_would_get_slow_down_from_fake(server, clock, store_path):
    # The fake server is faithful: a poll a hair early is answered slow_down.
    auth, flow = start(server)
    clock.advance(4.99)
    response = sca._post_form(auth._transport, server.base + sca.TOKEN_PATH,
                              {"client_id": sca.CLIENT_ID, "grant_type": sca.DEVICE_GRANT, "device_code": flow.device_code})
    assert json.loads(response.body)["error"] == "slow_down"


@pytest.mark.parametrize("answer, message", [
    ((403, {}, b'{"error": "access_denied", "error_description": "The resource owner denied the request"}'), "denied"),
    ((400, {}, b'{"error": "access_denied"}'), "denied"),
    ((400, {}, b'{"error": "expired_token"}'), "expired"),
    ((400, {}, b'{"error": "invalid_client", "error_description": "unknown client"}'), "invalid_client: unknown client"),
    ((401, {}, b'{"error": "invalid_client"}'), "invalid_client"),
    ((400, {}, b""), "HTTP 400"),
    ((401, {}, b"<html>no</html>"), "HTTP 401"),
])
def test_flow_errors_exit_3(cli, server, store_path, answer, message):
    server.interval = 1
    server.script(sca.TOKEN_PATH, answer)
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert message in result.err
    assert "login again" in result.err
    assert not store_path.exists()


def test_flow_denied_by_person(cli, server, clock, store_path):
    server.interval = 1
    clock.on_sleep = lambda c: server.approve(deny=True)
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "denied" in result.err


def test_flow_client_enforces_expiry(cli, server, clock, store_path):
    # Authelia keeps answering authorization_pending after expiry.
    server.interval, server.expires_in = 5, 61
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "expired" in result.err and "run login again" in result.err
    assert 55 <= clock.mono - 1000 <= 61
    assert server.polls() == 10  # 5.5 s apart within 60 s


def test_flow_network_failure_and_5xx_back_off_then_succeed(server, clock, store_path):
    server.interval = 2
    down = (503, {}, b"<html>maintenance</html>")
    server.script(sca.TOKEN_PATH, down, down, down)
    server.approve_after = 1
    auth, flow = start(server)
    auth.wait_for_login(flow)
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [2, 4, 8, 16]


def test_flow_backoff_is_capped_at_60(server, clock, store_path):
    server.interval, server.expires_in = 10, 3600
    server.script(sca.TOKEN_PATH, *[(500, {}, b"")] * 6)
    server.approve_after = 1
    auth, flow = start(server)
    auth.wait_for_login(flow)
    assert [round(s / 1.1, 6) for s in clock.sleeps] == [10, 20, 40, 60, 60, 60, 60]


def test_flow_connection_dropped_is_retried(server, clock, store_path):
    def hang_up(handler):
        handler.close_connection = True
        handler.connection.close()

    server.interval = 1
    server.script(sca.TOKEN_PATH, hang_up)
    server.approve_after = 1
    auth, flow = start(server)
    tokens = auth.wait_for_login(flow)
    assert tokens.access_token.startswith("authelia_at_")


def test_flow_error_after_retried_poll_says_run_login_again(cli, server, clock, store_path):
    # The lost answer carried the tokens: the code is now used up (Authelia: server_error 500).
    server.interval = 1
    server.approve_after = 1

    def lose_answer(handler):
        handler._poll(handler.fake.requests[-1]["form"])  # the server issues tokens...
        handler.close_connection = True
        handler.connection.close()  # ...and the answer is lost

    server.script(sca.TOKEN_PATH, lose_answer, (400, {}, b'{"error": "invalid_grant"}'))
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "run login again" in result.err
    assert not store_path.exists()


@pytest.mark.parametrize("body", [
    b"not json", b"<html>Bad Gateway</html>", b"[]", b"{}", b'{"access_token": 5, "token_type": "Bearer"}',
    b'{"access_token": "a", "token_type": "mac"}', b'{"access_token": "a b", "token_type": "Bearer"}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": -5}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": 1e300}',
    b'{"access_token": "a", "token_type": "Bearer", "expires_in": "3600"}',
    b'{"access_token": "a", "token_type": "Bearer", "refresh_token": ["x"]}',
    b"", b"[" * 50000,
])
def test_flow_malformed_token_answer_exit_5(cli, server, store_path, body):
    server.interval = 1
    server.script(sca.TOKEN_PATH, (200, {"Content-Type": "application/json"}, body))
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 5)
    assert not store_path.exists()


@pytest.mark.parametrize("body", [
    b"not json", b"<html>Bad Gateway</html>", b"[1]", b"{}", b"",
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": -1}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": 600, "interval": -1}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": 600, "interval": 1e9}',
    b'{"device_code": "d", "user_code": "U\\u001b[2J", "verification_uri": "https://v", "expires_in": 600}',
    b'{"device_code": "d", "user_code": "U", "verification_uri": "javascript:x", "expires_in": 600}',
    b'{"device_code": 7, "user_code": "U", "verification_uri": "https://v", "expires_in": 600}',
    b'{"user_code": "U", "verification_uri": "https://v", "expires_in": 600}',
])
def test_flow_malformed_device_answer_exit_5(cli, server, store_path, body):
    server.script(sca.DEVICE_PATH, (200, {"Content-Type": "application/json"}, body))
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 5)
    assert server.polls() == 0


def test_flow_device_request_rejected_exit_3(cli, server, store_path):
    server.script(sca.DEVICE_PATH, (400, {}, b'{"error": "invalid_scope", "error_description": "bad scope"}'))
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 3)
    assert "invalid_scope: bad scope" in result.err


def test_flow_stalled_device_request_exit_4(cli, server, store_path):
    server.script(sca.DEVICE_PATH, lambda handler: time.sleep(1.0))
    started = time.monotonic()
    result = cli("--url", server.base, "--timeout", "0.3", "login", "--no-qr")
    assert_one_error(result, 4)
    assert time.monotonic() - started < 1.0


def test_flow_real_server_variants_work(server, clock, store_path):
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


# ==== §11 command line: login, status, output rules =========================


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
    result = cli("--url", server.base, "login", "--no-qr")
    assert_one_error(result, 5)
    assert "tokens are stored" in result.err
    assert json.loads(store_path.read_text())["servers"][server.base]


def test_cli_login_no_check_skips_healthcheck(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--no-qr", "--no-check").code == 0
    assert server.count(sca.API_PATH + sca.HEALTHCHECK_PATH) == 0


def test_cli_login_already_logged_in(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "login")
    assert result.code == 0 and "Already logged in" in result.err
    assert server.count(sca.DEVICE_PATH) == 0
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--force", "--no-qr").code == 0
    assert server.count(sca.DEVICE_PATH) == 1


def test_cli_login_ctrl_c_exit_130(cli, server, clock, store_path):
    def interrupt(c):
        raise KeyboardInterrupt

    server.interval = 1
    clock.on_sleep = interrupt
    result = cli("--url", server.base, "login", "--no-qr")
    assert result.code == 130
    assert "login cancelled" in result.err
    assert not store_path.exists() and not list(store_path.parent.glob("*.tmp"))


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
    assert not store.exists()


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
    result = cli("status")  # the only server in the store
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


def test_cli_url_resolution(cli, server, store_path, clock, monkeypatch):
    # none in the store: exit 2 naming --url
    result = cli("token")
    assert_one_error(result, 2)
    assert "--url" in result.err
    # several: exit 2 naming --url
    write_store(store_path, {"https://a.example": entry_for({"access_token": "a"}, 0.0, expires_at=None),
                             "https://b.example": entry_for({"access_token": "b"}, 0.0, expires_at=None)})
    result = cli("token")
    assert_one_error(result, 2)
    assert "--url" in result.err and "https://a.example" in result.err
    # the environment beats the store, the flag beats the environment
    monkeypatch.setenv("STANDCLOUD_URL", "a.example")
    assert cli("token").out == "a\n"
    assert cli("--url", "https://b.example", "token").out == "b\n"
    # the only server in the store is the default
    write_store(store_path, {"https://b.example": entry_for({"access_token": "b"}, 0.0, expires_at=None)})
    monkeypatch.delenv("STANDCLOUD_URL")
    assert cli("token").out == "b\n"


@pytest.mark.parametrize("argv", [
    ["--bogus", "status"], ["status", "--bogus"], ["frobnicate"], ["token", "--min-valid"],
    ["token", "--min-valid", "abc"], ["login", "--qr", "--no-qr"], ["status", "extra"],
    ["--insecure=1", "status"], ["api"], ["--timeout"],
])
def test_cli_bad_usage_is_one_line_exit_2(cli, store_path, argv):
    result = cli("--url", "https://h.example", *argv)
    assert_one_error(result, 2)
    assert result.out == ""


def test_cli_globals_before_or_after_command(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    assert cli("--url", server.base, "token").out == tokens["access_token"] + "\n"
    assert cli("token", "--url", server.base).out == tokens["access_token"] + "\n"
    assert cli("token", "--url=" + server.base).out == tokens["access_token"] + "\n"


def test_cli_help_and_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out == "standcloud-auth %s\n" % sca.__version__
    result = cli("--help")
    assert result.code == 0
    for command in ("login", "token", "refresh", "status", "healthcheck", "logout", "api"):
        assert command in result.out
        sub = cli(command, "--help")
        assert sub.code == 0 and "usage:" in sub.out


def test_cli_internal_error_is_one_line_exit_1(cli, monkeypatch, store_path):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("secret-ish detail")

    monkeypatch.setattr(sca.StandCloudAuth, "status", boom)
    result = cli("--url", "https://h.example", "status")
    assert_one_error(result, 1)
    assert "secret-ish" not in result.err
    result = cli("--url", "https://h.example", "-v", "status")
    assert result.code == 1 and "Traceback" in result.err


def test_cli_big_user_code_round_trips():
    text = "".join(sorted(sca._BIG_FONT))
    for chunk in (text[i:i + 10] for i in range(0, len(text), 10)):
        drawing = sca._big_text(chunk).splitlines()
        assert len(drawing) == 3
        width = 6 * len(chunk)
        cells = [line[4:].ljust(width) for line in drawing]
        halves = {" ": (0, 0), "\u2580": (1, 0), "\u2584": (0, 1), "\u2588": (1, 1)}
        rows = [[halves[c][half] for c in line] for line in cells for half in (0, 1)]
        for index, char in enumerate(chunk):
            glyph = ["".join(str(rows[r][6 * index + col]) for col in range(5)) for r in range(5)]
            assert " ".join(glyph) == sca._BIG_FONT[char], char
            assert all(rows[r][6 * index + 5] == 0 for r in range(6))
    assert sca._big_text("ab~c") is None and sca._big_text("") is None


def test_cli_login_screen_on_a_terminal(cli, server, store_path):
    server.interval, server.approve_after = 1, 3
    result = cli("--url", server.base, "login", "--no-qr", tty=True)
    assert result.code == 0, result
    user_code = list(server.devices.values())[0]["user_code"]
    assert sca._big_text(user_code[:4] + "-" + user_code[4:]) in result.err
    assert "\r  9:5" in result.err  # the live countdown
    plain = cli("--url", server.base, "login", "--force", "--no-qr")
    assert "\r" not in plain.err and "\u2588" not in plain.err  # no countdown, no big type off a terminal


def test_cli_login_screen_ascii_terminal_has_no_block_glyphs(cli, server, store_path):
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr", tty=True, encoding="ascii")
    assert result.code == 0, result
    assert "\u2588" not in result.err


def test_cli_login_open_uses_webbrowser(cli, server, store_path, monkeypatch):
    import webbrowser

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or True)
    server.interval, server.approve_after = 1, 1
    assert cli("--url", server.base, "login", "--no-qr", "--open").code == 0
    user_code = list(server.devices.values())[0]["user_code"]
    assert opened == [server.base.replace("http://", "http://") + "/consent/openid/device-authorization?user_code=" + user_code]


def test_fake_server_consent_page_approves_by_hand(server, store_path):
    # fakeserver.py doubles as a server to try the CLI on: its page approves.
    from urllib.request import urlopen

    auth, flow = start(server)
    with urlopen(flow.verification_uri_complete) as page:
        assert flow.user_code.encode() in page.read()
    form = ("user_code=%s&decision=allow" % flow.user_code).encode()
    with urlopen(flow.verification_uri, data=form) as page:
        assert b"Done: allow" in page.read()
    assert auth.wait_for_login(flow).access_token.startswith("authelia_at_")


# ==== real subprocesses: every command at least once =======================


def test_subprocess_login_then_every_command(live_server, tmp_path):
    live_server.interval, live_server.approve_after = 1, 1
    env = {"STANDCLOUD_TOKEN_FILE": str(tmp_path / "tokens.json")}
    result = run_cli("--url", live_server.base, "login", "--no-qr", env=env)
    assert result.code == 0, result
    assert "Logged in" in result.err
    token = run_cli("token", env=env)
    assert token.code == 0 and token.out.startswith("authelia_at_")
    assert run_cli("status", env=env).code == 0
    assert run_cli("healthcheck", env=env).out == "ok\n"
    assert run_cli("api", "/test_report", "-d", '{"ok": true}', env=env).code == 0
    assert run_cli("refresh", env=env).code == 0
    assert run_cli("logout", env=env).code == 0
    assert run_cli("--url", live_server.base, "token", env=env).code == 3


def test_subprocess_module_and_script_forms(tmp_path):
    for argv in ([sys.executable, MODULE, "--version"],
                 [sys.executable, "-m", "standcloud_auth", "--version"]):
        out = subprocess.check_output(argv, cwd=os.path.dirname(MODULE))
        assert out == ("standcloud-auth %s\n" % sca.__version__).encode()


def test_subprocess_vendored_copy_imports_cleanly(tmp_path):
    # Proof that it vendors: a copy in an empty folder, isolated mode, warnings as errors.
    import shutil

    shutil.copy(MODULE, str(tmp_path / "standcloud_auth.py"))
    out = subprocess.check_output([sys.executable, "-I", "-W", "error", "-c",
                                   "import sys; sys.path.insert(0, '.'); import standcloud_auth as s; print(s.__version__)"],
                                  cwd=str(tmp_path))
    assert out.split()[0] == sca.__version__.encode()
    for name in sca.__all__:
        assert hasattr(sca, name)
