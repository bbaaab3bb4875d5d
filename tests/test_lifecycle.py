"""Tests for the token lifecycle (issue 3, and v2's issues 11 and 12): refresh
with rotation, the answer to a refresh awaited REFRESH_WAIT once sent, the
short-token refresh threshold, the store's lock, 401 handling, the
token/refresh/logout commands (several servers, --all), STANDCLOUD_TOKEN,
read-only commands that write nothing, and the `token` hot path.

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
from conftest import MODULE, assert_one_error, entry_for, error_lines, free_port, listing, log_in, run_cli, write_store
from fakeserver import FakeStandCloud

HERE = os.path.dirname(os.path.abspath(__file__))
HEALTH = sca.API_PATH + sca.HEALTHCHECK_PATH
JSON = {"Content-Type": "application/json"}
OTHER = "https://other.standcloud.example"


# ==== helpers ===============================================================


def transport(timeout=10.0):
    """The module's HTTP transport, as the library builds it (private: allowed in tests)."""
    return sca._Transport(timeout, None, False, sca._Console())


def lost_answer_line(result, base):
    """The one error line of a refresh whose answer was lost (v2), checked."""
    assert_one_error(result, 4)
    line = error_lines(result.err)[0]
    assert "the answer to the refresh sent to %s%s was lost" % (base, sca.TOKEN_PATH) in line, line
    assert "the server may already have rotated the session" in line, line
    assert "run 'standcloud-auth --url %s token' again" % base in line, line
    assert "run 'standcloud-auth --url %s login'" % base in line, line
    assert "try again later" not in line, line
    return line


def other_entry(now):
    return entry_for({"access_token": "other_at", "refresh_token": "other_rt"}, now)


def stored(store_path, base):
    return json.loads(store_path.read_text())["servers"].get(base)


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


@pytest.mark.parametrize("left, life, min_valid, refreshes", [
    (3600, 3600, None, 0),
    (61, 3600, None, 0),
    (59, 3600, None, 1),  # default: 60 s before the expiry of a long-lived token
    (61, None, None, 0),  # no updated_at (an older store): the 60 s default
    (59, None, None, 1),
    (60, 60, None, 0),  # a 60 s token just issued is not refreshed (issue 11 point 9)
    (31, 60, None, 0),  # ... nor with more than half its life left
    (30, 60, None, 1),
    (60, 119, None, 0),  # half of 119 s: refreshed from 59.5 s on, not from 60 s
    (59, 119, None, 1),
    (61, 120, None, 0),  # from 120 s of life on, the 60 s default
    (59, 120, None, 1),
    (3600, 3600, "3599", 0),
    (3600, 3600, "3601", 1),
    (3600, 3600, "7200", 1),
    (50, 60, "55", 1),  # an explicit --min-valid is exact, also for a short token:
    (20, 60, "10", 0),  # the half-life rule would have refreshed this one
    (50, 60, "45", 0),
    (30, 3600, "0", 0),
    (-1, 3600, "0", 1),
])
def test_token_min_valid_triggers_refresh(cli, server, store_path, clock, left, life, min_valid, refreshes):
    expires_at = clock.now() + left
    tokens = log_in(server, store_path, clock.now(), expires_at=expires_at,
                    updated_at=None if life is None else expires_at - life)
    argv = ["--url", server.base, "token"] + (["--min-valid", min_valid] if min_valid else [])
    result = cli(*argv)
    assert result.code == 0, result
    assert server.refreshes() == refreshes and len(server.requests) == refreshes
    entry = stored(store_path, server.base)
    assert result.out == entry["access_token"] + "\n"
    assert (entry["access_token"] != tokens["access_token"]) == bool(refreshes)


def test_token_short_lived_tokens_are_not_refreshed_on_every_call(cli, server, store_path, clock):
    # Issue 11 point 9: with 60 s access tokens and the v1 threshold (60 s),
    # every `token` call refreshed. v2 refreshes at half the life: a call every
    # 5 s for two minutes refreshes at 30, 60, 90 and 120 s, and never prints
    # a token with less than half its life left.
    server.access_ttl = 60
    log_in(server, store_path, clock.now())  # expires_at now + 60, updated_at now
    printed = []
    for _ in range(25):
        result = cli("--url", server.base, "token")
        assert result.code == 0, result
        token = result.out.strip()
        assert server.token_ok(token)
        assert stored(store_path, server.base)["expires_at"] - clock.now() > 30
        printed.append(token)
        clock.advance(5)
    assert server.refreshes() == 4
    assert len(set(printed)) == 5


def test_token_short_lived_threshold_as_a_subprocess(live_server, store_path):
    # The same rule through the real CLI: a 60 s token with 40 s left is used
    # as is; an explicit --min-valid (abbreviated, as argparse allows) is exact.
    live_server.access_ttl = 60
    tokens = live_server.issue()
    write_store(store_path, {live_server.base: entry_for(tokens, time.time() - 20)})  # 40 s of 60 left
    result = run_cli("--url", live_server.base, "token")
    assert result.code == 0 and result.out == tokens["access_token"] + "\n", result
    assert live_server.refreshes() == 0
    result = run_cli("--url", live_server.base, "token", "--min", "45")
    assert result.code == 0, result
    entry = stored(store_path, live_server.base)
    assert live_server.refreshes() == 1 and result.out == entry["access_token"] + "\n"
    assert entry["access_token"] != tokens["access_token"] and live_server.token_ok(entry["access_token"])


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


NOT_LOGGED_IN = ["no-folder", "no-store", "other-server", "expired-no-refresh-token"]


def not_logged_in(state, server, store_path, clock):
    """A store (or none) where ``server`` has no usable session."""
    if state == "no-store":
        store_path.parent.mkdir(mode=0o700)
    elif state == "other-server":
        write_store(store_path, {OTHER: other_entry(clock.now())})
    elif state == "expired-no-refresh-token":  # `status` calls this "Logged in: no"
        log_in(server, store_path, clock.now(), expires_at=clock.now() - 1, refresh_token=None)


@pytest.mark.parametrize("command", ["token", "refresh"])
@pytest.mark.parametrize("state", NOT_LOGGED_IN)
def test_not_logged_in_writes_nothing(cli, server, store_path, clock, tmp_path, command, state):
    # Contract, output rule: "any command when not logged in writes nothing to
    # disk: no folder, no lock file" (issue 12 point 5).
    not_logged_in(state, server, store_path, clock)
    files = listing(tmp_path)
    before = store_path.read_bytes() if store_path.exists() else None
    result = cli("--url", server.base, command)
    assert_one_error(result, 3)
    assert "login" in error_lines(result.err)[0] and result.out == ""
    assert server.requests == []
    assert listing(tmp_path) == files
    assert (store_path.read_bytes() if store_path.exists() else None) == before


@pytest.mark.parametrize("command", ["token", "refresh"])
def test_not_logged_in_writes_nothing_as_a_subprocess(live_server, tmp_path, command):
    # The default store path (HOME is in tmp_path): no ~/.config/standcloud made.
    files = listing(tmp_path)
    result = run_cli("--url", live_server.base, command)
    assert_one_error(result, 3)
    assert "login" in result.err and result.out == ""
    assert live_server.requests == []
    assert listing(tmp_path) == files


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
@pytest.mark.parametrize("timeout, wait", [("0.1", 0.3), ("0.3", 0.1)], ids=["refresh-wait-longer", "timeout-longer"])
def test_failure_timeout_leaves_store_unchanged(cli, server, store_path, clock, monkeypatch, command, timeout, wait):
    # v2 (issue 11 point 2): once sent, a refresh's answer is awaited
    # max(REFRESH_WAIT, --timeout); when it never comes, exit 4 with a message
    # that says the session may already be rotated (not "try again later").
    monkeypatch.setattr(sca, "REFRESH_WAIT", wait)
    log_in(server, store_path, clock.now(), others={OTHER: other_entry(clock.now())}, expires_at=clock.now() - 10)
    before, files = store_path.read_bytes(), listing(store_path.parent)
    stall = Stall()
    server.script(sca.TOKEN_PATH, stall)
    started = time.monotonic()
    try:
        result = cli("--url", server.base, "--timeout", timeout, command)
    finally:
        stall.release.set()
    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed < 1.5, elapsed  # the longer of the two, not the shorter
    lost_answer_line(result, server.base)
    assert result.out == ""
    assert store_path.read_bytes() == before
    assert listing(store_path.parent) - {"tokens.json.lock"} == files  # no temp file left behind
    assert server.refreshes() == 1


def trickled(body, every):
    """A canned answer: headers at once, then ``body`` one byte every ``every``
    seconds (each read succeeds; only a bound on the whole answer stops it)."""
    stop = threading.Event()

    def answer(handler):
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for byte in body:
                if stop.wait(every):
                    return
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
        except OSError:
            pass

    answer.stop = stop
    return answer


def test_failure_trickling_answer_is_bounded_by_refresh_wait(cli, server, store_path, clock, monkeypatch):
    # A refresh answer trickling in for ~2 s: neither --timeout (0.1 s) nor a
    # socket read ends the wait, REFRESH_WAIT (patched to 0.3 s) does.
    monkeypatch.setattr(sca, "REFRESH_WAIT", 0.3)
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    body = json.dumps({"access_token": "authelia_at_slow", "token_type": "Bearer", "expires_in": 60}).encode()
    answer = trickled(body, 0.03)
    server.script(sca.TOKEN_PATH, answer)
    started = time.monotonic()
    try:
        result = cli("--url", server.base, "--timeout", "0.1", "token")
    finally:
        answer.stop.set()
    assert 0.28 <= time.monotonic() - started < 1.5
    lost_answer_line(result, server.base)
    assert store_path.read_bytes() == before


def test_refresh_answer_slower_than_timeout_is_used(cli, server, store_path, clock, monkeypatch):
    # The other side of the same rule: an answer that takes longer than
    # --timeout but arrives within REFRESH_WAIT is used and stored.
    monkeypatch.setattr(sca, "REFRESH_WAIT", 3.0)
    old = log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    body = json.dumps({"access_token": "authelia_at_slow", "token_type": "Bearer", "expires_in": 60,
                       "refresh_token": "authelia_rt_slow"}).encode()
    server.script(sca.TOKEN_PATH, trickled(body, 0.002))  # ~0.25 s in all
    started = time.monotonic()
    result = cli("--url", server.base, "--timeout", "0.1", "token")
    assert time.monotonic() - started >= 0.15
    assert result.code == 0, result
    assert result.out == "authelia_at_slow\n"
    entry = stored(store_path, server.base)
    assert (entry["access_token"], entry["refresh_token"]) == ("authelia_at_slow", "authelia_rt_slow")
    assert old["refresh_token"] not in store_path.read_text()


def test_refresh_answer_after_timeout_is_used_as_a_subprocess(live_server, store_path):
    # Issue 11: "--timeout expiring after the server accepted the refresh" lost
    # the session in v1. The real CLI, the real clock, REFRESH_WAIT as shipped
    # (30 s): the server takes 1 s, --timeout is 0.3 s, the answer is used.
    old = log_in(live_server, store_path, time.time(), expires_at=time.time() - 10)
    live_server.refresh_delay = 1.0
    started = time.monotonic()
    result = run_cli("--url", live_server.base, "--timeout", "0.3", "token")
    assert time.monotonic() - started >= 1.0
    assert result.code == 0, result
    entry = stored(store_path, live_server.base)
    assert result.out == entry["access_token"] + "\n" and result.err == ""
    assert live_server.refreshes() == 1
    assert entry["refresh_token"] != old["refresh_token"]
    assert live_server.refresh_tokens[entry["refresh_token"]]["active"]  # the session lives on
    assert live_server.token_ok(entry["access_token"])
    live_server.refresh_delay = 0.0
    again = run_cli("--url", live_server.base, "--timeout", "0.3", "token")
    assert again.code == 0 and again.out == result.out, again  # no second refresh needed
    assert live_server.refreshes() == 1


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
        sca._refresh_tokens(transport(), server.base, tokens["refresh_token"])
    else:
        server.script(sca.TOKEN_PATH, (400, JSON, b'{"error": "invalid_grant", "error_description": "expired"}'))
    result = cli("--url", server.base, command)
    assert_one_error(result, 3)
    assert "login" in error_lines(result.err)[0]
    doc = json.loads(store_path.read_text())
    assert doc["servers"] == {OTHER: other}


# ==== reuse detection: the fake is faithful, and the client never reuses ====


def test_reuse_fake_server_kills_the_family_on_reuse(server, clock):
    http = transport()
    first = server.issue()
    second = sca._refresh_tokens(http, server.base, first["refresh_token"])
    assert isinstance(second, sca.Tokens) and second.refresh_token != first["refresh_token"]
    assert server.token_ok(second.access_token) and not server.token_ok(first["access_token"])
    with pytest.raises(sca.AuthError) as info:  # the rotated token again: theft
        sca._refresh_tokens(http, server.base, first["refresh_token"])
    assert info.value.error == "invalid_grant"
    assert not server.token_ok(second.access_token)  # the whole family is dead
    with pytest.raises(sca.AuthError) as info:
        sca._refresh_tokens(http, server.base, second.refresh_token)
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


def test_lock_default_wait_is_30_seconds():
    # The constant is what lock() reads at each wait (the next test patches it
    # and sees the message and the bound follow).
    assert sca.LOCK_TIMEOUT == 30


def test_lock_wait_is_bounded_and_ends_in_a_clear_error(cli, server, store_path, clock, monkeypatch):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    before = store_path.read_bytes()
    monkeypatch.setattr(sca, "LOCK_TIMEOUT", 0.2)
    holder = sca.TokenStore(str(store_path), sca._Console())
    with holder.lock():  # flock: a second open file description in this process must wait too
        started = time.monotonic()
        result = cli("--url", server.base, "token")
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert "lock" in line and "0.2 s" in line and str(store_path) + ".lock" in line, line
    assert server.requests == []
    assert store_path.read_bytes() == before


def test_lock_waiter_process_rereads_the_store_and_uses_the_new_token(live_server, store_path):
    # Another process (this one) holds the lock and refreshes; the waiting
    # process must use its result, not send its own (now rotated) token.
    old = log_in(live_server, store_path, time.time(), expires_at=time.time() - 10)
    store = sca.TokenStore(str(store_path), sca._Console())
    with store.lock():
        proc = popen_cli("--url", live_server.base, "token")
        time.sleep(0.25)  # the child starts, finds the token expired and waits
        new = sca._refresh_tokens(transport(), live_server.base, old["refresh_token"])
        servers = store.load()
        servers[live_server.base] = new
        store.save(servers)
    result = finish(proc)
    assert result.code == 0, result
    assert result.out == new.access_token + "\n"
    assert live_server.refreshes() == 1  # ours only
    assert live_server.token_ok(new.access_token)


# ==== the storm =============================================================

GATED = (  # the module loaded (from its cached bytecode) before the gate: after it, main() races at once
    "import os, sys, time\n"
    "gate = sys.argv[1]\n"
    "sys.argv = sys.argv[2:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n"
    "import standcloud_auth\n"
    "open('%s.ready.%d' % (gate, os.getpid()), 'w').close()\n"
    "while not os.path.exists(gate):\n"
    "    time.sleep(0.002)\n"
    "sys.exit(standcloud_auth.main(sys.argv[1:]))\n"
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
    deadline = time.monotonic() + 30
    while len([n for n in os.listdir(str(tmp_path)) if n.startswith("go.ready.")]) < count:  # all at the gate
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not reach the gate"
        time.sleep(0.01)
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
    assert server.base in result.err and error_lines(result.err) == []
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


def test_cmd_login_force_revokes_the_replaced_session_after_storing_the_new_one(cli, server, store_path, clock):
    # Issue 11 point 8: the session that --force replaces is revoked at the
    # server (best effort, as logout), once the new tokens are on disk.
    other = other_entry(clock.now())
    old = log_in(server, store_path, clock.now(), others={OTHER: other})
    server.interval, server.approve_after = 1, 1
    stored_then = []

    def revocation(handler):
        record = handler.fake.requests[-1]
        stored_then.append(stored(store_path, server.base)["access_token"])
        behave(handler, record)

    server.script(sca.REVOCATION_PATH, revocation, revocation)
    result = cli("--url", server.base, "login", "--force", "--no-qr", "--no-check")
    assert result.code == 0, result
    new = stored(store_path, server.base)
    assert [r["form"] for r in server.requests if r["path"] == sca.REVOCATION_PATH] == [
        {"client_id": sca.CLIENT_ID, "token": old["refresh_token"], "token_type_hint": "refresh_token"},
        {"client_id": sca.CLIENT_ID, "token": old["access_token"], "token_type_hint": "access_token"},
    ]
    paths = [r["path"] for r in server.requests]
    assert paths[-2:] == [sca.REVOCATION_PATH] * 2  # after the poll that brought the new tokens
    assert stored_then == [new["access_token"]] * 2  # which were stored by then
    assert not server.token_ok(old["access_token"]) and not server.refresh_tokens[old["refresh_token"]]["active"]
    assert server.token_ok(new["access_token"]) and server.refresh_tokens[new["refresh_token"]]["active"]
    assert stored(store_path, OTHER) == other  # another server's session is not touched
    assert error_lines(result.err) == [] and "warning" not in result.err


def test_cmd_login_force_revocation_failure_is_a_warning(cli, server, store_path, clock):
    old = log_in(server, store_path, clock.now())
    server.interval, server.approve_after = 1, 1
    server.script(sca.REVOCATION_PATH, (500, {}, b""), (503, {"Content-Type": "text/html"}, b"<html>down</html>"))
    result = cli("--url", server.base, "login", "--force", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert error_lines(result.err) == []
    assert len([x for x in result.err.splitlines() if x.startswith("standcloud-auth: warning:")]) == 2
    new = stored(store_path, server.base)
    assert new["access_token"] != old["access_token"] and server.token_ok(new["access_token"])
    assert server.count(sca.REVOCATION_PATH) == 2


def test_cmd_login_with_a_dead_session_starts_a_new_flow(cli, server, store_path, clock):
    log_in(server, store_path, clock.now(), expires_at=clock.now() - 10)
    server.refresh_tokens.clear()  # invalid_grant
    server.interval, server.approve_after = 1, 1
    result = cli("--url", server.base, "login", "--no-qr", "--no-check")
    assert result.code == 0, result
    assert server.refreshes() == 1 and server.count(sca.DEVICE_PATH) == 1
    assert server.token_ok(stored(store_path, server.base)["access_token"])
    assert server.count(sca.REVOCATION_PATH) == 0  # the server had ended that session already


# ==== several servers =======================================================


@pytest.fixture
def two_more(clock):
    """Two more fake servers (other origins), on the fake clock."""
    fakes = [FakeStandCloud(clock).start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        fake.stop()


@pytest.fixture
def two_more_live():
    fakes = [FakeStandCloud().start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        fake.stop()


def log_in_everywhere(fakes, store_path, now):
    """One session per fake server in one store; returns each one's tokens."""
    issued = [fake.issue() for fake in fakes]
    write_store(store_path, {fake.base: entry_for(tokens, now) for fake, tokens in zip(fakes, issued)})
    return issued


def revocation_forms(tokens):
    return [{"client_id": sca.CLIENT_ID, "token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
            {"client_id": sca.CLIENT_ID, "token": tokens["access_token"], "token_type_hint": "access_token"}]


def test_cmd_logout_all_revokes_and_removes_every_server(cli, server, two_more, store_path, clock):
    fakes = [server] + two_more
    issued = log_in_everywhere(fakes, store_path, clock.now())
    result = cli("logout", "--all")
    assert result.code == 0 and result.out == "", result
    assert error_lines(result.err) == [] and "warning" not in result.err
    for fake, tokens in zip(fakes, issued):
        assert [r["form"] for r in fake.requests] == revocation_forms(tokens)
        assert not fake.token_ok(tokens["access_token"])
        assert fake.base in result.err
    assert json.loads(store_path.read_text())["servers"] == {}


def test_cmd_logout_all_no_revoke_sends_nothing(cli, server, two_more, store_path, clock):
    fakes = [server] + two_more
    issued = log_in_everywhere(fakes, store_path, clock.now())
    result = cli("logout", "--all", "--no-revoke")
    assert result.code == 0, result
    assert all(fake.requests == [] for fake in fakes)
    assert all(fake.token_ok(tokens["access_token"]) for fake, tokens in zip(fakes, issued))
    assert json.loads(store_path.read_text())["servers"] == {}


def test_cmd_logout_all_with_an_unreachable_server_still_removes_it(cli, server, store_path, clock):
    gone = "http://127.0.0.1:%d" % free_port()
    tokens = log_in(server, store_path, clock.now(), others={gone: entry_for(
        {"access_token": "gone_at", "refresh_token": "gone_rt"}, clock.now())})
    result = cli("--timeout", "1", "logout", "--all")
    assert result.code == 0, result
    assert error_lines(result.err) == [] and "warning" in result.err
    assert [r["form"] for r in server.requests] == revocation_forms(tokens)
    assert json.loads(store_path.read_text())["servers"] == {}


@pytest.mark.parametrize("state", ["no-folder", "empty"])
def test_cmd_logout_all_with_nothing_stored_writes_nothing(cli, store_path, tmp_path, state):
    if state == "empty":
        write_store(store_path, {})
    files = listing(tmp_path)
    result = cli("logout", "--all")
    assert result.code == 0 and error_lines(result.err) == [], result
    assert listing(tmp_path) == files


def test_cmd_logout_all_as_a_subprocess(live_server, two_more_live, store_path):
    fakes = [live_server] + two_more_live
    issued = log_in_everywhere(fakes, store_path, time.time())
    result = run_cli("logout", "--all")
    assert result.code == 0, result
    for fake, tokens in zip(fakes, issued):
        assert [r["form"] for r in fake.requests] == revocation_forms(tokens)
    assert json.loads(store_path.read_text())["servers"] == {}


@pytest.mark.parametrize("argv", [["token"], ["token", "--json"], ["refresh"], ["logout"], ["logout", "--no-revoke"]])
def test_several_servers_and_no_url_exit_2_naming_them(cli, server, store_path, clock, tmp_path, argv):
    log_in(server, store_path, clock.now(), others={OTHER: other_entry(clock.now())}, expires_at=clock.now() - 10)
    before, files = store_path.read_bytes(), listing(tmp_path)
    result = cli(*argv)
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert server.base in line and OTHER in line and "--url" in line, line
    assert result.out == "" and server.requests == []
    assert store_path.read_bytes() == before and listing(tmp_path) == files


def test_several_servers_and_no_url_as_a_subprocess(live_server, store_path, tmp_path):
    log_in(live_server, store_path, time.time(), others={OTHER: other_entry(time.time())})
    files = listing(tmp_path)
    result = run_cli("token")
    assert_one_error(result, 2)
    line = error_lines(result.err)[0]
    assert live_server.base in line and OTHER in line and "--url" in line, line
    assert live_server.requests == [] and listing(tmp_path) == files
    # STANDCLOUD_URL settles it, as --url does.
    result = run_cli("token", env={"STANDCLOUD_URL": live_server.base})
    assert result.code == 0 and result.out == stored(store_path, live_server.base)["access_token"] + "\n", result


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
    line = error_lines(result.err)[0]  # v2: the variable's token was refused; login would refuse to run
    assert "the token in STANDCLOUD_TOKEN was refused" in line and "login" not in line, line
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
