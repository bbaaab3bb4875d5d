"""An Authelia-like fake StandCloud over real sockets, standard library only.

Used by the tests (through conftest.py) and by bench.py, and runnable by hand
to try the CLI without an account (see main(); from the repository root:
``python tests/fakeserver.py --port 8765``). It answers as Authelia does
(as measured on Authelia 4.39.20 configured like StandCloud, where that
differs from what its source suggests):

- device authorization: 200 with the RFC 8628 fields; refused (empty form,
  unknown client, a scope or -- when ``audiences`` is set -- an audience that
  is not allowed) with 400/401 and an OAuth error body, or with the body
  ``{}`` (no ``error`` at all, as the real Authelia 4.39.20) when
  ``empty_device_errors`` is true;
- device flow: ``slow_down`` (400) to a poll that comes less than one
  interval after the previous one, and the timer restarts on every poll (the
  library's rule; the running server never sends it); ``authorization_pending``
  (400) even after the code has expired;
- a Deny (``approve(deny=True)``, the Deny button, ``deny_after``): with
  ``deny_style="authelia"`` (the default) the next poll of that code and
  every later one get 500 ``server_error`` "... Misconfigured code ...", as
  the real server answers; with ``deny_style="rfc"`` they get
  ``access_denied`` with ``denied_status`` (403, the library's; 400 is the
  RFC's);
- a device code already redeemed, or unknown: 500 ``server_error``, the same
  body;
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
import shlex
import shutil
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
DENY_STYLES = ("authelia", "rfc")
# What Authelia 4.39.20 answers a poll of a denied, redeemed or unknown device
# code (fosite's server_error text and its "Misconfigured code" hint).
MISCONFIGURED = ("The authorization server encountered an unexpected condition that prevented it from "
                 "fulfilling the request. Misconfigured code lead to an error that prohibited the OAuth 2.0 "
                 "Framework from processing this request.")
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
    def __init__(self, clock=None, deny_style="authelia", empty_device_errors=False):
        self.clock = clock.monotonic if clock is not None else time.monotonic
        self.deny_style = deny_style  # "authelia": a Deny is 500 server_error; "rfc": access_denied
        self.denied_status = 403  # the HTTP status of access_denied with deny_style="rfc"
        self.empty_device_errors = empty_device_errors  # device-authorization errors: body {}
        self.audiences = None  # audiences the device authorization accepts (None: any)
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
        self.deny_after = None  # deny automatically at this poll number
        self.notify = None  # called with a line of text on each login event (main() prints them)
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

    @property
    def deny_style(self):
        return self._deny_style

    @deny_style.setter
    def deny_style(self, style):
        if style not in DENY_STYLES:
            raise ValueError("deny_style must be one of %s, not %r" % (", ".join(DENY_STYLES), style))
        self._deny_style = style

    def _tell(self, text):
        if self.notify is not None:
            self.notify(text)

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
        """Approve (or deny) the pending login with this user code, or every
        pending one; returns how many it decided (a decision is final)."""
        decided = 0
        with self.lock:
            for state in self.devices.values():
                if (user_code is None or state["user_code"] == user_code) and state["status"] == "pending":
                    state["status"] = "denied" if deny else "approved"
                    decided += 1
                    self._tell("%s %s" % ("denied" if deny else "approved", state["user_code"]))
        return decided

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


def _server_error():
    """Authelia's answer to a poll of a denied, redeemed or unknown device code."""
    return _oauth_error("server_error", 500, MISCONFIGURED)


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
        refusal = None
        scopes = form.get("scope", "").split()
        if not form:
            refusal = ("invalid_request", 400, "The request is missing a required parameter.")
        elif form.get("client_id") != sca.CLIENT_ID:
            refusal = ("invalid_client", 401, "Client authentication failed (e.g., unknown client).")
        elif any(scope not in sca.SCOPE.split() for scope in scopes):
            refusal = ("invalid_scope", 400, "The requested scope is invalid, unknown, or malformed.")
        elif fake.audiences is not None and form.get("audience") not in fake.audiences:
            refusal = ("invalid_target", 400, "The requested audience is not allowed for this client.")
        if refusal is not None:
            if fake.empty_device_errors:  # Authelia 4.39.20: the status, and the body {}
                return refusal[1], {"Content-Type": "application/json", "Cache-Control": "no-store"}, b"{}"
            return _oauth_error(*refusal)
        device_code = _token("authelia_dc_")
        user_code = "".join(random.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
        with fake.lock:
            fake.devices[device_code] = {"user_code": user_code, "status": "pending", "last": fake.clock(),
                                         "expires": fake.clock() + fake.expires_in, "polls": 0}
        page = "http://127.0.0.1:%d%s" % (self.server.server_address[1], CONSENT_PATH)
        fake._tell("login started: user code %s-%s, page %s?user_code=%s"
                   % (user_code[:4], user_code[4:], page, user_code))
        return _ok({"device_code": device_code, "user_code": user_code, "verification_uri": page,
                    "verification_uri_complete": page + "?user_code=" + user_code,
                    "expires_in": fake.expires_in - 1, "interval": fake.interval})

    def _poll(self, form):
        fake = self.fake
        with fake.lock:
            state = fake.devices.get(form.get("device_code", ""))
            authelia = fake.deny_style == "authelia"
            if state is None or state["status"] == "used" or (authelia and state["status"] == "denied"):
                # Unknown, redeemed, or (Authelia) denied: 500 on this poll and every later one.
                if state is not None:
                    fake._tell("poll of %s (%s): 500 server_error" % (state["user_code"], state["status"]))
                return _server_error()
            now = fake.clock()
            early = state["last"] + fake.interval > now
            state["last"] = now  # Authelia restarts its timer even on slow_down
            if early:
                fake.slow_downs += 1
                return _oauth_error("slow_down")
            state["polls"] += 1
            if state["status"] == "pending":
                for after, status in ((fake.deny_after, "denied"), (fake.approve_after, "approved")):
                    if after is not None and state["polls"] >= after:
                        state["status"] = status
                        fake._tell("%s %s (poll %d)" % (status, state["user_code"], state["polls"]))
                        break
            if state["status"] == "pending":
                return _oauth_error("authorization_pending")
            if state["status"] == "denied":
                if authelia:
                    fake._tell("poll of %s (denied): 500 server_error" % state["user_code"])
                    return _server_error()
                return _oauth_error("access_denied", fake.denied_status, "The resource owner denied the request.")
            if now > state["expires"]:
                return _oauth_error("expired_token")
            state["status"] = "used"
            fake._tell("tokens issued for %s" % state["user_code"])
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
            deny = form.get("decision") == "deny"
            if code and self.fake.approve(code, deny=deny):
                note = b"Done: deny. The station's next poll is refused." if deny else \
                    b"Done: allow. The station signs in at its next poll."
            else:
                note = b"Unknown code, or this login was already decided."
        safe = "".join(c for c in code if c.isalnum()).encode("ascii", "replace")
        return 200, {"Content-Type": "text/html; charset=utf-8"}, _PAGE % (safe, note)


def _command(*words):
    """A shell command line for the person to copy (POSIX or Windows quoting)."""
    if os.name == "nt":
        return " ".join('"%s"' % w if " " in w else w for w in words)
    return " ".join(shlex.quote(w) for w in words)


def _cli_command(base, command):
    """How to run the CLI from the current folder: python standcloud_auth.py --url B <command>."""
    module = os.path.abspath(sca.__file__)
    if module.endswith((".pyc", ".pyo")):
        module = module[:-1]
    try:
        relative = os.path.relpath(module)
    except ValueError:  # Windows: another drive
        relative = module
    if not relative.startswith(os.pardir) or relative == os.path.join(os.pardir, os.path.basename(module)):
        module = relative  # from the repository root, or from tests/
    python = "python" if shutil.which("python") else "python3" if shutil.which("python3") else sys.executable
    return _command(python, module, "--url", base, *command.split())


def main(argv=None):
    """Run the fake StandCloud by hand, to try the CLI without an account.

    From the repository root: ``python tests/fakeserver.py --port 8765``; it
    prints the command to run next and one line per login event."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fakeserver.py",
        description="An Authelia-like fake StandCloud on 127.0.0.1 for trying standcloud-auth by hand "
                    "(standard library only; everything lives in memory).",
        epilog="Approve a login on the page its address opens (Allow or Deny), or let the server decide "
               "by itself with --approve-after or --deny-after.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--interval", type=int, default=2, metavar="SECONDS",
                        help="the poll interval the server asks for (default: 2; Authelia's is 10)")
    decide = parser.add_mutually_exclusive_group()
    decide.add_argument("--approve-after", type=int, metavar="POLLS",
                        help="approve every login by itself at its POLLS-th poll (about POLLS x interval "
                             "seconds after it starts); default: approve on the page")
    decide.add_argument("--deny-after", type=int, metavar="POLLS",
                        help="deny every login by itself at its POLLS-th poll")
    parser.add_argument("--deny-style", choices=DENY_STYLES, default="authelia",
                        help="how polls of a denied code are answered: authelia (default): 500 server_error "
                             "on that poll and every later one, as the real server; rfc: 403 access_denied")
    parser.add_argument("--empty-device-errors", action="store_true",
                        help="answer a refused device authorization with the body {} (no error name), "
                             "as the real server does")
    args = parser.parse_args(argv)
    for name in ("approve_after", "deny_after"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error("--%s takes a poll number from 1" % name.replace("_", "-"))
    if args.interval < 1:
        parser.error("--interval takes whole seconds from 1")
    fake = FakeStandCloud(deny_style=args.deny_style, empty_device_errors=args.empty_device_errors)
    fake.interval, fake.approve_after, fake.deny_after = args.interval, args.approve_after, args.deny_after
    fake.notify = lambda text: print("  [%s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)
    try:
        fake.start(port=args.port)
    except OSError as e:
        sys.stderr.write("fakeserver.py: error: cannot listen on 127.0.0.1:%d: %s\n" % (args.port, e))
        return 1
    if args.approve_after:
        decision = "by itself: each login is approved at its poll %d (--approve-after)" % args.approve_after
    elif args.deny_after:
        decision = "by itself: each login is denied at its poll %d (--deny-after)" % args.deny_after
    else:
        decision = "open the address the login shows (a page of this server) and press Allow or Deny"
    deny = ("the next poll and every later one get 500 server_error, as Authelia" if args.deny_style == "authelia"
            else "polls get %d access_denied (--deny-style rfc)" % fake.denied_status)
    lines = [
        "Fake StandCloud (Authelia-like) at %s; Ctrl-C stops it." % fake.base,
        "",
        "Next, in another terminal in this folder, run:",
        "",
        "    " + _cli_command(fake.base, "login"),
        "",
        "Approval: " + decision + ".",
        "A Deny: " + deny + ".",
        "Afterwards try: " + _cli_command(fake.base, "token") + "   (also healthcheck, status, logout)",
        "",
        "Login events:",
    ]
    print("\n".join(lines), flush=True)
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
