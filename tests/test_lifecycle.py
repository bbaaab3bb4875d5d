"""Tests for the token lifecycle (issue 3): refresh with rotation, the store's
lock, 401 handling, the token/refresh/logout commands, STANDCLOUD_TOKEN and
the `token` hot path.

Real HTTP over real sockets against the Authelia-like fake StandCloud from
conftest.py (rotation, reuse detection, revocation), the fake clock on the
module's seams for in-process tests, and real subprocesses where processes
matter: the refresh storm, waiting for another process's lock, the hot path.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, assert_one_error, entry_for, error_lines, free_port, log_in, run_cli, write_store
from fakeserver import FakeStandCloud

HERE = os.path.dirname(os.path.abspath(__file__))
HEALTH = sca.API_PATH + sca.HEALTHCHECK_PATH
JSON = {"Content-Type": "application/json"}
OTHER = "https://other.standcloud.example"


# ==== helpers ===============================================================





def other_entry(now):
    return entry_for({"access_token": "other_at", "refresh_token": "other_rt"}, now)


def stored(store_path, base):
    return json.loads(store_path.read_text())["servers"].get(base)


def listing(folder):
    """Every path under ``folder`` (files and folders), relative."""
    found = set()
    for root, dirs, files in os.walk(str(folder)):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), str(folder)))
    return found


def api_requests(server):
    return [r for r in server.requests if r["path"].startswith(sca.API_PATH)]


def bearer(request):
    return request["headers"].get("Authorization")


def refresh_answer(**fields):
    body = {"access_token": "authelia_at_new", "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": "authelia_rt_new", "scope": sca.SCOPE}
    body.update(fields)
    for name in [k for k, v in body.items() if v is None]:
        del body[name]
    return 200, JSON, json.dumps(body).encode()


class Stall(object):
    """A canned response that answers nothing until released (or 3 s)."""

    def __init__(self):
        self.release = threading.Event()

    def __call__(self, handler):
        self.release.wait(3)


def behave(handler, record=None):
    """Answer as the fake server would, from inside a scripted callable
    (``record``: this request's record, when others came in meanwhile)."""
    record = record or handler.fake.requests[-1]
    handler.send(*handler._behave(record["path"], record["form"]))


# ==== §8 refresh per the contract ===========================================


def test_refresh_form_fields_exactly(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    assert cli("--url", server.base, "token").code == 0
    (request,) = [r for r in server.requests if r["path"] == sca.TOKEN_PATH]
    assert request["method"] == "POST"
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert request["headers"]["Accept"] == "application/json"
    assert request["form"] == {"client_id": "hardpy-report-uploader", "grant_type": "refresh_token",
                               "refresh_token": tokens["refresh_token"]}  # no audience, no scope


def test_refresh_rotated_refresh_token_is_stored(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    result = cli("--url", server.base, "token")
    assert result.code == 0
    entry = stored(store_path, server.base)
    assert entry["refresh_token"] != tokens["refresh_token"]
    assert server.refresh_tokens[entry["refresh_token"]]["active"]
    assert not server.refresh_tokens[tokens["refresh_token"]]["active"]
    assert result.out == entry["access_token"] + "\n"
    assert server.token_ok(entry["access_token"]) and not server.token_ok(tokens["access_token"])
    assert entry["token_type"] == "Bearer" and entry["scope"] == sca.SCOPE


def test_refresh_answer_without_refresh_token_keeps_the_old_one(cli, server, store_path, clock):
    server.rotate = False
    tokens = log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    assert cli("--url", server.base, "refresh").code == 0
    entry = stored(store_path, server.base)
    assert entry["refresh_token"] == tokens["refresh_token"]
    assert entry["access_token"] != tokens["access_token"]
    assert cli("--url", server.base, "refresh").code == 0  # the kept token still works
    assert server.refreshes() == 2
    assert stored(store_path, base=server.base)["refresh_token"] == tokens["refresh_token"]


def test_refresh_expires_at_is_measured_from_the_send_time(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    sent = []

    def slow(handler):  # the answer takes 30 s (on the fake clock) to arrive
        sent.append(clock.now())
        clock.advance(30)
        behave(handler)

    server.script(sca.TOKEN_PATH, slow)
    assert cli("--url", server.base, "token").code == 0
    entry = stored(store_path, server.base)
    assert entry["expires_at"] == sent[0] + server.access_ttl
    assert entry["updated_at"] >= sent[0]


def test_refresh_answer_without_expiry_stores_null(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    server.script(sca.TOKEN_PATH, refresh_answer(expires_in=None))
    result = cli("--url", server.base, "refresh")
    assert result.code == 0, result
    assert stored(store_path, server.base)["expires_at"] is None
    assert "no expiry" in result.err


def test_refresh_token_without_expiry_is_used_until_401_then_refreshed(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), expires_at=None)
    clock.advance(10 * 86400)  # the server's token died long ago; we cannot know
    result = cli("--url", server.base, "token")
    assert result.code == 0 and result.out == tokens["access_token"] + "\n"
    assert server.requests == []
    result = cli("--url", server.base, "api", "/thing")
    assert result.code == 0, result
    calls = api_requests(server)
    assert len(calls) == 2 and server.refreshes() == 1
    new = stored(store_path, server.base)["access_token"]
    assert bearer(calls[0]) == "Bearer " + tokens["access_token"]
    assert bearer(calls[1]) == "Bearer " + new and new != tokens["access_token"]


@pytest.mark.parametrize("fields", [
    {"token_type": "BEARER"},
    {"token_type": "bearer", "id_token": "eyJ.x.y", "iat": 1764400000, "unknown": {"a": [1]}},
    {"scope": None},
    {"access_token": "eyJhbGciOiJSUzI1NiJ9." + "a" * 2000 + ".sig"},
    {"access_token": "x"},
], ids=["BEARER", "extra-fields", "no-scope", "long-jwt", "short-opaque"])
def test_refresh_real_server_variants_work(cli, server, store_path, clock, fields):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    server.script(sca.TOKEN_PATH, refresh_answer(**fields))
    result = cli("--url", server.base, "token")
    assert result.code == 0, result
    entry = stored(store_path, server.base)
    assert result.out == entry["access_token"] + "\n"
    assert entry["token_type"] == "Bearer" and entry["scope"] == sca.SCOPE  # a missing scope keeps the old


# ==== `token` ===============================================================


def test_token_valid_sends_no_request(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "token")
    assert result.code == 0 and result.out == tokens["access_token"] + "\n" and result.err == ""
    assert server.requests == []
    assert cli("token").out == tokens["access_token"] + "\n"  # the store's only server
    assert server.requests == []


@pytest.mark.parametrize("left, min_valid, refreshes", [
    (3600, None, 0),
    (61, None, 0),
    (59, None, 1),  # default --min-valid 60
    (3600, "3599", 0),
    (3600, "3601", 1),
    (3600, "7200", 1),
    (30, "0", 0),
    (-1, "0", 1),
])
def test_token_min_valid_triggers_refresh(cli, server, store_path, clock, left, min_valid, refreshes):
    tokens = log_in(server, store_path, clock.now(), expires_at=clock.now() + left)
    argv = ["--url", server.base, "token"] + (["--min-valid", min_valid] if min_valid else [])
    result = cli(*argv)
    assert result.code == 0, result
    assert server.refreshes() == refreshes and len(server.requests) == refreshes
    entry = stored(store_path, server.base)
    assert result.out == entry["access_token"] + "\n"
    assert (entry["access_token"] != tokens["access_token"]) == bool(refreshes)


def test_token_json_fields(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), expires_at=clock.now() + 1234.5)
    result = cli("--url", server.base, "token", "--json")
    assert result.code == 0 and result.err == ""
    doc = json.loads(result.out)
    assert doc == {"access_token": tokens["access_token"], "token_type": "Bearer",
                   "expires_at": clock.now() + 1234.5, "expires_in": 1234}
    assert server.requests == []


def test_token_json_after_refresh_and_without_expiry(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 5)
    doc = json.loads(cli("--url", server.base, "token", "--json").out)
    entry = stored(store_path, server.base)
    assert doc["access_token"] == entry["access_token"] and doc["expires_in"] == server.access_ttl
    write_store(store_path, {server.base: dict(entry, expires_at=None)})
    doc = json.loads(cli("--url", server.base, "token", "--json").out)
    assert doc["expires_at"] is None and doc["expires_in"] is None


@pytest.mark.parametrize("servers", [None, {}, {OTHER: "other"}], ids=["no-store", "empty", "other-server"])
def test_token_not_logged_in_says_run_login(cli, server, store_path, clock, servers):
    if servers is not None:
        write_store(store_path, {k: other_entry(clock.now()) for k in servers})
    result = cli("--url", server.base, "token")
    assert_one_error(result, 3)
    assert "login" in result.err and result.out == ""
    assert server.requests == []


def test_token_expired_without_refresh_token_says_run_login(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 1, refresh_token=None)
    before = store_path.read_bytes()
    result = cli("--url", server.base, "token")
    assert_one_error(result, 3)
    assert "login" in result.err and server.requests == []
    assert store_path.read_bytes() == before


# ==== refresh failures: the store is unchanged byte for byte =================


BIG = b'{"access_token": "' + b"a" * (1024 * 1024 + 10) + b'"}'

FAILURES = [
    # id, canned answer, exit code, words in the message
    ("500", (500, {}, b""), 5, "500"),
    ("502-html", (502, {"Content-Type": "text/html"}, b"<html><body>Bad gateway</body></html>"), 5, "502"),
    ("503-oauth-body", (503, JSON, b'{"error": "temporarily_unavailable"}'), 5, "503"),
    ("not-json", (200, JSON, b"hello"), 5, "JSON"),
    ("html-page", (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><html>proxy login</html>"), 5, "JSON"),
    ("empty-200", (200, JSON, b""), 5, "JSON"),
    ("json-array", (200, JSON, b'[{"access_token": "x"}]'), 5, "object"),
    ("json-string", (200, JSON, b'"authelia_at_x"'), 5, "object"),
    ("missing-access-token", refresh_answer(access_token=None), 5, "access_token"),
    ("empty-access-token", refresh_answer(access_token=""), 5, "access_token"),
    ("access-token-number", refresh_answer(access_token=123), 5, "access_token"),
    ("access-token-newline", refresh_answer(access_token="abc\r\nX-Evil: 1"), 5, "access_token"),
    ("refresh-token-number", refresh_answer(refresh_token=42), 5, "refresh_token"),
    ("token-type-number", refresh_answer(token_type=1), 5, "token_type"),
    ("token-type-mac", refresh_answer(token_type="mac"), 5, "Bearer"),
    ("token-type-dpop", refresh_answer(token_type="DPoP"), 5, "Bearer"),
    ("expires-in-string", refresh_answer(expires_in="3600"), 5, "expires_in"),
    ("expires-in-bool", refresh_answer(expires_in=True), 5, "expires_in"),
    ("expires-in-negative", refresh_answer(expires_in=-1), 5, "expires_in"),
    ("expires-in-absurd", refresh_answer(expires_in=1e300), 5, "expires_in"),
    ("expires-in-nan", (200, JSON, b'{"access_token": "a", "token_type": "Bearer", "expires_in": NaN}'), 5, "JSON"),
    ("scope-number", refresh_answer(scope=5), 5, "scope"),
    ("deeply-nested", (200, JSON, b"[" * 100000 + b"]" * 100000), 5, "nested"),
    ("over-1-mib", (200, JSON, BIG), 5, "1 MiB"),
    ("redirect", (302, {"Location": "https://evil.example/token"}, b""), 5, "redirect"),
    ("invalid-request", (400, JSON, b'{"error": "invalid_request", "error_description": "concurrent"}'), 3,
     "invalid_request"),
    ("unauthorized-client", (400, JSON, b'{"error": "unauthorized_client", "error_description": "no"}'), 3,
     "unauthorized_client"),
    ("invalid-client-401", (401, JSON, b'{"error": "invalid_client"}'), 3, "invalid_client"),
    ("invalid-scope", (400, JSON, b'{"error": "invalid_scope"}'), 3, "invalid_scope"),
    ("empty-400", (400, {}, b""), 3, "HTTP 400"),
    ("empty-401", (401, {}, b""), 3, "HTTP 401"),
    ("html-400", (400, {"Content-Type": "text/html"}, b"<html>Bad Request</html>"), 3, "HTTP 400"),
]


@pytest.mark.parametrize("command", ["token", "refresh"])
@pytest.mark.parametrize("answer, code, words", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_failure_leaves_store_unchanged(cli, server, store_path, clock, command, answer, code, words):
    log_in(server, store_path, clock.now(), others={OTHER: other_entry(clock.now())}, expires_at=clock.now() - 10)
    before, files = store_path.read_bytes(), listing(store_path.parent)
    server.script(sca.TOKEN_PATH, answer)
    result = cli("--url", server.base, command)
    assert_one_error(result, code)
    assert words in error_lines(result.err)[0]
    assert result.out == ""
    assert store_path.read_bytes() == before
    assert listing(store_path.parent) - {"tokens.json.lock"} == files  # no temp file left behind
    assert server.refreshes() == 1  # no retry of a refresh


@pytest.mark.parametrize("answer", [f[1] for f in FAILURES if f[2] == 3], ids=[f[0] for f in FAILURES if f[2] == 3])
def test_failure_rejected_refresh_token_says_run_login(cli, server, store_path, clock, answer):
    # Contract, `token`: "the refresh is rejected: exit 3 with a message that says to run `login`".
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    server.script(sca.TOKEN_PATH, answer)
    result = cli("--url", server.base, "token")
    assert_one_error(result, 3)
    assert "login" in error_lines(result.err)[0]


def test_failure_message_says_what_to_do_next(cli, server, store_path, clock):
    # Contract, output rule: "standcloud-auth: error: <what happened>; <what to do next>".
    # One test over the whole table: the offenders are listed together.
    offenders = []
    for name, answer, _, _ in FAILURES:
        log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
        server.script(sca.TOKEN_PATH, answer)
        (line,) = error_lines(cli("--url", server.base, "token").err)
        what, sep, then = line[len("standcloud-auth: error: "):].rpartition("; ")
        if not (sep and what and then):
            offenders.append("%s: %s" % (name, line))
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize("command", ["token", "refresh"])
def test_failure_timeout_leaves_store_unchanged(cli, server, store_path, clock, command):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    stall = Stall()
    server.script(sca.TOKEN_PATH, stall)
    started = time.monotonic()
    try:
        result = cli("--url", server.base, "--timeout", "0.2", command)
    finally:
        stall.release.set()
    assert time.monotonic() - started < 1.5
    assert_one_error(result, 4)
    assert "timed out" in result.err
    assert store_path.read_bytes() == before


def test_failure_trickling_answer_is_bounded_by_timeout(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    body = json.dumps({"access_token": "a", "token_type": "Bearer", "expires_in": 60}).encode()
    stop = threading.Event()

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for byte in body:
                if stop.wait(0.03):
                    return
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
        except OSError:
            pass

    server.script(sca.TOKEN_PATH, trickle)
    started = time.monotonic()
    try:
        result = cli("--url", server.base, "--timeout", "0.3", "token")
    finally:
        stop.set()
    assert time.monotonic() - started < 1.5
    assert_one_error(result, 4)
    assert store_path.read_bytes() == before


@pytest.mark.parametrize("command", ["token", "refresh"])
def test_failure_refused_port_leaves_store_unchanged(cli, store_path, clock, command):
    base = "http://127.0.0.1:%d" % free_port()
    write_store(store_path, {base: entry_for({"access_token": "at", "refresh_token": "rt"}, clock.now(),
                                             expires_at=clock.now() - 10)})
    before = store_path.read_bytes()
    result = cli("--url", base, command)
    assert_one_error(result, 4)
    assert "refused" in result.err
    assert store_path.read_bytes() == before


def test_failure_server_stopped_leaves_store_unchanged(cli, store_path, clock):
    gone = FakeStandCloud(clock).start()
    tokens = gone.issue()
    write_store(store_path, {gone.base: entry_for(tokens, clock.now(), expires_at=clock.now() - 10)})
    gone.stop()
    before = store_path.read_bytes()
    result = cli("--url", gone.base, "token")
    assert_one_error(result, 4)
    assert store_path.read_bytes() == before


# ==== invalid_grant: the only answer that ends the stored session ===========


@pytest.mark.parametrize("command", ["token", "refresh"])
@pytest.mark.parametrize("how", ["unknown", "reused", "scripted"])
def test_invalid_grant_removes_only_this_servers_entry(cli, server, store_path, clock, command, how):
    other = other_entry(clock.now())
    tokens = log_in(server, store_path, clock.now(), others={OTHER: other}, expires_at=clock.now() - 10)
    if how == "unknown":
        server.refresh_tokens.clear()
    elif how == "reused":  # someone else rotated our refresh token: it is now a reuse
        sca._refresh_tokens(sca._Transport(), server.base, tokens["refresh_token"])
    else:
        server.script(sca.TOKEN_PATH, (400, JSON, b'{"error": "invalid_grant", "error_description": "expired"}'))
    result = cli("--url", server.base, command)
    assert_one_error(result, 3)
    assert "login" in error_lines(result.err)[0]
    doc = json.loads(store_path.read_text())
    assert doc["servers"] == {OTHER: other}


# ==== reuse detection: the fake is faithful, and the client never reuses ====


def test_reuse_fake_server_kills_the_family_on_reuse(server, clock):
    transport = sca._Transport()
    first = server.issue()
    second = sca._refresh_tokens(transport, server.base, first["refresh_token"])
    assert server.token_ok(second["access_token"]) and not server.token_ok(first["access_token"])
    with pytest.raises(sca.AuthError) as info:  # the rotated token again: theft
        sca._refresh_tokens(transport, server.base, first["refresh_token"])
    assert info.value.error == "invalid_grant"
    assert not server.token_ok(second["access_token"])  # the whole family is dead
    with pytest.raises(sca.AuthError) as info:
        sca._refresh_tokens(transport, server.base, second["refresh_token"])
    assert info.value.error == "invalid_grant"
    bystander = server.issue()  # another login is not touched
    assert server.token_ok(bystander["access_token"])


def test_reuse_two_instances_refreshing_in_turn_both_succeed(server, store_path, clock):
    log_in(server, store_path, clock.now())
    first = sca.StandCloudAuth(server.base)
    second = sca.StandCloudAuth(server.base)  # created before `first` refreshes
    for auth in (first, second, first, second):
        tokens = auth.refresh()
        assert server.token_ok(tokens.access_token)
    assert server.refreshes() == 4
    sent = [r["form"]["refresh_token"] for r in server.requests if r["path"] == sca.TOKEN_PATH]
    assert len(set(sent)) == 4  # no refresh token was ever sent twice
    assert second.request("GET", "/thing").status == 200


def test_reuse_processes_refreshing_in_turn_all_succeed(live_server, store_path):
    log_in(live_server, store_path, time.time())
    seen = set()
    for _ in range(3):
        result = run_cli("--url", live_server.base, "refresh")
        assert result.code == 0, result
        seen.add(stored(store_path, live_server.base)["refresh_token"])
    assert live_server.refreshes() == 3 and len(seen) == 3
    sent = [r["form"]["refresh_token"] for r in live_server.requests if r["path"] == sca.TOKEN_PATH]
    assert len(set(sent)) == 3  # no refresh token was ever sent twice


def test_reuse_concurrent_refresh_processes_never_reuse(live_server, store_path):
    # `refresh` forces a refresh in every process: they must take turns.
    log_in(live_server, store_path, time.time())
    procs = [popen_cli("--url", live_server.base, "refresh") for _ in range(8)]
    results = [finish(p) for p in procs]
    assert [r.code for r in results] == [0] * 8, results
    sent = [r["form"]["refresh_token"] for r in live_server.requests if r["path"] == sca.TOKEN_PATH]
    assert len(sent) == 8 and len(set(sent)) == 8
    assert live_server.token_ok(stored(store_path, live_server.base)["access_token"])


# ==== 401 and 403 from the API ==============================================


def test_401_after_another_process_refreshed_uses_the_stored_token(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())

    def meanwhile(handler):  # another process refreshes while our request is on its way
        record = server.requests[-1]
        sca.StandCloudAuth(server.base).refresh()
        behave(handler, record)  # our (now revoked) token gets the fake's 401

    server.script(sca.API_PATH + "/thing", meanwhile)
    result = cli("--url", server.base, "api", "/thing")
    assert result.code == 0, result
    calls = api_requests(server)
    new = stored(store_path, server.base)["access_token"]
    assert [bearer(c) for c in calls] == ["Bearer " + tokens["access_token"], "Bearer " + new]
    assert server.refreshes() == 1  # the other process's; ours sent none


def test_401_with_the_same_stored_token_refreshes_once_then_retries(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    server.access_tokens[tokens["access_token"]]["active"] = False  # revoked at the server
    result = cli("--url", server.base, "healthcheck")
    assert result.code == 0 and result.out == "ok\n", result
    calls = api_requests(server)
    assert len(calls) == 2 and server.refreshes() == 1
    assert bearer(calls[1]) == "Bearer " + stored(store_path, server.base)["access_token"]


@pytest.mark.parametrize("argv", [["healthcheck"], ["api", "/thing"], ["api", "/thing", "-d", '{"a": 1}']])
def test_401_is_retried_once_never_more(cli, server, store_path, clock, argv):
    log_in(server, store_path, clock.now())
    path = HEALTH if argv[0] == "healthcheck" else sca.API_PATH + "/thing"
    server.script(path, *[(401, {"WWW-Authenticate": "Bearer"}, b"no")] * 5)
    result = cli("--url", server.base, *argv)
    assert_one_error(result, 3)
    assert len(api_requests(server)) == 2 and server.refreshes() == 1


def test_401_when_another_process_token_is_refused_too_no_refresh(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())

    def meanwhile(handler):
        sca.StandCloudAuth(server.base).refresh()
        handler.send(401, {}, b"")

    server.script(HEALTH, meanwhile, (401, {}, b""), (401, {}, b""))
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert len(api_requests(server)) == 2 and server.refreshes() == 1  # only the other process's


def test_401_library_request_returns_the_second_answer(server, store_path, clock):
    log_in(server, store_path, clock.now())
    server.script(HEALTH, (401, {}, b"first"), (401, {}, b"second"), (401, {}, b"third"))
    response = sca.StandCloudAuth(server.base).request("GET", "/healthcheck")
    assert response.status == 401 and response.body == b"second"
    assert len(api_requests(server)) == 2


@pytest.mark.parametrize("argv", [["healthcheck"], ["api", "/thing"]])
def test_403_is_final_no_refresh(cli, server, store_path, clock, argv):
    log_in(server, store_path, clock.now())
    before = store_path.read_bytes()
    path = HEALTH if argv[0] == "healthcheck" else sca.API_PATH + "/thing"
    server.script(path, (403, JSON, b'{"detail": "forbidden"}'), (403, JSON, b"{}"))
    result = cli("--url", server.base, *argv)
    assert_one_error(result, 3)
    assert len(api_requests(server)) == 1 and server.refreshes() == 0
    assert store_path.read_bytes() == before


def test_401_then_invalid_grant_ends_session(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), others={OTHER: other_entry(clock.now())})
    server.access_tokens[tokens["access_token"]]["active"] = False
    server.refresh_tokens.clear()
    result = cli("--url", server.base, "healthcheck")
    assert_one_error(result, 3)
    assert "login" in result.err
    assert len(api_requests(server)) == 1
    assert list(json.loads(store_path.read_text())["servers"]) == [OTHER]


# ==== the lock ==============================================================


def test_lock_default_wait_is_30_seconds(tmp_path):
    assert sca.LOCK_TIMEOUT == 30
    assert sca.TokenStore(str(tmp_path / "tokens.json")).lock().timeout == 30


def test_lock_wait_is_bounded_and_ends_in_a_clear_error(cli, server, store_path, clock, monkeypatch):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    holder = sca.TokenStore(str(store_path))
    with holder.lock():
        # TokenStore.lock binds LOCK_TIMEOUT as a default argument at import,
        # so patching the constant has no effect: shorten the method itself.
        monkeypatch.setattr(sca.TokenStore, "lock", lambda self, timeout=0.2: sca._StoreLock(self, 0.2))
        started = time.monotonic()
        result = cli("--url", server.base, "token")
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2
    assert result.code not in (0, 1), result
    assert_one_error(result, result.code)
    assert "lock" in error_lines(result.err)[0]
    assert server.requests == []
    assert store_path.read_bytes() == before


def test_lock_waiter_process_rereads_the_store_and_uses_the_new_token(live_server, store_path):
    # Another process (this one) holds the lock and refreshes; the waiting
    # process must use its result, not send its own (now rotated) token.
    old = log_in(live_server, store_path, time.time(), expires_at=time.time() - 10)
    store = sca.TokenStore(str(store_path))
    with store.lock():
        proc = popen_cli("--url", live_server.base, "token")
        time.sleep(0.25)  # the child starts, finds the token expired and waits
        new = sca._refresh_tokens(sca._Transport(), live_server.base, old["refresh_token"])
        store.set_entry(live_server.base, new)
    result = finish(proc)
    assert result.code == 0, result
    assert result.out == new["access_token"] + "\n"
    assert live_server.refreshes() == 1  # ours only
    assert live_server.token_ok(new["access_token"])


# ==== the storm =============================================================

GATED = (
    "import os, runpy, sys, time\n"
    "gate = sys.argv[1]\n"
    "while not os.path.exists(gate):\n"
    "    time.sleep(0.002)\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def popen_cli(*argv, **kwargs):
    env = dict(os.environ)
    env.update(kwargs.get("env", {}))
    prefix = [sys.executable, "-c", GATED, kwargs["gate"]] if "gate" in kwargs else [sys.executable]
    return subprocess.Popen(prefix + [MODULE] + list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def finish(proc, timeout=60):
    from conftest import Result

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Result(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def test_storm_many_processes_cause_exactly_one_refresh(live_server, store_path, tmp_path):
    count = 24
    live_server.refresh_delay = 0.2  # widen the race
    old = log_in(live_server, store_path, time.time(), expires_at=time.time() - 10)
    gate = str(tmp_path / "go")
    procs = [popen_cli("--url", live_server.base, "token", gate=gate) for _ in range(count)]
    time.sleep(0.3)  # let the interpreters start and wait at the gate
    started = time.monotonic()
    open(gate, "w").close()
    results = [finish(p) for p in procs]
    wall = time.monotonic() - started
    failures = [r for r in results if r.code != 0]
    new = stored(store_path, live_server.base)["access_token"]
    print("\nstorm: %d processes, %d refresh request(s), %d failure(s), %.2f s wall"
          % (count, live_server.refreshes(), len(failures), wall))
    assert failures == []
    assert live_server.refreshes() == 1
    assert new != old["access_token"] and live_server.token_ok(new)
    assert set(r.out for r in results) == {new + "\n"}
    assert all("error" not in r.err for r in results)


# ==== commands: refresh, logout, login ======================================


def test_cmd_refresh_prints_new_expiry_on_stderr(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())  # valid: refreshed anyway
    result = cli("--url", server.base, "refresh")
    assert result.code == 0 and result.out == ""
    assert "valid until" in result.err and "60 min" in result.err
    entry = stored(store_path, server.base)
    assert entry["access_token"] != tokens["access_token"]
    assert entry["expires_at"] == clock.now() + server.access_ttl
    assert server.refreshes() == 1


def test_cmd_refresh_quiet_says_nothing(cli, server, store_path, clock):
    log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "-q", "refresh")
    assert result.code == 0 and result.out == "" and result.err == ""


def test_cmd_refresh_not_logged_in_exit_3(cli, server, store_path):
    result = cli("--url", server.base, "refresh")
    assert_one_error(result, 3)
    assert "login" in result.err and server.requests == []


def test_cmd_logout_revokes_refresh_then_access_token(cli, server, store_path, clock, monkeypatch):
    other = other_entry(clock.now())
    tokens = log_in(server, store_path, clock.now(), others={OTHER: other})
    result = cli("--url", server.base, "logout")
    assert result.code == 0 and result.out == "", result
    forms = [r["form"] for r in server.requests]
    assert [r["path"] for r in server.requests] == [sca.REVOCATION_PATH] * 2
    assert forms == [
        {"client_id": sca.CLIENT_ID, "token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        {"client_id": sca.CLIENT_ID, "token": tokens["access_token"], "token_type_hint": "access_token"},
    ]
    assert json.loads(store_path.read_text())["servers"] == {OTHER: other}
    # The old access token is refused by the API from now on.
    monkeypatch.setenv("STANDCLOUD_TOKEN", tokens["access_token"])
    assert_one_error(cli("--url", server.base, "healthcheck"), 3)


def test_cmd_logout_without_refresh_token_revokes_the_access_token(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now(), refresh_token=None)
    assert cli("--url", server.base, "logout").code == 0
    assert [r["form"]["token_type_hint"] for r in server.requests] == ["access_token"]
    assert not server.token_ok(tokens["access_token"])


@pytest.mark.parametrize("answers", [
    [(500, {}, b""), (500, {}, b"")],
    [(400, JSON, b'{"error": "unauthorized_client"}'), (200, {}, b"")],
    [(200, {}, b""), (503, {"Content-Type": "text/html"}, b"<html>down</html>")],
], ids=["both-5xx", "oauth-error-first", "5xx-second"])
def test_cmd_logout_revocation_failure_is_a_warning(cli, server, store_path, clock, answers):
    log_in(server, store_path, clock.now())
    server.script(sca.REVOCATION_PATH, *answers)
    result = cli("--url", server.base, "logout")
    assert result.code == 0, result
    assert error_lines(result.err) == [] and "Traceback" not in result.err
    failed = len([a for a in answers if a[0] != 200])
    assert len([x for x in result.err.splitlines() if x.startswith("standcloud-auth: warning:")]) == failed
    assert stored(store_path, server.base) is None


def test_cmd_logout_unreachable_server_still_logs_out(cli, store_path, clock):
    base = "http://127.0.0.1:%d" % free_port()
    write_store(store_path, {base: entry_for({"access_token": "at", "refresh_token": "rt"}, clock.now())})
    result = cli("--url", base, "--timeout", "1", "logout")
    assert result.code == 0 and "warning" in result.err, result
    assert json.loads(store_path.read_text())["servers"] == {}


def test_cmd_logout_no_revoke_sends_nothing(cli, server, store_path, clock):
    tokens = log_in(server, store_path, clock.now())
    result = cli("--url", server.base, "logout", "--no-revoke")
    assert result.code == 0
    assert server.requests == [] and stored(store_path, server.base) is None
    assert server.token_ok(tokens["access_token"])


@pytest.mark.parametrize("servers", [None, {OTHER: "other"}], ids=["no-store", "other-server"])
def test_cmd_logout_not_logged_in_exit_0(cli, server, store_path, clock, servers):
    if servers is not None:
        write_store(store_path, {OTHER: other_entry(clock.now())})
    before = store_path.read_bytes() if servers else None
    result = cli("--url", server.base, "logout")
    assert result.code == 0 and error_lines(result.err) == []
    assert server.requests == []
    if before is not None:
        assert json.loads(store_path.read_bytes()) == json.loads(before)


@pytest.mark.parametrize("left, refreshes", [(3600, 0), (-10, 1)], ids=["valid", "refreshable"])
def test_cmd_login_with_a_session_exits_0_without_a_flow(cli, server, store_path, clock, left, refreshes):
    log_in(server, store_path, clock.now(), expires_at=clock.now() + left)
    result = cli("--url", server.base, "login", "--no-qr")
    assert result.code == 0 and "Already logged in" in result.err, result
    assert server.count(sca.DEVICE_PATH) == 0 and server.polls() == 0
    assert server.refreshes() == refreshes


def test_cmd_login_force_starts_a_new_flow(cli, server, store_path, clock):
    old = log_in(server, store_path, clock.now())
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--force", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert server.count(sca.DEVICE_PATH) == 1 and server.refreshes() == 0
    assert stored(store_path, server.base)["access_token"] != old["access_token"]


def test_cmd_login_with_a_dead_session_starts_a_new_flow(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    server.refresh_tokens.clear()  # invalid_grant
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert server.refreshes() == 1 and server.count(sca.DEVICE_PATH) == 1
    assert server.token_ok(stored(store_path, server.base)["access_token"])


# ==== STANDCLOUD_TOKEN ======================================================


@pytest.fixture
def static_token(monkeypatch):
    monkeypatch.setenv("STANDCLOUD_TOKEN", "static-api-key")
    return "static-api-key"


@pytest.mark.parametrize("argv", [["token"], ["--url", "https://company.standcloud.io", "token"]],
                         ids=["no-url", "url"])
def test_env_token_printed_without_store(cli, static_token, tmp_path, argv):
    files = listing(tmp_path)
    result = cli(*argv)
    assert result.code == 0 and result.out == static_token + "\n" and result.err == ""
    doc = json.loads(cli(*(argv + ["--json"])).out)
    assert doc["access_token"] == static_token and doc["token_type"] == "Bearer"
    assert doc["expires_at"] is None and doc["expires_in"] is None
    assert listing(tmp_path) == files


def test_env_token_beats_the_store(cli, server, store_path, clock, static_token):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    result = cli("--url", server.base, "token")
    assert result.out == static_token + "\n"
    assert server.requests == [] and store_path.read_bytes() == before


def test_env_token_status_source_environment(cli, static_token, tmp_path):
    files = listing(tmp_path)
    result = cli("--url", "https://company.standcloud.io", "status", "--json")
    assert result.code == 0
    doc = json.loads(result.out)
    assert doc["source"] == "environment" and doc["logged_in"] is True
    assert static_token not in result.out + result.err
    assert listing(tmp_path) == files


@pytest.mark.parametrize("argv", [["login", "--no-qr"], ["refresh"], ["logout"], ["logout", "--no-revoke"]])
@pytest.mark.parametrize("url", [True, False], ids=["url", "no-url"])
def test_env_token_refuses_login_refresh_logout(cli, server, static_token, tmp_path, argv, url):
    files = listing(tmp_path)
    result = cli(*((["--url", server.base] if url else []) + argv))
    assert_one_error(result, 2)
    assert "STANDCLOUD_TOKEN" in result.err
    assert server.requests == []
    assert listing(tmp_path) == files


def test_env_token_api_and_healthcheck_send_it_as_bearer(cli, server, clock, monkeypatch, tmp_path):
    tokens = server.issue()
    monkeypatch.setenv("STANDCLOUD_TOKEN", tokens["access_token"])
    files = listing(tmp_path)
    assert cli("--url", server.base, "healthcheck").code == 0
    assert cli("--url", server.base, "api", "/thing", "-d", "{}").code == 0
    assert [bearer(r) for r in server.requests] == ["Bearer " + tokens["access_token"]] * 2
    assert listing(tmp_path) == files


@pytest.mark.parametrize("argv", [["healthcheck"], ["api", "/thing"]])
def test_env_token_never_refreshed_on_401(cli, server, static_token, tmp_path, argv):
    files = listing(tmp_path)
    result = cli("--url", server.base, *argv)
    assert_one_error(result, 3)
    assert len(server.requests) == 1 and server.refreshes() == 0
    assert bearer(server.requests[0]) == "Bearer " + static_token
    assert listing(tmp_path) == files


def test_env_token_subprocess_writes_nothing(live_server, tmp_path):
    tokens = live_server.issue()
    files = listing(tmp_path)
    env = {"STANDCLOUD_TOKEN": tokens["access_token"]}
    assert run_cli("token", env=env).out == tokens["access_token"] + "\n"
    assert run_cli("--url", live_server.base, "healthcheck", env=env).code == 0
    assert run_cli("--url", live_server.base, "logout", env=env).code == 2
    assert listing(tmp_path) == files


# ==== the hot path ==========================================================

NETWORK = ("ssl", "urllib.request", "http.client")
SEEN = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], 'token']\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "sys.stderr.write('LOADED %s\\n' % ' '.join(m for m in " + repr(NETWORK) + " if m in sys.modules))\n"
    "sys.exit(code)\n"
)


def valid_store(store_path):
    write_store(store_path, {"https://company.standcloud.io": entry_for(
        {"access_token": "authelia_at_hot", "refresh_token": "authelia_rt_hot"}, time.time())})


def run_python(args, cwd=None):
    proc = subprocess.Popen([sys.executable] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(sys.version_info < (3, 7), reason="-X importtime is new in Python 3.7")
@pytest.mark.parametrize("how", [[MODULE, "token"], ["-m", "standcloud_auth", "token"]], ids=["file", "module"])
def test_hot_path_importtime_shows_no_network_stack(store_path, how):
    valid_store(store_path)
    code, out, err = run_python(["-X", "importtime"] + how, cwd=os.path.dirname(MODULE))
    assert code == 0 and out == "authelia_at_hot\n", err[-2000:]
    imported = set(line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:"))
    assert len(imported) > 10  # the log was parsed
    assert imported & set(NETWORK) == set()


def test_hot_path_sys_modules_has_no_network_stack(store_path):
    valid_store(store_path)
    code, out, err = run_python(["-c", SEEN, MODULE])
    assert code == 0 and out == "authelia_at_hot\n", err
    assert "LOADED \n" in err


def test_hot_path_refresh_does_load_the_network_stack(live_server, store_path):
    # The check above can fail: with an expired token the stack is loaded.
    tokens = live_server.issue()
    write_store(store_path, {live_server.base: entry_for(tokens, time.time(), expires_at=time.time() - 10)})
    code, out, err = run_python(["-c", SEEN, MODULE])
    assert code == 0, err
    assert "urllib.request" in err.split("LOADED ")[1] and "http.client" in err.split("LOADED ")[1]
