"""Seeded fuzz (issue 11 point 10): mutated token stores, and mutated server
answers at every endpoint, each case the real CLI in a fresh interpreter.

A case is an endpoint and a seed (``random.Random(seed)``; the seed is in the
test id: ``-k seed2017`` replays one). From the seed come a store or a server
answer -- byte flips, truncations, odd values put into fields (huge numbers,
1e999, NaN, lone surrogates, bidi overrides, control characters, deep
nesting, 1 MiB strings, our own tokens echoed), type swaps, dropped and
duplicated fields, another status, broken HTTP framing -- and a command.
The answers are served raw by the fake server's ``script()``, each case
under its own path prefix (its own base URL), so that cases run side by side.

Every case must hold the invariants: never exit 1, never a traceback,
exactly one ``standcloud-auth: error:`` line on failure (none on success),
nothing unshowable and no token or device code on stderr, and the store
byte for byte unchanged on failure (the contract's exceptions: invalid_grant
ends the session; logout removes the entry whatever the server says; login
keeps an unreadable store aside as tokens.json.corrupt-<time>, byte for
byte). Plus an oracle for stores: the module's own parser, in this process,
says whether the store is readable, and the CLI must agree.

Time: 84 cases, about 15 s of CPU per interpreter; the cases of a
run start together (a few at a time), on the first test of the module, and
each test then checks its own. More: ``SCA_FUZZ_CASES=500`` (cases per
endpoint); another series: ``SCA_FUZZ_SEED=7``.
"""

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

import standcloud_auth as sca
from conftest import MODULE, error_lines, isolation
from fakeserver import FakeStandCloud

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes in the invariants")

COUNTS = {"store": 28, "device": 10, "poll": 6, "refresh": 16, "revoke": 6, "health": 8, "api": 10}
ENDPOINTS = list(COUNTS)
try:
    PER_ENDPOINT = int(os.environ.get("SCA_FUZZ_CASES", "0"))
    SERIES = int(os.environ.get("SCA_FUZZ_SEED", "1"))
except ValueError:
    raise SystemExit("SCA_FUZZ_CASES and SCA_FUZZ_SEED take whole numbers") from None
WORKERS = max(4, 3 * (os.cpu_count() or 1))
CASE_TIMEOUT = 60  # seconds before a case counts as hung
WALL = 25  # seconds a case may take on a loaded machine (--timeout 5, no stalls are served)
OTHER = "https://other.example"
UNSHOWABLE = {"\x1b", "\x07", "\x9b", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
              "\u2069"}


def seeds(endpoint):
    count = PER_ENDPOINT or COUNTS[endpoint]
    first = SERIES * 100000 + (ENDPOINTS.index(endpoint) + 1) * 1000
    return [first + i for i in range(count)]


CASES = [pytest.param(endpoint, seed, id="%s-seed%d" % (endpoint, seed)) for endpoint in ENDPOINTS
         for seed in seeds(endpoint)]


# ==== odd values =============================================================
#
# JSON fragments, put in place of a field's value. "@SECRET@" becomes one of
# the client's secrets (a token, the device code): echoed back, it must never
# be printed.

ODD = [
    "null", "true", "false", "0", "-1", "-0.0", "0.5", "1e300", "-1e300", "1e999", "-1e999", "NaN", "Infinity",
    "-Infinity", "1" + "0" * 400, "9" * 5000, "1.7976931348623157e308", "3600", '"3600"', '""', '" "', '"\\ud800"',
    '"\\udfff\\ud800"', '"a\\ud800b"', '"\\u202eevil"', '"\\u2066x\\u2069"', '"\\u0000"', '"\\u001b[2J"',
    '"\\u009b31m"', '"a\\nb"', '"a\\r\\nstandcloud-auth: error: forged"', '"\\ud83d\\ude00"', '"\u00e9t\u00e9"',
    '"' + "x" * 20000 + '"', '"' + "y" * 1100 + '"', "[]", "{}", "[1, 2]", '{"a": {"b": null}}', "[" * 3000 + "]" * 3000,
    '"https://evil.example/x"', '"http://127.0.0.1:1/"', '"Bearer"', '"bearer"', '"mac"', '"@SECRET@"',
    '"prefix @SECRET@ suffix"', '"authorization_pending"', '"invalid_grant"', '"slow_down"', '"a b"', '"\\t"',
]
HUGE = '"' + "z" * (1024 * 1024) + '"'  # over an answer's 1 MiB cap


def fragment_of(value):
    return json.dumps(value)


def swap_type(rng, fragment):
    """The same value as another JSON type: "3600" for 3600, 3600 for "3600", [x] for x..."""
    try:
        value = json.loads(fragment)
    except (ValueError, RecursionError):
        return "null"
    if isinstance(value, bool) or value is None:
        return rng.choice(['"%s"' % fragment, "0", "1", "{}"])
    if isinstance(value, (int, float)):
        return rng.choice([json.dumps(str(value)), "[%s]" % fragment, "true"])
    if isinstance(value, str):
        return rng.choice(["[%s]" % fragment, '{"value": %s}' % fragment, "12345", "true"])
    return rng.choice(['"%s"' % type(value).__name__, "null", "1"])


def fill(text, rng, secrets):
    while "@SECRET@" in text:
        text = text.replace("@SECRET@", json.dumps(rng.choice(secrets))[1:-1], 1)
    return text


def obj_text(fields):
    """A JSON object from (key, fragment) pairs (duplicates kept, as a server may send them)."""
    return "{" + ", ".join("%s: %s" % (json.dumps(key), value) for key, value in fields) + "}"


def mutate_object(rng, template, secrets, ops=None):
    """A template dict, with 1-3 field mutations, as JSON text."""
    if not isinstance(template, dict):  # a JSON array, say: mutate its bytes
        return mutate_bytes(rng, json.dumps(template).encode())
    fields = [(key, fragment_of(value)) for key, value in template.items()]
    for _ in range(ops or rng.randint(1, 3)):
        op = rng.choice(["drop", "odd", "odd", "swap", "extra", "echo", "duplicate"])
        index = rng.randrange(len(fields)) if fields else None
        if index is None or op == "extra":
            name = rng.choice(["id_token", "iat", "error", "error_description", "x" * rng.randint(1, 300), "\u202e",
                               "", "access_token", "scope"])
            fields.insert(rng.randint(0, len(fields)), (name, rng.choice(ODD)))
        elif op == "drop":
            del fields[index]
        elif op == "odd":
            fields[index] = (fields[index][0], rng.choice(ODD))
        elif op == "swap":
            fields[index] = (fields[index][0], swap_type(rng, fields[index][1]))
        elif op == "echo":
            fields[index] = (fields[index][0], json.dumps(rng.choice(secrets) + rng.choice(["", " ", "\x1b[0m"])))
        elif op == "duplicate":
            fields.insert(rng.randint(0, len(fields)), (fields[index][0], rng.choice(ODD)))
    return fill(obj_text(fields), rng, secrets).encode("utf-8", "surrogatepass")


def mutate_bytes(rng, data):
    """A byte-level mutation: flips, a cut, an insertion, or a whole other body."""
    op = rng.choice(["flip", "flip", "cut", "cut", "insert", "replace"])
    data = bytearray(data)
    if op == "flip" and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "cut":
        data = data[:rng.randrange(len(data) + 1)]
    elif op == "insert":
        junk = rng.choice([b"\x00", b"\xff\xfe", b'"', b"\\", b",", b"}", b"]", b"\xed\xa0\x80", b"\xe2\x80\xae",
                           b"\x1b[2J", b"NaN", b"\n", bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))])
        at = rng.randint(0, len(data))
        data[at:at] = junk
    else:
        data = bytearray(rng.choice([
            b"", b" ", b"null", b"[]", b"{}", b"42", b'"string"', b"[" * 100000 + b"]" * 100000,
            b"<html><body>502 Bad Gateway</body></html>", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00",
            b'{"a": ' * 5000 + b"1" + b"}" * 5000, HUGE.encode(), b'{"access_token": "ab',
        ]))
    return bytes(data)


# ==== raw HTTP answers =======================================================

REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved", 302: "Found", 303: "See Other",
           307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 418: "Teapot", 429: "Too Many", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Unavailable", 599: "Odd", 100: "Continue", 299: "Odd", 0: "Zero"}


def compose(rng, status, body, base, path, mutate_http):
    """The bytes of an answer: a status line, headers and ``body``; with
    ``mutate_http``, odd statuses, headers and framing. Always Connection:
    close, and the connection is closed after it: no case stalls."""
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    framing = "length"
    if mutate_http:
        op = rng.choice(["status", "status", "type", "framing", "framing", "header", "location", "head-bytes"])
        if op == "status":
            status = rng.choice(sorted(REASONS))
        elif op == "type":
            headers[0] = ("Content-Type", rng.choice(["text/html", "application/json; charset=latin-1", "", "x/y"]))
        elif op == "framing":
            framing = rng.choice(["short", "long", "none", "chunked", "chunked-broken", "bad-length", "two-lengths"])
        elif op == "header":  # a line over http.client's 64 KiB, a control character, over 100 headers
            headers += rng.choice([[("X-Long", "v" * 70000)], [("X-Ctl", "a\x1bb")], [("WWW-Authenticate", "Bearer")],
                                   [("X-Many-%d" % i, "1") for i in range(120)]])
        if op == "location" or status in (301, 302, 303, 307, 308):
            headers.append(("Location", rng.choice([base + path, base + sca.API_PATH + "/y", "https://evil.example/x",
                                                    "/relative", "", "http://[::1", "\x1b[2J", base + path + "?loop=1"])))
    head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Odd"))] + ["%s: %s" % h for h in headers]
    payload = body
    if framing in ("length", "short", "long", "bad-length", "two-lengths"):
        length = {"length": len(body), "short": max(0, len(body) - rng.randint(1, 8)),
                  "long": len(body) + rng.randint(1, 100)}.get(framing)
        if framing == "bad-length":
            head.append("Content-Length: %s" % rng.choice(["-5", "12abc", "", "99999999999999999999", " 3"]))
        elif framing == "two-lengths":
            head += ["Content-Length: %d" % len(body), "Content-Length: %d" % (len(body) + 1)]
        else:
            head.append("Content-Length: %d" % length)
    elif framing in ("chunked", "chunked-broken"):
        head.append("Transfer-Encoding: chunked")
        size = max(1, len(body) // rng.randint(1, 4))
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        if framing == "chunked-broken":
            payload = mutate_bytes(rng, payload)
    head.append("Connection: close")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace")
    if mutate_http and rng.random() < 0.1:  # the status line or a header itself damaged
        raw = mutate_bytes(random.Random(rng.random()), raw[:-4]) + b"\r\n\r\n"
    return raw + payload


def serve(raw):
    """A script() callable that writes ``raw`` and hangs up."""

    def answer(handler):
        handler.close_connection = True
        try:
            handler.wfile.write(raw)
            handler.wfile.flush()
        except OSError:
            pass

    return answer


def answer_for(rng, template, base, path, secrets, status=200):
    """A mutated answer for an endpoint: the template's fields, its bytes
    or its HTTP, one or more of them. Returns (raw bytes, body bytes)."""
    layers = rng.choice([{"fields"}, {"fields"}, {"bytes"}, {"http"}, {"fields", "http"}, {"fields", "bytes"},
                         {"bytes", "http"}])
    body = mutate_object(rng, template, secrets) if "fields" in layers else \
        json.dumps(template).encode()
    if "bytes" in layers:
        body = mutate_bytes(rng, body)
    return compose(rng, status, body, base, path, "http" in layers), body


# ==== the endpoints ==========================================================


def token_answer(prefix):
    return {"access_token": prefix + "_at_" + "a1" * 16, "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": prefix + "_rt_" + "r2" * 16, "scope": sca.SCOPE}


DEVICE = {"device_code": "dc_fuzz_" + "d3" * 16, "user_code": "BCDFGHJK", "verification_uri": "https://v.example/device",
          "verification_uri_complete": "https://v.example/device?user_code=BCDFGHJK", "expires_in": 60, "interval": 1}


def oauth_error(error, description="described"):
    return {"error": error, "error_description": description}


def slow_device_answer(body):
    """Whether a device answer would make the login wait long: an interval
    over 2 s, or none (5 s). Right behaviour, but not for a fuzz run."""
    try:
        obj = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict):
        return False
    interval = obj.get("interval", 5)
    return not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval != interval or interval > 2


class Case(object):
    """One fuzz case: what it writes and scripts, the command, and afterwards its outcome."""

    def __init__(self, endpoint, seed, fuzz):
        self.endpoint, self.seed, self.rng = endpoint, seed, random.Random(seed)
        self.folder = os.path.join(fuzz.root, "seed%d" % seed)
        self.store = os.path.join(self.folder, "store", "tokens.json")
        self.base = fuzz.server.base + "/f%d" % seed  # its own paths on the shared server
        self.server, self.secrets, self.bodies = fuzz.server, [], []
        self.argv, self.before, self.parses = None, None, None
        os.makedirs(os.path.dirname(self.store), mode=0o700)
        os.makedirs(os.path.join(self.folder, "home"))
        getattr(self, "_build_" + endpoint)()
        if self.rng.random() < 0.2:
            self.argv = ["-v"] + self.argv  # the per-request lines must be safe too

    # -- building ----------------------------------------------------------
    def _write_store(self, servers):
        data = json.dumps({"version": 1, "servers": servers}).encode()
        self._write_bytes(data)

    def _write_bytes(self, data):
        fd = os.open(self.store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        self.before = data

    def _session(self, base, expired=False, prefix=None):
        if prefix is None:  # the fake server's own tokens (its real refresh and API)
            tokens = self.server.issue()
        else:
            tokens = {"access_token": prefix + "_old_at_" + "o4" * 16, "refresh_token": prefix + "_old_rt_" + "o5" * 16}
        now = time.time()
        entry = {"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"], "token_type": "Bearer",
                 "expires_at": now - 100 if expired else now + 3600, "scope": sca.SCOPE, "updated_at": now - 3600}
        self.secrets += [tokens["access_token"], tokens["refresh_token"]]
        return entry

    def _other(self):
        return {"access_token": "other_at_" + "q6" * 16, "refresh_token": "other_rt_" + "q7" * 16, "token_type": "Bearer",
                "expires_at": time.time() + 3600, "scope": sca.SCOPE, "updated_at": time.time()}

    def _script(self, path, *raws):
        self.server.script(self.base[len(self.server.base):] + path, *[serve(raw) for raw in raws])

    def _build_store(self):
        rng, base = self.rng, self.server.base
        entries = [(OTHER, fragment_of(self._other())),
                   (base, fragment_of(self._session(base, expired=rng.random() < 0.3)))]
        op = rng.choice(["entry", "entry", "entry", "key", "top", "bytes", "bytes", "both"])
        if op in ("entry", "both"):
            index = rng.randrange(2)
            entries[index] = (entries[index][0], mutate_object(rng, json.loads(entries[index][1]), self.secrets).decode(
                "utf-8", "surrogatepass"))
        text = '{"version": 1, "servers": %s}' % obj_text(entries)
        if op == "key":
            odd = rng.choice(["not a url", "", "https://A.example", "https://a.example:443", "https://a.example/",
                              "http://[127.0.0.1]", "a.example", "https://a.example/\u202e", "https://\ud800.example",
                              base + "/", base.upper(), "https://[::1", "https://host:\u00b2", "ftp://a.example"])
            text = text.replace(json.dumps(OTHER), json.dumps(odd), 1)
        if op == "top":
            text = rng.choice([
                text.replace('"version": 1', '"version": %s' % rng.choice(ODD), 1),
                text.replace('"servers": {', '"servers": [{', 1).rstrip("}") + "}]}",
                text[:-1] + ', "extra": %s}' % rng.choice(ODD),
                text.replace('{"version": 1', '{"version": 1, "version": %s' % rng.choice(["1", "2", '"1"']), 1),
                "\ufeff" + text, text + "\n" + " " * rng.randint(0, 5) + rng.choice(["", "x", "{}", "\x00"]),
                text.replace('"version": 1', '"version": 1.0', 1),
                text + " " * (4 * 1024 * 1024),
            ])
        data = text.encode("utf-8", "surrogatepass")
        if op in ("bytes", "both"):
            data = mutate_bytes(rng, data)
        self._write_bytes(data)
        try:
            sca._parse_store(data, self.store)  # the oracle: the module's parser, in this process
            self.parses = True
        except sca.StoreCorrupt:
            self.parses = False
        command = rng.choice([["token"], ["token", "--json"], ["status"], ["status", "--json"], ["refresh"], ["logout"],
                              ["api", "/x"], ["healthcheck"], ["login", "--no-qr", "--no-check"],
                              ["token", "--min-valid", "7200"]])
        self.argv = (["--url", base] if command[0] != "status" else []) + command

    def _build_device(self):
        rng = self.rng
        self._write_store({OTHER: self._other()})
        # The device code is not yet the client's secret here: it is in this very answer (and a
        # server that makes it the user_code has it shown). Echoes of it are just text.
        echoes = [DEVICE["device_code"]]
        for _ in range(20):  # no interval that makes the login wait long
            raw, body = answer_for(rng, DEVICE if rng.random() < 0.8 else oauth_error(
                rng.choice(["invalid_client", "invalid_scope", "invalid_request"])), self.base, sca.DEVICE_PATH,
                echoes, status=200)
            if not slow_device_answer(body):
                break
        else:
            raw = compose(rng, 200, b"{", self.base, sca.DEVICE_PATH, False)
        self._script(sca.DEVICE_PATH, raw)
        self.bodies.append(json.dumps(token_answer("poll")).encode())
        self._script(sca.TOKEN_PATH, compose(rng, 200, self.bodies[0], self.base, sca.TOKEN_PATH, False))
        self.argv = ["--url", self.base, "--timeout", "5", "login", "--no-qr", "--no-check"]

    def _build_poll(self):
        rng = self.rng
        self._write_store({OTHER: self._other()})
        self.secrets.append(DEVICE["device_code"])
        self._script(sca.DEVICE_PATH, compose(rng, 200, json.dumps(DEVICE).encode(), self.base, sca.DEVICE_PATH, False))
        template, status = rng.choice([
            (token_answer("poll"), 200), (token_answer("poll"), 200), (oauth_error("authorization_pending"), 400),
            (oauth_error("access_denied"), 403), (oauth_error("expired_token"), 400),
            (oauth_error("server_error", "Misconfigured code"), 500), ({}, 400)])
        raw, body = answer_for(rng, template, self.base, sca.TOKEN_PATH, self.secrets, status)
        self.bodies.append(body)
        ends = compose(rng, 400, json.dumps(oauth_error("expired_token")).encode(), self.base, sca.TOKEN_PATH, False)
        self._script(sca.TOKEN_PATH, raw, ends, ends)
        self.argv = ["--url", self.base, "--timeout", "5", "login", "--no-qr", "--no-check"]

    def _build_refresh(self):
        rng = self.rng
        self._write_store({OTHER: self._other(), self.base: self._session(self.base, expired=True, prefix="refresh")})
        template, status = rng.choice([
            (token_answer("new"), 200), (token_answer("new"), 200), (token_answer("new"), 200),
            (dict(token_answer("new"), refresh_token=None), 200), ({"access_token": "new_at_" + "n8" * 16}, 200),
            (oauth_error("invalid_grant", "token reuse detected"), 400), (oauth_error("invalid_request"), 400),
            (oauth_error("server_error"), 500), ({}, 400), ({}, 401)])
        raw, body = answer_for(rng, template, self.base, sca.TOKEN_PATH, self.secrets, status)
        self.bodies.append(body)
        self._script(sca.TOKEN_PATH, raw)
        command = rng.choice([["refresh"], ["token"], ["token", "--json"], ["api", "/x"]])
        if command[0] == "api":
            self._script(sca.API_PATH + "/x", compose(rng, 200, b'{"ok": true}', self.base, sca.API_PATH, False))
        self.argv = ["--url", self.base, "--timeout", "5"] + command

    def _build_revoke(self):
        rng = self.rng
        self._write_store({OTHER: self._other(), self.base: self._session(self.base, prefix="revoke")})
        raws = []
        for _ in range(2):  # the refresh token, then the access token
            template, status = rng.choice([({}, 200), ({}, 200), (oauth_error("invalid_request"), 400),
                                           (oauth_error("unsupported_token_type"), 400), ({}, 503)])
            raws.append(answer_for(rng, template, self.base, sca.REVOCATION_PATH, self.secrets, status)[0])
        self._script(sca.REVOCATION_PATH, *raws)
        self.argv = ["--url", self.base, "--timeout", "5", "logout"]

    def _build_api(self, health=False):
        rng = self.rng
        self._write_store({OTHER: self._other(), self.base: self._session(self.base, prefix="api")})
        path = sca.API_PATH + (sca.HEALTHCHECK_PATH if health else "/x")
        answers = []
        for _ in range(2):  # the first, and the one retry after a 401
            template, status = rng.choice([({"status": "ok"}, 200), ({"ok": True}, 200), ({"ok": True}, 201),
                                           ({"detail": "Not authenticated"}, 401), ({"detail": "forbidden"}, 403),
                                           ({"detail": "no"}, 500), ([], 200)])
            answers.append(answer_for(rng, template, self.base, path, self.secrets, status)[0])
        self._script(path, *answers)
        self.bodies.append(json.dumps(token_answer("api")).encode())
        self._script(sca.TOKEN_PATH, compose(rng, 200, self.bodies[0], self.base, sca.TOKEN_PATH, False))
        command = ["healthcheck"] if health else rng.choice([["api", "/x"], ["api", "/x", "-d", '{"report": 1}'],
                                                              ["api", "-X", "PUT", "/x", "-d", "a=b"]])
        self.argv = ["--url", self.base, "--timeout", "5"] + command + (["--json"] if health and rng.random() < 0.5 else [])

    def _build_health(self):
        self._build_api(health=True)

    # -- running -----------------------------------------------------------
    def environment(self, fuzz):
        # A module-scoped fixture runs before isolated_env: isolate the process here.
        env = dict(os.environ)
        for name, value in isolation(os.path.join(self.folder, "home")).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        env["STANDCLOUD_TOKEN_FILE"] = self.store
        return env

    def run(self, fuzz):
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, MODULE] + self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.environment(fuzz), cwd=self.folder)
        try:
            out, err = proc.communicate(timeout=CASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.code = "hung"
        else:
            self.code = proc.returncode
        self.elapsed, self.raw_out, self.raw_err = time.monotonic() - started, out, err
        self.out, self.err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        self.after = self._read(self.store)
        self.kept = [self._read(os.path.join(os.path.dirname(self.store), name))
                     for name in sorted(os.listdir(os.path.dirname(self.store))) if ".corrupt-" in name]
        self.leftovers = [name for name in os.listdir(os.path.dirname(self.store)) if name.endswith(".tmp")]
        return self

    @staticmethod
    def _read(path):
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError:
            return None

    def __repr__(self):
        return "<fuzz case %s seed %d: %s\n  exit %s in %.1f s\n  stdout %r\n  stderr %r\n  store before %r\n  after %r>" % (
            self.endpoint, self.seed, " ".join(self.argv), self.code, self.elapsed, self.raw_out[:600],
            self.raw_err[:1500], (self.before or b"")[:600], (self.after or b"")[:600])


class Fuzz(object):
    """The shared fake server, and every selected case, run together on first use."""

    def __init__(self, root, selected):
        self.root, self.selected, self.cases = root, selected, None
        self.server = FakeStandCloud().start()
        self.server.interval, self.server.approve_after = 1, 1  # a login against its own behaviour: one poll

    def case(self, endpoint, seed):
        if self.cases is None:
            self.cases, built = {}, []
            for key in self.selected:
                try:
                    built.append(Case(key[0], key[1], self))
                except Exception as exc:  # a bug of this file: that case fails, the others run
                    self.cases[key] = exc
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                self.cases.update({(c.endpoint, c.seed): c for c in pool.map(lambda c: c.run(self), built)})
        case = self.cases[(endpoint, seed)]
        if isinstance(case, Exception):
            raise case
        return case


@pytest.fixture(scope="module")
def fuzz(request, tmp_path_factory):
    selected = [(item.callspec.params["endpoint"], item.callspec.params["seed"]) for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "seed" in item.callspec.params]
    runner = Fuzz(str(tmp_path_factory.mktemp("fuzz")), selected)
    yield runner
    runner.server.stop()
    shutil.rmtree(runner.root, ignore_errors=True)


# ==== the invariants =========================================================


def check_common(case):
    assert case.code != "hung", case
    assert case.elapsed < WALL, case
    assert case.code != 1, case
    assert case.code in (0, 2, 3, 4, 5), case
    assert b"Traceback" not in case.raw_err + case.raw_out, case
    errors = error_lines(case.err)
    assert len(errors) == (0 if case.code == 0 else 1), case
    assert not (UNSHOWABLE & set(case.err)), case
    assert not [c for c in case.err if ord(c) < 32 and c != "\n"], case  # no tty here: not even login's countdown
    for secret in case.secrets:
        assert secret not in case.err, (secret, case)
    assert case.leftovers == [], case  # no temporary store left behind


def stored(data):
    return json.loads(data.decode("utf-8"))["servers"] if data is not None else None


def entries(data):
    """A store's entries as the module reads them (unknown fields dropped)."""
    return {url: tokens.entry() for url, tokens in sca._parse_store(data, "store").items()}


def check_store_case(case):
    command = [a for a in case.argv if not a.startswith("-") and not a.startswith("http")][0]
    base = case.server.base
    if case.parses is False and command != "login":
        # The module's own parser refused it in this process: the CLI must say so.
        assert case.code == 2 and "is unreadable" in case.err, case
    if case.parses and case.code == 2:
        assert "is unreadable" not in case.err, case  # the fresh interpreter disagrees with this one
    if case.after is not None and case.after != case.before:
        entries(case.after)  # whatever was written reads back
    if command == "login":
        # An unreadable store is kept aside byte for byte, then a new login; a readable one is never moved.
        assert case.kept == ([case.before] if case.parses is False else []), case
        if case.code != 0:
            assert case.after == case.before or case.kept == [case.before], case
        return
    if case.code == 3 and "the session has ended" in case.err:
        # invalid_grant (the mutation changed the refresh token): only this server's entry goes.
        expected = entries(case.before)
        del expected[base]
        assert entries(case.after) == expected, case
    elif case.code != 0:
        assert case.after == case.before, case
    elif command == "token" and "--json" not in case.argv:
        assert case.out.endswith("\n") and entries(case.after)[base]["access_token"] == case.out[:-1], case


def check_login_case(case):
    if case.code != 0:
        assert case.after == case.before, case
        return
    servers = stored(case.after)
    assert servers[OTHER] == stored(case.before)[OTHER], case
    new = servers[case.base]
    assert new["access_token"].encode() in case.bodies[-1] or new["access_token"].encode() in b"".join(case.bodies), case
    assert "Logged in to %s" % case.base in case.err, case


def check_refresh_case(case):
    before, after = stored(case.before), case.after
    if case.code != 0:
        if case.code == 3 and "the session has ended" in case.err:  # invalid_grant: only this entry goes
            assert stored(after) == {OTHER: before[OTHER]}, case
        else:
            assert after == case.before, case
        return
    servers = stored(after)
    assert servers[OTHER] == before[OTHER], case
    new, old = servers[case.base], before[case.base]
    assert new["access_token"].encode() in case.bodies[0], case  # from the answer, not invented
    assert new["refresh_token"] and (new["refresh_token"] == old["refresh_token"] or
                                     new["refresh_token"].encode() in case.bodies[0]), case  # never lost
    sca._parse_store(after, case.store)  # and it reads back
    if case.argv[-1] == "token":
        assert case.out == new["access_token"] + "\n", case


def check_revoke_case(case):
    # Best effort: the entry is gone whatever the server said, exit 0, at most a warning per token.
    assert case.code == 0, case
    assert stored(case.after) == {OTHER: stored(case.before)[OTHER]}, case
    assert len([line for line in case.err.splitlines() if "warning" in line]) <= 2, case


def check_api_case(case):
    before = stored(case.before)
    if case.after == case.before:
        return
    # Only the 401 retry may change the store: the refresh answer's tokens, the other entry intact.
    servers = stored(case.after)
    assert servers[OTHER] == before[OTHER], case
    assert servers[case.base]["access_token"] == token_answer("api")["access_token"], case


CHECKS = {"store": check_store_case, "device": check_login_case, "poll": check_login_case, "refresh": check_refresh_case,
          "revoke": check_revoke_case, "health": check_api_case, "api": check_api_case}


@pytest.mark.parametrize("endpoint, seed", CASES)
def test_fuzz(fuzz, endpoint, seed):
    case = fuzz.case(endpoint, seed)
    check_common(case)
    if endpoint != "store":  # a server's answer is never a usage or configuration error
        assert case.code != 2, case
    CHECKS[endpoint](case)
    if endpoint != "api":  # api passes the server's body through, as is
        assert not (UNSHOWABLE & set(case.out)), case


def test_fuzz_cases_are_the_same_every_run(tmp_path):
    # A seed must replay its case: the same bytes from the same seed.
    def answer(seed):
        rng = random.Random(seed)
        return answer_for(rng, token_answer("x"), "http://h", sca.TOKEN_PATH, ["secret_0123456789"])

    assert answer(5) == answer(5) and answer(5) != answer(6)
    assert len({answer(s)[0] for s in range(40)}) > 30  # and they differ from seed to seed
