"""The hardening table: every hostile answer the contract lists ("Responses
the client must survive"), from every endpoint, and every broken token store
for every command ("Token store").

Each row runs the command line in-process against the fake StandCloud (fake
clock, so polling is instant) and asserts the exit code, exactly one
``standcloud-auth: error:`` line (none when the command must succeed), no
traceback, a bounded wall time, what reached stdout, and the store file:
byte-for-byte unchanged unless the contract says it changes (a login stores
tokens, a logout removes the entry, a 401 refreshes). A store that really
cannot be read runs the CLI as a subprocess without the right to read it
(see ``unprivileged()``, also used by test_inputs.py).

v2 changes the rows at the refresh endpoint: an answer lost once the refresh
was sent (stall, trickle, hang-up) is awaited REFRESH_WAIT and then reported
as lost, "the server may already have rotated the session" (exit 4).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, entry_for, error_lines, write_store
from fakeserver import chunked, stall, trickle

TIMEOUT = "0.3"  # --timeout for every row: a stall must end in about this
WALL = 3.0  # seconds a row may take, whatever the server does
MIB = 1024 * 1024
OTHER = "https://other.example"  # a second server in every store: never touched

JSON = {"Content-Type": "application/json"}
HTML = {"Content-Type": "text/html"}


# -- fixtures -----------------------------------------------------------------
#
# Over 350 rows: starting and stopping a fake server per row costs more than
# the rows themselves (its shutdown waits out a 10 ms poll). So one server
# runs per module and every test gets a fresh FakeStandCloud state behind it,
# on a fake clock patched onto the module's seams as conftest's `clock` does.


def warning_lines(err):
    return [line for line in err.splitlines() if line.startswith("standcloud-auth: warning:")]


# -- hostile answers ----------------------------------------------------------
#
# Each is a canned answer for FakeStandCloud.script(): (status, headers, body)
# or a callable that writes its own (stalls, trickles, broken connections).


def _dumps(obj):
    return json.dumps(obj).encode()


DEVICE_OK = {"device_code": "dc_hostile", "user_code": "BCDFGHJK", "verification_uri": "https://v.example/device",
             "verification_uri_complete": "https://v.example/device?user_code=BCDFGHJK",
             "expires_in": 600, "interval": 1}
TOKEN_OK = {"access_token": "at_hostile", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt_hostile"}


_DROP = object()  # a field value meaning "leave the field out"


def _changed(template, changes):
    obj = dict(template)
    for name, value in changes.items():
        if value is _DROP:
            del obj[name]
        else:
            obj[name] = value
    return obj


def device_body(**changes):
    return _changed(DEVICE_OK, changes)


def token_body(**changes):
    return _changed(TOKEN_OK, changes)


def literal(template, name, raw):
    """A JSON text whose field ``name`` is the raw literal ``raw`` (1e999)."""
    marker = "__literal__"
    return json.dumps(dict(template, **{name: marker})).replace('"%s"' % marker, raw).encode()


def closed(handler):
    # Reads the request and hangs up without a word.
    handler.close_connection = True
    try:
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def garbage(handler):
    # Bytes that are not HTTP at all, then a hang-up.
    handler.close_connection = True
    try:
        handler.wfile.write(b"\x00\x16\x03\x01garbage, not HTTP at all\r\n\r\n")
        handler.wfile.flush()
    except OSError:
        pass


BIG_BODY = b'{"x": "' + b"a" * MIB + b'"}'
DEEP_BODY = b"[" * 100000 + b"]" * 100000  # valid JSON, 100000 levels deep
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><hr>nginx</body></html>"


def hostile(name, kind, base, path):
    """The answer ``name`` for an endpoint of ``kind`` ("device" or "token")
    at ``base + path`` (redirects need them)."""
    port = int(base.rsplit(":", 1)[1])
    other_origin = "http://localhost:%d/other-origin" % port  # same socket, another origin
    fields = device_body if kind == "device" else token_body
    template = DEVICE_OK if kind == "device" else TOKEN_OK
    code_field = "device_code" if kind == "device" else "access_token"
    answers = {
        "not_json": (200, JSON, b"this is not JSON"),
        "json_array": (200, JSON, b'[{"access_token": "a"}]'),
        "json_string": (200, JSON, b'"at_in_a_string"'),
        "json_number": (200, JSON, b"42"),
        "json_null": (200, JSON, b"null"),
        "wrong_type_code": (200, JSON, _dumps(fields(**{code_field: 7}))),
        "wrong_type_expires_in": (200, JSON, _dumps(fields(expires_in="3600"))),
        "wrong_type_bool": (200, JSON, _dumps(fields(expires_in=True))),
        "missing_code": (200, JSON, _dumps(fields(**{code_field: _DROP}))),
        "token_type_mac": (200, JSON, _dumps(token_body(token_type="mac"))),
        "expires_negative": (200, JSON, _dumps(fields(expires_in=-5))),
        "expires_inf": (200, JSON, literal(template, "expires_in", "1e999")),
        "expires_absurd": (200, JSON, _dumps(fields(expires_in=1e300))),
        "interval_negative": (200, JSON, _dumps(device_body(interval=-1))),
        "interval_inf": (200, JSON, literal(DEVICE_OK, "interval", "1e999")),
        "interval_absurd": (200, JSON, _dumps(device_body(interval=1e9))),
        "html_502": (502, HTML, HTML_PAGE),
        "html_200": (200, HTML, HTML_PAGE),
        "empty_200": (200, JSON, b""),
        "empty_400": (400, JSON, b""),
        "empty_401": (401, JSON, b""),
        "big_length": (200, JSON, BIG_BODY),
        "big_chunked": chunked(),
        "deep_nesting": (200, JSON, DEEP_BODY),
        "stall": stall(1.0),
        "trickle": trickle(180, 0.05, prefix=b'{"access_token": "'),
        "redirect_same": (302, {"Location": base + sca.API_PATH + "/redirected"}, b""),
        "redirect_other": (302, {"Location": other_origin}, b""),
        "redirect_loop": (302, {"Location": base + path}, b""),  # to itself
        "closed": closed,
        "garbage": garbage,
    }
    return answers[name]


# -- the table ----------------------------------------------------------------
#
# One row per hostile answer, one column per endpoint (and the command that
# reaches it). A cell is what the command must do:
#
#   5, 4, 3   that exit code, one error line, the store unchanged
#   "ok"      exit 0, no error line; login: the tokens stored (the poll was
#             retried: contract, "a network failure or a 5xx while polling is
#             not fatal"); api/healthcheck: the store unchanged
#   "401"     api/healthcheck: the one retry refreshes (the store changes to
#             the new tokens), the second 401 ends it: exit 3
#   "W"       logout: exit 0 with one warning (revocation is best effort)
#   "-"       logout: exit 0, no warning (RFC 7009 §2.2: a 200 is success,
#             whatever its body)
#   None      not applicable to this endpoint
#
# device = device authorization (login), poll = token poll (login),
# token/refresh = refresh grant (`token` with an expired stored token,
# `refresh`), logout = revocation, health = API/healthcheck, api = `api /x`.

ENDPOINTS = ("device", "poll", "token", "refresh", "logout", "health", "api")

TABLE = [
    # answer                 device poll  token refresh logout health api
    ("not_json",              (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("json_array",            (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("json_string",           (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("json_number",           (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("json_null",             (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("wrong_type_code",       (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("wrong_type_expires_in", (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("wrong_type_bool",       (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("missing_code",          (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("token_type_mac",        (None, 5,    5,    5,      "-",   "ok",  "ok")),
    ("expires_negative",      (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("expires_inf",           (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("expires_absurd",        (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("interval_negative",     (5,    None, None, None,   None,  None,  None)),
    ("interval_inf",          (5,    None, None, None,   None,  None,  None)),
    ("interval_absurd",       (5,    None, None, None,   None,  None,  None)),
    ("html_502",              (5,    "ok", 5,    5,      "W",   5,     5)),
    ("html_200",              (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("empty_200",             (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("empty_400",             (5,    3,    3,    3,      "W",   5,     5)),
    ("empty_401",             (5,    3,    3,    3,      "W",   "401", "401")),
    ("big_length",            (5,    5,    5,    5,      "W",   5,     5)),
    ("big_chunked",           (5,    5,    5,    5,      "W",   5,     5)),
    ("deep_nesting",          (5,    5,    5,    5,      "-",   "ok",  "ok")),
    ("stall",                 (4,    "ok", 4,    4,      "W",   4,     4)),
    ("trickle",               (4,    "ok", 4,    4,      "W",   4,     4)),
    ("redirect_same",         (5,    5,    5,    5,      "W",   "ok",  "ok")),
    ("redirect_other",        (5,    5,    5,    5,      "W",   5,     5)),
    ("redirect_loop",         (None, None, None, None,   None,  5,     5)),
    ("closed",                (4,    "ok", 4,    4,      "W",   4,     4)),
    ("garbage",               (5,    5,    5,    5,      "W",   5,     5)),
]

ROWS = [pytest.param(endpoint, answer, cells[i], id="%s-%s" % (endpoint, answer))
        for answer, cells in TABLE for i, endpoint in enumerate(ENDPOINTS) if cells[i] is not None]

# What the error line must mention, when the answer has something to say.
NEEDLES = {
    "big_length": "1 MiB", "big_chunked": "1 MiB", "stall": "timed out", "trickle": "timed out",
    "redirect_same": "redirect", "redirect_other": "redirect",
}

# v2 (contract, Token store): once a refresh is sent, its answer is awaited
# REFRESH_WAIT (max with --timeout); an answer that is lost -- a stall, a
# trickle cut off at the deadline, a hang-up -- may have rotated the session,
# and the message must say so instead of "try again later". The rows patch
# REFRESH_WAIT down to --timeout, so that they stay fast.
REFRESH_ENDPOINTS = ("token", "refresh")
LOST = ("stall", "trickle", "closed")


def _check_lost_refresh(line, base):
    assert "the answer to the refresh sent to %s%s was lost" % (base, sca.TOKEN_PATH) in line, line
    assert "the server may already have rotated the session" in line, line
    assert "run 'standcloud-auth --url %s token' again" % base in line, line
    assert "if it then says the session has ended, run 'standcloud-auth --url %s login'" % base in line, line
    assert "try again later" not in line and "timed out" not in line, line


def _path_of(endpoint):
    return {
        "device": sca.DEVICE_PATH, "poll": sca.TOKEN_PATH, "token": sca.TOKEN_PATH, "refresh": sca.TOKEN_PATH,
        "logout": sca.REVOCATION_PATH, "health": sca.API_PATH + sca.HEALTHCHECK_PATH, "api": sca.API_PATH + "/x",
    }[endpoint]


def _argv(endpoint, base):
    command = {
        "device": ["login", "--no-qr", "--no-check"], "poll": ["login", "--no-qr", "--no-check"],
        "token": ["token"], "refresh": ["refresh"], "logout": ["logout"],
        "health": ["healthcheck"], "api": ["api", "/x"],
    }[endpoint]
    return ["--url", base, "--timeout", TIMEOUT] + command


def _prepare_store(endpoint, server, store_path, clock):
    """The store before the row: another server always; a session for B
    (expired where the row must refresh) except for a login."""
    other = entry_for({"access_token": "at_other", "refresh_token": "rt_other"}, clock.now())
    servers = {OTHER: other}
    secrets = []
    if endpoint not in ("device", "poll"):
        tokens = server.issue()
        expired = endpoint == "token"
        servers[server.base] = entry_for(tokens, clock.now(),
                                         expires_at=clock.now() - 10 if expired else clock.now() + 3600)
        secrets = [tokens["access_token"], tokens["refresh_token"]]
    write_store(store_path, servers)
    return other, secrets


@pytest.mark.parametrize("endpoint, answer, expect", ROWS)
def test_hostile_answer(cli, server, store_path, clock, monkeypatch, endpoint, answer, expect):
    monkeypatch.setattr(sca, "REFRESH_WAIT", float(TIMEOUT))  # 30 s in use: see REFRESH_ENDPOINTS
    server.interval = 1  # contract: the poll waits `interval`; fake clock, so instant
    server.approve_after = 1  # a poll after a retried failure is approved
    other, secrets = _prepare_store(endpoint, server, store_path, clock)
    before = store_path.read_bytes()
    canned = hostile(answer, "device" if endpoint == "device" else "token", server.base, _path_of(endpoint))
    times = 2 if expect == "401" else sca.MAX_REDIRECTS + 1 if answer == "redirect_loop" else 1
    server.script(_path_of(endpoint), *([canned] * times))

    started = time.monotonic()
    result = cli(*_argv(endpoint, server.base))
    elapsed = time.monotonic() - started

    assert elapsed < WALL, result
    if answer in ("stall", "trickle"):
        # Contract: "--timeout bounds the whole request, not each socket read";
        # the trickle would take 9 s, the stall 1 s.
        assert elapsed < 5 * float(TIMEOUT), (elapsed, result)
    assert "Traceback" not in result.err + result.out, result
    for secret in secrets + ["dc_hostile"]:
        assert secret not in result.err, result
    # Contract: "Authorization, a refresh token or a device code never reach
    # an origin other than B's" -- the other origin here is the same socket.
    assert server.count("/other-origin") == 0
    errors, warnings = error_lines(result.err), warning_lines(result.err)
    after = json.loads(store_path.read_text()) if store_path.exists() else None

    if expect in ("W", "-"):  # logout: best effort, the entry is removed whatever
        assert result.code == 0, result
        assert errors == [], result
        assert len(warnings) == (1 if expect == "W" else 0), result
        assert after["servers"] == {OTHER: other}
        return
    if expect == "ok":
        assert result.code == 0, result
        assert errors == [] and warnings == [], result
        if endpoint == "poll":
            assert set(after["servers"]) == {OTHER, server.base} and after["servers"][OTHER] == other
            assert after["servers"][server.base]["access_token"].startswith("authelia_at_")
        else:
            assert store_path.read_bytes() == before
        if endpoint == "health":
            assert result.out == "ok\n", result
        elif endpoint == "api" and answer != "redirect_same":
            assert result.out.encode("utf-8") == canned[2], result  # the body as is
        return

    code = 3 if expect == "401" else expect
    assert result.code == code, result
    assert len(errors) == 1, result
    assert warnings == [], result
    if endpoint in REFRESH_ENDPOINTS and answer in LOST:
        _check_lost_refresh(errors[0], server.base)
    elif answer in NEEDLES:
        assert NEEDLES[answer] in errors[0], result
    if endpoint in REFRESH_ENDPOINTS and answer == "garbage":
        # v2: an answer that came, but is not HTTP, is still a server error (5), not a lost one.
        assert "did not answer with valid HTTP" in errors[0] and "was lost" not in errors[0], result
    if answer in ("empty_400", "empty_401") and endpoint in ("poll", "token", "refresh"):
        # Contract: "exit 3, with the HTTP status in the message, and the store unchanged".
        assert answer[-3:] in errors[0], result
    if answer in ("empty_400", "empty_401") and endpoint == "device":
        # v2: a refusal without an OAuth error body (Authelia's {} or nothing) is exit 5, with the status.
        assert "the server refused to start a login (HTTP %s from %s%s)" % (answer[-3:], server.base, sca.DEVICE_PATH) \
            in errors[0], result
    if expect == "401":
        # The one retry refreshed (rotation) and stored the new tokens; never a second retry.
        assert server.count(_path_of(endpoint)) == 2 and server.refreshes() == 1
        entry = after["servers"][server.base]
        assert entry["access_token"] not in secrets and entry["refresh_token"] not in secrets
        assert after["servers"][OTHER] == other
    else:
        assert store_path.read_bytes() == before
    _check_stdout(endpoint, answer, code, result, canned)


def _check_stdout(endpoint, answer, code, result, canned):
    """stdout carries only what was asked for: the api body as is, else nothing."""
    if endpoint != "api" or not isinstance(canned, tuple) or canned[0] == 302 or answer.startswith("big"):
        assert result.out == "", result
        return
    assert result.out == canned[2].decode("utf-8"), result


def test_hostile_api_bodies_pass_through_to_stdout(cli, server, store_path, clock):
    # The table's "ok" cells for api: the body reaches stdout byte for byte.
    _prepare_store("api", server, store_path, clock)
    server.script(sca.API_PATH + "/x", (200, JSON, DEEP_BODY), (502, HTML, HTML_PAGE))
    first = cli(*_argv("api", server.base))
    assert first.code == 0 and first.out.encode() == DEEP_BODY
    second = cli(*_argv("api", server.base))
    assert second.code == 5 and second.out.encode() == HTML_PAGE and len(error_lines(second.err)) == 1


def test_hostile_table_covers_every_listed_answer_on_every_endpoint():
    # The contract's list, so that the table cannot silently lose a cell.
    not_applicable = {"token_type_mac": {"device"}, "redirect_loop": {"device", "poll", "token", "refresh", "logout"}}
    for name in ("interval_negative", "interval_inf", "interval_absurd"):
        not_applicable[name] = set(ENDPOINTS) - {"device"}
    for answer, cells in TABLE:
        for endpoint, cell in zip(ENDPOINTS, cells):
            assert (cell is None) == (endpoint in not_applicable.get(answer, ())), (answer, endpoint)


@pytest.mark.parametrize("endpoint, answer", [("token", "stall"), ("refresh", "trickle")])
def test_hostile_refresh_answer_is_awaited_refresh_wait_not_timeout(cli, server, store_path, clock, monkeypatch,
                                                                    endpoint, answer):
    # The table patches REFRESH_WAIT down to --timeout; here it is longer, as
    # in use (30 s against 10): the client waits it out, not just --timeout,
    # and then says that the answer was lost.
    wait = 2 * float(TIMEOUT)
    monkeypatch.setattr(sca, "REFRESH_WAIT", wait)
    _prepare_store(endpoint, server, store_path, clock)
    before = store_path.read_bytes()
    server.script(sca.TOKEN_PATH, stall(3 * wait) if answer == "stall" else trickle(180, 0.05, prefix=b'{"a": "'))
    started = time.monotonic()
    result = cli(*_argv(endpoint, server.base))
    elapsed = time.monotonic() - started
    assert wait - 0.05 <= elapsed < wait + 1.0, (elapsed, result)
    _assert_one_error(result, 4)
    line = error_lines(result.err)[0]
    _check_lost_refresh(line, server.base)
    # The reason must not say it gave up after --timeout: it waited REFRESH_WAIT.
    assert "no answer in %s s" % TIMEOUT not in line, line
    assert store_path.read_bytes() == before
    assert server.refreshes() == 1


# -- broken token stores, for every command ------------------------------------

COMMANDS = ("login", "token", "refresh", "status", "healthcheck", "logout", "api")

_VALID = {"access_token": "at", "refresh_token": "rt", "token_type": "Bearer", "expires_at": 1764403600.0,
          "scope": sca.SCOPE, "updated_at": 1764400000.0}


def _store_text(servers, version=1):
    return json.dumps({"version": version, "servers": servers}).encode()


def _entry(**changes):
    entry = dict(_VALID)
    entry.update(changes)
    return entry


BROKEN_STORES = [
    ("garbage", b"{not json at all"),
    ("binary", b"\x00\xff\xfe\x00garbage"),
    ("truncated", _store_text({"https://a.example": _VALID})[:60]),
    ("empty", b""),
    ("whitespace", b"  \n\t\n"),
    ("not_utf8", b'{"version": 1, "servers": {"https://\xff": {}}}'),
    ("nan", _store_text({"https://a.example": _VALID}).replace(b"1764403600.0", b"NaN")),
    ("schema_array", b"[]"),
    ("schema_null", b"null"),
    ("schema_no_version", b'{"servers": {}}'),
    ("schema_version_2", _store_text({}, version=2)),
    ("schema_version_string", b'{"version": "1", "servers": {}}'),
    ("schema_no_servers", b'{"version": 1}'),
    ("schema_servers_list", b'{"version": 1, "servers": []}'),
    ("schema_entry_string", _store_text({"https://a.example": "at"})),
    ("schema_entry_no_access_token", _store_text({"https://a.example": _entry(access_token=None)})),
    ("schema_access_token_number", _store_text({"https://a.example": _entry(access_token=5)})),
    ("schema_refresh_token_list", _store_text({"https://a.example": _entry(refresh_token=["rt"])})),
    ("schema_expires_at_string", _store_text({"https://a.example": _entry(expires_at="tomorrow")})),
    ("schema_expires_at_bool", _store_text({"https://a.example": _entry(expires_at=True)})),
    ("schema_expires_at_inf", _store_text({"https://a.example": _entry(expires_at=12345.5)}).replace(b"12345.5", b"1e999")),
]


def _command_argv(command, base):
    extra = {"login": ["--no-qr", "--no-check"], "api": ["/x"]}.get(command, [])
    return ["--url", base, "--timeout", TIMEOUT, command] + extra


def _assert_one_error(result, code):
    assert result.code == code, result
    assert len(error_lines(result.err)) == 1, result
    assert "Traceback" not in result.err + result.out, result


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("content", [pytest.param(c, id=name) for name, c in BROKEN_STORES])
def test_store_broken(cli, server, store_path, clock, command, content):
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(content)
    os.chmod(str(store_path), 0o600)
    server.interval, server.approve_after = 1, 1
    started = time.monotonic()
    result = cli(*_command_argv(command, server.base))
    assert time.monotonic() - started < WALL
    assert "Traceback" not in result.err + result.out, result
    if command == "login":
        # Contract: login "first keeps it as tokens.json.corrupt-<unix time> and says so".
        assert result.code == 0, result
        assert error_lines(result.err) == [], result
        kept = [p for p in store_path.parent.iterdir() if ".corrupt-" in p.name]
        assert len(kept) == 1, kept
        assert re.match(r"^tokens\.json\.corrupt-\d+$", kept[0].name)
        assert kept[0].read_bytes() == content
        assert kept[0].name in result.err
        assert list(json.loads(store_path.read_text())["servers"]) == [server.base]
        return
    _assert_one_error(result, 2)
    assert str(store_path) in error_lines(result.err)[0]
    assert result.out == ""
    assert store_path.read_bytes() == content
    assert [p.name for p in store_path.parent.iterdir() if ".corrupt-" in p.name] == []
    assert server.requests == []  # nothing is sent on a store we cannot read


def _live_store(server, store_path, clock, mode):
    tokens = server.issue()
    write_store(store_path, {server.base: entry_for(tokens, clock.now()),
                             OTHER: entry_for({"access_token": "at_other", "refresh_token": "rt_other"}, clock.now())},
                mode=mode)
    return tokens


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("command", COMMANDS)
def test_store_readable_by_others_warns_and_works(cli, server, store_path, clock, command):
    # Contract: "Looser permissions found on an existing file: a warning, and
    # they are tightened on the next write."
    _live_store(server, store_path, clock, 0o644)
    before = store_path.read_bytes()
    result = cli(*_command_argv(command, server.base))
    assert result.code == 0, result
    assert error_lines(result.err) == [], result
    warnings = warning_lines(result.err)
    assert len(warnings) == 1 and "644" in warnings[0] and str(store_path) in warnings[0], result
    assert "Traceback" not in result.err
    mode = os.stat(str(store_path)).st_mode & 0o777
    if command in ("refresh", "logout"):  # these write: the file is private again
        assert mode == 0o600
        assert store_path.read_bytes() != before
    else:
        assert mode == 0o644
        assert store_path.read_bytes() == before


@pytest.mark.parametrize("command", COMMANDS)
def test_store_unreadable_simulated_exit_2(cli, server, store_path, clock, command, monkeypatch):
    # The same as a 0000 file, in-process and whoever runs the tests: opening
    # the store fails with EACCES. v2 opens it with os.open (O_NONBLOCK, for a
    # FIFO), so that is what refuses; the builtin open() too, should it come back.
    _live_store(server, store_path, clock, 0o600)
    before = store_path.read_bytes()
    real_os_open, real_open, refused, active = os.open, open, [], [True]

    def denied(path):
        if active and os.path.abspath(os.fsdecode(path)) == str(store_path):
            refused.append(path)
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

    def denying_os_open(path, *args, **kwargs):
        denied(path)
        return real_os_open(path, *args, **kwargs)

    def denying_open(path, *args, **kwargs):
        if not isinstance(path, int):
            denied(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_os_open)
    monkeypatch.setattr(sca, "open", denying_open, raising=False)  # shadows the builtin in the module
    result = cli(*_command_argv(command, server.base))
    del active[:]  # the test's own reads below are not refused
    assert refused, "the store was never opened: the simulation missed"
    _check_unreadable(result, store_path, server)
    assert "Permission denied" in error_lines(result.err)[0]
    assert store_path.read_bytes() == before


# -- a store that really cannot be read: a real process, real permissions -----
#
# Root reads a 0000 file anyway (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH). Where
# the tests run as root, the CLI runs without those two capabilities (dropped
# from the bounding set before exec, so it stays uid 0 and its folder is still
# its own); failing that, as `nobody` in a folder of nobody's. Elsewhere it
# runs as the user, who cannot read a 0000 file.

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
_UNPRIVILEGED = {}


def _drop_dac_capabilities():  # preexec_fn: runs in the child, before exec
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)


def _as_nobody():
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def _probe(preexec, folder):
    """Whether a Python run with ``preexec`` is refused a 0000 file in ``folder``."""
    probe = os.path.join(folder, "probe")
    with open(probe, "w") as handle:
        handle.write("x")
    os.chmod(probe, 0)
    try:
        proc = subprocess.Popen([sys.executable, "-c", "open(%r).read()" % probe], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=preexec, cwd=folder)
        out, err = proc.communicate(timeout=30)
        return proc.returncode == 1 and b"PermissionError" in err
    except OSError:
        return False
    finally:
        os.unlink(probe)


def unprivileged():
    """(preexec_fn, folder owner uid or None) to run the CLI where a 0000 file
    is unreadable; pytest.skip with the reason where nothing works."""
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        return None, None
    if not _UNPRIVILEGED:
        import tempfile

        folder = tempfile.mkdtemp()
        try:
            os.chmod(folder, 0o777)  # nobody writes its probe's file here
            if sys.platform.startswith("linux") and _probe(_drop_dac_capabilities, folder):
                _UNPRIVILEGED["how"] = (_drop_dac_capabilities, None)
            elif _probe(_as_nobody, folder):
                import pwd

                _UNPRIVILEGED["how"] = (_as_nobody, pwd.getpwnam("nobody").pw_uid)
            else:
                _UNPRIVILEGED["how"] = None
        finally:
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)
    if _UNPRIVILEGED["how"] is None:
        pytest.skip("running as root, and neither dropping CAP_DAC_OVERRIDE nor running as nobody made a "
                    "0000 file unreadable (nobody may not reach this Python)")
    return _UNPRIVILEGED["how"]


class _Result(object):
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def __repr__(self):
        return "Result(code=%r, out=%r, err=%r)" % (self.code, self.out, self.err)


@pytest.mark.parametrize("command", COMMANDS)
def test_store_unreadable_exit_2(live_server, tmp_path, command):
    import shutil
    import tempfile

    preexec, owner = unprivileged()
    # nobody must reach the folder: not under pytest's private temporary folder
    top = tmp_path if owner is None else type(tmp_path)(tempfile.mkdtemp())
    store_path = top / "store" / "tokens.json"
    try:
        write_store(store_path, {live_server.base: entry_for(live_server.issue(), time.time())})
        before = store_path.read_bytes()
        os.chmod(str(store_path), 0o000)
        if owner is not None:
            os.chmod(str(top), 0o755)
            for path in (store_path.parent, store_path):
                os.chown(str(path), owner, -1)
        argv = [sys.executable, MODULE, "--store", str(store_path)] + _command_argv(command, live_server.base)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=preexec, cwd=str(top))
        result = _Result(proc.returncode, *proc.communicate(timeout=30))
        result.code = proc.returncode
        _check_unreadable(result, store_path, live_server)
        assert "cannot read the token store %s (Permission denied)" % store_path in result.err, result
        os.chmod(str(store_path), 0o600)
        assert store_path.read_bytes() == before
    finally:
        if owner is not None:
            shutil.rmtree(str(top), ignore_errors=True)


def _check_unreadable(result, store_path, server):
    # Unreadable is not corrupt: even login stops (exit 2) and keeps nothing aside.
    _assert_one_error(result, 2)
    assert str(store_path) in error_lines(result.err)[0]
    assert result.out == ""
    assert [p.name for p in store_path.parent.iterdir() if ".corrupt-" in p.name] == []
    assert server.requests == []
