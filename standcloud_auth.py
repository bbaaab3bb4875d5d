#!/usr/bin/env python3
"""Log a test station into StandCloud with the OAuth 2.0 device flow.

standcloud-auth runs the Device Authorization Grant (RFC 8628) against a StandCloud server, keeps the tokens in a
private file, refreshes them (one process at a time, with refresh-token rotation) and makes authenticated calls to the
StandCloud API. One file, CPython 3.6-3.13, standard library only: copy it onto a station, or vendor it into a
repository and import it.

Usage::

    python standcloud_auth.py --url company.standcloud.io login
    python standcloud_auth.py token                  # a valid access token
    python standcloud_auth.py api /test_report -d @report.json

Contents, in the order the data flows (``grep -n '^# ==== §'``):

    §1 imports, constants     §5 HTTP                  §9  QR code
    §2 errors, the console    §6 OAuth 2.0             §10 entry point
    §3 configuration          §7 StandCloudAuth
    §4 token store            §8 command line

MIT License

Copyright (c) 2026 the standcloud-auth authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

# ==== §1 imports, constants ==================================================
# Only cheap modules here: `token` must start fast (contract: Speed); argparse and the network stack where used.

import contextlib
import json
import os
import stat
import sys
import time

TYPE_CHECKING = False  # typing costs 10 ms at start on 3.6; type checkers take this as true
if TYPE_CHECKING:  # pragma: no cover
    from typing import IO, Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple  # noqa: F401 (type comments)

__version__ = "2.0.0"
__all__ = ["AuthError", "ConfigError", "DeviceFlow", "LoginRequired", "NetworkError", "Response", "ServerError",
           "StandCloudAuth", "StandCloudError", "StoreCorrupt", "TokenStore", "Tokens", "main"]

PROG = "standcloud-auth"
ISSUES = "https://github.com/everypinio/hardpy/issues"  # where a bug is reported
CLIENT_ID = "hardpy-report-uploader"
SCOPE = "offline_access authelia.bearer.authz"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
API_PATH = "/hardpy/api/v1"
DEVICE_PATH = "/auth/api/oidc/device-authorization"
TOKEN_PATH = "/auth/api/oidc/token"
REVOCATION_PATH = "/auth/api/oidc/revocation"
HEALTHCHECK_PATH = "/healthcheck"  # below API_PATH

ENV_URL, ENV_STORE, ENV_TOKEN = "STANDCLOUD_URL", "STANDCLOUD_TOKEN_FILE", "STANDCLOUD_TOKEN"
ENV_CA_FILE, ENV_INSECURE, ENV_TIMEOUT = "STANDCLOUD_CA_FILE", "STANDCLOUD_INSECURE", "STANDCLOUD_TIMEOUT"
ENV_QR, ENV_ALLOW_HTTP = "STANDCLOUD_QR", "STANDCLOUD_ALLOW_HTTP"

DEFAULT_TIMEOUT, DEFAULT_MIN_VALID = 10.0, 60.0  # seconds: a request; how long `token` wants its token to live
REFRESH_WAIT = 30.0  # the answer to a refresh already sent is awaited this long at least
LOCK_TIMEOUT = 30.0  # how long a process waits for the store's lock
MAX_REDIRECTS = 5
DEFAULT_INTERVAL = 5.0  # RFC 8628 §3.2: the poll interval when the server gives none
POLL_MARGIN = 0.10  # a server may answer slow_down to a poll that comes even slightly early
SLOW_DOWN_STEP = 5.0  # RFC 8628 §3.5: slow_down adds 5 s for the rest of the flow
MAX_BACKOFF = 60.0  # a failed poll doubles the wait, up to this
REFUSALS = 3  # Authelia answers a Deny with 500 server_error: the third one ends the login

# Anything outside these is malformed; stored fields are capped well under the reader's limit, so that what is written
# reads back (contract).
MAX_BODY = 1024 * 1024  # a server's answer
MAX_STORE = 4 * 1024 * 1024  # the token store
MAX_TOKEN = 16 * 1024  # an access or refresh token: it must fit an HTTP header
MAX_SCOPE, MAX_URL = 1024, 2048
ENTRY_ROOM = 128 * 1024  # more than one server's entry takes, JSON escapes included
MAX_TIME = 32503680000.0  # the year 3000: a later time in the store is corrupt
MAX_TOKEN_LIFETIME, MAX_CODE_LIFETIME, MAX_INTERVAL = 10 * 365 * 86400.0, 86400.0, 600.0


# ==== §2 errors, the console =================================================

_run_as = PROG  # how the user runs this program: main() sets it, for the advice in messages


def _run(command, again=False):  # type: (str, bool) -> str
    # Advice that names the program as it was run (contract: output rule).
    return "run %s'%s %s'" % ("login again: " if again else "", _run_as, command)


class StandCloudError(Exception):
    """Every error raised on purpose: ``exit_code``, and a ``hint`` of what to do next."""
    exit_code, default_hint = 1, None  # type: int, Optional[str]

    def __init__(self, message, hint=None):  # type: (str, Optional[str]) -> None
        super().__init__(message)
        self.message, self.hint = message, hint or self.default_hint

    def __str__(self):  # type: () -> str
        return "%s; %s" % (self.message, self.hint) if self.hint else self.message


class ConfigError(StandCloudError):
    """Usage or configuration (exit 2)."""
    exit_code = 2


class StoreCorrupt(ConfigError):
    """The token store is not valid JSON, or not this schema (exit 2)."""

    def __init__(self, path, reason):  # type: (str, str) -> None
        super().__init__("the token store %s is unreadable (%s)" % (path, reason),
                         "fix or remove it, or %s to keep it aside and log in again" % _run("login"))
        self.path = path


class AuthError(StandCloudError):
    """Authentication (exit 3), with the server's OAuth ``error`` and ``description``."""
    exit_code = 3

    def __init__(self, message, hint=None, error=None, description=None):
        # type: (str, Optional[str], Optional[str], Optional[str]) -> None
        super().__init__(message, hint or _run("login"))
        self.error, self.description = error, description


class LoginRequired(AuthError):
    """There is no usable session for this server: run ``login``."""


class NetworkError(StandCloudError):
    """DNS, refused, reset, timeout or TLS (exit 4)."""
    exit_code, default_hint = 4, "check the network and try again"


class ServerError(StandCloudError):
    """An HTTP error or an answer that breaks the protocol (exit 5), with its ``status`` and ``body``."""
    exit_code, default_hint = 5, "try again later (-v shows each request)"

    def __init__(self, message, hint=None, status=None, body=None):
        # type: (str, Optional[str], Optional[int], Optional[bytes]) -> None
        super().__init__(message, hint)
        self.status, self.body = status, body


_secrets = set()  # type: Set[str]  # every token and device code this process holds (Tokens, DeviceFlow): never shown


def _safe(text, limit=300):  # type: (str, int) -> str
    # Text fit to show (contract): our tokens redacted; controls, bidi overrides, surrogates as '?'.
    for secret in _secrets:
        if len(secret) >= 8:  # a shorter one would mangle words
            text = text.replace(secret, "[redacted]")
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Console(object):
    # Everything for a person goes to stderr (contract); a closed or full one never ends a command.

    def __init__(self, stream=None, quiet=False, verbose=False):  # type: (Optional[IO[str]], bool, bool) -> None
        self.stream, self.quiet, self.verbose = stream, quiet, verbose

    def write(self, text):  # type: (str) -> None
        stream = self.stream or sys.stderr
        with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):  # None (2>&-), full, closed, re-entered
            try:
                stream.write(text)
            except UnicodeEncodeError:  # an old code page: degrade, never drop
                encoding = getattr(stream, "encoding", None) or "ascii"
                stream.write(text.encode(encoding, "replace").decode(encoding))
            stream.flush()

    def info(self, text):  # type: (str) -> None
        self.write("" if self.quiet else text + "\n")

    def warn(self, text, always=False):  # type: (str, bool) -> None
        self.write("%s: warning: %s\n" % (PROG, _safe(text, 1000)) if always or not self.quiet else "")  # always: even -q

    def debug(self, text):  # type: (str) -> None
        self.write("%s: %s\n" % (PROG, _safe(text, 1000)) if self.verbose else "")

    def error(self, text):  # type: (str) -> None
        self.write("%s: error: %s\n" % (PROG, _safe(text, 2000)))

    def isatty(self):  # type: () -> bool
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return bool((self.stream or sys.stderr).isatty())
        return False


# ==== §3 configuration =======================================================

# The clock seams, which tests replace (a ten-poll login in milliseconds): *_at is Unix time, *_deadline monotonic.
_now, _monotonic, _sleep = time.time, time.monotonic, time.sleep


def _env_flag(name, environ):  # type: (str, Mapping[str, str]) -> Optional[bool]
    # A 0/1 environment switch; None when unset.
    raw = environ.get(name, "").strip().lower()
    if raw not in ("", "1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError("%s=%s is not 0 or 1" % (name, _safe(raw, 40)), "set it to 0 or 1")
    return None if not raw else raw in ("1", "true", "yes", "on")


def _seconds(value, what, upper=3600.0):  # type: (Any, str, float) -> float
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds <= upper:  # NaN too
        raise ConfigError("%s must be a number of seconds up to %g, not %s" % (what, upper, _safe(str(value), 40)),
                          "for example %s 30" % what)
    return seconds


def _split_url(url):  # type: (str) -> Tuple[str, str, Optional[int], str]
    # An absolute http(s) URL as (scheme, host, port, the rest after the host), lower-case, an IPv6 host without its
    # brackets; ValueError for anything else. By hand, not urlsplit: importing urllib.parse makes every `token` 6-9 ms
    # slower on 3.11+ (contract: Speed), and a base URL is this small a grammar (§5 uses urlsplit for requests).
    scheme, sep, rest = url.partition("://")
    netloc = rest.split("/")[0].split("?")[0].split("#")[0]
    host, bracket, port = netloc[1:].partition("]") if netloc[:1] == "[" else ("", "", "")
    if bracket:  # an IPv6 literal ("[127.0.0.1]" is none)
        import ipaddress
        ipaddress.IPv6Address(host.partition("%")[0])
        if port[:1] not in ("", ":"):  # "[::1]x"
            raise ValueError(url)
        port = port[1:]
    else:
        host, _, port = netloc.partition(":")
        if host.lower().strip("abcdefghijklmnopqrstuvwxyz0123456789-._"):  # something else is left
            raise ValueError(url)
    if scheme.lower() not in ("http", "https") or not sep or not host or port.strip("0123456789") or \
            port and not 0 < int(port) < 65536:  # ("host:²" too: int() would take it)
        raise ValueError(url)
    return scheme.lower(), host.lower(), int(port) if port else None, rest[len(netloc):]


def _origin(url):  # type: (str) -> str
    # ``scheme://host[:port]``, the port only when it is not the scheme's own.
    scheme, host, port, _ = _split_url(url)
    return "%s://%s%s" % (scheme, "[%s]" % host if ":" in host else host,
                          "" if port in (None, {"http": 80, "https": 443}[scheme]) else ":%d" % port)


def _normalize_url(url):  # type: (str) -> str
    # The base URL ``B``, one spelling per server (one store entry); a bare host means https.
    text = url.strip() if "://" in url else "https://" + url.strip()
    with contextlib.suppress(ValueError):
        if len(text) <= MAX_URL and text.isprintable() and not any(c in text for c in " ?#@\\"):
            return _origin(text) + _split_url(text)[3].rstrip("/")
    raise ConfigError("%s is not a StandCloud URL" % _safe(repr(url), 100), "pass --url https://company.standcloud.io")


def _check_http_policy(base, environ):  # type: (str, Mapping[str, str]) -> None
    # Contract: no bearer token crosses a network in clear text by accident.
    if base.startswith("https://"):
        return
    import ipaddress
    host = _split_url(base)[1]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost" or host.endswith(".localhost")
    if not (loopback or _env_flag(ENV_ALLOW_HTTP, environ)):
        raise ConfigError("refusing plain http:// to %s: bearer tokens would cross the network in clear text" % host,
                          "use https://, or set %s=1 if you really mean it" % ENV_ALLOW_HTTP)


def _default_store_path(environ, platform=sys.platform):  # type: (Mapping[str, str], str) -> str
    # The per-OS default token store (contract: Configuration).
    home = environ.get("HOME")
    if home is None:  # (set but empty is unusable, not "/" as expanduser would make it)
        try:
            home = environ.get("USERPROFILE") or os.path.expanduser("~")
        except (ImportError, KeyError):  # 3.6 and 3.7 raise when the user has no passwd entry
            home = ""
    # Windows: %APPDATA%; macOS: Application Support; else $XDG_CONFIG_HOME (a relative one is ignored) or ~/.config.
    base = environ.get("APPDATA" if platform == "win32" else "XDG_CONFIG_HOME" if platform != "darwin" else "", "")
    if not os.path.isabs(base):
        if not os.path.isabs(home):
            raise ConfigError("cannot tell where the home folder is (HOME is %s)" % _safe(repr(home), 100),
                              "pass --store PATH or set %s" % ENV_STORE)
        base = os.path.join(home, *{"win32": ["AppData", "Roaming"], "darwin": ["Library", "Application Support"]}.get(
            platform, [".config"]))
    return os.path.join(base, "standcloud", "tokens.json")


# ==== §4 token store =========================================================
# One JSON file for every server (contract: Token store). Reads take no lock, every write being an atomic replace; a
# read-refresh-write holds the lock throughout, so that no rotated refresh token is ever sent twice.

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # the lock file is never opened through a symlink
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO in the store's place must not hang us


def _loads(data):  # type: (bytes) -> Any
    # json.loads of UTF-8, without NaN or Infinity; every failure a ValueError.
    def constant(name):  # type: (str) -> Any
        raise ValueError(name)

    try:
        return json.loads(data.decode("utf-8"), parse_constant=constant)
    except RecursionError:  # the nesting limit
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 4,300 digits
        raise ValueError("not valid JSON (%s)" % type(exc).__name__) from None


def _dumps(value, indent=None):  # type: (Any, Optional[int]) -> str  # as request(json=...) hides the module
    return json.dumps(value, indent=indent)


def _is_token(value):  # type: (Any) -> bool
    # Fit for an HTTP header, a file and a terminal: 1 to MAX_TOKEN visible ASCII characters.
    return isinstance(value, str) and 0 < len(value) <= MAX_TOKEN and all(" " < c < "\x7f" for c in value)


def _is_text(value, limit):  # type: (Any, int) -> bool
    # Fit to show: isprintable() refuses controls, bidirectional overrides and lone surrogates.
    return isinstance(value, str) and len(value) <= limit and value.isprintable()


class Tokens(object):
    """One server's token set, as stored and as returned; times are Unix seconds, None when unknown."""

    def __init__(self, access_token, refresh_token=None, expires_at=None, scope=None, updated_at=None):
        # type: (str, Optional[str], Optional[float], Optional[str], Optional[float]) -> None
        self.access_token, self.refresh_token, self.token_type = access_token, refresh_token, "Bearer"
        self.expires_at, self.scope, self.updated_at = expires_at, scope, updated_at
        _secrets.update(token for token in (access_token, refresh_token) if token)

    @classmethod
    def from_entry(cls, entry):  # type: (Any) -> Tokens
        """A store entry, checked field by field; ValueError says what is wrong."""
        get = entry.get if isinstance(entry, dict) else {}.get
        times = [get("expires_at"), get("updated_at")]
        if not (_is_token(get("access_token")) and (get("refresh_token") is None or _is_token(get("refresh_token")))
                and isinstance(get("token_type"), str) and (get("scope") is None or _is_text(get("scope"), MAX_SCOPE))
                and all(t is None or type(t) in (int, float) and 0 <= t <= MAX_TIME for t in times)):  # not 1e300, 400 digits
            raise ValueError("is not an object of valid tokens, token_type, scope and times")
        expires_at, updated_at = (None if t is None else float(t) for t in times)
        return cls(entry["access_token"], get("refresh_token"), expires_at, get("scope"), updated_at)

    def entry(self):  # type: () -> Dict[str, Any]
        return dict(vars(self))  # the attributes are the store's fields, in its order

    def expires_in(self):  # type: () -> Optional[int]
        return None if self.expires_at is None else int(self.expires_at - _now())

    def fresh(self, min_valid=None):  # type: (Optional[float]) -> bool
        """Good for ``min_valid`` more seconds (default 60, or half a shorter lifetime)? No expiry: yes."""
        if self.expires_at is None:
            return True
        if min_valid is None:
            min_valid = min(DEFAULT_MIN_VALID, (self.expires_at - (self.updated_at or 0.0)) / 2)
        return self.expires_at - _now() > max(0.0, min_valid)


def _parse_store(data, path):  # type: (bytes, str) -> Dict[str, Tokens]
    # Every server's Tokens from the store's bytes; else StoreCorrupt.
    try:
        doc = _loads(data) if len(data) <= MAX_STORE else None
        if type(doc) is not dict or type(doc.get("version")) is not int or doc["version"] != 1 \
                or type(doc.get("servers")) is not dict:
            raise ValueError("not a version 1 token store of at most 4 MiB")
        servers = {}
        for url, entry in doc["servers"].items():
            normal = _normalize_url(url)  # ConfigError when it is no URL at all
            if normal != url:
                raise ValueError("the server %s is not written as %s" % (_safe(repr(url), 100), normal))
            try:
                servers[url] = Tokens.from_entry(entry)
            except ValueError as exc:
                raise ValueError("the entry for %s %s" % (url, exc)) from None
        return servers
    except (ConfigError, ValueError) as exc:
        raise StoreCorrupt(path, getattr(exc, "message", str(exc))) from None


def _serialize(servers):  # type: (Dict[str, Tokens]) -> bytes
    return (_dumps({"version": 1, "servers": {url: servers[url].entry() for url in sorted(servers)}}, indent=1) + "\n").encode()


def _lock_file(fd, lock):  # type: (int, bool) -> bool
    # Take the exclusive lock without waiting (False when another process has it), or release it.
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK if lock else msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if lock else fcntl.LOCK_UN)
    except OSError:  # another process has it
        return False
    return True


def _replace(source, target):  # type: (str, str) -> None
    # os.replace, durable; retried for a second as Windows refuses it while another process reads.
    for _ in range(99):
        with contextlib.suppress(PermissionError):
            os.replace(source, target)
            break
        time.sleep(0.01)
    else:  # a last try, whose failure is raised
        os.replace(source, target)
    with contextlib.suppress(OSError):  # make the rename durable; Windows cannot open a folder
        fd = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _cannot(doing, exc, hint="pass --store"):  # type: (str, OSError, str) -> ConfigError
    return ConfigError("cannot %s (%s)" % (doing, exc.strerror or exc), hint)


class TokenStore(object):
    """The token file, its folder and lock: load(), lock() a read-refresh-write, prepare() the file for save()."""

    def __init__(self, path, console):  # type: (str, _Console) -> None
        self.path, self.console, self._warned = os.path.abspath(path), console, False
        self.folder, self.lock_path = os.path.dirname(self.path), self.path + ".lock"

    def load(self):  # type: () -> Dict[str, Tokens]
        """Every server's Tokens; {} when there is no store yet."""
        self._check_folder()
        try:
            with os.fdopen(os.open(self.path, os.O_RDONLY | _O_NONBLOCK | _O_BINARY), "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ConfigError("the token store %s is not a regular file" % self.path, "remove it, or pass --store")
                if sys.platform != "win32" and info.st_mode & 0o077 and not self._warned:
                    self._warned = True
                    self.console.warn("the token store %s is readable by others (mode %03o); the next write makes it "
                                      "private (0600)" % (self.path, info.st_mode & 0o777))
                data = handle.read(MAX_STORE + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _cannot("read the token store %s" % self.path, exc) from None
        return _parse_store(data, self.path)

    def _check_folder(self):  # type: () -> None
        # Contract: the folder is the user's own, as ssh insists on ~/.ssh.
        try:
            info = os.stat(self.folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _cannot("use the folder %s" % self.folder, exc) from None
        if sys.platform != "win32" and (info.st_uid != os.geteuid() or info.st_mode & 0o022):
            raise ConfigError("the token store's folder %s belongs to another user or is writable by others (mode %03o)" % (
                self.folder, info.st_mode & 0o777), "keep the store in a folder of your own, mode 0700 (chmod go-w, or --store)")

    def _make_folder(self):  # type: () -> List[str]
        # Make the missing folders, each 0700 (os.makedirs: only the last); return them, for check_writable to remove.
        made, path = [], self.folder  # type: List[str], str
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            made.insert(0, path)
            path = os.path.dirname(path)
        for path in made:
            try:
                with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                    os.mkdir(path, 0o700)
            except OSError as exc:
                raise _cannot("create the folder %s" % path, exc) from None
        self._check_folder()
        return made

    def _open_lock(self):  # type: () -> int
        import errno
        reason, odd = "not a regular file", True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_BINARY, 0o600)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        except OSError as exc:  # ELOOP: a symlink, never followed
            reason, odd = exc.strerror or str(exc), exc.errno in (errno.ELOOP, errno.EISDIR)
        raise ConfigError("cannot use the lock file %s (%s); nothing was sent to the server" % (self.lock_path, reason),
                          "remove it, as it must be a regular file of yours" if odd else "make the folder writable, or --store")

    @contextlib.contextmanager
    def lock(self):  # type: () -> Iterator[None]
        """Hold the cross-process lock (the lock file is never deleted)."""
        self._make_folder()
        fd = self._open_lock()
        try:
            deadline, delay = time.monotonic() + LOCK_TIMEOUT, 0.005  # real time: other processes hold it
            while not _lock_file(fd, True):
                if time.monotonic() >= deadline:
                    raise ConfigError("another %s process has held the lock %s for over %g s"
                                      % (PROG, self.lock_path, LOCK_TIMEOUT), "check for a stuck process, then try again")
                time.sleep(delay)
                delay = min(2 * delay, 0.1)
            try:
                self._adopt_leftovers()
                yield
            finally:
                _lock_file(fd, False)
        finally:
            os.close(fd)

    def leftovers(self):  # type: () -> List[str]
        """Temporary stores beside the store, oldest first (adopted or removed under ``lock()``)."""
        prefix = os.path.basename(self.path) + "."
        with contextlib.suppress(OSError):
            return sorted((os.path.join(self.folder, name) for name in os.listdir(self.folder)
                           if name.startswith(prefix) and name.endswith(".tmp")), key=os.path.getmtime)
        return []

    def _adopt_leftovers(self):  # type: () -> None
        # Contract: a killed process's temporary store may hold the only copy of rotated tokens: adopt it if complete,
        # valid and not older than the store; remove any other (under the lock, no live process has one).
        for path in self.leftovers():
            try:
                if os.path.islink(path) or not os.path.isfile(path) or os.path.exists(self.path) and \
                        os.path.getmtime(path) < os.path.getmtime(self.path):  # (a FIFO would hang us)
                    raise ValueError(path)
                with open(path, "rb") as handle:
                    _parse_store(handle.read(MAX_STORE + 1), path)
                _replace(path, self.path)
                self.console.warn("recovered the tokens that a stopped process had saved in %s" % path)
            except (OSError, ValueError, StoreCorrupt):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def prepare(self, servers):  # type: (Dict[str, Tokens]) -> IO[bytes]
        """Contract: never send a refresh that cannot be saved. The temporary file (private from its first byte) takes
        the room of ``servers`` and one more entry now, in spaces, which JSON ignores."""
        import tempfile
        size, handle = len(_serialize(servers)) + ENTRY_ROOM, None
        if size > MAX_STORE:
            raise ConfigError("the token store %s is full" % self.path, "log out of servers you no longer use")
        try:
            handle = tempfile.NamedTemporaryFile("w+b", prefix=os.path.basename(self.path) + ".", suffix=".tmp",
                                                 dir=self.folder, delete=False)
            handle.write(b" " * size)
            handle.flush()
            return handle
        except OSError as exc:
            if handle is not None:
                self.discard(handle)
            raise _cannot("write the token store in %s" % self.folder, exc, "nothing was sent to the server; free some "
                          "space or fix the folder, then try again") from None

    def save(self, servers, handle=None):  # type: (Dict[str, Tokens], Optional[IO[bytes]]) -> None
        """Replace the store atomically: fill the prepared file, sync it, rename it."""
        handle = handle or self.prepare(servers)
        try:
            handle.seek(0)
            handle.write(_serialize(servers))
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            _replace(handle.name, self.path)
        except OSError as exc:
            self.discard(handle)
            raise _cannot("write the token store %s" % self.path, exc, "free some space or fix the folder, then try "
                          "again") from None

    def discard(self, handle):  # type: (IO[bytes]) -> None
        """Remove a prepared file; once save() renamed it there is none."""
        with contextlib.suppress(OSError):
            handle.close()
            os.unlink(handle.name)

    def check_writable(self):  # type: () -> None
        """Contract: a login checks first that its tokens can be saved, and leaves nothing behind."""
        servers = self.load()  # an unreadable store stops it before it starts
        made = self._make_folder()
        try:
            if os.path.lexists(self.lock_path):
                os.close(self._open_lock())
            self.discard(self.prepare(servers))
        finally:
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    def keep_aside(self):  # type: () -> Optional[str]
        """Rename an unreadable store to tokens.json.corrupt-<time>, private; None if there is none."""
        target = "%s.corrupt-%d" % (self.path, int(_now()))
        with self.lock():
            try:
                if sys.platform != "win32":
                    os.chmod(self.path, 0o600)
                os.replace(self.path, target)
                return target
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _cannot("move the token store %s aside" % self.path, exc, "move or remove it yourself") from None


@contextlib.contextmanager
def _signals_held(console):  # type: (_Console) -> Iterator[None]
    # Contract: a session ends only when the server ends it. While a request that may issue or revoke tokens is out
    # and until its result is on disk, SIGINT, SIGTERM and SIGHUP wait; then they act (main thread only).
    import signal
    held, saved = [], {}  # type: List[int], Dict[int, Any]

    def hold(signum, frame):  # type: (int, Any) -> None
        held.append(signum)
        console.write("\n%s: saving the new tokens, one moment\n" % PROG)

    with contextlib.suppress(ValueError):  # not the main thread
        for signum in [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]:
            saved[signum] = signal.signal(signum, hold) or signal.SIG_DFL  # None: set outside Python
    try:
        yield
    finally:
        for signum, old in saved.items():
            signal.signal(signum, old)
        old = saved[held[0]] if held else signal.SIG_IGN
        if callable(old):  # Python's SIGINT handler raises KeyboardInterrupt
            old(held[0], None)
        elif old == signal.SIG_DFL and sys.platform == "win32":
            raise SystemExit(128 + held[0])
        elif old == signal.SIG_DFL:  # the default action: the process ends by that signal
            os.kill(os.getpid(), held[0])


# ==== §5 HTTP ================================================================
# One request() on http.client: a deadline for the whole request, a 1 MiB cap, the proxy of the environment or the OS,
# redirects only within the origin when asked, and every failure mapped to the contract's exit codes.

USER_AGENT = "%s/%s Python/%d.%d" % (PROG, __version__, sys.version_info[0], sys.version_info[1])


class Response(object):
    """An HTTP answer: ``status``, ``headers`` (lower-case names), ``body`` (bytes), ``url``."""

    def __init__(self, status, headers, body, url):  # type: (int, Dict[str, str], bytes, str) -> None
        self.status, self.headers, self.body, self.url = status, headers, body, url
        self.token_from_env = False  # the request carried STANDCLOUD_TOKEN

    @property
    def ok(self):  # type: () -> bool
        return 200 <= self.status < 300

    def json(self):  # type: () -> Any
        """The body as JSON; ServerError (exit 5) when it is not."""
        try:
            return _loads(self.body)
        except ValueError as exc:
            raise ServerError("the answer from %s is %s" % (self.url, exc), None, self.status, self.body) from None

    def raise_for_status(self):  # type: () -> Response
        """AuthError for 401 and 403, ServerError for any other status but 2xx."""
        if self.status in (401, 403) and self.token_from_env:
            raise AuthError("the token in %s was refused by %s (HTTP %d)" % (ENV_TOKEN, self.url, self.status),
                            "replace it, or unset %s and log in" % ENV_TOKEN)
        if self.status in (401, 403):
            raise AuthError("the server refused the request to %s (HTTP %d)" % (self.url, self.status),
                            _run("login", again=True) if self.status == 401 else "ask for access to this resource")
        if not self.ok:
            raise ServerError("HTTP %d from %s" % (self.status, self.url), None, self.status, self.body)
        return self


class _Watchdog(object):
    # Contract: --timeout bounds the whole request: at the deadline a timer shuts the socket down, waking any blocked
    # read (what arrived stays readable).

    def __init__(self, seconds, sock):  # type: (float, Any) -> None
        import threading
        self.fired, self._sock, self._mutex = False, sock, threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self):  # type: () -> None
        with self._mutex:
            self._sock = None
        self._timer.cancel()

    def _fire(self):  # type: () -> None
        import socket
        with self._mutex, contextlib.suppress(OSError):
            if self._sock is not None:
                self.fired = True
                # Through the descriptor: SSLSocket.shutdown() drops state that the blocked read still uses.
                raw = socket.socket(fileno=self._sock.fileno())
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                finally:
                    raw.detach()


class _Transport(object):
    # What every request shares: the timeout, TLS, the -v log.

    def __init__(self, timeout, ca_file, insecure, console):  # type: (float, Optional[str], bool, _Console) -> None
        self.timeout, self.ca_file, self.insecure, self.console = timeout, ca_file, insecure, console
        self.refresh_wait = max(REFRESH_WAIT, timeout)  # for the answer to a request that may have rotated tokens
        self._context = None  # type: Any

    def ssl_context(self):  # type: () -> Any
        """One context for every request (3.12+ would load one per connection, ~30 ms)."""
        if self._context is None:
            import ssl
            try:
                self._context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("cannot load the CA file %s (%s)" % (self.ca_file, getattr(exc, "strerror", None) or exc),
                                  "pass a PEM file of CA certificates with --ca-file") from None
            if self.insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        return self._context

    def request(self, method, url, body=None, headers=None, follow=None, critical=False):
        # type: (str, str, Optional[bytes], Optional[Dict[str, str]], Optional[str], bool) -> Response
        # One request; its answer, whatever the status. Redirects followed only on the origin ``follow`` (None: never).
        headers = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            response = self._exchange(method, url, body, headers, critical)
            if response.status not in (301, 302, 303, 307, 308):
                return response
            from urllib.parse import urljoin
            try:
                url = urljoin(response.url, response.headers.get("location", ""))
                followed = follow is not None and _origin(url) == follow
            except ValueError:  # a Location that is no URL
                followed = False
            if not followed:  # contract: Authorization never reaches another origin
                raise ServerError("%s answered with a redirect (HTTP %d), not followed %s"
                                  % (response.url, response.status, "to another origin" if follow else "here"),
                                  "check the StandCloud URL", response.status, response.body)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None  # what browsers and urllib do
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        raise ServerError("too many redirects from %s" % url)

    def _exchange(self, method, url, body, headers, critical):
        # type: (str, str, Optional[bytes], Dict[str, str], bool) -> Response
        import http.client
        from urllib.parse import urlsplit
        parts, started, watchdog, conn, sent = urlsplit(url), time.monotonic(), None, None, False  # type: Any, float, Any, Any, bool
        try:
            conn, target, proxy_headers = self._connection(parts)
            conn.connect()  # each step bounded by the socket's timeout; from here on, the watchdog
            watchdog = _Watchdog(self.timeout - (time.monotonic() - started), conn.sock)
            conn.request(method, target, body, dict(dict({"User-Agent": USER_AGENT, "Accept": "application/json"}, **headers),
                                                    **proxy_headers))
            sent = critical
            if critical:  # contract: the answer to a refresh already sent is awaited 30 s at least
                watchdog.stop()
                watchdog = _Watchdog(self.refresh_wait, conn.sock)
                conn.sock.settimeout(self.refresh_wait)
            answer = conn.getresponse()
            response = Response(answer.status, {k.lower(): ", ".join(answer.msg.get_all(k)) for k in answer.msg}, b"", url)
            response.body, length = answer.read(MAX_BODY + 1), response.headers.get("content-length", "")
            if len(response.body) > MAX_BODY or length.isdigit() and int(length) > MAX_BODY:
                raise ServerError("the answer from %s is larger than 1 MiB" % url)
            # Contract: an answer that came in full is used even when its deadline passed meanwhile (a paused
            # process); one cut off is not (http.client's read(n) just stops when the connection closes early).
            cut = length.isdigit() and len(response.body) < int(length) and method != "HEAD" and answer.status not in (204, 304)
            if cut or watchdog.fired and not length.isdigit() and "chunked" not in response.headers.get("transfer-encoding", ""):
                raise ConnectionResetError("the answer was cut off")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.console.debug("%s %s failed after %d ms" % (method, url, (time.monotonic() - started) * 1000))
            raise self._failure(exc, parts, watchdog is not None and watchdog.fired, sent) from None
        finally:
            if watchdog is not None:
                watchdog.stop()
            if conn is not None:
                conn.close()
        location = response.headers.get("location", "") if 300 <= response.status < 400 else ""
        self.console.debug("%s %s %d %d ms%s" % (method, url, response.status, (time.monotonic() - started) * 1000,
                                                 location and " -> " + location))
        return response

    def _connection(self, parts):  # type: (Any) -> Tuple[Any, str, Dict[str, str]]
        # A connection (through the proxy that the environment or the OS names), the request target, proxy headers.
        import http.client
        import urllib.request
        from urllib.parse import unquote, urlsplit
        tls, proxy, via = parts.scheme == "https", urllib.request.getproxies().get(parts.scheme), None  # type: bool, Any, Any
        host, port = parts.hostname, parts.port or (443 if tls else 80)
        target = parts.path + ("?" + parts.query if parts.query else "")
        if proxy and not urllib.request.proxy_bypass(host):
            try:
                via = urlsplit(proxy if "://" in proxy else "http://" + proxy)
                if via.scheme != "http" or not via.hostname or via.port == 0:
                    raise ValueError(proxy)
            except ValueError:
                raise ConfigError("the proxy setting %s is not an http:// proxy URL" % _safe(repr(proxy), 100),
                                  "set %s_PROXY to http://host:port" % parts.scheme.upper()) from None
        auth = {}
        if via and via.username is not None:
            import base64
            pair = ("%s:%s" % (unquote(via.username), unquote(via.password or ""))).encode("utf-8")
            auth["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        address = (via.hostname, via.port or 80) if via else (host, port)
        if not tls:  # through a proxy, plain http names the whole URL
            return http.client.HTTPConnection(*address, timeout=self.timeout), parts.geturl() if via else target or "/", auth
        conn = http.client.HTTPSConnection(*address, timeout=self.timeout, context=self.ssl_context())
        if via:  # a CONNECT tunnel: the proxy sees neither the request nor Authorization
            conn.set_tunnel(host, port, headers=auth)
        return conn, target or "/", {}

    def _failure(self, exc, parts, fired, answer_lost):  # type: (BaseException, Any, bool, bool) -> StandCloudError
        import http.client
        import socket
        import ssl
        host, text = parts.hostname, str(exc) or type(exc).__name__
        timed_out, dropped = fired or isinstance(exc, socket.timeout), (ConnectionError, http.client.IncompleteRead)
        if answer_lost and (timed_out or isinstance(exc, (OSError,) + dropped)):  # the server may have rotated the tokens
            return NetworkError("the answer to the refresh sent to %s was lost (%s); the server may already have rotated the "
                                "session" % (parts.geturl(), "no answer in %g s" % self.refresh_wait
                                             if timed_out else getattr(exc, "strerror", None) or text),
                                "%s again; if it then says the session has ended, %s" % (_run("token"), _run("login")))
        if timed_out:
            return NetworkError("%s timed out after %g s" % (parts.geturl(), self.timeout),
                                "check the network, or raise --timeout")
        if isinstance(exc, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return NetworkError("TLS certificate verification failed for %s (%s)" % (host, getattr(exc, "verify_message", text)),
                                "if the server uses an in-house CA, pass its certificate with --ca-file")
        if isinstance(exc, (http.client.HTTPException, ValueError)) and not isinstance(exc, dropped):
            return ServerError("%s did not answer with valid HTTP (%s)" % (host, type(exc).__name__), "check the URL")
        what = "cannot resolve %s" if isinstance(exc, socket.gaierror) else "connection to %s refused" if isinstance(
            exc, ConnectionRefusedError) else "the connection to %s was dropped" if isinstance(exc, dropped) else \
            "TLS failure talking to %s" if isinstance(exc, ssl.SSLError) else "cannot reach %s"
        return NetworkError("%s (%s)" % (what % host, getattr(exc, "strerror", None) or text),
                            "check the URL, the network and any proxy")


# ==== §6 OAuth 2.0 ===========================================================
# The protocol alone: each field of an answer read by a typed reader, never splatted; no store (§7 saves the tokens).


def _field(obj, name, what, valid, required=True):  # type: (Dict[str, Any], str, str, Callable[[Any], bool], bool) -> Any
    value = obj.get(name)
    if (value is None and required) or (value is not None and not valid(value)):
        raise ServerError("%s has %s %s" % (what, "no" if value is None else "a malformed", name))
    return value


def _duration(obj, name, what, upper, default=None):  # type: (Dict[str, Any], str, str, float, Optional[float]) -> Any
    # Seconds in [0, upper] (no NaN, no 1e300); ``default`` when absent.
    value = obj.get(name)
    if value is not None and not (type(value) in (int, float) and 0 <= value <= upper):
        raise ServerError("%s has an invalid %s (%s)" % (what, name, _safe(repr(value), 40)))
    return default if value is None else float(value)


def _is_web_address(value):  # type: (Any) -> bool
    return _is_text(value, MAX_URL) and value.lower().startswith(("https://", "http://")) and " " not in value


class DeviceFlow(object):
    """A started device login (RFC 8628 §3.2), the RFC's names as attributes (verification_uri_complete may be None)."""

    def __init__(self, obj, what):  # type: (Dict[str, Any], str) -> None
        self.device_code = _field(obj, "device_code", what, _is_token)  # type: str
        _secrets.add(self.device_code)
        self.user_code = _field(obj, "user_code", what, lambda v: _is_text(v, 64) and v.strip() != "")  # type: str
        self.verification_uri = _field(obj, "verification_uri", what, _is_web_address)  # type: str
        self.verification_uri_complete = _field(obj, "verification_uri_complete", what, _is_web_address, False)
        self.expires_in = _duration(obj, "expires_in", what, MAX_CODE_LIFETIME) or 0.0  # type: float
        if not self.expires_in:
            raise ServerError("%s has no usable expires_in" % what)
        # RFC 8628 §3.2: 5 s when absent; and never hammer the server on a 0.
        self.interval = max(1.0, _duration(obj, "interval", what, MAX_INTERVAL, DEFAULT_INTERVAL))  # type: float
        self.started = _monotonic()
        self.deadline = self.started + self.expires_in


def _post_form(transport, url, fields, critical=False):  # type: (_Transport, str, Dict[str, str], bool) -> Response
    # Contract: every OAuth request is a form and follows no redirect.
    from urllib.parse import urlencode
    return transport.request("POST", url, urlencode(fields).encode("ascii"),
                             {"Content-Type": "application/x-www-form-urlencoded"}, critical=critical)


def _json_object(response, what):  # type: (Response, str) -> Dict[str, Any]
    obj = response.json()
    if not isinstance(obj, dict):
        raise ServerError("%s is not a JSON object" % what, None, response.status, response.body)
    return obj


def _oauth_error(response):  # type: (Response) -> Optional[Tuple[str, str]]
    # An OAuth error body's (error, description), safe to show; None for Authelia's {}.
    with contextlib.suppress(ValueError):
        obj = _loads(response.body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            description = obj.get("error_description")
            return _safe(obj["error"], 100), _safe(description, 300) if isinstance(description, str) else ""
    return None


def _describe(error, status):  # type: (Optional[Tuple[str, str]], int) -> str
    if error is None:
        return "HTTP %d, no OAuth error given" % status
    return "%s: %s" % error if error[1] else error[0]


def _start_device_flow(transport, base):  # type: (_Transport, str) -> DeviceFlow
    # RFC 8628 §3.1: ask for a device code and a user code.
    url = base + DEVICE_PATH
    response = _post_form(transport, url, {"client_id": CLIENT_ID, "scope": SCOPE, "audience": base + API_PATH})
    what = "the device authorization answer"
    if response.ok:
        return DeviceFlow(_json_object(response, what), what)
    error = _oauth_error(response)
    if error is not None and 400 <= response.status < 500:
        raise AuthError("the server refused to start a login (HTTP %d, %s)" % (response.status, _describe(error, 0)),
                        "check the StandCloud URL, and that this client may log in there", error[0], error[1])
    raise ServerError("the server refused to start a login (HTTP %d from %s)" % (response.status, url),
                      "check the StandCloud URL", response.status, response.body)


def _parse_tokens(obj, sent_at, what):  # type: (Dict[str, Any], float, str) -> Tokens
    # A token answer (RFC 6749 §5.1); ServerError for a field the store could not keep.
    token_type = obj.get("token_type", "Bearer")  # required by the RFC; tolerated when absent
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ServerError("%s has token_type %s; only Bearer is supported" % (what, _safe(repr(token_type), 40)))
    expires_in = _duration(obj, "expires_in", what, MAX_TOKEN_LIFETIME)
    return Tokens(_field(obj, "access_token", what, _is_token), _field(obj, "refresh_token", what, _is_token, False),
                  # From when the request was sent: never later than the server's own clock.
                  None if expires_in is None else sent_at + expires_in,
                  _field(obj, "scope", what, lambda v: _is_text(v, MAX_SCOPE), False), _now())


def _token_error(response, url, doing):  # type: (Response, str, str) -> StandCloudError
    # An error from the token or revocation endpoint; a bare 400 or 401 is a rejection (contract).
    error = _oauth_error(response)
    if response.status in (400, 401) or (error is not None and 400 <= response.status < 500):
        return AuthError("the server rejected the %s (%s)" % (doing, _describe(error, response.status)), None,
                         error and error[0], error and error[1])
    return ServerError("HTTP %d from %s" % (response.status, url), None, response.status, response.body)


def _refresh_tokens(transport, base, refresh_token):  # type: (_Transport, str, str) -> Tokens
    # RFC 6749 §6. The audience is not resent: the server keeps the grant's.
    url, sent_at = base + TOKEN_PATH, _now()
    fields = {"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": refresh_token}
    response = _post_form(transport, url, fields, critical=True)
    if not response.ok:
        raise _token_error(response, url, "refresh token")
    return _parse_tokens(_json_object(response, "the refresh answer"), sent_at, "the refresh answer")


def _revoke(transport, base, token, hint):  # type: (_Transport, str, str, str) -> None
    # RFC 7009 §2.1: 200 is success, also for a token the server does not know.
    url = base + REVOCATION_PATH
    response = _post_form(transport, url, {"client_id": CLIENT_ID, "token": token, "token_type_hint": hint})
    if not response.ok:
        raise _token_error(response, url, "revocation of the %s" % hint.replace("_", " "))


def _wait_until(target, flow, on_wait):  # type: (float, DeviceFlow, Optional[Callable[[float], None]]) -> None
    # Sleep until the monotonic ``target``, calling ``on_wait(seconds_left)`` every second.
    now = _monotonic()
    while now < target:
        if on_wait is not None:
            on_wait(max(0.0, flow.deadline - now))
        _sleep(target - now if on_wait is None else min(target - now, (flow.deadline - now) % 1.0 or 1.0))
        now = _monotonic()


# RFC 8628 §3.5, and what the real server does (SERVER-NOTES §R): what each answer to a poll does.
#
#   200 with tokens                   saved (signals held), done
#   authorization_pending             poll again after `interval`
#   slow_down                         interval += 5 s for the rest of the flow
#   access_denied (any 4xx)           AuthError: denied
#   expired_token; expires_in passed  AuthError: the code expired (Authelia says authorization_pending forever)
#   5xx with an OAuth error           Authelia's Deny or a used code (server_error): poll again at the interval;
#                                     the third in a row ends the login
#   other OAuth error, bare 400/401   AuthError with the server's words or status
#   5xx without one, network failure  poll again, the wait doubled (at most 60 s)
#   an error after such a failure     AuthError: run login again (a device code is single-use: a lost answer is gone)


def _poll_for_tokens(transport, base, flow, keep, on_wait=None):
    # type: (_Transport, str, DeviceFlow, Callable[[Tokens], None], Optional[Callable[[float], None]]) -> Tokens
    # Poll until the person decides; ``keep`` saves the tokens while signals are held.
    url = base + TOKEN_PATH
    fields = {"client_id": CLIENT_ID, "grant_type": DEVICE_GRANT, "device_code": flow.device_code}
    interval = wait = flow.interval
    last, lost, refusals = flow.started, False, 0  # lost: an unanswered poll may have been the one with the tokens
    while True:
        next_poll = last + wait * (1.0 + POLL_MARGIN)
        if next_poll >= flow.deadline:
            _wait_until(flow.deadline, flow, on_wait)
            raise _poll_failure(None, url, ("expired_token", ""), lost)  # the client keeps expires_in itself
        _wait_until(next_poll, flow, on_wait)
        with _signals_held(transport.console):
            sent_at = _now()
            try:
                response = _post_form(transport, url, fields)  # type: Optional[Response]
            except NetworkError:
                response = None
            if response is not None and response.ok:
                tokens = _parse_tokens(_json_object(response, "the token answer"), sent_at, "the token answer")
                keep(tokens)
                return tokens
        last = _monotonic()
        error = None if response is None else _oauth_error(response)
        if response is None or (response.status >= 500 and error is None):
            lost, wait = True, min(wait * 2.0, MAX_BACKOFF)
            continue
        code = error[0] if error else None
        refusals = refusals + 1 if response.status >= 500 else 0
        if code == "slow_down":
            interval += SLOW_DOWN_STEP
        elif code != "authorization_pending" and not (0 < refusals < REFUSALS and not lost):
            raise _poll_failure(response, url, error, lost)
        wait = interval


def _poll_failure(response, url, error, lost):  # (response: None when the code has expired unanswered)
    # type: (Any, str, Optional[Tuple[str, str]], bool) -> StandCloudError
    code, description = error or (None, None)
    again = _run("login", again=True)
    if code == "access_denied":
        return AuthError("the login was denied", again, code, description)
    if code == "expired_token":
        return AuthError("the code expired before anyone approved it", again, code, description)
    if lost:
        return AuthError("the server no longer accepts this device code (%s); an answer was lost on the network"
                         % _describe(error, response.status), again, code, description)
    if response.status >= 500:
        return AuthError("the server refused the code: it was denied at the consent page, or already used (%s)"
                         % _describe(error, response.status), again, code, description)
    rejection = _token_error(response, url, "login")
    rejection.hint = again if isinstance(rejection, AuthError) else rejection.hint
    return rejection


# ==== §7 StandCloudAuth ======================================================
# The library's one class, where the protocol meets the store.


class StandCloudAuth(object):
    """Log in to one StandCloud server and call its API.

    An argument left as None comes from the environment, as on the command line (STANDCLOUD_URL, _TOKEN_FILE,
    _CA_FILE, _INSECURE, _TIMEOUT, _TOKEN), then the default; with no URL, the only server in the store. ``token=``
    (STANDCLOUD_TOKEN) is static: never refreshed, nothing written.

    >>> StandCloudAuth("company.standcloud.io").request("GET", "/healthcheck").status  # doctest: +SKIP
    200
    """

    def __init__(self, url=None, store=None, ca_file=None, insecure=None, timeout=None, token=None, environ=None, console=None):
        # type: (Optional[str], Optional[str], Optional[str], Optional[bool], Any, Optional[str], Optional[Dict[str, str]], Optional[_Console]) -> None
        env = self._env = os.environ if environ is None else environ  # type: Any
        self._console, self._store, self._cache = console or _Console(), None, None  # type: _Console, Optional[TokenStore], Any
        self._static = token if token is not None else env.get(ENV_TOKEN, "").strip() or None
        if self._static is not None and not _is_token(self._static):
            raise ConfigError("%s is not a valid bearer token" % ENV_TOKEN, "check the variable's value")
        _secrets.add(self._static or "")
        self._store_path = store or env.get(ENV_STORE)
        timeout = _seconds(*(timeout, "--timeout") if timeout is not None else (env.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT,
                                                                                ENV_TIMEOUT))
        insecure = _env_flag(ENV_INSECURE, env) if insecure is None else insecure
        self._transport = _Transport(timeout, ca_file or env.get(ENV_CA_FILE) or None, bool(insecure), self._console)
        if insecure:
            self._console.warn("TLS certificates are not verified (--insecure): anyone on the network can read the "
                               "tokens", always=True)
        self._url = url or env.get(ENV_URL)
        if self._url:
            self._url = _normalize_url(self._url)
            _check_http_policy(self._url, env)
        self.url_given = bool(self._url)  # else: the only server in the store
        self.uses_env_token = self._static is not None  # STANDCLOUD_TOKEN, or token=

    @property
    def store(self):  # type: () -> TokenStore
        """The token store, found on first use (a command that needs none works without HOME)."""
        if self._store is None:
            self._store = TokenStore(self._store_path or _default_store_path(self._env), self._console)
        return self._store

    @property
    def url(self):  # type: () -> str
        """The base URL ``B``; with none given, the only server in the store."""
        if self._url is None:
            self._cache = self.store.load()  # and the hot path then reads the store once
            if len(self._cache) != 1:
                raise ConfigError("no StandCloud URL given, and the token store has %s" % (
                    "several servers: " + ", ".join(sorted(self._cache)) if self._cache else "no server"),
                    "pass --url https://company.standcloud.io or set %s" % ENV_URL)
            self._url = list(self._cache)[0]
            _check_http_policy(self._url, self._env)
        return self._url

    def servers(self):  # type: () -> List[str]
        """The servers in the token store."""
        return sorted(self.store.load())

    def for_server(self, url):  # type: (str) -> StandCloudAuth
        """The same settings (store, TLS, timeout) for another server."""
        import copy
        other = copy.copy(self)
        other._url, other._cache = _normalize_url(url), None  # http:// is checked before a request (_revoke)
        return other

    def _stored(self):  # from the store as just read, if it was
        # type: () -> Optional[Tokens]
        url = self.url
        servers, self._cache = self._cache if self._cache is not None else self.store.load(), None
        if self.store.leftovers():  # contract: a killed process's complete temporary store is adopted at the next start
            with self.store.lock():
                servers = self.store.load()
        return servers.get(url)

    def _no_static(self, action):  # type: (str) -> None
        if self._static is not None:
            raise ConfigError("%s is set, so there is no stored session to %s" % (ENV_TOKEN, action),
                              "unset %s to use the token store" % ENV_TOKEN)

    def start_login(self):  # type: () -> DeviceFlow
        """Start a device login (RFC 8628 §3.1) once sure its tokens can be saved; show its address and user_code."""
        self._no_static("log in to")
        url = self.url
        self.store.check_writable()
        return _start_device_flow(self._transport, url)

    def wait_for_login(self, flow, on_wait=None):  # type: (DeviceFlow, Optional[Callable[[float], None]]) -> Tokens
        """Poll until approved (``on_wait(seconds_left)`` each second); store the tokens, revoke a session replaced."""
        url, replaced = self.url, []  # type: str, List[Optional[Tokens]]

        def keep(tokens):  # type: (Tokens) -> None
            with self.store.lock():
                servers = self.store.load()
                replaced.append(servers.get(url))
                servers[url] = tokens
                self.store.save(servers)

        tokens = _poll_for_tokens(self._transport, url, flow, keep, on_wait)
        if replaced[0] and replaced[0].refresh_token != tokens.refresh_token:
            self._revoke(replaced[0])
        return tokens

    def logged_in(self, min_valid=None):  # type: (Optional[float]) -> Optional[Tokens]
        """The stored session when it is usable (valid, or refreshed now), else None."""
        self._no_static("use")
        with contextlib.suppress(AuthError):
            return self.tokens(min_valid)
        return None

    def tokens(self, min_valid=None):  # type: (Optional[float]) -> Tokens
        """The session's tokens, refreshed first unless fresh (see Tokens.fresh); else LoginRequired."""
        if self._static is not None:
            return Tokens(self._static)
        current = self._stored()
        if current is not None and current.fresh(min_valid):
            return current  # the hot path: one read, no lock, no network
        return self._refresh(current, min_valid)

    def access_token(self, min_valid=None):  # type: (Optional[float]) -> str
        """A valid access token, refreshed first when needed (see tokens())."""
        return self.tokens(min_valid).access_token

    def refresh(self):  # type: () -> Tokens
        """Refresh now, whatever the expiry."""
        self._no_static("refresh")
        return self._refresh(self._stored(), None, True)

    def _refresh(self, current, min_valid, force=False):  # type: (Optional[Tokens], Optional[float], bool) -> Tokens
        # Refresh under the lock, unless another process did while this one waited for it.
        if current is None or not current.refresh_token:  # nothing to refresh, and nothing written (contract)
            raise LoginRequired(("not logged in to %s" if current is None else "there is no refresh token for %s") % self.url)
        with self.store.lock():
            servers = self.store.load()
            latest = servers.get(self.url)
            if force or latest is None or not (latest.fresh(min_valid) or latest.access_token != current.access_token
                                               and latest.fresh(0)):
                return self._refresh_locked(servers)
            return latest

    def _refresh_locked(self, servers):  # type: (Dict[str, Tokens]) -> Tokens
        # Only under the lock, ``servers`` read under it: a rotated refresh token sent twice ends the session.
        url, old = self.url, servers.get(self.url)
        if old is None or not old.refresh_token:  # another process logged out meanwhile
            raise LoginRequired("not logged in to %s" % url)
        pending = self.store.prepare(servers)  # contract: never send a refresh that cannot be saved
        try:
            with _signals_held(self._console):
                try:
                    new = _refresh_tokens(self._transport, url, old.refresh_token)
                except AuthError as exc:
                    if exc.error != "invalid_grant":
                        raise  # contract: only invalid_grant ends the stored session
                    del servers[url]
                    self.store.save(servers, pending)
                    raise LoginRequired("%s; the session has ended" % exc.message, None, exc.error, exc.description) from None
                new.refresh_token = new.refresh_token or old.refresh_token  # a server that does not rotate
                new.scope = new.scope or old.scope
                servers[url] = new
                self.store.save(servers, pending)
                return new
        finally:
            self.store.discard(pending)

    def _token_after_401(self, used):  # type: (str) -> str
        # Contract: a 401 usually means that another process refreshed (revoking this token): use its token, else refresh.
        with self.store.lock():
            servers = self.store.load()
            latest = servers.get(self.url)
            if latest is not None and latest.access_token != used:
                return latest.access_token
            return self._refresh_locked(servers).access_token

    def request(self, method, path, json=None, data=None, headers=None):
        # type: (str, str, Any, Any, Optional[Dict[str, str]]) -> Response
        """An authenticated request to ``API + path`` (or a URL on its origin), with ``json=`` or ``data=`` (bytes,
        str); the Response for any status, after one retry on 401. A usage error is ConfigError, nothing sent."""
        url, send = self._api_target(path), {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        if not method or method.strip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"):  # ASCII before upper()
            raise ConfigError("%s is not an HTTP method" % _safe(repr(method), 40), "for example -X POST")
        for name, value in send.items():
            if not _is_token(name) or ":" in name or not all(" " <= c < "\x7f" for c in value):
                raise ConfigError("the header %s is not ASCII 'Name: value'" % _safe(repr(name), 100), "give it in ASCII")
        body = _dumps(json).encode() if json is not None else data.encode() if isinstance(data, str) else data and bytes(data)
        if body is not None and not any(k.lower() == "content-type" for k in send):
            send["Content-Type"] = "application/octet-stream" if json is None else "application/json"
        token = self.access_token()
        response = self._send_api(method.upper(), url, body, send, token)
        if response.status == 401 and self._static is None:
            response = self._send_api(method.upper(), url, body, send, self._token_after_401(token))
        return response

    def _api_target(self, path):  # type: (str) -> str
        api = self.url + API_PATH
        try:
            same = "://" in path and _origin(path) == _origin(self.url)
        except ValueError:
            same = False
        if not path.startswith("/") and not same:
            raise ConfigError("%s is neither a path such as /test_report nor a URL on %s"
                              % (_safe(repr(path), 200), _origin(self.url)), "give a path such as /test_report")
        if same and not path.startswith(api + "/"):
            self._console.warn("%s is outside the API (%s); the token may not be valid there" % (path, api))
        target = path if same else api + path
        if not all(" " < c < "\x7f" for c in target):
            raise ConfigError("the API path %s has spaces or characters that are not ASCII" % _safe(repr(path), 200),
                              "percent-encode them, as in /a%20b")
        return target

    def _send_api(self, method, url, body, headers, token):  # type: (str, str, Optional[bytes], Dict[str, str], str) -> Response
        # Redirects only within B's origin: the bearer token never leaves it.
        response = self._transport.request(method, url, body, dict(headers, Authorization="Bearer " + token),
                                           follow=_origin(self.url))
        response.token_from_env = self._static is not None
        return response

    def healthcheck(self):  # type: () -> bool
        """GET API/healthcheck: True on 2xx; AuthError on 401 (after the retry) or 403."""
        response = self.request("GET", HEALTHCHECK_PATH)
        if response.status in (401, 403):
            response.raise_for_status()
        return response.ok

    def logout(self, revoke=True):  # type: (bool) -> bool
        """Remove the stored session and revoke it at the server (best effort); whether there was one."""
        self._no_static("log out of")
        if self._stored() is None:
            return False  # and nothing written (contract)
        with _signals_held(self._console):
            with self.store.lock():
                servers = self.store.load()
                old = servers.pop(self.url, None)
                if old is not None:
                    self.store.save(servers)
            if old is not None and revoke:
                self._revoke(old)
        return old is not None

    def _revoke(self, tokens):  # type: (Tokens) -> None
        # RFC 7009: the refresh token first; at Authelia either ends the whole session.
        for hint, token in (("refresh_token", tokens.refresh_token), ("access_token", tokens.access_token)):
            try:
                if token:
                    _check_http_policy(self.url, self._env)
                    _revoke(self._transport, self.url, token, hint)
            except StandCloudError as exc:
                self._console.warn("could not revoke the %s at the server: %s" % (hint.replace("_", " "), exc.message))

    def status(self):  # type: () -> Dict[str, Any]
        """The contract's status object: reads the store, calls no server."""
        static = self._static is not None
        tokens = Tokens(self._static) if self._static is not None else self._stored()
        return {"url": self._url if static else self.url, "store": None if static else self.store.path,
                "source": "environment" if static else "file" if tokens else None,
                "logged_in": bool(tokens and (tokens.refresh_token or tokens.fresh(0))),
                "access_token_expires_at": tokens and tokens.expires_at,
                "access_token_expires_in": tokens and tokens.expires_in(),
                "has_refresh_token": bool(tokens and tokens.refresh_token),
                "refreshed_at": tokens and tokens.updated_at, "scope": tokens and tokens.scope}


# ==== §8 command line ========================================================
# argparse, imported inside _parser() as bottle does; one subparser per command, bound to its handler by set_defaults();
# global options before or after the command.


def _parser(prog):  # type: (str) -> Any
    import argparse

    class Parser(argparse.ArgumentParser):
        # The contract's errors (one line, exit 2); help through _write_out, 100 columns wide (without a width,
        # argparse imports shutil: 0.7 MiB more for `token` on 3.13).

        def __init__(self, **kwargs):  # type: (**Any) -> None
            super().__init__(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100), **kwargs)

        def error(self, message):  # type: (str) -> Any
            raise ConfigError(message, "see '%s --help'" % self.prog)

        def print_help(self, file=None):  # type: (Any) -> None
            _write_out(self.format_help())

    common = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    for flag, metavar, text in (("--url", "URL", "StandCloud base URL; a bare host means https (env STANDCLOUD_URL)"),
                                ("--store", "PATH", "the token store file (env STANDCLOUD_TOKEN_FILE)"),
                                ("--ca-file", "PATH", "PEM file of CA certificates to trust (env STANDCLOUD_CA_FILE)"),
                                ("--timeout", "SECONDS", "limit for each HTTP request, default 10 (env STANDCLOUD_TIMEOUT)")):
        common.add_argument(flag, metavar=metavar, help=text)
    for flags, text in ((["--insecure"], "do not verify TLS certificates (env STANDCLOUD_INSECURE=1)"),
                        (["-v", "--verbose"], "one stderr line per HTTP request"), (["-q", "--quiet"], "only errors on stderr")):
        common.add_argument(*flags, action="store_true", help=text)
    parser = Parser(prog=prog, parents=[common], description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name, func, text, *switches):  # type: (str, Callable[[Any, _Console], int], str, *Tuple[str, str]) -> Any
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(func=func)
        for switch, help in switches:
            sub.add_argument(switch, action="store_true", help=help)
        return sub

    login = command("login", _cmd_login, "log in with the device flow and store the tokens",
                    ("--force", "start a new login even when logged in"), ("--open", "also open the address in a browser"),
                    ("--no-check", "skip the API healthcheck after logging in"), ("--json", "JSON lines, one per event"))
    qr = login.add_mutually_exclusive_group()
    qr.add_argument("--qr", action="store_const", const=True, help="draw the QR code off a terminal too (env STANDCLOUD_QR=1)")
    qr.add_argument("--no-qr", dest="qr", action="store_const", const=False, help="no QR code (env STANDCLOUD_QR=0)")
    command("token", _cmd_token, "print a valid access token, refreshing it when needed", ("--json", "print JSON")).add_argument(
        "--min-valid", type=float, metavar="SECONDS", help="refresh when it expires within SECONDS (default 60)")
    command("refresh", _cmd_refresh, "refresh the tokens now")
    command("status", _cmd_status, "show the stored sessions; calls no server", ("--json", "print JSON"))
    command("healthcheck", _cmd_healthcheck, "call the API's healthcheck with the token", ("--json", "print JSON"))
    command("logout", _cmd_logout, "revoke the tokens and remove them from the store",
            ("--no-revoke", "only remove them from the store"), ("--all", "log out of every server in the store"))
    api = command("api", _cmd_api, "an authenticated request to the API")
    api.add_argument("path", metavar="PATH", help="below the API, such as /test_report")
    api.add_argument("-X", "--method", help="HTTP method (default GET, or POST with data)")
    api.add_argument("-d", "--data", help="the body: text, @FILE or @- for stdin; JSON goes as application/json")
    api.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="a header (repeatable)")
    return parser


def _write_out(data):  # type: (Any) -> None
    # stdout carries only what was asked for (contract: output rule); closed or full is exit 2, `| head` no error.
    out = sys.stdout
    try:
        if isinstance(data, str):  # in stdout's encoding; what it lacks (a path, say) as \\x escapes
            data = data.encode(getattr(out, "encoding", None) or "utf-8", "backslashreplace")
        out.flush()
        out.buffer.write(data)
        out.buffer.flush()
    except (AttributeError, OSError, ValueError) as exc:  # AttributeError: None, as after `>&-`
        with contextlib.suppress(AttributeError, OSError, ValueError):  # so that the flush at exit cannot fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        if not isinstance(exc, BrokenPipeError):
            raise ConfigError("stdout is closed" if out is None else "cannot write to stdout (%s)" % (
                getattr(exc, "strerror", None) or exc), "check where the output goes") from None


def _auth(args, console):  # type: (Any, _Console) -> StandCloudAuth
    return StandCloudAuth(args.url, args.store, args.ca_file, True if args.insecure else None, args.timeout, console=console)


def _span(seconds):  # type: (float) -> str
    seconds = max(0, int(seconds))
    return "%d s" % seconds if seconds < 120 else "%d min" % (seconds // 60) if seconds < 7200 else "%d h" % (seconds // 3600)


def _cmd_token(args, console):  # type: (Any, _Console) -> int
    if args.min_valid is not None and not 0 <= args.min_valid <= MAX_TOKEN_LIFETIME:
        raise ConfigError("--min-valid must be a number of seconds, not %g" % args.min_valid, "for example --min-valid 300")
    tokens = _auth(args, console).tokens(args.min_valid)
    _write_out(_dumps({"access_token": tokens.access_token, "token_type": "Bearer", "expires_at": tokens.expires_at,
                       "expires_in": tokens.expires_in()}) + "\n" if args.json else tokens.access_token + "\n")
    return 0


def _cmd_refresh(args, console):  # type: (Any, _Console) -> int
    auth = _auth(args, console)
    expires_at = auth.refresh().expires_at
    console.info("Refreshed the session for %s; %s." % (auth.url, "the server gave no expiry" if expires_at is None else
                 "the access token is valid until %s (%s)" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at)),
                                                              _span(expires_at - _now()))))
    return 0


def _cmd_status(args, console):  # type: (Any, _Console) -> int
    # One server, or with no URL given every stored one, as `gh auth status` lists every host.
    auth = _auth(args, console)
    one = auth.url_given or auth.uses_env_token
    reports = [auth.status()] if one else [auth.for_server(url).status() for url in auth.servers()]
    _write_out(_dumps(reports[0] if one else reports) + "\n" if args.json else "\n".join(map(_status_text, reports)))
    unusable = [report["url"] for report in reports if not report["logged_in"]]
    if unusable or not reports:
        console.error("not logged in to %s; %s" % (", ".join(unusable) or "any StandCloud server",
                                                   _run("login" if reports else "--url https://company.standcloud.io login")))
    return 3 if unusable or not reports else 0


def _status_text(report):  # type: (Dict[str, Any]) -> str
    # A status object for a person: the store with its permissions, never a secret.
    left, issued, store = report["access_token_expires_in"], report["refreshed_at"], report["store"]
    with contextlib.suppress(OSError, TypeError):
        store += " (mode %03o)" % (os.stat(store).st_mode & 0o777) if sys.platform != "win32" else " (exists)"
    rows = (("StandCloud", report["url"] or "(no URL given)"), ("Logged in", "yes" if report["logged_in"] else "no"),
            ("Token store", store or "none: the token in %s is used as is" % ENV_TOKEN),
            ("Access token", "-" if not report["source"] else "no expiry given" if left is None else
             "valid for %s" % _span(left) if left > 0 else "expired"),
            ("Refresh token", "no" if not report["has_refresh_token"] else "yes; last used %s ago (an idle one expires, at "
             "Authelia after 90 min)" % _span(_now() - issued) if issued else "yes"), ("Scope", report["scope"] or "-"))
    return "".join("%-15s %s\n" % row for row in rows)


def _cmd_healthcheck(args, console):  # type: (Any, _Console) -> int
    response = _auth(args, console).request("GET", HEALTHCHECK_PATH)
    if args.json or response.ok:
        _write_out(_dumps({"status": response.status, "ok": response.ok}) + "\n" if args.json else "ok\n")
    response.raise_for_status()
    return 0


def _cmd_logout(args, console):  # type: (Any, _Console) -> int
    auth = _auth(args, console)
    for each in [auth.for_server(url) for url in auth.servers()] if args.all else [auth]:
        console.info(("Logged out of %s." if each.logout(not args.no_revoke) else "Not logged in to %s.") % each.url)
    return 0


def _cmd_api(args, console):  # type: (Any, _Console) -> int
    headers, data = {}, args.data
    for raw in args.header:
        name, colon, value = raw.partition(":")
        if not colon or not name.strip():
            raise ConfigError("-H wants 'Name: value', not %s" % _safe(repr(raw), 100), "see '%s api --help'" % _run_as)
        headers[name.strip()] = value.strip()
    if data is not None:  # -d DATA, @FILE or @- (argv that is not UTF-8 is sent as typed)
        try:
            if data == "@-":
                data = sys.stdin.buffer.read()
            elif data[:1] == "@":
                with open(data[1:], "rb") as handle:
                    data = handle.read()
            else:
                data = os.fsencode(data)
        except (AttributeError, OSError) as exc:  # AttributeError: no stdin at all
            raise ConfigError("cannot read %s (%s)" % (data[1:], getattr(exc, "strerror", None) or "closed"),
                              "check the file after -d @") from None
        if not any(k.lower() == "content-type" for k in headers):  # JSON goes as JSON (contract)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            with contextlib.suppress(ValueError):
                _loads(data)
                headers["Content-Type"] = "application/json"
    response = _auth(args, console).request(args.method or ("GET" if data is None else "POST"), args.path, data=data,
                                            headers=headers)
    _write_out(response.body)
    response.raise_for_status()
    return 0


def _unicode_terminal(stream):  # type: (Any) -> bool
    # Block glyphs: the stream encodes them, and the locale says UTF-8 (Python 3.7+ takes C as UTF-8; a console cannot).
    names = ["LC_ALL", "LC_CTYPE", "LANG"]
    if getattr(sys.flags, "utf8_mode", 0) and os.environ.get("LC_CTYPE") == "C.UTF-8":
        names.remove("LC_CTYPE")  # PEP 538: Python set it itself, in place of a C locale
    locale = ([os.environ[name] for name in names if os.environ.get(name)] + ["UTF-8"])[0]
    encoding = (getattr(stream, "encoding", None) or "ascii").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32", "cp65001") and ("utf8" in locale.lower().replace("-", "") or
                                                                    sys.platform == "win32")


def _show_login(console, flow, want_qr, opening):  # type: (_Console, DeviceFlow, bool, bool) -> None
    # The screen the operator reads while waiting (contract): the address and code always visible; a QR code where it
    # fits, and only one that scans.
    uri, code = flow.verification_uri_complete or flow.verification_uri, flow.user_code
    code = code[:4] + "-" + code[4:] if len(code) == 8 and code.isalnum() else code  # Authelia's: XXXX-XXXX
    lines = ["", "To log in, open this address on a phone or a computer:", "", uri, "",
             ("and check that the page shows the code   " if flow.verification_uri_complete else "and enter the code   ")
             + code, "", "The code expires in %s. Waiting for approval (Ctrl-C to cancel)..." % _span(flow.expires_in)]
    stream, terminal, cols, rows = console.stream or sys.stderr, console.isatty(), 10 ** 6, 10 ** 6
    if terminal:  # shutil honours COLUMNS and LINES, then asks stdout (maybe a pipe): stderr's size is the fallback
        import shutil
        fallback = os.terminal_size((80, 24))
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fallback = os.get_terminal_size(stream.fileno())
        cols, rows = shutil.get_terminal_size(fallback)
    room = rows - 1 - opening - sum(max(1, -(-len(line) // max(cols, 1))) for line in lines)  # countdown, warning
    unicode, color = _unicode_terminal(stream), terminal and not os.environ.get("NO_COLOR")
    with contextlib.suppress(ValueError):  # longer than a QR code here holds
        if want_qr and (unicode or color or not terminal):  # an ASCII terminal without colour: '#' never scans
            matrix = _qr_encode(uri.encode("utf-8"))[0]
            art = _qr_render(matrix, unicode, color)
            need = max(cols, (len(matrix) + 8) * (1 if unicode else 2)), max(rows, rows - room + len(art) + 1)
            if need == (cols, rows):
                lines[-2:-2] = [""] + art
            elif room >= 2:  # say what would show it
                lines[-2:-2] = ["", "A QR code of this address needs a terminal of %d x %d or more." % need]
    console.info("\n".join(lines))


def _open_browser(console, uri):  # type: (_Console, str) -> None
    # --open, in a thread: a console browser or a BROWSER script that waits must not stop the polling.
    import threading
    import webbrowser

    def run():  # type: () -> None
        with contextlib.suppress(webbrowser.Error, OSError):
            if webbrowser.open(uri):
                return
        console.write("\r%s\r" % (" " * 20) if console.isatty() else "")  # not on the countdown's line
        console.warn("no web browser could be opened; open the address by hand")

    threading.Thread(target=run, name="standcloud-auth browser", daemon=True).start()


def _cmd_login(args, console):  # type: (Any, _Console) -> int
    auth = _auth(args, console)
    want_qr = args.qr if args.qr is not None else _env_flag(ENV_QR, os.environ)  # a usage error before any request

    def emit(**event):  # type: (**Any) -> None
        if args.json:
            _write_out(_dumps(event) + "\n")

    try:
        tokens = auth.logged_in()  # ConfigError when STANDCLOUD_TOKEN is set
    except StoreCorrupt as exc:  # contract: kept aside, never overwritten silently
        console.warn("the token store %s was unreadable; kept it as %s" % (exc.path, auth.store.keep_aside()))
        tokens = None
    if tokens is not None and not args.force:
        console.info("Already logged in to %s (tokens in %s); use --force to log in again." % (auth.url, auth.store.path))
        emit(event="logged_in", url=auth.url, expires_at=tokens.expires_at, already=True)
        return 0
    flow = auth.start_login()
    uri = flow.verification_uri_complete or flow.verification_uri
    emit(event="authorize", verification_uri=flow.verification_uri, verification_uri_complete=flow.verification_uri_complete,
         user_code=flow.user_code, expires_in=int(flow.expires_in), interval=flow.interval)
    _show_login(console, flow, console.isatty() if want_qr is None else want_qr, args.open)
    if args.open:
        _open_browser(console, uri)
    live = console.isatty() and not console.quiet  # a countdown on a terminal; elsewhere no spinner noise
    try:
        tokens = auth.wait_for_login(flow, (lambda left: console.write("\r  %d:%02d left " % divmod(int(left), 60)))
                                     if live else None)
    finally:
        console.write("\r%s\r" % (" " * 20) if live else "")
    if not args.no_check:
        response = auth.request("GET", HEALTHCHECK_PATH)
        if not response.ok:
            raise (AuthError if response.status in (401, 403) else ServerError)(
                "logged in, but the API healthcheck answered HTTP %d" % response.status, "the tokens are stored; check this "
                "account's access to the StandCloud API, or %s later" % _run("healthcheck"))
        console.info("The StandCloud API accepts the token (healthcheck ok).")
    console.info("Logged in to %s. The tokens are stored in %s" % (auth.url, auth.store.path))
    emit(event="logged_in", url=auth.url, expires_at=tokens.expires_at)
    return 0


# ==== §9 QR code ==============================================================
# The login address as a QR code a phone camera opens: bytes in, a matrix of modules out (_qr_encode), lines of text
# out (_qr_render); only `login` comes here. What a login URL needs: byte mode, levels L and M, versions 1-10 (10-L
# holds 271 bytes). Steps cite ISO/IEC 18004:2015 ("18004 §x"); the model is Nayuki's qrcodegen. Comments, not
# docstrings: the parser's tokens are what a copied file's start pays for.

# 18004 Table 9, versions 1-10: "EC codewords per block,blocks,data codewords" (the last blocks one more if uneven).
_QR_BLOCKS = {"L": "7,1,19 10,1,34 15,1,55 20,1,80 26,1,108 18,2,136 20,2,156 24,2,194 30,2,232 18,4,274",
              "M": "10,1,16 16,1,28 26,1,44 18,2,64 24,2,86 16,4,108 18,4,124 22,4,154 22,5,182 26,5,216"}


def _qr_blocks(version, ecl):  # type: (int, str) -> Tuple[int, ...]
    return tuple(map(int, _QR_BLOCKS[ecl].split()[version - 1].split(",")))


# 18004 §7.5.2: the EC codewords, data(x) * x^degree modulo the generator, the product of (x - 2^i) for i < degree,
# in GF(256) modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11D).
def _qr_reed_solomon(data, degree):  # type: (List[int], int) -> List[int]
    # exp[k] = 2^k, log its inverse: a * b = exp[log a + log b]; exp doubled, so no modulo (built per call, not at import)
    exp = [1]
    for k in range(509):
        exp.append(exp[k] << 1 ^ (exp[k] >> 7) * 0x11D)
    log = dict(zip(exp, range(255)))
    # The generator, highest power first, times (x - 2^i) in turn (minus is XOR; no coefficient is 0: Annex A).
    generator = [1]
    for i in range(degree):
        generator = [1] + [high ^ exp[log[low] + i] for high, low in zip(generator[1:] + [0], generator)]
    # Long division, a codeword at a time: the remainder shifts up, less factor * generator.
    remainder = [0] * degree
    for word in data:
        factor = word ^ remainder[0]
        remainder = [r ^ exp[log[g] + log[factor]] if factor else r for r, g in zip(remainder[1:] + [0], generator[1:])]
    return remainder


# 18004 §7.8.3.1: the mask penalty N1 + N2 + N3 + N4 of a matrix; lower is better.
def _qr_penalty(matrix):  # type: (List[List[bool]]) -> int
    import re

    # Rows of "0" (light) and "1" (dark); `lines`: the rows, then the columns, between 4 "-" (the quiet zone).
    n = len(matrix)
    rows = ["%d" * n % tuple(row) for row in matrix]
    lines = "----%s----" % "--------".join(rows + ["".join(column) for column in zip(*rows)])
    # N1: 5 + i modules of one colour in a row or column score 3 + i.
    return (sum(len(run) - 2 for run in re.findall("0{5,}|1{5,}", lines))
            # N3: each 1011101 (1:1:3:1:1) with 4 light modules (quiet zone included) before or after it: 40.
            + 40 * len(re.findall("(?=(?<=[-0]{4})1011101|1011101[-0]{4})", lines))
            # N2: each 2 x 2 block of one colour (overlapping) scores 3: a module, its right one, and the two n + 8 on.
            + 3 * len(re.findall("(?=([01])\\1.{%d}\\1\\1)" % (n + 6), "--------".join(rows)))
            # N4: 10 for each whole 5 % by which the dark share misses 50 % (`lines` holds each module twice).
            + 10 * abs(lines.count("1") - n * n) // (n * n) * 10)


# Data as a byte-mode QR code: (matrix, version, ecl, mask), rows of modules, True dark, no quiet zone. ecl ("L",
# "M"), version (1-10), mask (0-7) force a choice; else the smallest version that holds the data, M before L (a small
# symbol fits more terminals; a screen is not damaged paper), and the mask of the lowest penalty (ties: the lowest).
def _qr_encode(data, ecl=None, version=None, mask=None):
    # type: (bytes, Optional[str], Optional[int], Optional[int]) -> Tuple[List[List[bool]], int, str, int]
    from itertools import islice, zip_longest

    # The allowed (version, level) pairs that hold the data, or ValueError. 18004 §7.4: mode, count (Table 3) and
    # terminator take 4 + 8 + 4 bits, 2 codewords; from version 10 the count takes 16 bits, so 3.
    fits = [(ver, level) for ver in range(1, 11) for level in "ML"
            if version in (None, ver) and ecl in (None, level) and len(data) + 2 + (ver > 9) <= _qr_blocks(ver, level)[2]]
    if not fits:
        raise ValueError("no QR code of level %r, version %r, mask %r holds %.40r" % (ecl, version, mask, data))
    version, ecl = fits[0]
    # §7.4 in hex digits: mode 4 (0100), the count, the bytes, terminator 0, then the pad codewords EC, 11 (§7.4.10).
    ec, count, capacity = _qr_blocks(version, ecl)
    words = iter(bytes.fromhex(("4%04x%s0" if version > 9 else "4%02x%s0") % (len(data), data.hex())
                                + "ec11" * capacity)[:capacity])
    # §7.6: block b takes (capacity + b) // count codewords; the data interleaved column by column, then the EC.
    blocks = [list(islice(words, (capacity + b) // count)) for b in range(count)]
    bits = "".join(format(word, "08b") for group in (blocks, [_qr_reed_solomon(block, ec) for block in blocks])
                   for column in zip_longest(*group) for word in column if word is not None)

    # The symbol of a mask: function patterns (§6.3), format and version information (§7.9, §7.10), then the bits in
    # the data modules (None until then), masked (§7.7.3, §7.8.2).
    def symbol(mask):  # type: (int) -> List[List[bool]]
        # §6.3.3-4: the finder and separator below (top-left) drawn at three corners, [y][x] for the distances from the
        # nearest edges (size + ~k is size - 1 - k); §6.3.5: timing lines on row and column 6, dark at even positions.
        size = 4 * version + 17
        edge = [min(k, size + ~k) for k in range(size)]
        matrix = [["11111110 10000010 10111010 10111010 10111010 10000010 11111110 00000000".split()[y][x] == "1"
                   if y < 8 > x and min(r, c) < 8 else not (r + c) % 2 if 6 in (r, c) else None
                   for c, x in enumerate(edge)] for r, y in enumerate(edge)]  # type: List[List[Any]]
        # §6.3.6 alignment patterns wherever no finder is (there the module down-right of the centre is taken); Annex
        # E rows and columns to version 13: 6, the middle from version 7, and size - 7 (a[~6] is a[-7]).
        centres = [6, size // 2, ~6][::2 - (version > 6)] if version > 1 else []
        for row in centres:
            for col in centres:
                if matrix[row + 1][col + 1] is None:
                    for r, line in enumerate("11111 10001 10101 10001 11111".split()):
                        matrix[row + r - 2][col - 2:col + 3] = [module == "1" for module in line]
        # §7.9.1 format information, from Table C.1 (level, mask, BCH bits, XOR 0x5412), bit 14 first, for M masks 0-7
        # then L, the dark module's 1 put in after bit 8. Copy 2: up column 8 from the bottom (info[i]), then right
        # along row 8 (info[~i]); copy 1: down column 8 by the top-left finder, skipping row 6, and left along row 8.
        info = ("1010100100010010 1010001100100101 1011110101111100 1011011101001011 1000101111111001 "
                "1000000111001110 1001111110010111 1001010110100000 1110111111000100 1110010111110011 "
                "1111101110101010 1111000110011101 1100110100101111 1100011100011000 1101100101000001 "
                "1101001101110110").split()[8 * (ecl == "L") + mask]
        for i in range(8):
            p = i + (i > 5)
            matrix[8][p] = matrix[~i][8] = info[i] == "1"
            matrix[p][8] = matrix[8][~i] = info[~i] == "1"
        # §7.10 version information from version 7 (Table D.1, bit 0 first): bit k at row k % 3 - 11, column k // 3
        # (above the bottom-left finder), and transposed.
        for k, bit in enumerate(",,,,,,001010010011111000,001111011010000100,100110010101100100,110010110010010100"
                                .split(",")[version - 1]):
            matrix[k % 3 - 11][k // 3] = matrix[k // 3][k % 3 - 11] = bit == "1"
        # §7.7.3: two-column strips from the right, right module first, upwards where the right column is a multiple
        # of 4 (as the first is), a column further left past the timing line. §7.8.2 Table 10: a bit is inverted
        # where the mask's expression is 0 (s = r + c, p = r * c; p % 2 + p % 3 is 0 where p % 6 is, even where < 3).
        stream = iter(bits)
        for right in range(size - 1, 0, -2):
            for r in range(size)[::right % 4 - 1]:
                for c in right, right - 1:
                    c -= c <= 6
                    if matrix[r][c] is None:
                        s, p = r + c, r * c
                        matrix[r][c] = next(stream, "0") == "01"[(s % 2, r % 2, c % 3, s % 3, (r // 2 + c // 3) % 2,
                                                                  p % 6, p % 6 > 2, (s + p % 3) % 2)[mask] > 0]
        return matrix

    # §7.8.3: each mask scored on its whole symbol, format information included, as qrcodegen does.
    mask = min(range(8), key=lambda k: _qr_penalty(symbol(k))) if mask is None else mask
    return symbol(mask), version, ecl, mask


# The matrix as text in its light quiet zone of 4 (§6.3.8). unicode: half blocks, two rows a line, LIGHT modules as
# ink (plain: for a dark terminal; color: white on black). Else two columns a module: color paints spaces, plain "##".
def _qr_render(matrix, unicode, color):  # type: (List[List[bool]], bool, bool) -> List[str]
    quiet, light = [False] * 4, [[False] * len(matrix)] * 4
    grid = [quiet + list(row) + quiet for row in light + list(matrix) + light]
    if unicode:  # rows in pairs (a light row pads an odd number); ink where light, indexed 2 * top + low
        return [("\x1b[37;40m%s\x1b[0m" if color else "%s") % "".join("\u2588\u2580\u2584 "[2 * top + low]
                                                                       for top, low in zip(*pair))
                for pair in zip(*[iter(grid + grid[:1])] * 2)]
    lines = ["".join("##" if dark else "  " for dark in row) for row in grid]
    # In colour a dark cell is black spaces between white; a code only where the colour changes.
    return ["\x1b[47m%s\x1b[0m" % line.replace("##", "\x1b[40m  \x1b[47m").replace("\x1b[47m\x1b[40m", "")
            for line in lines] if color else lines


# ==== §10 entry point: main(), the one place where an error becomes a message ======


def _quoted(word):  # type: (str) -> str
    # ``word`` as it pastes into a shell (shlex only when needed: main() runs this every time).
    if word and not word.strip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-:+=,@%"):
        return word
    import shlex
    return '"%s"' % word if sys.platform == "win32" else shlex.quote(word)


def main(argv=None):  # type: (Optional[List[str]]) -> int
    """Run the command line with ``argv`` (default: sys.argv[1:]) and return its exit code."""
    global _run_as  # how the user ran this program (contract: output rule): the console script, -m, or a copied file
    _run_as = PROG if __name__ != "__main__" else ("python -m " + __spec__.name if __spec__ is not None
                                                    else "python " + _quoted(sys.argv[0] or "standcloud_auth.py"))
    console, args = _Console(), None  # type: _Console, Any
    try:
        try:
            args = _parser(_run_as).parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit:  # -h: argparse has printed the help (its errors raise ConfigError)
            return 0
        for name in ("url", "store", "ca_file", "insecure", "timeout", "verbose", "quiet"):
            setattr(args, name, getattr(args, name, None))  # SUPPRESS: absent unless given
        console.quiet, console.verbose = bool(args.quiet), bool(args.verbose)
        if args.version:
            _write_out("%s %s\n" % (PROG, __version__))
            return 0
        if args.command is None:
            raise ConfigError("no command given", "see '%s --help'" % _run_as)
        for flag, value in (("--url", args.url and _normalize_url(args.url)), ("--store", args.store)):
            _run_as += " %s %s" % (flag, _quoted(value)) if value else ""  # what the next command needs too
        return int(args.func(args, console))
    except StandCloudError as exc:
        code, message = exc.exit_code, str(exc)
        kind = exc.error if isinstance(exc, AuthError) and exc.error else {2: "config", 3: "auth", 4: "network"}.get(
            code, "server")
    except KeyboardInterrupt:
        console.write("\n")
        code, kind, message = 130, "cancelled", "login cancelled" if getattr(args, "command", "") == "login" else "interrupted"
    except Exception as exc:  # a bug: one line, and the traceback only with -v
        if console.verbose:
            import traceback
            traceback.print_exc()
        code, kind, message = 1, "internal", "internal error (%s); this is a bug: please report it at %s with the output " \
            "of -v" % (type(exc).__name__, ISSUES)
    console.error(message)
    if getattr(args, "command", "") == "login" and args.json:
        with contextlib.suppress(StandCloudError):
            _write_out(_dumps({"event": "error", "error": kind, "message": _safe(message, 2000), "exit_code": code}) + "\n")
    return code


if __name__ == "__main__":
    import gc
    code = main()
    if hasattr(gc, "freeze"):  # 3.7+: the interpreter's last collection would walk every object made, 6 ms (Speed)
        gc.freeze()  # novermin (hasattr above)
    sys.exit(code)
