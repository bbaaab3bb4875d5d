"""The login's waiting screen, as an operator sees it (contract: "The screen
the operator sees").

Each case runs ``standcloud_auth.py login`` as a real subprocess on a real
pseudo-terminal of one size and locale (terminal.run_in_pty), against a fake
StandCloud that never approves: the login waits and shows its screen. Once
the countdown is on the screen, the terminal model (terminal.Screen) says
what is visible, and:

- the complete verification address is on the visible screen, whole, in one
  line (soft wraps joined, as a terminal copies it), and so is the user
  code as XXXX-XXXX;
- a QR code on the visible screen reads back, module for module, as the
  encoder's matrix of that address; QR art drawn anywhere in the session
  (scrolled off, wrapped, overwritten) that does not read from the visible
  screen fails;
- at 120x50 in UTF-8 a QR code is drawn (the QR path is exercised);
- in the C locale every byte is ASCII; with NO_COLOR there is no SGR;
- below 80x24 nothing crashes and the address is somewhere.

The device authorization answer is scripted (server.script) so that the
address has a chosen length: "standcloud" is the production address
(https://company.standcloud.io/auth/consent/openid/device-authorization
?user_code=..., 89 characters, QR version 6 at level M), "fake" has the
shape fakeserver.py issues (77 characters with a 5-digit port, version 5),
"long" a longer identity provider's (160, version 9). Its interval is 60 s,
so no poll comes while a case runs.

Speed: the first test that needs a case runs all of them, four at a time
(each is a Python start-up plus one HTTP exchange, well under a second),
in that test's isolated environment (conftest.isolated_env).
"""

import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import standcloud_auth as sca
from conftest import MODULE
from fakeserver import FakeStandCloud
from terminal import looks_like_qr_art, read_qr, run_in_pty

COUNTDOWN = re.compile(r"\d+:\d\d left")
LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # Authelia's user-code alphabet (as the fake's)
SGR = re.compile(rb"\x1b\[[0-9;:]*m")

ADDRESSES = {
    "standcloud": lambda base, code: "https://company.standcloud.io/auth/consent/openid/device-authorization"
                                     "?user_code=" + code,
    "fake": lambda base, code: base + "/consent/openid/device-authorization?user_code=" + code,
    "long": lambda base, code: base + "/auth/realms/manufacturing-line-7/protocol/openid-connect/auth/device"
                                      "?client_id=hardpy-report-uploader&ui_locales=en-US&user_code=" + code,
}

# Variables that would change what the module sees: the caller's own
# locale, colour wishes, size overrides (shutil.get_terminal_size takes
# COLUMNS and LINES first), Python's encoding switches.
SCRUBBED = ("LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LANGUAGE", "NO_COLOR", "FORCE_COLOR", "CLICOLOR", "CLICOLOR_FORCE",
            "COLUMNS", "LINES", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE", "PYTHONLEGACYWINDOWSSTDIO",
            "STANDCLOUD_QR")

SIZES = [(24, 80), (30, 80), (40, 100), (50, 120), (60, 200)]  # rows, columns
LOCALES = ["C.UTF-8", "C"]
ADDRESS_CASES = [("fake", (24, 80)), ("fake", (50, 120)), ("long", (24, 80)), ("long", (60, 200))]
NO_COLOR_CASES = [((24, 80), "C.UTF-8"), ((50, 120), "C.UTF-8"), ((60, 200), "C")]
SMALL = (20, 60)


def case(size, lang="C.UTF-8", address="standcloud", no_color=False):
    """A case's name, which is also its key."""
    return "%dx%d LANG=%s address=%s%s" % (size[1], size[0], lang, address, " NO_COLOR=1" if no_color else "")


CASES = {}  # name -> (size, lang, address, no_color)
for _size in SIZES:
    for _lang in LOCALES:
        CASES[case(_size, _lang)] = (_size, _lang, "standcloud", False)
for _address, _size in ADDRESS_CASES:
    CASES[case(_size, "C.UTF-8", _address)] = (_size, "C.UTF-8", _address, False)
for _size, _lang in NO_COLOR_CASES:
    CASES[case(_size, _lang, no_color=True)] = (_size, _lang, "standcloud", True)
for _lang in LOCALES:
    CASES[case(SMALL, _lang)] = (SMALL, _lang, "standcloud", False)

_SESSIONS = {}  # name -> Session, or the exception its run raised


class Session(object):
    def __init__(self, name, screen, raw, code, uri, user_code):
        self.name, self.screen, self.raw, self.code = name, screen, raw, code
        self.uri, self.user_code = uri, user_code

    def describe(self):
        """What was on the screen, for assertion messages."""
        scrolled = len(self.screen.with_scrollback().grid) - self.screen.rows
        return "%s, exit %r, address %s (%d chars)\n%s\n%d rows in the scrollback" % (
            self.name, self.code, self.uri, len(self.uri), self.screen.dump(), scrolled)


def run_case(name, base_env, folder):
    (rows, cols), lang, address, no_color = CASES[name]
    rng = random.Random(name)
    user_code = "".join(rng.choice(LETTERS) for _ in range(8))
    server = FakeStandCloud().start()
    try:
        uri = ADDRESSES[address](server.base, user_code)
        answer = {"device_code": "authelia_dc_" + "".join(rng.choice(LETTERS) for _ in range(32)),
                  "user_code": user_code, "verification_uri": uri.split("?")[0], "verification_uri_complete": uri,
                  "expires_in": 599, "interval": 60}
        server.script(sca.DEVICE_PATH, (200, {"Content-Type": "application/json", "Cache-Control": "no-store"},
                                        json.dumps(answer).encode("utf-8")))
        env = dict(base_env, LANG=lang, TERM="xterm", STANDCLOUD_TOKEN_FILE=os.path.join(folder, "tokens.json"))
        if no_color:
            env["NO_COLOR"] = "1"
        screen, raw, code = run_in_pty([sys.executable, MODULE, "--url", server.base, "login", "--no-check"],
                                       rows=rows, cols=cols, env=env, timeout=20,
                                       stop_when=lambda s: any(COUNTDOWN.search(line) for line in s.text_lines()))
    finally:
        server.stop()
    return Session(name, screen, raw, code, uri, user_code)


def session(name, tmp_path):
    """The run of case ``name``; the first call runs every case."""
    if not _SESSIONS:
        base_env = {key: value for key, value in os.environ.items() if key not in SCRUBBED}  # isolated_env's
        with ThreadPoolExecutor(4) as pool:
            futures = {}
            for number, each in enumerate(sorted(CASES)):
                folder = tmp_path / ("store-%d" % number)
                futures[each] = pool.submit(run_case, each, base_env, str(folder))
        for each, future in futures.items():
            error = future.exception()
            _SESSIONS[each] = error if error is not None else future.result()
    result = _SESSIONS[name]
    if isinstance(result, BaseException):
        raise result
    return result


def qr_matrix(uri):
    encode = getattr(sca, "_qr_encode", None) or sca._qr_module()._qr_encode
    return encode(uri.encode("utf-8"))[0]


def check_waiting_screen(run):
    """The contract's screen rule, on the screen as it was while waiting.
    Return the QR matrix read from the screen, or None."""
    screen, why = run.screen, run.describe()
    assert any(COUNTDOWN.search(line) for line in screen.text_lines()), "not waiting: " + why
    assert any(run.uri in line for line in screen.logical_lines()), "the address is not whole on screen: " + why
    shown = run.user_code[:4] + "-" + run.user_code[4:]
    assert any(shown in line for line in screen.text_lines()), "the user code is not on screen: " + why
    read = read_qr(screen)
    if read is None:
        assert not looks_like_qr_art(screen.with_scrollback()), "a QR code was drawn but does not read on screen: " + why
    else:
        assert read == qr_matrix(run.uri), "the QR code on screen is not the address's: " + why
    return read


def size_id(size):
    return "%dx%d" % (size[1], size[0])


@pytest.mark.parametrize("lang", LOCALES)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_waiting_screen_fits(tmp_path, size, lang):
    check_waiting_screen(session(case(size, lang), tmp_path))


@pytest.mark.parametrize("address, size", ADDRESS_CASES, ids=["%s-%s" % (a, size_id(s)) for a, s in ADDRESS_CASES])
def test_waiting_screen_fits_other_addresses(tmp_path, address, size):
    check_waiting_screen(session(case(size, "C.UTF-8", address), tmp_path))


def test_a_qr_code_is_drawn_on_a_large_utf8_terminal(tmp_path):
    run = session(case((50, 120), "C.UTF-8"), tmp_path)
    assert check_waiting_screen(run) is not None, "no QR code at 120x50: " + run.describe()


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_c_locale_output_is_ascii(tmp_path, size):
    """An ASCII console gets no block art: every byte written is ASCII.
    (CPython 3.7+ coerces the C locale to C.UTF-8 at start-up, and puts
    LC_CTYPE=C.UTF-8 into os.environ: the module must see through that.)"""
    run = session(case(size, "C"), tmp_path)
    odd = sorted(set(ch for ch in run.raw.decode("utf-8", "replace") if ord(ch) > 127))
    assert not odd, "non-ASCII %r in the C locale: %s" % ("".join(odd), run.describe())


@pytest.mark.parametrize("size, lang", NO_COLOR_CASES, ids=["%s-%s" % (size_id(s), lang) for s, lang in NO_COLOR_CASES])
def test_no_color_means_no_sgr(tmp_path, size, lang):
    run = session(case(size, lang, no_color=True), tmp_path)
    found = SGR.findall(run.raw)
    assert not found, "SGR with NO_COLOR=1: %r... %s" % (found[:4], run.describe())
    assert not [seq for seq in run.screen.escapes_seen if seq.startswith("\x1b[") and seq.endswith("m")]
    whole = run.screen.with_scrollback()
    assert all(cell[1:] == (None, None) for row in whole.grid for cell in row)
    check_waiting_screen(run)


@pytest.mark.parametrize("lang", LOCALES)
def test_below_the_minimum_size_nothing_breaks(tmp_path, lang):
    run = session(case(SMALL, lang), tmp_path)
    why = run.describe()
    assert run.code != 1 and b"Traceback" not in run.raw and b"internal error" not in run.raw, why
    assert any(run.uri in line for line in run.screen.with_scrollback().logical_lines()), why
