#!/usr/bin/env python3
"""Log a test station into StandCloud with the OAuth 2.0 device flow.

standcloud-auth runs the Device Authorization Grant (RFC 8628) against a
StandCloud server, keeps the tokens in a private file, refreshes them (one
process at a time, with refresh-token rotation) and makes authenticated calls
to the StandCloud API. One file, CPython 3.6-3.13, standard library only:
copy it onto a station or vendor it into a repository.

Usage::

    python standcloud_auth.py --url company.standcloud.io login
    standcloud-auth token                  # prints a valid access token
    standcloud-auth api /test_report -d @report.json

    import standcloud_auth as sca
    auth = sca.StandCloudAuth("https://company.standcloud.io")
    auth.request("POST", "/test_report", json={"ok": True})

Contents (``grep -n '^# ==== §'``):

    §1  imports, metadata         §7  HTTP
    §2  constants                 §8  OAuth 2.0 protocol
    §3  errors                    §9  library facade (StandCloudAuth)
    §4  utilities                 §10 QR code
    §5  platform                  §11 command line
    §6  token store               §12 entry point

Licence: MIT.
"""

# ==== §1 imports, metadata ===================================================
#
# Only cheap modules are imported here: `token` with a valid stored token must
# start fast (contract: Speed). ssl, urllib.request, http.client, argparse,
# threading and webbrowser are imported where they are used.

import os
import sys
import time

# `typing` costs several milliseconds at start on old interpreters; type
# checkers treat the name TYPE_CHECKING as true, the interpreter does not.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple  # noqa: F401 (type comments)

__version__ = "1.0.0"

__all__ = [
    "AuthError",
    "ConfigError",
    "DeviceFlow",
    "LoginRequired",
    "NetworkError",
    "Response",
    "ServerError",
    "StandCloudAuth",
    "StandCloudError",
    "Tokens",
    "main",
]

# ==== §2 constants ===========================================================

PROG = "standcloud-auth"
CLIENT_ID = "hardpy-report-uploader"
SCOPE = "offline_access authelia.bearer.authz"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

API_PATH = "/hardpy/api/v1"
DEVICE_PATH = "/auth/api/oidc/device-authorization"
TOKEN_PATH = "/auth/api/oidc/token"
REVOCATION_PATH = "/auth/api/oidc/revocation"
HEALTHCHECK_PATH = "/healthcheck"  # below API_PATH

ENV_URL = "STANDCLOUD_URL"
ENV_STORE = "STANDCLOUD_TOKEN_FILE"
ENV_CA_FILE = "STANDCLOUD_CA_FILE"
ENV_INSECURE = "STANDCLOUD_INSECURE"
ENV_TIMEOUT = "STANDCLOUD_TIMEOUT"
ENV_TOKEN = "STANDCLOUD_TOKEN"
ENV_QR = "STANDCLOUD_QR"
ENV_ALLOW_HTTP = "STANDCLOUD_ALLOW_HTTP"

STORE_VERSION = 1
DEFAULT_TIMEOUT = 10.0
DEFAULT_MIN_VALID = 60.0
LOCK_TIMEOUT = 30.0  # seconds a process waits for the store's lock
MAX_BODY = 1024 * 1024  # contract: a body over 1 MiB is a server error
MAX_REDIRECTS = 5

# RFC 8628 §3.2/§3.5 polling rules.
DEFAULT_INTERVAL = 5.0  # when the server gives none
POLL_MARGIN = 0.10  # Authelia answers slow_down to a poll even slightly early
SLOW_DOWN_STEP = 5.0  # RFC 8628 §3.5: slow_down adds 5 s for the rest of the flow
MAX_BACKOFF = 60.0  # network errors and 5xx while polling double the wait to this

# Sanity bounds on server-given durations: anything outside is a malformed
# answer, not something to sleep on or store.
MAX_TOKEN_LIFETIME = 10 * 365 * 86400.0
MAX_CODE_LIFETIME = 86400.0
MAX_INTERVAL = 600.0

# ==== §3 errors ==============================================================


class StandCloudError(Exception):
    """Base of every error this module raises on purpose.

    ``exit_code`` is the command line's exit code for it; ``hint`` says what
    to do next. ``str(err)`` is the one-line message (never a secret).
    """

    exit_code = 1
    default_hint = None  # type: Optional[str]

    def __init__(self, message, hint=None):
        # type: (str, Optional[str]) -> None
        super().__init__(message)
        self.message = message
        # Contract (output rule): every error says what to do next.
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self):
        # type: () -> str
        if self.hint:
            return "%s; %s" % (self.message, self.hint)
        return self.message


class ConfigError(StandCloudError):
    """Usage or configuration problem (exit 2)."""

    exit_code = 2


class AuthError(StandCloudError):
    """Authentication failed (exit 3): denied, expired, rejected, 401/403.

    ``error`` and ``description`` carry the server's OAuth ``error`` and
    ``error_description`` when it gave them.
    """

    exit_code = 3
    default_hint = "run '%s login'" % PROG

    def __init__(self, message, hint=None, error=None, description=None):
        # type: (str, Optional[str], Optional[str], Optional[str]) -> None
        super().__init__(message, hint)
        self.error = error
        self.description = description


class LoginRequired(AuthError):
    """There is no usable session for this server: run ``login``."""

    def __init__(self, message, error=None, description=None):
        # type: (str, Optional[str], Optional[str]) -> None
        super().__init__(message, "run '%s login'" % PROG, error, description)


class NetworkError(StandCloudError):
    """DNS, refused, reset, timeout or TLS failure (exit 4)."""

    exit_code = 4
    default_hint = "check the network and try again"


class ServerError(StandCloudError):
    """An HTTP error or an answer that breaks the protocol (exit 5).

    ``status`` and ``body`` are the HTTP status and body when there was one.
    """

    exit_code = 5
    default_hint = "check the StandCloud URL, or try again later (-v shows each request)"

    def __init__(self, message, hint=None, status=None, body=None):
        # type: (str, Optional[str], Optional[int], Optional[bytes]) -> None
        super().__init__(message, hint)
        self.status = status
        self.body = body


# ==== §4 utilities ===========================================================
#
# The clock and sleep seams: tests replace these module attributes so that a
# ten-poll login runs in milliseconds. Always call them through the module
# globals, never bind them at import.


def _now():
    # type: () -> float
    """Unix wall-clock seconds (for ``*_at`` values that are stored)."""
    return time.time()


def _monotonic():
    # type: () -> float
    """Monotonic seconds (for ``*_deadline`` values, never stored)."""
    return time.monotonic()


def _sleep(seconds):
    # type: (float) -> None
    if seconds > 0:
        time.sleep(seconds)


def _env_flag(name, environ):
    # type: (str, Mapping[str, str]) -> Optional[bool]
    """Read a 0/1 environment switch; None when unset or empty."""
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError("%s=%r is not 0 or 1" % (name, raw), "set it to 0 or 1")


def _parse_timeout(value, source):
    # type: (Any, str) -> float
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (0 < seconds <= 3600):
        raise ConfigError(
            "%s must be a number of seconds between 0 and 3600, not %r" % (source, value),
            "for example --timeout 30",
        )
    return seconds


def _split_url(url):
    # type: (str) -> Tuple[str, str, str]
    """Split ``scheme://host[:port]/path`` into its parts, without urllib.

    urllib.parse costs more at start than the whole `token` hot path, and the
    URLs handled here are simple: no credentials, no query, no fragment.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("no scheme")
    netloc, slash, path = rest.partition("/")
    return scheme.lower(), netloc, slash + path


def _host_of(netloc):
    # type: (str) -> str
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")].lower()
    return netloc.rsplit(":", 1)[0].lower() if netloc.count(":") == 1 else netloc.lower()


def normalize_url(url):
    # type: (str) -> str
    """Return the StandCloud base URL ``B``: a scheme, no trailing slash.

    A bare host means https. Raises ConfigError for anything that is not a
    plain http(s) URL.
    """
    text = (url or "").strip()
    if "://" not in text:
        text = "https://" + text
    bad = ConfigError("%r is not a StandCloud URL" % (url,), "pass --url https://company.standcloud.io")
    try:
        scheme, netloc, path = _split_url(text)
    except ValueError:
        raise bad from None
    if scheme not in ("http", "https") or not netloc or "@" in netloc:
        raise bad
    if any(c in text for c in "?# \t\r\n\\") or not _host_of(netloc):
        raise bad
    if netloc.count(":") == 1:
        port = netloc.rsplit(":", 1)[1]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise bad
    # One spelling per server, so the store has one entry per server.
    return _origin("%s://%s" % (scheme, netloc)) + path.rstrip("/")


def _is_loopback(host):
    # type: (str) -> bool
    if host == "localhost" or host.endswith(".localhost"):
        return True
    import ipaddress  # only for http:// URLs

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http_policy(base, environ):
    # type: (str, Dict[str, str]) -> None
    """Contract: plain http only to loopback, or with STANDCLOUD_ALLOW_HTTP=1."""
    scheme, netloc, _ = _split_url(base)
    if scheme != "http" or _is_loopback(_host_of(netloc)):
        return
    if _env_flag(ENV_ALLOW_HTTP, environ):
        return
    raise ConfigError(
        "refusing plain http:// to %s: bearer tokens would cross the network in clear text"
        % _host_of(netloc),
        "use https://, or set %s=1 if you really mean it" % ENV_ALLOW_HTTP,
    )


def _origin(url):
    # type: (str) -> str
    scheme, netloc, _ = _split_url(url)
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    netloc = netloc.lower()
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return "%s://%s" % (scheme, netloc)


class _JSONContext(object):
    """The settings the C JSON scanner reads (those of json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = {}  # type: Dict[str, Any]

    @staticmethod
    def parse_constant(name):
        # type: (str) -> Any
        raise ValueError("%s is not valid JSON" % name)  # NaN, Infinity


def _loads(data, what):
    # type: (bytes, str) -> Any
    """Parse JSON, rejecting NaN/Infinity; any failure is a ValueError.

    `import json` imports `re`, about a third of the `token` hot path's
    budget; the C scanner behind json.loads does not need it.
    """
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("a byte order mark")
        try:
            from _json import make_scanner
        except ImportError:  # pragma: no cover - CPython always has _json
            import json

            return json.loads(text, parse_constant=_JSONContext.parse_constant)
        start = len(text) - len(text.lstrip(" \t\n\r"))
        try:
            value, end = make_scanner(_JSONContext)(text, start)  # type: ignore[arg-type]
        except StopIteration:
            raise ValueError("no JSON value") from None
        if text[end:].strip(" \t\n\r"):
            raise ValueError("extra data")
        return value
    except RecursionError:
        raise ValueError("%s is nested too deeply" % what) from None
    except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
        raise ValueError("%s is not valid JSON (%s)" % (what, type(exc).__name__)) from None


def _dumps(value, indent=None):
    # type: (Any, Optional[int]) -> str
    import json  # not on the hot path: see _loads

    return json.dumps(value, indent=indent, sort_keys=indent is not None)


def _is_number(value):
    # type: (Any) -> bool
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _is_token(value):
    # type: (str) -> bool
    """Visible ASCII only: safe in an HTTP header, a file and a terminal."""
    return bool(value) and all(33 <= ord(c) <= 126 for c in value)


def _read_str(obj, name, what, required=True, token=False):
    # type: (Dict[str, Any], str, str, bool, bool) -> Optional[str]
    """A string field of a server answer; ``token=True`` also checks that it
    is a visible-ASCII token (it goes into an HTTP header and a file)."""
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ServerError("%s has %s" % (what, "no %s" % name if value is None else "a malformed %s" % name))
    if token and not _is_token(value):
        raise ServerError("%s has a malformed %s (not a token)" % (what, name))
    return value


def _read_seconds(obj, name, what, upper, default=None):
    # type: (Dict[str, Any], str, str, float, Optional[float]) -> Optional[float]
    """A duration field: a finite number in [0, upper], or the default when absent."""
    value = obj.get(name)
    if value is None:
        return default
    if not _is_number(value) or not 0 <= value <= upper:
        raise ServerError("%s has an invalid %s (%s)" % (what, name, _short(value)))
    return float(value)


def _short(value):
    # type: (Any) -> str
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Console(object):
    """Everything for a person goes to stderr (contract: output rule)."""

    def __init__(self, stream=None, quiet=False, verbose=False):
        # type: (Optional[IO[str]], bool, bool) -> None
        self.stream = stream
        self.quiet = quiet
        self.verbose = verbose

    def _write(self, text):
        # type: (str) -> None
        stream = self.stream or sys.stderr
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:  # an old console code page: degrade, never drop
                encoding = getattr(stream, "encoding", None) or "ascii"
                stream.write(text.encode(encoding, "replace").decode(encoding))
            stream.flush()
        except (OSError, ValueError):  # a closed pipe is not our error
            pass

    def info(self, text):
        # type: (str) -> None
        if not self.quiet:
            self._write(text + "\n")

    def warn(self, text, always=False):
        # type: (str, bool) -> None
        """A warning; ``always`` for security warnings that -q must not hide."""
        if always or not self.quiet:
            self._write("%s: warning: %s\n" % (PROG, text))

    def debug(self, text):
        # type: (str) -> None
        if self.verbose:
            self._write("%s: %s\n" % (PROG, text))

    def error(self, text):
        # type: (str) -> None
        self._write("%s: error: %s\n" % (PROG, text))

    def isatty(self):
        # type: () -> bool
        stream = self.stream or sys.stderr
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False


# ==== §5 platform ============================================================


def default_store_path(environ=None, platform=None):
    # type: (Optional[Dict[str, str]], Optional[str]) -> str
    """The per-OS default token store (contract: Configuration, --store)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    home = env.get("HOME") or env.get("USERPROFILE") or os.path.expanduser("~")
    if platform == "win32":
        base = env.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
        return os.path.join(base, "standcloud", "tokens.json")
    if platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "standcloud", "tokens.json")
    xdg = env.get("XDG_CONFIG_HOME", "")
    # XDG Base Directory spec: a relative XDG_CONFIG_HOME is invalid and ignored.
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".config")
    return os.path.join(base, "standcloud", "tokens.json")


def _make_private_dirs(folder):
    # type: (str) -> None
    """Create ``folder`` and any missing parents with mode 0700.

    os.makedirs(mode=) applies the mode to the leaf only (Python 3.7+), so a
    missing ~/.config would otherwise follow the umask.
    """
    missing = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd):
        # type: (int) -> bool
        """Take the exclusive lock without blocking; False when it is held."""
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd):
        # type: (int) -> None
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    def _fsync_dir(folder):
        # type: (str) -> None
        """Windows cannot open a folder to fsync it; os.replace is enough there."""

    def _replace(source, target):
        # type: (str, str) -> None
        """os.replace, retried briefly: on Windows it fails with
        PermissionError while another process has the store open to read it
        (Python opens files without FILE_SHARE_DELETE). Giving up here would
        lose a refresh token the server has already rotated."""
        for _ in range(100):
            try:
                os.replace(source, target)
                return
            except PermissionError:
                time.sleep(0.01)
        os.replace(source, target)

else:
    import fcntl

    def _try_lock(fd):
        # type: (int) -> bool
        """Take the exclusive lock without blocking; False when it is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _unlock(fd):
        # type: (int) -> None
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _replace(source, target):
        # type: (str, str) -> None
        """os.replace: atomic on POSIX, even while readers hold the file open."""
        os.replace(source, target)

    def _fsync_dir(folder):
        # type: (str) -> None
        """Make the rename itself durable (POSIX: fsync the folder)."""
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse; the rename is still atomic
            pass
        finally:
            os.close(fd)


# ==== §6 token store =========================================================
#
# One JSON file for every server (contract: Token store). Reads need no lock
# because every write is an atomic replace. Read-refresh-write sequences hold
# the lock file beside the store for their whole length, so that exactly one
# process refreshes and no rotated refresh token is ever sent twice.

_ENTRY_FIELDS = {
    "access_token": (str,),
    "refresh_token": (str, type(None)),
    "token_type": (str,),
    "expires_at": (int, float, type(None)),
    "scope": (str, type(None)),
    "updated_at": (int, float, type(None)),
}


class StoreCorrupt(ConfigError):
    """The store exists but is not valid JSON or not this schema (exit 2)."""

    def __init__(self, path, reason):
        # type: (str, str) -> None
        super().__init__(
            "the token store %s is unreadable (%s)" % (path, reason),
            "fix or remove it, or run '%s login' to keep it aside and log in again" % PROG,
        )
        self.path = path


def _validate_store(doc, path):
    # type: (Any, str) -> Dict[str, Any]
    if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION:
        raise StoreCorrupt(path, "not a version %d token store" % STORE_VERSION)
    servers = doc.get("servers")
    if not isinstance(servers, dict):
        raise StoreCorrupt(path, "no 'servers' object")
    for url, entry in servers.items():
        if not isinstance(entry, dict):
            raise StoreCorrupt(path, "the entry for %s is not an object" % url)
        for name, types in _ENTRY_FIELDS.items():
            value = entry.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise StoreCorrupt(path, "the entry for %s has a missing or malformed %s" % (url, name))
            if isinstance(value, float) and not _is_number(value):
                raise StoreCorrupt(path, "the entry for %s has a malformed %s" % (url, name))
    return doc


class TokenStore(object):
    """The token file and its lock file.

    ``load()`` returns the whole document (an empty one when the file does
    not exist); ``save()`` replaces it atomically with mode 0600; ``lock()``
    is the cross-process lock for read-refresh-write.
    """

    def __init__(self, path, console=None):
        # type: (str, Optional[_Console]) -> None
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self._console = console or _Console()
        self._warned = False

    def __repr__(self):
        # type: () -> str
        return "TokenStore(%r)" % self.path

    def load(self):
        # type: () -> Dict[str, Any]
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(4 * MAX_BODY)
                self._check_mode(handle.fileno())
        except FileNotFoundError:
            return {"version": STORE_VERSION, "servers": {}}
        except IsADirectoryError:
            raise StoreCorrupt(self.path, "it is a folder") from None
        except OSError as exc:
            raise ConfigError(
                "cannot read the token store %s (%s)" % (self.path, exc.strerror or exc),
                "check its permissions or pass --store",
            ) from None
        try:
            doc = _loads(data, "it")
        except ValueError as exc:
            raise StoreCorrupt(self.path, "empty" if not data.strip() else str(exc)) from None
        return _validate_store(doc, self.path)

    def _check_mode(self, fd):
        # type: (int) -> None
        if sys.platform == "win32" or self._warned:
            return
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            self._warned = True
            self._console.warn(
                "the token store %s is readable by others (mode %03o); "
                "it will be made private (0600) on the next write" % (self.path, mode)
            )

    def entry(self, url):
        # type: (str) -> Optional[Dict[str, Any]]
        servers = self.load()["servers"]  # type: Dict[str, Dict[str, Any]]
        return servers.get(url)

    def save(self, doc):
        # type: (Dict[str, Any]) -> None
        """Atomic replace: temp file (0600 from the first byte), fsync, rename."""
        folder = os.path.dirname(self.path)
        _make_private_dirs(folder)
        data = (_dumps(doc, indent=1) + "\n").encode("utf-8")
        tmp = "%s.%s.tmp" % (self.path, os.urandom(6).hex())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            _replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)

    def set_entry(self, url, entry):
        # type: (str, Optional[Dict[str, Any]]) -> None
        """Store (or with None, remove) one server's entry; call under lock()."""
        doc = self.load()
        if entry is None:
            if url not in doc["servers"]:
                return
            del doc["servers"][url]
        else:
            doc["servers"][url] = entry
        self.save(doc)

    def keep_corrupt_aside(self):
        # type: () -> Optional[str]
        """Rename an unreadable store to tokens.json.corrupt-<unix time>."""
        target = "%s.corrupt-%d" % (self.path, int(_now()))
        try:
            os.replace(self.path, target)
        except FileNotFoundError:
            return None
        return target

    def lock(self, timeout=None):
        # type: (Optional[float]) -> _StoreLock
        return _StoreLock(self, LOCK_TIMEOUT if timeout is None else timeout)


class _StoreLock(object):
    """Context manager holding the store's lock file (never deleted)."""

    def __init__(self, store, timeout):
        # type: (TokenStore, float) -> None
        self.store = store
        self.timeout = timeout
        self.fd = None  # type: Optional[int]

    def __enter__(self):
        # type: () -> _StoreLock
        _make_private_dirs(os.path.dirname(self.store.lock_path))
        fd = os.open(self.store.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        # Real time, not the _sleep seam: other processes hold this lock.
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError(
                    "another standcloud-auth process has held the lock %s for over %g s"
                    % (self.store.lock_path, self.timeout),
                    "check for a stuck process, then try again",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.fd = fd
        return self

    def __exit__(self, *exc_info):
        # type: (Any) -> None
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                _unlock(fd)
            finally:
                os.close(fd)


# ==== §7 HTTP ================================================================
#
# One request() over urllib: a deadline for the whole request (a watchdog
# shuts the socket down, so a server that trickles cannot hold us past
# --timeout), a 1 MiB cap, no automatic redirects (followed here, and only
# within the origin when allowed), and every failure mapped to an exit code.


class Response(object):
    """An HTTP response: ``status``, ``headers`` (lower-case names), ``body``."""

    __slots__ = ("status", "headers", "body", "url")

    def __init__(self, status, headers, body, url):
        # type: (int, Dict[str, str], bytes, str) -> None
        self.status = status
        self.headers = headers
        self.body = body
        self.url = url

    def __repr__(self):
        # type: () -> str
        return "<Response %d, %d bytes>" % (self.status, len(self.body))

    @property
    def ok(self):
        # type: () -> bool
        return 200 <= self.status < 300

    def json(self):
        # type: () -> Any
        """The body parsed as JSON; ServerError (exit 5) when it is not."""
        try:
            return _loads(self.body, "the response from %s" % self.url)
        except ValueError as exc:
            raise ServerError(str(exc), status=self.status, body=self.body) from None

    def raise_for_status(self):
        # type: () -> Response
        """AuthError for 401/403, ServerError for any other status but 2xx
        (a 3xx that reaches here is one the origin rule did not follow)."""
        if self.status in (401, 403):
            raise AuthError(
                "the server refused the request to %s (HTTP %d)" % (self.url, self.status),
                "run '%s login' again" % PROG if self.status == 401 else "ask for access to this resource",
            )
        if not self.ok:
            raise ServerError("HTTP %d from %s" % (self.status, self.url), status=self.status, body=self.body)
        return self


class _Watchdog(object):
    """Shuts down a request's sockets when its deadline passes."""

    def __init__(self, seconds):
        # type: (float) -> None
        import threading

        self.fired = False
        self._done = False
        self._fds = []  # type: List[int]
        self._mutex = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock):
        # type: (Any) -> Any
        with self._mutex:
            self._fds.append(sock.fileno())
        return sock

    def _fire(self):
        # type: () -> None
        import socket

        with self._mutex:
            if self._done:
                return
            self.fired = True
            for fd in self._fds:
                # The TLS socket took over the raw socket's descriptor, so act
                # on the descriptor: shutdown wakes a blocked recv everywhere.
                try:
                    peer = socket.socket(fileno=fd)
                except OSError:
                    continue
                try:
                    peer.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                finally:
                    peer.detach()

    def stop(self):
        # type: () -> None
        with self._mutex:
            self._done = True
        self._timer.cancel()


class _Transport(object):
    """HTTP client settings: timeout, TLS, verbose log."""

    def __init__(self, timeout=DEFAULT_TIMEOUT, ca_file=None, insecure=False, console=None):
        # type: (float, Optional[str], bool, Optional[_Console]) -> None
        self.timeout = timeout
        self.ca_file = ca_file
        self.insecure = insecure
        self.console = console or _Console()
        self._context = None  # type: Any

    def ssl_context(self):
        # type: () -> Any
        if self._context is None:
            import ssl

            if self.ca_file is not None and not os.path.isfile(self.ca_file):
                raise ConfigError("the CA file %s does not exist" % self.ca_file, "check --ca-file")
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    "cannot load the CA file %s (%s)" % (self.ca_file, getattr(exc, "strerror", None) or exc),
                    "pass a PEM file of CA certificates with --ca-file",
                ) from None
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    def request(self, method, url, body=None, headers=None, redirects="none", origin=None):
        # type: (str, str, Optional[bytes], Optional[Dict[str, str]], str, Optional[str]) -> Response
        """Send one request; follow redirects only when ``redirects="origin"``
        and only while they stay on ``origin``. Returns any HTTP status."""
        origin = origin or _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send_once(method, url, body, headers or {})
            if response.status not in (301, 302, 303, 307, 308):
                return response
            target = self._redirect_target(response, url, redirects, origin)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None  # what browsers and urllib do
                headers = {k: v for k, v in (headers or {}).items() if k.lower() != "content-type"}
            url = target
        raise ServerError("too many redirects from %s" % url)

    @staticmethod
    def _redirect_target(response, url, redirects, origin):
        # type: (Response, str, str, str) -> str
        from urllib.parse import urljoin

        location = response.headers.get("location", "")
        target = urljoin(url, location)
        if redirects != "origin":
            raise ServerError(
                "%s answered with a redirect (HTTP %d), which this endpoint must not do"
                % (url, response.status),
                "check the StandCloud URL",
                status=response.status,
                body=response.body,
            )
        try:
            same = _origin(target) == origin
        except ValueError:
            same = False
        if not same:
            raise ServerError(
                "%s redirected to another origin (%s); not followed" % (url, _origin_or(target)),
                "check the StandCloud URL",
                status=response.status,
                body=response.body,
            )
        return target

    def _send_once(self, method, url, body, headers):
        # type: (str, str, Optional[bytes], Dict[str, str]) -> Response
        import urllib.request

        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("User-Agent", "%s/%s Python/%d.%d" % (PROG, __version__, sys.version_info[0], sys.version_info[1]))
        request.add_header("Accept", "application/json")
        for name, value in headers.items():
            request.add_header(name, value)
        started = time.monotonic()
        watchdog = _Watchdog(self.timeout)
        try:
            response = self._exchange(request, watchdog)
        except StandCloudError:
            self.console.debug("%s %s failed (%d ms)" % (method, url, (time.monotonic() - started) * 1000))
            raise
        finally:
            watchdog.stop()
        self.console.debug("%s %s %d %d ms" % (method, url, response.status, (time.monotonic() - started) * 1000))
        return response

    def _exchange(self, request, watchdog):
        # type: (Any, _Watchdog) -> Response
        import urllib.error

        opener = self._opener(watchdog)
        url = request.full_url
        try:
            try:
                handle = opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                handle = exc  # an error status still has headers and a body
            with handle:
                status = handle.getcode() or 0
                header_map = {}  # type: Dict[str, str]
                for name, value in handle.headers.items():
                    key = name.lower()
                    header_map[key] = header_map[key] + ", " + value if key in header_map else value
                body = self._read_body(handle, header_map, url)
        except StandCloudError:
            raise
        except Exception as exc:  # every transport failure is mapped below
            raise self._map_failure(exc, url, watchdog) from None
        if watchdog.fired:
            raise NetworkError("%s timed out after %g s" % (url, self.timeout), "check the network, or raise --timeout")
        return Response(status, header_map, body, url)

    @staticmethod
    def _read_body(handle, headers, url):
        # type: (Any, Dict[str, str], str) -> bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            raise ServerError("the response from %s is larger than 1 MiB" % url)
        chunks = []  # type: List[bytes]
        size = 0
        while True:
            chunk = handle.read(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BODY:
                raise ServerError("the response from %s is larger than 1 MiB" % url)
            chunks.append(chunk)

    def _opener(self, watchdog):
        # type: (_Watchdog) -> Any
        import http.client
        import urllib.request

        def connection(cls, **extra):
            # type: (Any, Any) -> Any
            def make(*args, **kwargs):
                # type: (Any, Any) -> Any
                kwargs.update(extra)
                conn = cls(*args, **kwargs)
                create = conn._create_connection
                conn._create_connection = lambda *a, **k: watchdog.track(create(*a, **k))
                return conn

            return make

        transport = self

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req):
                # type: (Any) -> Any
                return self.do_open(connection(http.client.HTTPConnection), req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def __init__(self):
                # type: () -> None
                # Since 3.12 HTTPSHandler() builds (and loads) a default SSL
                # context, ~30 ms per request; ours is made once, in ssl_context().
                urllib.request.AbstractHTTPHandler.__init__(self)

            def https_open(self, req):
                # type: (Any) -> Any
                return self.do_open(connection(http.client.HTTPSConnection, context=transport.ssl_context()), req)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                # type: (Any, Any) -> None
                return None  # a 3xx comes back as a response; request() decides

        return urllib.request.build_opener(HTTPHandler, HTTPSHandler, NoRedirect)

    def _map_failure(self, exc, url, watchdog):
        # type: (BaseException, str, _Watchdog) -> StandCloudError
        import http.client
        import socket
        import ssl
        import urllib.error

        host = _host_of(_split_url(url)[1])
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if watchdog.fired or isinstance(reason, socket.timeout):
            return NetworkError("%s timed out after %g s" % (url, self.timeout), "check the network, or raise --timeout")
        if isinstance(reason, ssl.SSLError) or isinstance(reason, ssl.CertificateError):
            text = getattr(reason, "verify_message", None) or getattr(reason, "reason", None) or str(reason)
            if "CERTIFICATE_VERIFY_FAILED" in str(reason) or isinstance(reason, ssl.CertificateError):
                return NetworkError(
                    "TLS certificate verification failed for %s (%s)" % (host, text),
                    "if the server uses an in-house CA, pass its certificate with --ca-file",
                )
            return NetworkError("TLS failure talking to %s (%s)" % (host, text), "check the URL and any proxy")
        if isinstance(reason, socket.gaierror):
            return NetworkError("cannot resolve %s" % host, "check the URL and the station's DNS")
        if isinstance(reason, ConnectionRefusedError):
            return NetworkError("connection to %s refused" % host, "check the URL and that the server is up")
        if isinstance(reason, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead)):
            return NetworkError("the connection to %s was dropped (%s)" % (host, type(reason).__name__), "try again")
        if isinstance(reason, http.client.HTTPException):
            return ServerError("%s did not answer with valid HTTP (%s)" % (host, type(reason).__name__), "check the URL")
        if isinstance(reason, (OSError, str)):
            return NetworkError("cannot reach %s (%s)" % (host, getattr(reason, "strerror", None) or reason), "check the network")
        return ServerError("unexpected failure talking to %s (%s)" % (host, type(reason).__name__))


def _origin_or(url):
    # type: (str) -> str
    try:
        return _origin(url)
    except ValueError:
        return "an invalid URL"


# ==== §8 OAuth 2.0 protocol ==================================================
#
# Pure protocol: the endpoints, their fields and their answers. No store.


def _read_text(obj, name, what, required=True):
    # type: (Dict[str, Any], str, str, bool) -> Optional[str]
    """A string for a person to read: refused if it holds control characters
    (a hostile server must not drive the operator's terminal)."""
    value = _read_str(obj, name, what, required)
    if value is not None and any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ServerError("%s has a malformed %s (control characters)" % (what, name))
    return value


class DeviceFlow(object):
    """A started device login (RFC 8628 §3.2), as ``start_login()`` returns it.

    Attributes keep the RFC's names: ``verification_uri``,
    ``verification_uri_complete`` (None when the server gave none),
    ``user_code``, ``expires_in``, ``interval``; ``expires_at`` is Unix time.
    The ``device_code`` is a secret and never shown by ``repr()``.
    """

    __slots__ = ("device_code", "user_code", "verification_uri", "verification_uri_complete",
                 "expires_in", "interval", "expires_at", "started", "deadline")

    def __init__(self, obj, what):
        # type: (Any, str) -> None
        if not isinstance(obj, dict):
            raise ServerError("%s is not a JSON object" % what)
        self.device_code = _read_str(obj, "device_code", what, token=True)
        self.user_code = _read_text(obj, "user_code", what)
        self.verification_uri = _read_text(obj, "verification_uri", what)
        self.verification_uri_complete = _read_text(obj, "verification_uri_complete", what, required=False)
        for uri in (self.verification_uri, self.verification_uri_complete):
            if uri is None:
                continue
            if not uri.lower().startswith(("https://", "http://")) or " " in uri:
                raise ServerError("%s has a verification URI that is not a web address" % what)
        expires_in = _read_seconds(obj, "expires_in", what, MAX_CODE_LIFETIME)
        if not expires_in:
            raise ServerError("%s has no usable expires_in" % what)
        self.expires_in = expires_in
        # RFC 8628 §3.2: 5 seconds when absent; never hammer on a 0.
        self.interval = max(1.0, _read_seconds(obj, "interval", what, MAX_INTERVAL, DEFAULT_INTERVAL) or 0.0)
        self.started = _monotonic()
        self.deadline = self.started + expires_in
        self.expires_at = _now() + expires_in

    def __repr__(self):
        # type: () -> str
        return "<DeviceFlow user_code=%r expires_in=%g>" % (self.user_code, self.expires_in)

    def as_event(self):
        # type: () -> Dict[str, Any]
        return {
            "event": "authorize",
            "verification_uri": self.verification_uri,
            "verification_uri_complete": self.verification_uri_complete,
            "user_code": self.user_code,
            "expires_in": int(self.expires_in),
            "interval": self.interval,
        }


def _post_form(transport, url, fields):
    # type: (_Transport, str, Dict[str, str]) -> Response
    from urllib.parse import urlencode

    body = urlencode(fields).encode("ascii")
    return transport.request("POST", url, body, {"Content-Type": "application/x-www-form-urlencoded"})


def _oauth_error(response):
    # type: (Response) -> Optional[Tuple[str, str]]
    """The (error, error_description) of an OAuth error body, else None."""
    try:
        obj = _loads(response.body, "error")
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), str):
        return None
    description = obj.get("error_description")
    clean = "".join(c for c in obj["error"] if c.isprintable())[:100]
    text = "".join(c for c in description if c.isprintable())[:300] if isinstance(description, str) else ""
    return clean, text


def _json_object(response, what):
    # type: (Response, str) -> Dict[str, Any]
    obj = response.json()
    if not isinstance(obj, dict):
        raise ServerError("%s is not a JSON object" % what, status=response.status, body=response.body)
    return obj


def _describe(error, description):
    # type: (str, str) -> str
    return "%s: %s" % (error, description) if description else error


def _start_device_flow(transport, base):
    # type: (_Transport, str) -> DeviceFlow
    """RFC 8628 §3.1: ask for a device code and a user code."""
    url = base + DEVICE_PATH
    fields = {"client_id": CLIENT_ID, "scope": SCOPE, "audience": base + API_PATH}
    response = _post_form(transport, url, fields)
    what = "the device authorization answer"
    if response.ok:
        return DeviceFlow(_json_object(response, what), what)
    error = _oauth_error(response)
    if error is not None and 400 <= response.status < 500:
        raise AuthError(
            "the server refused to start a login (%s)" % _describe(*error),
            "check the StandCloud URL and that this client is allowed",
            error[0], error[1],
        )
    raise ServerError("HTTP %d from %s" % (response.status, url), "try again later", response.status, response.body)


def _parse_tokens(obj, sent_at, what):
    # type: (Dict[str, Any], float, str) -> Dict[str, Any]
    """A token response (RFC 6749 §5.1) as a store entry."""
    access_token = _read_str(obj, "access_token", what, token=True)
    token_type = obj.get("token_type", "Bearer")  # required by the RFC; tolerated when absent
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ServerError("%s has token_type %s; only Bearer is supported" % (what, _short(token_type)))
    expires_in = _read_seconds(obj, "expires_in", what, MAX_TOKEN_LIFETIME)
    scope = obj.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise ServerError("%s has a malformed scope" % what)
    return {
        "access_token": access_token,
        "refresh_token": _read_str(obj, "refresh_token", what, required=False, token=True),
        "token_type": "Bearer",
        # Measured from when the request was sent: never later than the server's clock.
        "expires_at": None if expires_in is None else sent_at + expires_in,
        "scope": scope,
        "updated_at": _now(),
    }


def _token_rejection(response, url, doing):
    # type: (Response, str, str) -> StandCloudError
    """An error answer from the token endpoint, as an exception."""
    error = _oauth_error(response)
    if error is not None and 400 <= response.status < 500:
        return AuthError("the server rejected the %s (%s)" % (doing, _describe(*error)), None, error[0], error[1])
    if response.status in (400, 401):
        # Contract: some servers answer a rejected refresh token with an empty 400.
        return AuthError("the server rejected the %s (HTTP %d with no OAuth error)" % (doing, response.status))
    return ServerError("HTTP %d from %s" % (response.status, url), "try again later", response.status, response.body)


def _refresh_tokens(transport, base, refresh_token):
    # type: (_Transport, str, str) -> Dict[str, Any]
    """RFC 6749 §6. The audience is not resent: the server keeps the grant's."""
    url = base + TOKEN_PATH
    fields = {"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": refresh_token}
    sent_at = _now()
    response = _post_form(transport, url, fields)
    if not response.ok:
        raise _token_rejection(response, url, "refresh token")
    what = "the refresh answer"
    return _parse_tokens(_json_object(response, what), sent_at, what)


def _revoke(transport, base, token, hint):
    # type: (_Transport, str, str, str) -> None
    """RFC 7009 §2.1; 200 (also for an unknown token) is success."""
    url = base + REVOCATION_PATH
    response = _post_form(transport, url, {"client_id": CLIENT_ID, "token": token, "token_type_hint": hint})
    if not response.ok:
        raise _token_rejection(response, url, "revocation of the %s" % hint.replace("_", " "))


def _wait_until(target, flow, on_wait):
    # type: (float, DeviceFlow, Optional[Callable[[float], None]]) -> None
    """Sleep until the monotonic ``target``; tick ``on_wait`` about once a second."""
    while True:
        now = _monotonic()
        if now >= target:
            return
        if on_wait is None:
            _sleep(target - now)
        else:
            on_wait(max(0.0, flow.deadline - now))
            # Wake when the countdown's whole second changes.
            _sleep(min(target - now, (flow.deadline - now) % 1.0 or 1.0))


def _expired():
    # type: () -> AuthError
    return AuthError("the code expired before anyone approved it", "run login again", "expired_token")


# RFC 8628 §3.5 -- what each answer to a poll does:
#
#   answer                        action
#   200 with tokens               done
#   authorization_pending         poll again after `interval`
#   slow_down                     interval += 5 s for the rest of the flow
#   access_denied (400 or 403)    AuthError: denied
#   expired_token                 AuthError: the code expired; run login again
#   other OAuth error             AuthError with error and error_description
#   400/401 with no OAuth body    AuthError with the HTTP status
#   5xx, network failure          keep polling, the wait doubled (<= 60 s)
#   error after such a failure    AuthError: run login again (a device code is
#                                 single-use; a lost answer cannot be refetched)
#   local expires_in passed       AuthError: expired (Authelia keeps saying
#                                 authorization_pending after expiry)


def _poll_for_tokens(transport, base, flow, on_wait=None):
    # type: (_Transport, str, DeviceFlow, Optional[Callable[[float], None]]) -> Dict[str, Any]
    url = base + TOKEN_PATH
    fields = {"client_id": CLIENT_ID, "grant_type": DEVICE_GRANT, "device_code": flow.device_code or ""}
    interval = flow.interval
    wait = interval
    last = flow.started
    failed = False  # a poll went unanswered: its answer may have been the tokens
    while True:
        # Authelia restarts its timer on every poll, even a rejected one, and
        # answers slow_down to a poll that is early by a millisecond: a margin.
        next_poll = last + wait * (1.0 + POLL_MARGIN)
        if next_poll >= flow.deadline:
            _wait_until(flow.deadline, flow, on_wait)
            raise _expired()
        _wait_until(next_poll, flow, on_wait)
        sent_at = _now()
        try:
            response = _post_form(transport, url, fields)
        except NetworkError:
            response = None
        last = _monotonic()
        if response is None or response.status >= 500:
            failed = True
            wait = min(wait * 2.0, MAX_BACKOFF)
            continue
        if response.ok:
            what = "the token answer"
            return _parse_tokens(_json_object(response, what), sent_at, what)
        error = _oauth_error(response)
        code = error[0] if error else None
        if code == "authorization_pending":
            wait = interval
            continue
        if code == "slow_down":
            interval += SLOW_DOWN_STEP
            wait = interval
            continue
        raise _poll_failure(response, url, error, failed)


def _poll_failure(response, url, error, failed):
    # type: (Response, str, Optional[Tuple[str, str]], bool) -> StandCloudError
    code, description = error if error else (None, "")
    if code == "access_denied":
        return AuthError("the login was denied", "run login again to retry", code, description)
    if code == "expired_token":
        return _expired()
    if failed:
        return AuthError(
            "the server no longer accepts this device code (%s); an answer was lost on the network"
            % (_describe(code, description) if code else "HTTP %d" % response.status),
            "run login again",
            code,
            description,
        )
    rejection = _token_rejection(response, url, "login")
    if isinstance(rejection, AuthError):
        rejection.hint = "run login again"
    return rejection


# ==== §9 library facade ======================================================


class Tokens(object):
    """A server's stored session; ``repr()`` never shows a token."""

    __slots__ = ("access_token", "refresh_token", "token_type", "expires_at", "scope", "updated_at")

    def __init__(self, entry):
        # type: (Dict[str, Any]) -> None
        self.access_token = entry["access_token"]  # type: str
        self.refresh_token = entry.get("refresh_token")  # type: Optional[str]
        self.token_type = "Bearer"
        self.expires_at = entry.get("expires_at")  # type: Optional[float]
        self.scope = entry.get("scope")  # type: Optional[str]
        self.updated_at = entry.get("updated_at")  # type: Optional[float]

    def __repr__(self):
        # type: () -> str
        return "<Tokens expires_at=%r refresh_token=%s>" % (self.expires_at, "yes" if self.refresh_token else "no")


def _fresh(entry, min_valid):
    # type: (Dict[str, Any], float) -> bool
    """True when the access token lives ``min_valid`` seconds more.

    A token with no known expiry is used until the server answers 401."""
    expires_at = entry.get("expires_at")
    return expires_at is None or expires_at - _now() > min_valid


class StandCloudAuth(object):
    """Log in to one StandCloud server and call its API.

    Every argument left as None is taken from the environment, as on the
    command line (STANDCLOUD_URL, STANDCLOUD_TOKEN_FILE, STANDCLOUD_CA_FILE,
    STANDCLOUD_INSECURE, STANDCLOUD_TIMEOUT, STANDCLOUD_TOKEN), then from the
    defaults. ``token=`` (or STANDCLOUD_TOKEN) is a static bearer token: used
    as is, never refreshed, and nothing is written to disk.

    >>> auth = StandCloudAuth("company.standcloud.io")     # doctest: +SKIP
    >>> auth.request("GET", "/healthcheck").status          # doctest: +SKIP
    200
    """

    def __init__(self, url=None, store=None, ca_file=None, insecure=None, timeout=None,
                 token=None, environ=None, console=None):
        # type: (Optional[str], Optional[str], Optional[str], Optional[bool], Optional[float], Optional[str], Optional[Dict[str, str]], Optional[_Console]) -> None
        env = os.environ if environ is None else environ  # type: Any
        self._console = console or _Console()
        self._static = token if token is not None else (env.get(ENV_TOKEN, "").strip() or None)
        if self._static is not None and not _is_token(self._static):
            raise ConfigError("%s is not a valid bearer token" % ENV_TOKEN, "check the variable's value")
        self._store = TokenStore(store or env.get(ENV_STORE) or default_store_path(env), self._console)
        if insecure is None:
            insecure = bool(_env_flag(ENV_INSECURE, env))
        if timeout is None:
            timeout = _parse_timeout(env.get(ENV_TIMEOUT), ENV_TIMEOUT) if env.get(ENV_TIMEOUT) else DEFAULT_TIMEOUT
        else:
            timeout = _parse_timeout(timeout, "timeout")
        self._transport = _Transport(timeout, ca_file or env.get(ENV_CA_FILE) or None, insecure, self._console)
        if insecure:
            self._console.warn("TLS certificates are not verified (--insecure): anyone on the network can read the tokens",
                               always=True)
        self._preloaded = None  # type: Optional[Dict[str, Any]]
        self._url = self._resolve_url(url or env.get(ENV_URL))
        if self._url is not None:
            _check_http_policy(self._url, env)

    def _resolve_url(self, given):
        # type: (Optional[str]) -> Optional[str]
        if given:
            return normalize_url(given)
        if self._static is not None:
            return None  # `token` works without a URL; the others ask for one
        doc = self._store.load()
        servers = sorted(doc["servers"])  # type: List[str]
        if len(servers) == 1:
            self._preloaded = doc["servers"][servers[0]]  # spares `token` a second read
            return servers[0]
        raise ConfigError(
            "no StandCloud URL given and the token store has %s"
            % ("no server" if not servers else "several servers (%s)" % ", ".join(servers)),
            "pass --url https://company.standcloud.io or set %s" % ENV_URL,
        )

    def __repr__(self):
        # type: () -> str
        return "StandCloudAuth(%r)" % (self._url,)

    @property
    def url(self):
        # type: () -> str
        """The base URL ``B``."""
        if self._url is None:
            raise ConfigError("no StandCloud URL given", "pass --url https://company.standcloud.io or set %s" % ENV_URL)
        return self._url

    @property
    def api_url(self):
        # type: () -> str
        return self.url + API_PATH

    @property
    def store_path(self):
        # type: () -> str
        return self._store.path

    def _no_static(self, action):
        # type: (str) -> None
        if self._static is not None:
            raise ConfigError(
                "%s is set, so there is no stored session to %s" % (ENV_TOKEN, action),
                "unset %s to use the token store" % ENV_TOKEN,
            )

    # -- login ---------------------------------------------------------------

    def start_login(self):
        # type: () -> DeviceFlow
        """Start a device login (RFC 8628 §3.1); show the returned flow's
        ``verification_uri_complete`` and ``user_code`` to a person."""
        self._no_static("log in to")
        self._store.load()  # an unreadable store must stop us before, not after, the login
        return _start_device_flow(self._transport, self.url)

    def wait_for_login(self, flow, on_wait=None):
        # type: (DeviceFlow, Optional[Callable[[float], None]]) -> Tokens
        """Poll until the person approves; store and return the tokens.

        ``on_wait(seconds_left)`` is called about once a second while waiting.
        """
        entry = _poll_for_tokens(self._transport, self.url, flow, on_wait)
        with self._store.lock():
            self._store.set_entry(self.url, entry)
        return Tokens(entry)

    def logged_in(self, min_valid=DEFAULT_MIN_VALID):
        # type: (float) -> Optional[Tokens]
        """The session when it is usable (valid, or refreshed now), else None."""
        try:
            return Tokens(self._session(min_valid))
        except AuthError:
            return None

    # -- tokens --------------------------------------------------------------

    def access_token(self, min_valid=DEFAULT_MIN_VALID):
        # type: (float) -> str
        """A valid access token, refreshed first when it expires within
        ``min_valid`` seconds. Raises LoginRequired when there is no session."""
        return str(self._session(min_valid)["access_token"])

    def _session(self, min_valid):
        # type: (float) -> Dict[str, Any]
        """The store entry (or the static token as one), refreshed as needed."""
        if self._static is not None:
            return {"access_token": self._static, "token_type": "Bearer", "expires_at": None}
        entry = self._preloaded or self._store.entry(self.url)
        self._preloaded = None  # only the first use may skip reading the store
        if entry is not None and _fresh(entry, min_valid):
            return entry  # the hot path: one read, no lock, no network
        seen = entry["access_token"] if entry else None
        with self._store.lock():
            entry = self._require_entry()
            # Another process may have refreshed while we waited for the lock.
            if _fresh(entry, min_valid) or (entry["access_token"] != seen and _fresh(entry, 0)):
                return entry
            return self._refresh_locked(entry)

    def refresh(self):
        # type: () -> Tokens
        """Refresh now, whatever the expiry."""
        self._no_static("refresh")
        with self._store.lock():
            return Tokens(self._refresh_locked(self._require_entry()))

    def _require_entry(self):
        # type: () -> Dict[str, Any]
        entry = self._store.entry(self.url)
        if entry is None:
            raise LoginRequired("not logged in to %s" % self.url)
        return entry

    def _refresh_locked(self, entry):
        # type: (Dict[str, Any]) -> Dict[str, Any]
        """Refresh with the stored refresh token and store the result.

        Call only under the store's lock, with an entry read under it: a
        rotated refresh token sent twice ends the whole session (Authelia)."""
        refresh_token = entry.get("refresh_token")
        if not refresh_token:
            raise LoginRequired("the access token for %s has expired and there is no refresh token" % self.url)
        try:
            new = _refresh_tokens(self._transport, self.url, refresh_token)
        except AuthError as exc:
            if exc.error != "invalid_grant":
                raise  # contract: only invalid_grant ends the stored session
            self._store.set_entry(self.url, None)
            raise LoginRequired(
                "the server rejected the refresh token (%s); the session has ended"
                % _describe("invalid_grant", exc.description or ""),
                exc.error,
                exc.description,
            ) from None
        if new["refresh_token"] is None:
            new["refresh_token"] = refresh_token  # servers that do not rotate
        if new["scope"] is None:
            new["scope"] = entry.get("scope")
        self._store.set_entry(self.url, new)
        return new

    def _token_after_401(self, used):
        # type: (str) -> str
        """Contract: a 401 usually means another process refreshed (which
        revokes the old access token). Use its token, else refresh."""
        with self._store.lock():
            entry = self._require_entry()
            if entry["access_token"] != used:
                return str(entry["access_token"])
            return str(self._refresh_locked(entry)["access_token"])

    # -- API -----------------------------------------------------------------

    def _api_target(self, path):
        # type: (str) -> str
        if path.startswith("/"):
            return self.api_url + path
        if "://" in path:
            try:
                same = _origin(path) == _origin(self.url)
            except ValueError:
                same = False
            if not same:
                raise ConfigError("%s is not on the StandCloud origin %s" % (path, _origin(self.url)),
                                  "give a path such as /healthcheck")
            if not path.startswith(self.api_url + "/"):
                self._console.warn("%s is outside the API (%s); the token may not be valid there" % (path, self.api_url))
            return path
        raise ConfigError("the API path %r does not start with /" % path, "give a path such as /test_report")

    def request(self, method, path, json=None, data=None, headers=None):
        # type: (str, str, Any, Any, Optional[Dict[str, str]]) -> Response
        """An authenticated request to ``API + path`` (or a full URL on the
        same origin). ``json=`` is sent as application/json; ``data=`` as is
        (bytes or str). Returns the Response for any status, after one retry
        on 401; use ``raise_for_status()`` to turn errors into exceptions.

        >>> auth.request("POST", "/test_report", json=report).raise_for_status()  # doctest: +SKIP
        """
        url = self._api_target(path)
        send_headers = dict(headers or {})
        body = None  # type: Optional[bytes]
        if json is not None:
            body = _dumps(json).encode("utf-8")
            send_headers.setdefault("Content-Type", "application/json")
        elif data is not None:
            body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            if not any(k.lower() == "content-type" for k in send_headers):
                send_headers["Content-Type"] = "application/octet-stream"
        token = self.access_token()
        response = self._send_api(method.upper(), url, body, send_headers, token)
        if response.status == 401 and self._static is None:
            response = self._send_api(method.upper(), url, body, send_headers, self._token_after_401(token))
        return response

    def _send_api(self, method, url, body, headers, token):
        # type: (str, str, Optional[bytes], Dict[str, str], str) -> Response
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = "Bearer " + token
        # Redirects are followed only within B's origin: the bearer token
        # never reaches another origin.
        return self._transport.request(method, url, body, headers, redirects="origin", origin=_origin(self.url))

    def healthcheck(self):
        # type: () -> bool
        """GET API/healthcheck: True on 2xx, False on another status;
        AuthError on 401 (after one retry) or 403."""
        response = self.request("GET", HEALTHCHECK_PATH)
        if response.status in (401, 403):
            response.raise_for_status()
        return response.ok

    # -- logout and status ---------------------------------------------------

    def logout(self, revoke=True):
        # type: (bool) -> bool
        """Remove the stored session and (``revoke=True``) revoke its tokens
        at the server, best effort: a failure is a warning. Returns whether
        there was a session."""
        self._no_static("log out of")
        with self._store.lock():
            entry = self._store.entry(self.url)
            self._store.set_entry(self.url, None)
        if entry is None:
            return False
        if revoke:
            # RFC 7009: the refresh token first; with Authelia either ends the session.
            for hint in ("refresh_token", "access_token"):
                if not entry.get(hint):
                    continue
                try:
                    _revoke(self._transport, self.url, entry[hint], hint)
                except StandCloudError as exc:
                    self._console.warn("could not revoke the %s at the server: %s" % (hint.replace("_", " "), exc.message))
        return True

    def status(self):
        # type: () -> Dict[str, Any]
        """The contract's status object; reads the store, calls no server."""
        if self._static is not None:
            return {"url": self._url, "store": None, "source": "environment", "logged_in": True,
                    "access_token_expires_at": None, "access_token_expires_in": None,
                    "has_refresh_token": False, "refreshed_at": None, "scope": None}
        entry = self._store.entry(self.url) or {}
        expires_at = entry.get("expires_at")
        valid = bool(entry) and (expires_at is None or expires_at > _now())
        return {
            "url": self.url,
            "store": self._store.path,
            "source": "file" if entry else None,
            "logged_in": valid or bool(entry.get("refresh_token")),
            "access_token_expires_at": expires_at,
            "access_token_expires_in": None if expires_at is None else int(expires_at - _now()),
            "has_refresh_token": bool(entry.get("refresh_token")),
            "refreshed_at": entry.get("updated_at"),
            "scope": entry.get("scope"),
        }


# ==== §10 QR code ============================================================
# A QR code of the verification URI, drawn as text, so that a phone camera
# can open the page. Self-contained: bytes in, module matrix out, then text.
# Byte mode only, levels M and L, versions 1-40. Each step is one small
# function that cites its clause of ISO/IEC 18004:2015 (as "18004 §x").
#
# The encoder is kept as source text and compiled on first use, into a
# module of its own (_qr_module()). `python standcloud_auth.py token` compiles
# this whole file on every start, and compiling the encoder alone costs about
# 3 MiB of the 7 MiB the contract allows that start (Speed); only `login` on a
# terminal needs it. It is ordinary Python below: read it as such. Its line
# numbers in tracebacks are this file's.


def _qr_module():
    # type: () -> Any
    """The QR encoder: _qr_encode(data) -> (modules, version, ecl, mask),
    _qr_render(modules, unicode, color) -> text, _qr_penalty(modules)."""
    module = sys.modules.get(__name__ + "._qr")
    if module is None:
        import types

        module = types.ModuleType(__name__ + "._qr", "The QR encoder of %s (§10)." % __name__)
        code = compile("\n" * _QR_LINE + _QR_SOURCE, __file__, "exec")
        exec(code, module.__dict__)
        sys.modules[module.__name__] = module
    return module


_QR_LINE = sys._getframe().f_lineno  # the source below starts on the next line
_QR_SOURCE = r'''
_QR_MAX_BYTES = 250  # a verification_uri_complete is far shorter

# 18004 Table 9: error correction per version, for levels L and M.
# Every block of one level carries the same number of EC codewords.
#  version  L: EC per block, blocks    M: EC per block, blocks
_QR_EC_TABLE = (
    (1, 7, 1, 10, 1), (2, 10, 1, 16, 1), (3, 15, 1, 26, 1),
    (4, 20, 1, 18, 2), (5, 26, 1, 24, 2), (6, 18, 2, 16, 4),
    (7, 20, 2, 18, 4), (8, 24, 2, 22, 4), (9, 30, 2, 22, 5),
    (10, 18, 4, 26, 5), (11, 20, 4, 30, 5), (12, 24, 4, 22, 8),
    (13, 26, 4, 22, 9), (14, 30, 4, 24, 9), (15, 22, 6, 24, 10),
    (16, 24, 6, 28, 10), (17, 28, 6, 28, 11), (18, 30, 6, 26, 13),
    (19, 28, 7, 26, 14), (20, 28, 8, 26, 16), (21, 28, 8, 26, 17),
    (22, 28, 9, 28, 17), (23, 30, 9, 28, 18), (24, 30, 10, 28, 20),
    (25, 26, 12, 28, 21), (26, 28, 12, 28, 23), (27, 30, 12, 28, 25),
    (28, 30, 13, 28, 26), (29, 30, 14, 28, 28), (30, 30, 15, 28, 29),
    (31, 30, 16, 28, 31), (32, 30, 17, 28, 33), (33, 30, 18, 28, 35),
    (34, 30, 19, 28, 37), (35, 30, 19, 28, 38), (36, 30, 20, 28, 40),
    (37, 30, 21, 28, 43), (38, 30, 22, 28, 45), (39, 30, 24, 28, 47),
    (40, 30, 25, 28, 49),
)

# 18004 Annex E, Table E.1: row/column coordinates of alignment pattern
# centres. A pattern sits at every pairing except the three finder corners.
#  version, centres
_QR_ALIGN_TABLE = (
    (1, ()), (2, (6, 18)), (3, (6, 22)), (4, (6, 26)), (5, (6, 30)),
    (6, (6, 34)), (7, (6, 22, 38)), (8, (6, 24, 42)), (9, (6, 26, 46)),
    (10, (6, 28, 50)), (11, (6, 30, 54)), (12, (6, 32, 58)),
    (13, (6, 34, 62)), (14, (6, 26, 46, 66)), (15, (6, 26, 48, 70)),
    (16, (6, 26, 50, 74)), (17, (6, 30, 54, 78)), (18, (6, 30, 56, 82)),
    (19, (6, 30, 58, 86)), (20, (6, 34, 62, 90)),
    (21, (6, 28, 50, 72, 94)), (22, (6, 26, 50, 74, 98)),
    (23, (6, 30, 54, 78, 102)), (24, (6, 28, 54, 80, 106)),
    (25, (6, 32, 58, 84, 110)), (26, (6, 30, 58, 86, 114)),
    (27, (6, 34, 62, 90, 118)), (28, (6, 26, 50, 74, 98, 122)),
    (29, (6, 30, 54, 78, 102, 126)), (30, (6, 26, 52, 78, 104, 130)),
    (31, (6, 30, 56, 82, 108, 134)), (32, (6, 34, 60, 86, 112, 138)),
    (33, (6, 30, 58, 86, 114, 142)), (34, (6, 34, 62, 90, 118, 146)),
    (35, (6, 30, 54, 78, 102, 126, 150)), (36, (6, 24, 50, 76, 102, 128, 154)),
    (37, (6, 28, 54, 80, 106, 132, 158)), (38, (6, 32, 58, 84, 110, 136, 162)),
    (39, (6, 26, 54, 82, 110, 138, 166)), (40, (6, 30, 58, 86, 114, 142, 170)),
)

# 18004 Table 12: the two error correction level bits of the format info.
_QR_ECL_BITS = {"L": 0b01, "M": 0b00}

# 18004 Table 10: mask condition per mask number; i = row, j = column.
# A data module is inverted where the condition holds.
_QR_MASKS = (
    lambda i, j: (i + j) % 2 == 0,
    lambda i, j: i % 2 == 0,
    lambda i, j: j % 3 == 0,
    lambda i, j: (i + j) % 3 == 0,
    lambda i, j: (i // 2 + j // 3) % 2 == 0,
    lambda i, j: (i * j) % 2 + (i * j) % 3 == 0,
    lambda i, j: ((i * j) % 2 + (i * j) % 3) % 2 == 0,
    lambda i, j: ((i + j) % 2 + (i * j) % 3) % 2 == 0,
)  # type: Tuple[Callable[[int, int], bool], ...]


def _qr_gf_tables():
    # type: () -> Tuple[List[int], List[int]]
    """Return (exp, log) tables of GF(256) with the 18004 §7.5.2 field
    polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d); exp is doubled in
    length so exp[log a + log b] needs no modulo."""
    exp = [0] * 512
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        value <<= 1
        if value & 0x100:
            value ^= 0x11D
    for power in range(255, 512):
        exp[power] = exp[power - 255]
    return exp, log


_QR_GF_EXP, _QR_GF_LOG = _qr_gf_tables()  # 256 steps: negligible at import


def _qr_rs_generator(degree):
    # type: (int) -> List[int]
    """Coefficients (highest power first, leading 1 dropped) of the
    18004 §7.5.2 generator polynomial: the product of (x - a^i), i < degree."""
    poly = [1]
    for i in range(degree):
        # Multiply by (x + a^i): subtraction is XOR in GF(2^8).
        nxt = poly + [0]
        for k, coef in enumerate(poly):
            if coef:
                nxt[k + 1] ^= _QR_GF_EXP[_QR_GF_LOG[coef] + i]
        poly = nxt
    return poly[1:]


def _qr_rs_product(generator, factor):
    # type: (List[int], int) -> int
    """generator(x) * factor as one integer, a byte per coefficient."""
    if not factor:
        return 0
    flog = _QR_GF_LOG[factor]
    coefs = bytes(_QR_GF_EXP[_QR_GF_LOG[g] + flog] if g else 0
                  for g in generator)
    return int.from_bytes(coefs, "big")


def _qr_rs_remainder(data, generator, products):
    # type: (List[int], List[int], Dict[int, int]) -> List[int]
    """The EC codewords of one block (18004 §7.5.2): the remainder of
    data(x) * x^degree divided by the generator, by long division in an
    integer used as a shift register of degree bytes. products caches
    generator * factor across the blocks of a symbol."""
    degree = len(generator)
    top = 8 * (degree - 1)
    keep = (1 << (8 * degree)) - 1
    rem = 0
    for byte in data:
        factor = byte ^ (rem >> top)
        if factor not in products:
            products[factor] = _qr_rs_product(generator, factor)
        rem = ((rem << 8) & keep) ^ products[factor]
    return list(rem.to_bytes(degree, "big"))


def _qr_raw_modules(version):
    # type: (int) -> int
    """Modules left for data and EC bits once the function patterns and
    the format/version areas are taken (18004 Table 1, column "data
    modules except", counted here rather than tabulated)."""
    size = 4 * version + 17
    # Three finders with separators (8x8 each), both timing patterns,
    # 2 x 15 format modules and the dark module.
    used = 3 * 64 + 2 * (size - 16) + 31
    if version >= 2:
        n = len(_QR_ALIGN_TABLE[version - 1][1])
        # 5x5 each, minus the 5 modules each shares with a timing pattern.
        used += 25 * (n * n - 3) - 10 * (n - 2)
    if version >= 7:
        used += 2 * 18  # two 6x3 version information blocks
    return size * size - used


def _qr_data_capacity(version, ecl):
    # type: (int, str) -> int
    """Data codewords of a version at a level: all codewords less EC."""
    row = _QR_EC_TABLE[version - 1]
    ec, blocks = (row[1], row[2]) if ecl == "L" else (row[3], row[4])
    return _qr_raw_modules(version) // 8 - ec * blocks


def _qr_bits_needed(length, version):
    # type: (int, int) -> int
    """Bits of a byte-mode segment: 4-bit mode indicator, the character
    count (8 bits up to version 9, else 16: 18004 Table 3), the data."""
    return 4 + (8 if version <= 9 else 16) + 8 * length


def _qr_choose(length, ecl, version):
    # type: (int, Optional[str], Optional[int]) -> Tuple[int, str]
    """Smallest version (or the one given) that holds length bytes, at
    level M, falling back to L only when M cannot hold them."""
    levels = ["M", "L"] if ecl is None else [ecl]
    versions = list(range(1, 41)) if version is None else [version]
    for level in levels:
        if level not in _QR_ECL_BITS:
            raise ValueError("QR level must be 'L' or 'M'")
        for ver in versions:
            if not 1 <= ver <= 40:
                raise ValueError("QR version must be 1 to 40")
            room = 8 * _qr_data_capacity(ver, level)
            if _qr_bits_needed(length, ver) <= room:
                return ver, level
    raise ValueError(f"{length} bytes do not fit a QR code here")


def _qr_data_codewords(data, version, capacity):
    # type: (bytes, int, int) -> List[int]
    """18004 §7.4: byte-mode bit stream, terminator, padding to capacity."""
    count_bits = 8 if version <= 9 else 16
    bits = "0100" + format(len(data), f"0{count_bits}b")
    bits += "".join(format(byte, "08b") for byte in data)
    # §7.4.9: a terminator of up to four 0 bits, then 0s to a byte boundary.
    bits += "0" * min(4, 8 * capacity - len(bits))
    bits += "0" * (-len(bits) % 8)
    words = [int(bits[k:k + 8], 2) for k in range(0, len(bits), 8)]
    # §7.4.10: fill the rest with the pad codewords 11101100 and 00010001.
    pads = (0xEC, 0x11)
    words += [pads[k % 2] for k in range(capacity - len(words))]
    return words


def _qr_interleave(words, version, ecl):
    # type: (List[int], int, str) -> List[int]
    """18004 §7.5.2 and §7.6: split the data into blocks (the shorter
    blocks first, the longer ones one codeword more), add each block's EC,
    then take the data column by column, then the EC likewise."""
    row = _QR_EC_TABLE[version - 1]
    ec, nblocks = (row[1], row[2]) if ecl == "L" else (row[3], row[4])
    short_len = len(words) // nblocks
    nlong = len(words) % nblocks
    generator = _qr_rs_generator(ec)
    products = {}  # type: Dict[int, int]
    blocks = []  # type: List[List[int]]
    ecs = []  # type: List[List[int]]
    start = 0
    for b in range(nblocks):
        end = start + short_len + (1 if b >= nblocks - nlong else 0)
        blocks.append(words[start:end])
        ecs.append(_qr_rs_remainder(words[start:end], generator, products))
        start = end
    out = []  # type: List[int]
    for k in range(short_len + 1):
        out.extend(block[k] for block in blocks if k < len(block))
    for k in range(ec):
        out.extend(e[k] for e in ecs)
    return out


def _qr_bch(value, poly, degree):
    # type: (int, int, int) -> int
    """value followed by its BCH remainder: value * x^degree mod poly."""
    rem = value << degree
    for shift in range(rem.bit_length() - poly.bit_length(), -1, -1):
        if rem & (1 << (shift + poly.bit_length() - 1)):
            rem ^= poly << shift
    return (value << degree) | rem


def _qr_format_bits(ecl, mask):
    # type: (str, int) -> int
    """18004 §7.9.1: BCH(15,5) of level and mask, generator 0x537,
    XORed with 0x5412 so that no format string is all zeros."""
    return _qr_bch((_QR_ECL_BITS[ecl] << 3) | mask, 0x537, 10) ^ 0x5412


def _qr_version_bits(version):
    # type: (int) -> int
    """18004 §7.10: BCH(18,6) of the version number, generator 0x1f25."""
    return _qr_bch(version, 0x1F25, 12)


def _qr_draw_finder(modules, reserved, top, left):
    # type: (List[List[bool]], List[List[bool]], int, int) -> None
    """18004 §6.3.3 finder (7x7: dark ring, light ring, 3x3 dark core)
    with its §6.3.4 light separator, clipped at the symbol's edge."""
    size = len(modules)
    for i in range(-1, 8):
        for j in range(-1, 8):
            r, c = top + i, left + j
            if 0 <= r < size and 0 <= c < size:
                ring = max(abs(i - 3), abs(j - 3))  # 0 centre .. 4 separator
                modules[r][c] = ring in (0, 1, 3)
                reserved[r][c] = True


def _qr_function_patterns(version):
    # type: (int) -> Tuple[List[List[bool]], List[List[bool]]]
    """The symbol with every function pattern drawn, and the map of
    modules that data must skip (format and version areas included)."""
    size = 4 * version + 17
    modules = [[False] * size for _ in range(size)]
    reserved = [[False] * size for _ in range(size)]
    for top, left in ((0, 0), (0, size - 7), (size - 7, 0)):
        _qr_draw_finder(modules, reserved, top, left)
    # §6.3.5 timing patterns: row 6 and column 6 alternate, dark on even.
    for k in range(8, size - 8):
        modules[6][k] = modules[k][6] = k % 2 == 0
        reserved[6][k] = reserved[k][6] = True
    centres = _QR_ALIGN_TABLE[version - 1][1]
    corners = {(6, 6), (6, size - 7), (size - 7, 6)}
    for r in centres:
        for c in centres:
            if (r, c) in corners:
                continue  # §6.3.6: no alignment pattern over a finder
            for i in range(-2, 3):
                for j in range(-2, 3):
                    modules[r + i][c + j] = max(abs(i), abs(j)) != 1
                    reserved[r + i][c + j] = True
    # §7.9.1: format areas beside the finders, and the dark module.
    for k in range(9):
        reserved[8][k] = reserved[k][8] = True
    for k in range(8):
        reserved[8][size - 1 - k] = reserved[size - 1 - k][8] = True
    modules[size - 8][8] = True
    if version >= 7:  # §7.10: two 6x3 version blocks
        for k in range(18):
            reserved[k // 3][size - 11 + k % 3] = True
            reserved[size - 11 + k % 3][k // 3] = True
    return modules, reserved


def _qr_place_data(modules, reserved, codewords):
    # type: (List[List[bool]], List[List[bool]], List[int]) -> None
    """18004 §7.7.3: bits go most significant first into two-column
    strips from the bottom-right corner, up then down alternately,
    skipping function modules and the vertical timing column; leftover
    remainder bits stay 0 (light) and are masked like data."""
    size = len(modules)
    cells = []  # type: List[Tuple[int, int]]
    for pair, right in enumerate(range(size - 1, 0, -2)):
        if right <= 6:
            right -= 1  # left of the timing column the pairs shift by one
        rows = range(size - 1, -1, -1) if pair % 2 == 0 else range(size)
        cells += [(r, c) for r in rows for c in (right, right - 1)
                  if not reserved[r][c]]
    bits = "".join(format(w, "08b") for w in codewords)
    for (r, c), bit in zip(cells, bits):
        modules[r][c] = bit == "1"


def _qr_draw_info(modules, ecl, mask, version):
    # type: (List[List[bool]], str, int, int) -> None
    """Write format information (18004 §7.9.1; bit 0 is the least
    significant) in both copies, and version information (§7.10) in both
    blocks from version 7 on."""
    size = len(modules)
    fmt = _qr_format_bits(ecl, mask)
    bits = [(fmt >> k) & 1 == 1 for k in range(15)]
    # Copy 1 wraps the top-left finder, skipping the timing modules.
    spots = [(k, 8) for k in range(6)] + [(7, 8), (8, 8), (8, 7)]
    spots += [(8, 14 - k) for k in range(9, 15)]
    # Copy 2 is split: bits 0-7 along row 8 under the top-right finder,
    # from the right edge; bits 8-14 down column 8 beside the bottom-left
    # finder, below the dark module.
    spots += [(8, size - 1 - k) for k in range(8)]
    spots += [(size - 15 + k, 8) for k in range(8, 15)]
    for n, (r, c) in enumerate(spots):
        modules[r][c] = bits[n % 15]
    if version >= 7:
        ver = _qr_version_bits(version)
        for k in range(18):
            dark = (ver >> k) & 1 == 1
            modules[k // 3][size - 11 + k % 3] = dark
            modules[size - 11 + k % 3][k // 3] = dark


_QR_BITS = bytes.maketrans(b"\x00\x01", b"01")  # bools as b"0"/b"1"


def _qr_line_ints(lines):
    # type: (List[List[bool]]) -> List[int]
    """Each line of modules as an integer, first module the highest bit:
    the penalty rules then run as bit operations, not Python loops."""
    return [int(bytes(line).translate(_QR_BITS), 2) for line in lines]


def _qr_masked_rows(rows, free, size, mask):
    # type: (List[int], List[int], int, int) -> List[int]
    """Rows (as from _qr_line_ints) with mask applied to the data modules
    only (18004 §7.8.2): free has a 1 bit for each data module. Every
    mask repeats every 12 rows and columns, so one 12x12 tile builds it."""
    cond = _QR_MASKS[mask]
    tile = ["".join("1" if cond(i, j) else "0" for j in range(12))
            for i in range(12)]
    reps = size // 12 + 1
    return [row ^ (int((tile[i % 12] * reps)[:size], 2) & free[i])
            for i, row in enumerate(rows)]


def _qr_ones(value):
    # type: (int) -> int
    """Number of 1 bits (int.bit_count is 3.10+)."""
    return bin(value).count("1")


def _qr_pack(lines):
    # type: (List[str]) -> Tuple[int, int, int, int]
    """Lay lines of '0'/'1' (light/dark) side by side in one integer, so
    that each penalty rule is a few big-integer operations instead of a
    Python loop per module. Each line gets 4 light modules on both sides:
    the quiet zone, which N3 counts as light; 8 between two lines keep
    every pattern inside its line. Return (dark, light, pairs, width):
    pairs has bit p set where modules p and p + 1 are in the same line."""
    n = len(lines[0])
    dark = int("".join("0000" + line + "0000" for line in lines), 2)
    light = ~dark & ((1 << (len(lines) * (n + 8))) - 1)
    pairs = int(("00000" + "1" * (n - 1) + "0000") * len(lines), 2)
    return dark, light, pairs, n + 8


def _qr_penalty_lines(lines):
    # type: (List[str]) -> int
    """N1 and N3 of 18004 §7.8.3.1 along the given rows or columns."""
    dark, light, pairs, _ = _qr_pack(lines)
    # N1: a run of 5 + i modules of one colour scores 3 + i. same marks a
    # module equal to its neighbour, run4 the first of 5 equal in a row;
    # a run of length L sets L - 4 bits of run4, plus 2 for each run.
    same = ~(dark ^ (dark >> 1)) & pairs
    run4 = same & (same >> 1) & (same >> 2) & (same >> 3)
    score = _qr_ones(run4) + 2 * _qr_ones(run4 & ~(run4 >> 1))
    # N3: dark-light-dark-dark-dark-light-dark (1:1:3:1:1, a palindrome,
    # so bit order does not matter) with 4 light modules on either side
    # scores 40, counted once when both sides are light.
    core = (dark & (light >> 1) & (dark >> 2) & (dark >> 3) & (dark >> 4)
            & (light >> 5) & (dark >> 6))
    quiet4 = light & (light >> 1) & (light >> 2) & (light >> 3)
    return score + 40 * _qr_ones(core & ((quiet4 >> 7) | (quiet4 << 4)))


def _qr_penalty_rows(rows, n):
    # type: (List[int], int) -> int
    """The 18004 §7.8.3.1 penalty (N1 + N2 + N3 + N4) of an n x n symbol
    given as row integers (as from _qr_line_ints)."""
    text = [format(row, f"0{n}b") for row in rows]
    score = _qr_penalty_lines(text + ["".join(col) for col in zip(*text)])
    # N2: every 2x2 block of one colour scores 3 (blocks may overlap).
    # Shifting by a line's width lines each row up with the row above it.
    dark, light, pairs, width = _qr_pack(text)
    pairs &= (1 << (width * (n - 1))) - 1  # the first row has none above
    for colour in (dark, light):
        square = colour & (colour >> width)
        score += 3 * _qr_ones(square & (square >> 1) & pairs)
    # N4: 10 for each full 5 % step the dark share lies away from 50 %.
    total = n * n
    return score + 10 * (abs(20 * _qr_ones(dark) - 10 * total) // total)


def _qr_penalty(modules):
    # type: (List[List[bool]]) -> int
    """Mask penalty (N1 + N2 + N3 + N4, 18004 §7.8.3.1) of a symbol."""
    return _qr_penalty_rows(_qr_line_ints(modules), len(modules))


def _qr_encode(data,  # type: bytes
               ecl=None,  # type: Optional[str]
               version=None,  # type: Optional[int]
               mask=None,  # type: Optional[int]
               ):
    # type: (...) -> Tuple[List[List[bool]], int, str, int]
    """Encode data as a byte-mode QR code.

    Return (modules, version, ecl, mask): modules is the square matrix
    without quiet zone, True = dark. By default the smallest version at
    level M, or at L when M cannot hold the data, and the mask with the
    lowest penalty (ties: the lowest number). ecl, version and mask force
    a choice (tests compare with other encoders through them). Raise
    ValueError for more than _QR_MAX_BYTES bytes or data that cannot fit.
    """
    if len(data) > _QR_MAX_BYTES:
        raise ValueError(f"QR data is {len(data)} bytes; "
                         f"at most {_QR_MAX_BYTES} fit here")
    if mask is not None and not 0 <= mask <= 7:
        raise ValueError("QR mask must be 0 to 7")
    version, ecl = _qr_choose(len(data), ecl, version)
    words = _qr_data_codewords(data, version, _qr_data_capacity(version, ecl))
    modules, reserved = _qr_function_patterns(version)
    _qr_place_data(modules, reserved, _qr_interleave(words, version, ecl))
    size = len(modules)
    free = _qr_line_ints([[not r for r in row] for row in reserved])
    best = (-1, -1, [])  # type: Tuple[int, int, List[int]]
    for candidate in range(8) if mask is None else [mask]:
        # §7.8.3: score each mask on the finished symbol, format (and
        # version) information included, as a reader sees it. (§7.1 adds
        # format information after masking and encoders differ here; any
        # mask gives a valid symbol. This way _qr_penalty of the result
        # reproduces the choice.)
        _qr_draw_info(modules, ecl, candidate, version)
        rows = _qr_masked_rows(_qr_line_ints(modules), free, size, candidate)
        score = _qr_penalty_rows(rows, size) if mask is None else 0
        if best[1] < 0 or score < best[0]:
            best = (score, candidate, rows)
    matrix = [[ch == "1" for ch in format(row, f"0{size}b")]
              for row in best[2]]
    return matrix, version, ecl, best[1]


def _qr_ascii_line(row, color):
    # type: (List[bool], bool) -> str
    """One module row as '##' (dark) and '  ' (light). With color, black
    '#' on a black background for dark and a white background for light,
    so that every module is a solid cell, as a camera needs."""
    if not color:
        return "".join("  " if light else "##" for light in row)
    line = "\x1b[30;47m"
    before = True
    for light in row:
        if light != before:
            line += "\x1b[47m" if light else "\x1b[40m"
            before = light
        line += "  " if light else "##"
    return line + "\x1b[0m"


def _qr_render(modules, unicode, color=False):
    # type: (List[List[bool]], bool, bool) -> str
    """Draw a symbol as text with a 4-module quiet zone (18004 §6.3.8).

    unicode=True: half blocks, two module rows per line, LIGHT modules
    drawn as the glyph ('█' '▀' '▄') and dark ones as ' '. A glyph shows
    in the terminal's foreground colour, so plain output has the right
    polarity on the usual dark-background terminal and is inverted on a
    light one. unicode=False: '##' for dark and '  ' for light, one line
    per row: right polarity on a light background, but '#' is no solid
    cell, so cameras rarely read it plain.

    color=True paints explicitly with ANSI SGR colours (the 8 basic ones,
    which every colour terminal has): half blocks white on black, ASCII
    cells black or white, quiet zone included. The code then scans on a
    dark and a light terminal alike. Each line ends with a reset, so no
    colour leaks past it; the text without the SGR codes is the plain one.
    """
    width = len(modules) + 8
    # grid: True for LIGHT modules, quiet zone included.
    quiet = [True] * width
    grid = [quiet] * 4 + [[True] * 4 + [not m for m in row] + [True] * 4
                          for row in modules] + [quiet] * 4
    if not unicode:
        lines = [_qr_ascii_line(row, color) for row in grid]
        return "\n".join(lines) + "\n"
    grid.append(quiet)  # odd row count: the last line's lower half
    glyphs = {(True, True): "\u2588", (True, False): "\u2580",
              (False, True): "\u2584", (False, False): " "}
    lines = ["".join(glyphs[pair] for pair in zip(top, bottom))
             for top, bottom in zip(grid[0::2], grid[1::2])]
    if color:
        lines = ["\x1b[37;40m" + line + "\x1b[0m" for line in lines]
    return "\n".join(lines) + "\n"
'''  # end of _QR_SOURCE


# ==== §10 end ================================================================


# ==== §11 command line =======================================================
#
# A small table-driven parser instead of argparse: argparse costs more at
# start than the whole `token` hot path, and its errors are several lines
# where the contract wants one. Global options go before or after the
# command. Each table row: (flags, dest, METAVAR or None for a switch, help).

_GLOBAL_OPTIONS = (
    (("--url",), "url", "URL", "StandCloud base URL; a bare host means https (env %s)" % ENV_URL),
    (("--store",), "store", "PATH", "token store file (env %s)" % ENV_STORE),
    (("--ca-file",), "ca_file", "PATH", "PEM file of CA certificates to trust (env %s)" % ENV_CA_FILE),
    (("--insecure",), "insecure", None, "do not verify TLS certificates (env %s=1); never in production" % ENV_INSECURE),
    (("--timeout",), "timeout", "SECONDS", "limit for each HTTP request, default 10 (env %s)" % ENV_TIMEOUT),
    (("-v", "--verbose"), "verbose", None, "one stderr line per HTTP request; tracebacks for bugs"),
    (("-q", "--quiet"), "quiet", None, "only errors on stderr"),
)

_COMMANDS = {
    "login": ("log in with the device flow and store the tokens", None, (
        (("--force",), "force", None, "start a new login even when logged in"),
        (("--no-check",), "no_check", None, "skip the API healthcheck after logging in"),
        (("--qr",), "qr", None, "draw the QR code even when stderr is not a terminal (env %s=1)" % ENV_QR),
        (("--no-qr",), "no_qr", None, "never draw the QR code (env %s=0)" % ENV_QR),
        (("--open",), "open", None, "also open the verification page in a web browser"),
        (("--json",), "json", None, "JSON lines on stdout, one per event"),
    )),
    "token": ("print a valid access token, refreshing it when needed", None, (
        (("--json",), "json", None, "print JSON with the expiry"),
        (("--min-valid",), "min_valid", "SECONDS", "refresh when it expires within SECONDS (default 60)"),
    )),
    "refresh": ("refresh the tokens now", None, ()),
    "status": ("show the stored session; calls no server", None, (
        (("--json",), "json", None, "print JSON"),
    )),
    "healthcheck": ("call the API's healthcheck with the token", None, (
        (("--json",), "json", None, "print JSON"),
    )),
    "logout": ("revoke the tokens and remove them from the store", None, (
        (("--no-revoke",), "no_revoke", None, "only remove them locally"),
    )),
    "api": ("an authenticated request to API + PATH", "PATH", (
        (("-X", "--method"), "method", "METHOD", "HTTP method (default GET, or POST with data)"),
        (("-d", "--data"), "data", "DATA", "request body: text, @FILE or @- for stdin; JSON is sent as application/json"),
        (("-H", "--header"), "header", "'NAME: VALUE'", "an extra request header (repeatable)"),
    )),
}  # type: Dict[str, Tuple[str, Optional[str], Tuple[Any, ...]]]

_REPEATABLE = ("header",)


def _usage_error(message, command=None):
    # type: (str, Optional[str]) -> ConfigError
    return ConfigError(message, "see '%s %s--help'" % (PROG, command + " " if command else ""))


def _parse_args(argv):
    # type: (List[str]) -> Dict[str, Any]
    """Parse the command line into a dict of dests (None when not given)."""
    args = {"command": None, "help": False, "version": False, "positional": []}  # type: Dict[str, Any]
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        command = args["command"]
        if arg == "--":
            args["positional"].extend(argv[i:])
            break
        if arg in ("-h", "--help", "--version"):
            args["help" if arg != "--version" else "version"] = True
            continue
        if not arg.startswith("-") or arg == "-":
            if command is None:
                if arg not in _COMMANDS:
                    raise _usage_error("unknown command %r" % arg)
                args["command"] = arg
            else:
                args["positional"].append(arg)
            continue
        spec, attached = _find_option(arg, command)
        flags, dest, metavar = spec[0], spec[1], spec[2]
        value = attached  # type: Any
        if metavar is None:
            if attached is not None:
                raise _usage_error("%s takes no value" % flags[-1], command)
            value = True
        elif attached is None:
            if i >= len(argv):
                raise _usage_error("%s needs a value (%s)" % (flags[-1], metavar), command)
            value = argv[i]
            i += 1
        if dest in _REPEATABLE:
            args.setdefault(dest, []).append(value)
        else:
            args[dest] = value
    return args


def _find_option(arg, command):
    # type: (str, Optional[str]) -> Tuple[Any, Optional[str]]
    """The table row for ``arg`` and its attached value (--url=X, -XPOST)."""
    specs = _GLOBAL_OPTIONS + (_COMMANDS[command][2] if command else ())
    name, eq, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
    if not arg.startswith("--") and len(arg) > 2:
        name, eq, attached = arg[:2], "=", arg[2:]
    for spec in specs:
        if name in spec[0]:
            return spec, attached if eq else None
    where = " for %s" % command if command else ""
    raise _usage_error("unknown option %s%s" % (name, where), command)


def _help_text(command):
    # type: (Optional[str]) -> str
    def rows(specs):
        # type: (Tuple[Any, ...]) -> List[str]
        out = []
        for flags, _, metavar, text in specs:
            left = ", ".join(flags) + (" " + metavar if metavar else "")
            out.append("  %-24s %s" % (left, text) if len(left) < 25 else "  %s\n  %24s %s" % (left, "", text))
        return out

    if command is None:
        lines = ["usage: %s [OPTIONS] COMMAND [ARGS]" % PROG, "", __doc__.splitlines()[0], "", "commands:"]
        lines += ["  %-12s %s" % (name, spec[0]) for name, spec in _COMMANDS.items()]
        lines += ["", "options (before or after the command):"] + rows(_GLOBAL_OPTIONS)
        lines += ["  %-24s %s" % ("--version", "print the version"), "",
                  "'%s COMMAND --help' shows a command's options." % PROG]
    else:
        summary, positional, specs = _COMMANDS[command]
        lines = ["usage: %s [OPTIONS] %s%s%s" % (PROG, command, " [COMMAND OPTIONS]" if specs else "",
                                                 " " + positional if positional else ""), "", summary]
        if specs:
            lines += ["", "%s options:" % command] + rows(specs)
        lines += ["", "options:"] + rows(_GLOBAL_OPTIONS)
    return "\n".join(lines) + "\n"


def _write_out(text):
    # type: (str) -> None
    """stdout: only what the command was asked for."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `standcloud-auth token | head -c 0` is not an error
        pass


def _emit(event):
    # type: (Dict[str, Any]) -> None
    _write_out(_dumps(event) + "\n")


def _auth(args, console):
    # type: (Dict[str, Any], _Console) -> StandCloudAuth
    return StandCloudAuth(
        url=args.get("url"),
        store=args.get("store"),
        ca_file=args.get("ca_file"),
        insecure=True if args.get("insecure") else None,
        timeout=_parse_timeout(args["timeout"], "--timeout") if args.get("timeout") is not None else None,
        console=console,
    )


def _no_positional(args):
    # type: (Dict[str, Any]) -> None
    if args["positional"]:
        raise _usage_error("unexpected argument %r" % args["positional"][0], args["command"])


def _local_time(unix):
    # type: (Optional[float]) -> str
    if unix is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _duration(seconds):
    # type: (float) -> str
    seconds = max(0, int(seconds))
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%d h %d min" % (seconds // 3600, seconds % 3600 // 60)


def _cmd_token(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    min_valid = DEFAULT_MIN_VALID
    if args.get("min_valid") is not None:
        try:
            min_valid = float(args["min_valid"])
        except ValueError:
            min_valid = -1.0
        if not 0 <= min_valid <= MAX_TOKEN_LIFETIME:
            raise _usage_error("--min-valid must be a number of seconds, not %r" % args["min_valid"], "token")
    session = _auth(args, console)._session(min_valid)
    if not args.get("json"):
        _write_out(session["access_token"] + "\n")
        return 0
    expires_at = session.get("expires_at")
    _emit({
        "access_token": session["access_token"],
        "token_type": "Bearer",
        "expires_at": expires_at,
        "expires_in": None if expires_at is None else int(expires_at - _now()),
    })
    return 0


def _cmd_refresh(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    auth = _auth(args, console)
    tokens = auth.refresh()
    if tokens.expires_at is None:
        console.info("Refreshed the session for %s (the server gave no expiry)." % auth.url)
    else:
        console.info("Refreshed the session for %s; the access token is valid until %s (%s)."
                     % (auth.url, _local_time(tokens.expires_at), _duration(tokens.expires_at - _now())))
    return 0


def _cmd_status(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    auth = _auth(args, console)
    report = auth.status()
    if args.get("json"):
        _emit(report)
    else:
        _write_out(_status_text(report))
    if not report["logged_in"]:
        console.error("not logged in to %s; run '%s login'" % (report["url"], PROG))
        return 3
    return 0


def _status_text(report):
    # type: (Dict[str, Any]) -> str
    lines = [("StandCloud", report["url"] or "(none given)")]
    if report["source"] == "environment":
        lines.append(("Token", "from %s (static: never refreshed, nothing stored)" % ENV_TOKEN))
        return "".join("%-15s %s\n" % row for row in lines)
    path = report["store"]
    try:
        mode = "mode %03o" % (os.stat(path).st_mode & 0o777) if sys.platform != "win32" else "exists"
    except OSError:
        mode = "does not exist"
    lines.append(("Token store", "%s (%s)" % (path, mode)))
    lines.append(("Logged in", "yes" if report["logged_in"] else "no"))
    if report["source"]:
        expires_at, left = report["access_token_expires_at"], report["access_token_expires_in"]
        if expires_at is None:
            access = "no expiry given by the server"
        elif left > 0:
            access = "valid for %s (until %s)" % (_duration(left), _local_time(expires_at))
        else:
            access = "expired at %s" % _local_time(expires_at)
        lines.append(("Access token", access))
        issued = report["refreshed_at"]
        lines.append(("Refresh token", "%s; tokens last issued %s ago (idle refresh tokens expire: "
                      "Authelia's default is 90 min)" % ("yes" if report["has_refresh_token"] else "no",
                                                         _duration(_now() - issued) if issued else "?")))
        lines.append(("Scope", report["scope"] or "-"))
    return "".join("%-15s %s\n" % row for row in lines)


def _cmd_healthcheck(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    response = _auth(args, console).request("GET", HEALTHCHECK_PATH)
    if args.get("json"):
        _emit({"status": response.status, "ok": response.ok})
    elif response.ok:
        _write_out("ok\n")
    response.raise_for_status()
    return 0


def _cmd_logout(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    auth = _auth(args, console)
    if auth.logout(revoke=not args.get("no_revoke")):
        console.info("Logged out of %s." % auth.url)
    else:
        console.info("Not logged in to %s; nothing to do." % auth.url)
    return 0


def _read_data(value):
    # type: (str) -> bytes
    if not value.startswith("@"):
        return value.encode("utf-8")
    if value == "@-":
        stream = getattr(sys.stdin, "buffer", None)
        return stream.read() if stream is not None else b""
    try:
        with open(value[1:], "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError("cannot read %s (%s)" % (value[1:], exc.strerror or exc), "check the path after -d @") from None


def _parse_headers(values):
    # type: (List[str]) -> Dict[str, str]
    headers = {}  # type: Dict[str, str]
    for raw in values:
        name, sep, value = raw.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _is_token(name) or any(c in raw for c in "\r\n"):
            raise _usage_error("-H wants 'Name: value', not %r" % raw, "api")
        headers[name] = value
    return headers


def _cmd_api(args, console):
    # type: (Dict[str, Any], _Console) -> int
    if len(args["positional"]) != 1:
        raise _usage_error("api needs exactly one PATH, such as /healthcheck", "api")
    headers = _parse_headers(args.get("header") or [])
    data = None if args.get("data") is None else _read_data(args["data"])
    method = (args.get("method") or ("POST" if data is not None else "GET")).upper()
    if not method.isalpha():
        raise _usage_error("%r is not an HTTP method" % args["method"], "api")
    if data is not None and not any(k.lower() == "content-type" for k in headers):
        try:
            _loads(data, "data")
            headers["Content-Type"] = "application/json"
        except ValueError:
            headers["Content-Type"] = "application/x-www-form-urlencoded"  # what curl -d sends
    response = _auth(args, console).request(method, args["positional"][0], data=data, headers=headers)
    out = getattr(sys.stdout, "buffer", None)
    try:
        if out is not None:
            out.write(response.body)
            out.flush()
        else:
            _write_out(response.body.decode("utf-8", "replace"))
    except BrokenPipeError:
        pass
    response.raise_for_status()
    return 0


def _show_qr(console, uri, wanted):
    # type: (_Console, str, bool) -> None
    if not wanted:
        return
    qr = _qr_module()
    try:
        modules = qr._qr_encode(uri.encode("utf-8"))[0]
    except ValueError:
        console.info("(The address is too long for a QR code; type it instead.)")
        return
    unicode_ok = _unicode_ok(console.stream or sys.stderr)
    console.info(qr._qr_render(modules, unicode_ok, console.isatty()).rstrip("\n"))


def _qr_wanted(args, console):
    # type: (Dict[str, Any], _Console) -> bool
    if args.get("qr") and args.get("no_qr"):
        raise _usage_error("--qr and --no-qr contradict each other", "login")
    if args.get("qr") or args.get("no_qr"):
        return bool(args.get("qr"))
    from_env = _env_flag(ENV_QR, os.environ)
    return console.isatty() if from_env is None else from_env


def _display_code(user_code):
    # type: (str) -> str
    """Authelia's codes are 8 letters: show them as XXXX-XXXX to read aloud."""
    if len(user_code) == 8 and user_code.isalnum():
        return user_code[:4] + "-" + user_code[4:]
    return user_code


# A 5x5 font for reading the user code aloud across a room: one row of
# glyph bits per string row ("1" = ink), drawn with half blocks (3 lines).
_BIG_FONT = {
    "A": "01110 10001 11111 10001 10001", "B": "11110 10001 11110 10001 11110",
    "C": "01111 10000 10000 10000 01111", "D": "11110 10001 10001 10001 11110",
    "E": "11111 10000 11110 10000 11111", "F": "11111 10000 11110 10000 10000",
    "G": "01111 10000 10011 10001 01111", "H": "10001 10001 11111 10001 10001",
    "I": "11111 00100 00100 00100 11111", "J": "00111 00001 00001 10001 01110",
    "K": "10001 10010 11100 10010 10001", "L": "10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10001 10001", "N": "10001 11001 10101 10011 10001",
    "O": "01110 10001 10001 10001 01110", "P": "11110 10001 11110 10000 10000",
    "Q": "01110 10001 10101 10010 01101", "R": "11110 10001 11110 10010 10001",
    "S": "01111 10000 01110 00001 11110", "T": "11111 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 01110", "V": "10001 10001 10001 01010 00100",
    "W": "10001 10001 10101 11011 10001", "X": "10001 01010 00100 01010 10001",
    "Y": "10001 01010 00100 00100 00100", "Z": "11111 00010 00100 01000 11111",
    "0": "01110 10011 10101 11001 01110", "1": "00100 01100 00100 00100 01110",
    "2": "11110 00001 01110 10000 11111", "3": "11110 00001 00110 00001 11110",
    "4": "10010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 11110",
    "6": "01110 10000 11110 10001 01110", "7": "11111 00001 00010 00100 00100",
    "8": "01110 10001 01110 10001 01110", "9": "01110 10001 01111 00001 01110",
    "-": "00000 00000 11111 00000 00000",
}


def _big_text(text):
    # type: (str) -> Optional[str]
    """``text`` in 3 lines of half blocks, or None when a glyph is missing."""
    if not text or any(c not in _BIG_FONT for c in text.upper()) or len(text) > 14:
        return None
    glyphs = [_BIG_FONT[c].split() for c in text.upper()]
    rows = [[bit == "1" for glyph in glyphs for bit in glyph[r] + "0"] for r in range(5)]
    rows.append([False] * len(rows[0]))
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2]):
        lines.append("    " + "".join(" \u2580\u2584\u2588"[a + 2 * b] for a, b in zip(top, bottom)).rstrip())
    return "\n".join(lines)


def _unicode_ok(stream):
    # type: (Any) -> bool
    encoding = (getattr(stream, "encoding", None) or "ascii").lower().replace("-", "").replace("_", "")
    return encoding in ("utf8", "utf16", "utf32", "cp65001")


def _show_flow(console, flow, args, show_qr):
    # type: (_Console, DeviceFlow, Dict[str, Any], bool) -> None
    uri = flow.verification_uri_complete or flow.verification_uri or ""
    console.info("")
    console.info("To log in, open this address on a phone or a computer:")
    console.info("")
    console.info("    " + uri)
    console.info("")
    code = _display_code(flow.user_code or "")
    if flow.verification_uri_complete:
        console.info("and check that the page shows the code   %s" % code)
    else:
        console.info("and enter the code   %s" % code)
    big = _big_text(code) if console.isatty() and _unicode_ok(console.stream or sys.stderr) else None
    if big:
        console.info("")
        console.info(big)
    _show_qr(console, uri, show_qr)
    console.info("")
    console.info("The code expires in %s. Waiting for approval (Ctrl-C to cancel)..." % _duration(flow.expires_in))
    if args.get("open"):
        import webbrowser

        try:
            webbrowser.open(uri)
        except Exception as exc:  # a missing browser must not end the login
            console.warn("could not open a browser (%s)" % type(exc).__name__)


def _countdown(console):
    # type: (_Console) -> Optional[Callable[[float], None]]
    """A live countdown line on a terminal; no spinner noise elsewhere."""
    if console.quiet or not console.isatty():
        return None

    def tick(left):
        # type: (float) -> None
        console._write("\r  %d:%02d left " % (int(left) // 60, int(left) % 60))

    return tick


def _cmd_login(args, console):
    # type: (Dict[str, Any], _Console) -> int
    _no_positional(args)
    show_qr = _qr_wanted(args, console)  # a usage error must come before any request
    try:
        auth = _auth(args, console)
        auth._store.load()
    except StoreCorrupt as exc:
        kept = TokenStore(exc.path).keep_corrupt_aside()
        console.warn("the token store %s was unreadable; kept it as %s" % (exc.path, kept))
        auth = _auth(args, console)
    auth._no_static("log in to")
    if not args.get("force"):
        tokens = auth.logged_in()
        if tokens is not None:
            console.info("Already logged in to %s (tokens in %s); use --force to log in again."
                         % (auth.url, auth.store_path))
            if args.get("json"):
                _emit({"event": "logged_in", "url": auth.url, "expires_at": tokens.expires_at, "already": True})
            return 0
    flow = auth.start_login()
    if args.get("json"):
        _emit(flow.as_event())
    _show_flow(console, flow, args, show_qr)
    tick = _countdown(console)
    try:
        tokens = auth.wait_for_login(flow, tick)
    finally:
        if tick is not None:
            console._write("\r" + " " * 20 + "\r")
    if not args.get("no_check"):
        response = auth.request("GET", HEALTHCHECK_PATH)
        if not response.ok:
            raise _check_failure(response)  # it says the tokens are stored
        console.info("The StandCloud API accepts the token (healthcheck ok).")
    console.info("Logged in to %s. The tokens are stored in %s" % (auth.url, auth.store_path))
    if args.get("json"):
        _emit({"event": "logged_in", "url": auth.url, "expires_at": tokens.expires_at})
    return 0


def _check_failure(response):
    # type: (Response) -> StandCloudError
    what = "logged in, but the API healthcheck answered HTTP %d" % response.status
    if response.status in (401, 403):
        return AuthError(what, "the tokens are stored; check this account's access to the StandCloud API")
    return ServerError(what, "the tokens are stored; try '%s healthcheck' later" % PROG, response.status, response.body)


_HANDLERS = {
    "login": _cmd_login,
    "token": _cmd_token,
    "refresh": _cmd_refresh,
    "status": _cmd_status,
    "healthcheck": _cmd_healthcheck,
    "logout": _cmd_logout,
    "api": _cmd_api,
}  # type: Dict[str, Callable[[Dict[str, Any], _Console], int]]


def _error_kind(exc):
    # type: (StandCloudError) -> str
    if isinstance(exc, AuthError) and exc.error:
        return exc.error
    return {2: "config", 3: "auth", 4: "network", 5: "server"}.get(exc.exit_code, "internal")


def main(argv=None):
    # type: (Optional[List[str]]) -> int
    """Run the command line with ``argv`` (default: sys.argv[1:]); return the
    exit code. This is the one place where an error becomes a message."""
    console = _Console()
    args = {}  # type: Dict[str, Any]
    try:
        args = _parse_args(list(sys.argv[1:] if argv is None else argv))
        console.quiet, console.verbose = bool(args.get("quiet")), bool(args.get("verbose"))
        if args["version"]:
            _write_out("%s %s\n" % (PROG, __version__))
            return 0
        if args["help"] or args["command"] is None:
            _write_out(_help_text(args["command"]))
            return 0 if args["help"] else 2
        return _HANDLERS[args["command"]](args, console)
    except StandCloudError as exc:
        console.error(str(exc))
        code, message, kind = exc.exit_code, str(exc), _error_kind(exc)
    except KeyboardInterrupt:
        message = "login cancelled" if args.get("command") == "login" else "interrupted"
        console._write("\n")
        console.error(message)
        code, kind = 130, "cancelled"
    except Exception as exc:  # a bug: say so in one line, traceback only with -v
        if console.verbose:
            import traceback

            traceback.print_exc()
        message = "internal error (%s); this is a bug, please report it with the output of -v" % type(exc).__name__
        console.error(message)
        code, kind = 1, "internal"
    if args.get("command") == "login" and args.get("json"):
        _emit({"event": "error", "error": kind, "message": message, "exit_code": code})
    return code


# ==== §12 entry point ========================================================

if __name__ == "__main__":
    sys.exit(main())
