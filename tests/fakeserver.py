"""An Authelia-like fake StandCloud over real sockets, standard library only.

Used by the tests (through conftest.py) and by bench.py. It behaves as
SERVER-NOTES.md describes Authelia:

- device flow: ``slow_down`` (400) to a poll that comes less than one
  interval after the previous one, and the timer restarts on every poll;
  ``authorization_pending`` (400) even after the code has expired;
  ``access_denied`` with HTTP 403; a device code used twice gives
  ``server_error`` (500);
- refresh: single-use refresh tokens; a refresh revokes the previous access
  token at once; presenting a rotated refresh token again revokes the whole
  token family (``invalid_grant``);
- revocation of either token ends the whole session; 200 for unknown tokens;
- the API accepts only a live access token (401 with WWW-Authenticate).

``server.script(path, *responses)`` queues canned answers for a path, served
before the behaviour above: each is ``(status, headers, body)`` or a callable
``f(handler)`` that writes its own answer (stalls, trickles, redirects).
"""

import json
import os
import random
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import standcloud_auth as sca  # noqa: E402

CONSENT_PATH = "/consent/openid/device-authorization"  # Authelia's verification page
_PAGE = (b"<!doctype html><title>Fake StandCloud</title><form method=post>"
         b"<p>Code <input name=user_code value='%s'></p>"
         b"<button name=decision value=allow>Allow</button> "
         b"<button name=decision value=deny>Deny</button></form><p>%s</p>")


class FakeClock(object):
    """Monotonic and wall clocks that only move when something sleeps."""

    def __init__(self):
        self.mono = 1000.0
        self.wall_offset = 1764400000.0 - 1000.0
        self.sleeps = []
        self.on_sleep = None  # called after each sleep, e.g. to approve

    def monotonic(self):
        return self.mono

    def now(self):
        return self.mono + self.wall_offset

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.mono += max(0.0, seconds)
        if self.on_sleep is not None:
            self.on_sleep(self)

    def advance(self, seconds):
        self.mono += seconds


def _token(prefix):
    return prefix + "".join(random.choice(string.ascii_letters + string.digits) for _ in range(32))


class FakeStandCloud(object):
    def __init__(self, clock=None):
        self.clock = clock.monotonic if clock is not None else time.monotonic
        self.requests = []  # dicts: method, path, headers, form, body
        self.scripts = {}
        self.lock = threading.Lock()
        self.interval = 5
        self.expires_in = 600
        self.access_ttl = 3600
        self.rotate = True
        self.devices = {}  # device_code -> state dict
        self.refresh_tokens = {}  # token -> {"family", "active"}
        self.access_tokens = {}  # token -> {"family", "active", "expires"}
        self.approve_after = None  # approve automatically at this poll number
        self.refresh_delay = 0.0  # real seconds a refresh takes (storms)
        self.slow_downs = 0  # slow_down answers sent
        self.httpd = None
        self.base = None

    # -- lifecycle ----------------------------------------------------------
    def start(self, ssl_context=None, port=0):
        server = self

        class Handler(_Handler):
            fake = server

        self.httpd = _ThreadingServer(("127.0.0.1", port), Handler)
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if ssl_context is not None else "http"
        self.base = "%s://127.0.0.1:%d" % (scheme, self.httpd.server_address[1])
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01})
        thread.daemon = True
        thread.start()
        self.thread = thread
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    # -- scripting and inspection -------------------------------------------
    def script(self, path, *responses):
        self.scripts.setdefault(path, []).extend(responses)

    def count(self, path, **form):
        return len([r for r in self.requests if r["path"] == path and all(r["form"].get(k) == v for k, v in form.items())])

    def refreshes(self):
        return self.count(sca.TOKEN_PATH, grant_type="refresh_token")

    def polls(self):
        return self.count(sca.TOKEN_PATH, grant_type=sca.DEVICE_GRANT)

    def approve(self, user_code=None, deny=False):
        with self.lock:
            for state in self.devices.values():
                if user_code is None or state["user_code"] == user_code:
                    state["status"] = "denied" if deny else "approved"

    def issue(self, family=None):
        """Mint a live token pair (as if a login had happened)."""
        with self.lock:
            return self._issue(family or _token("fam_"))

    def _issue(self, family):
        access, refresh = _token("authelia_at_"), _token("authelia_rt_")
        self.access_tokens[access] = {"family": family, "active": True, "expires": self.clock() + self.access_ttl}
        self.refresh_tokens[refresh] = {"family": family, "active": True}
        body = {"access_token": access, "token_type": "bearer", "expires_in": self.access_ttl,
                "scope": sca.SCOPE, "refresh_token": refresh}
        return body

    def _revoke_family(self, family):
        for table in (self.access_tokens, self.refresh_tokens):
            for state in table.values():
                if state["family"] == family:
                    state["active"] = False

    def token_ok(self, token):
        state = self.access_tokens.get(token)
        return bool(state and state["active"] and state["expires"] > self.clock())


# -- canned answers for script(): misbehaving servers --------------------------


def stall(seconds=1.0, partial=None):
    """Say nothing for ``seconds`` -- before the headers, or (``partial``
    bytes given) after the headers and those first bytes of the body."""

    def answer(handler):
        handler.close_connection = True
        try:
            if partial is not None:
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(partial) + 100))
                handler.end_headers()
                handler.wfile.write(partial)
                handler.wfile.flush()
            time.sleep(seconds)
        except OSError:
            pass

    return answer


def trickle(count=100, every=0.05, prefix=b""):
    """Headers at once, then one byte every ``every`` seconds: each socket
    read succeeds, only a bound on the whole request stops the client."""

    def answer(handler):
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(prefix) + count))
        handler.end_headers()
        try:
            handler.wfile.write(prefix)
            for _ in range(count):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(every)
        except OSError:
            pass

    return answer


def chunked(chunks=20, size=65536):
    """A chunked JSON body of ``chunks`` x ``size`` bytes and no
    Content-Length (1.25 MiB by default): the 1 MiB cap must hold while
    reading, not only when a length is announced."""

    def answer(handler):
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            handler.wfile.write(b'2\r\n["\r\n')
            for _ in range(chunks):
                handler.wfile.write(b"%x\r\n%s\r\n" % (size, b"a" * size))
            handler.wfile.write(b'2\r\n"]\r\n0\r\n\r\n')
        except OSError:
            pass

    return answer


class _ThreadingServer(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # clients that hang up are normal here
        pass


def _oauth_error(error, status=400, description=""):
    body = {"error": error, "error_description": description or error}
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store"}, json.dumps(body).encode()


def _ok(obj, status=200):
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store"}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    fake = None  # type: FakeStandCloud
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        form = {}
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            form = {k: v[0] for k, v in parse_qs(body.decode("ascii", "replace")).items()}
        record = {"method": self.command, "path": path, "headers": dict(self.headers.items()),
                  "form": form, "body": body, "target": self.path}
        fake = self.fake
        with fake.lock:
            fake.requests.append(record)
            queue = fake.scripts.get(path)
            canned = queue.pop(0) if queue else None
        if callable(canned):
            canned(self)
            return
        if canned is None:
            canned = self._behave(path, form)
        self.send(*canned)

    def send(self, status, headers, body):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _behave(self, path, form):
        fake = self.fake
        if path == CONSENT_PATH:
            return self._consent(form)
        if path == sca.DEVICE_PATH and self.command == "POST":
            return self._device(form)
        if path == sca.TOKEN_PATH and self.command == "POST":
            if form.get("grant_type") == sca.DEVICE_GRANT:
                return self._poll(form)
            if form.get("grant_type") == "refresh_token":
                return self._refresh(form)
            return _oauth_error("unsupported_grant_type")
        if path == sca.REVOCATION_PATH and self.command == "POST":
            with fake.lock:
                token = form.get("token", "")
                state = fake.refresh_tokens.get(token) or fake.access_tokens.get(token)
                if state:
                    fake._revoke_family(state["family"])
            return 200, {}, b""
        if path.startswith(sca.API_PATH):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not fake.token_ok(auth[7:]):
                return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"', "Content-Type": "text/plain"}, b"unauthorized"
            if path == sca.API_PATH + sca.HEALTHCHECK_PATH:
                return _ok({"status": "ok"})
            return _ok({"ok": True, "method": self.command, "bytes": len(self.fake.requests[-1]["body"])})
        return 404, {"Content-Type": "text/html"}, b"<html>not found</html>"

    def _device(self, form):
        fake = self.fake
        if form.get("client_id") != sca.CLIENT_ID:
            return _oauth_error("invalid_client", 401)
        device_code = _token("authelia_dc_")
        user_code = "".join(random.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
        with fake.lock:
            fake.devices[device_code] = {"user_code": user_code, "status": "pending", "last": fake.clock(),
                                         "expires": fake.clock() + fake.expires_in, "polls": 0}
        page = "http://127.0.0.1:%d%s" % (self.server.server_address[1], CONSENT_PATH)
        return _ok({"device_code": device_code, "user_code": user_code, "verification_uri": page,
                    "verification_uri_complete": page + "?user_code=" + user_code,
                    "expires_in": fake.expires_in - 1, "interval": fake.interval})

    def _poll(self, form):
        fake = self.fake
        with fake.lock:
            state = fake.devices.get(form.get("device_code", ""))
            if state is None:
                return _oauth_error("invalid_grant", 400, "unknown device code")
            if state["status"] == "used":
                return _oauth_error("server_error", 500, "Misconfigured code")
            now = fake.clock()
            early = state["last"] + fake.interval > now
            state["last"] = now  # Authelia restarts its timer even on slow_down
            if early:
                fake.slow_downs += 1
                return _oauth_error("slow_down")
            state["polls"] += 1
            if fake.approve_after is not None and state["polls"] >= fake.approve_after and state["status"] == "pending":
                state["status"] = "approved"
            if state["status"] == "pending":
                return _oauth_error("authorization_pending")
            if state["status"] == "denied":
                return _oauth_error("access_denied", 403)
            if now > state["expires"]:
                return _oauth_error("expired_token")
            state["status"] = "used"
            return _ok(fake._issue(_token("fam_")))

    def _refresh(self, form):
        fake = self.fake
        if fake.refresh_delay:
            time.sleep(fake.refresh_delay)
        with fake.lock:
            token = form.get("refresh_token", "")
            state = fake.refresh_tokens.get(token)
            if state is None:
                return _oauth_error("invalid_grant", 400, "not found")
            if not state["active"]:
                fake._revoke_family(state["family"])  # reuse: the whole family dies
                return _oauth_error("invalid_grant", 400, "token reuse detected")
            family = state["family"]
            if not fake.rotate:
                for at in fake.access_tokens.values():
                    if at["family"] == family:
                        at["active"] = False
                body = fake._issue(family)
                del fake.refresh_tokens[body.pop("refresh_token")]
                return _ok(body)
            fake._revoke_family(family)  # rotation: old refresh and access tokens die
            return _ok(fake._issue(family))

    def _consent(self, form):
        """The person's side, for trying the CLI by hand: a form that
        approves or denies a user code."""
        query = parse_qs(urlsplit(self.path).query)
        code = form.get("user_code") or (query.get("user_code") or [""])[0]
        code = code.replace("-", "").upper()
        note = b""
        if self.command == "POST":
            known = any(state["user_code"] == code for state in self.fake.devices.values())
            self.fake.approve(code, deny=form.get("decision") == "deny")
            note = (b"Done: " + form.get("decision", "").encode("ascii", "replace")) if known else b"Unknown code."
        safe = "".join(c for c in code if c.isalnum()).encode("ascii", "replace")
        return 200, {"Content-Type": "text/html; charset=utf-8"}, _PAGE % (safe, note)


def main(argv=None):
    """Run the fake StandCloud by hand: ``python fakeserver.py [--port N]``."""
    import argparse

    parser = argparse.ArgumentParser(description="A fake StandCloud for trying standcloud-auth by hand.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--interval", type=int, default=2, help="device-flow poll interval in seconds")
    parser.add_argument("--approve-after", type=int, metavar="POLLS",
                        help="approve every login by itself at this poll (default: approve in the browser)")
    args = parser.parse_args(argv)
    fake = FakeStandCloud()
    fake.interval, fake.approve_after = args.interval, args.approve_after
    fake.start(port=args.port)
    print("Fake StandCloud at %s (Ctrl-C stops it)" % fake.base, flush=True)
    print("Log in:  python standcloud_auth.py --url %s login" % fake.base, flush=True)
    print("Approve: open the address it shows in a browser and press Allow", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
