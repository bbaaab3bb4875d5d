"""A small terminal model for the tests: what an operator would see.

``Screen(rows, cols)`` takes the bytes a program writes to a terminal and
keeps the grid of cells an xterm-like terminal would show, with the lines
that scrolled off the top in ``scrollback``. ``read_qr(screen)`` reads a QR
code back from the cells, as a camera would see them. ``run_in_pty()`` runs
a command on a real pseudo-terminal of a given size and feeds a Screen.

Standard library only, Python 3.6 and later. It models what standcloud-auth
draws and a little more, the way xterm behaves (checked against xterm's
source; tmux, for one, differs in corners the login never reaches: LF, BS
or EL while a wrap is pending, where the login always sends CR first):

- printable characters, one cell each (no wide or combining characters);
- CR, LF (also VT and FF), BS, TAB (stops every 8 columns); other C0 and
  C1 controls are ignored;
- auto-wrap at the right margin with xterm's "pending wrap": writing the
  last column leaves the cursor there, and only the next printable
  character wraps (CR, LF, BS, EL and cursor moves cancel the pending wrap);
  a row left by a wrap is marked soft-wrapped;
- LF on the bottom row scrolls: the top row goes to ``scrollback``, a blank
  row comes in at the bottom (in the current background colour, as xterm's
  back-colour-erase does);
- SGR colours per cell: 30-37/40-47, 90-97/100-107, 38/48;5;n, 38/48;2;r;g;b,
  39/49 and 0 (other attributes, such as bold or reverse video, are ignored);
- EL (``ESC [ K``, 0/1/2), ED (``ESC [ J``, 0/1/2), cursor moves CUU CUD CUF
  CUB CHA CUP HVP (A B C D G H f); every other escape sequence (CSI, OSC,
  DCS, two-byte ESC) is consumed and ignored.

Every escape sequence fed is appended, whole, to ``escapes_seen``.

Colours are palette numbers: 0-7 the basic eight (0 black, 7 white), 8-15
the bright ones, 16-255 the 256-colour cube, an (r, g, b) tuple for direct
colour, None for the terminal's default.
"""

import codecs
import errno
import os
import re
import select
import signal
import subprocess
import sys
import time

__all__ = ["Screen", "read_qr", "looks_like_qr_art", "run_in_pty", "BLACK", "WHITE"]

BLACK, WHITE = 0, 7
_ESC = "\x1b"


class Screen(object):
    """The visible grid of a ``rows`` x ``cols`` terminal, fed with ``feed()``."""

    def __init__(self, rows, cols):
        if rows < 1 or cols < 1:
            raise ValueError("a screen needs at least one row and one column")
        self.rows, self.cols = rows, cols
        self.fg = self.bg = None  # the current SGR colours
        self.row = self.col = 0  # the cursor
        self.pending_wrap = False
        self.grid = [self._blank_row() for _ in range(rows)]  # cells: (char, fg, bg)
        self.wrapped = [False] * rows  # row i continues (soft wrap) in row i + 1
        self.scrollback = []  # text of the rows that scrolled off, oldest first
        self._history = []  # (cells, wrapped) of the same rows
        self.escapes_seen = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # an escape sequence not complete yet

    # -- reading the screen ----------------------------------------------------

    def cell(self, r, c):
        """(char, fg, bg) of the visible cell at row ``r``, column ``c``."""
        return self.grid[r][c]

    def text_lines(self):
        """The visible rows as text, trailing spaces stripped."""
        return ["".join(cell[0] for cell in row).rstrip(" ") for row in self.grid]

    def logical_lines(self):
        """The visible rows, soft-wrapped rows joined with the next one.

        A logical line that began above the top row is not whole here: its
        visible part is the first line."""
        return _join_wrapped(self.grid, self.wrapped)

    def with_scrollback(self):
        """A Screen of the scrollback and the visible rows, all visible."""
        whole = Screen(len(self._history) + self.rows, self.cols)
        whole.grid = [list(cells) for cells, _ in self._history] + [list(row) for row in self.grid]
        whole.wrapped = [flag for _, flag in self._history] + list(self.wrapped)
        whole.row, whole.col = len(self._history) + self.row, self.col
        return whole

    def __repr__(self):
        return "<Screen %dx%d cursor=%d,%d>" % (self.cols, self.rows, self.row, self.col)

    def dump(self):
        """The visible rows between bars, for assertion messages."""
        lines = ["+" + "-" * self.cols + "+"]
        for text, flag in zip(self.text_lines(), self.wrapped):
            lines.append("|" + text.ljust(self.cols) + ("\\" if flag else "|"))
        return "\n".join(lines + ["+" + "-" * self.cols + "+"])

    # -- feeding -----------------------------------------------------------------

    def feed(self, data):
        """Take ``data`` (bytes, decoded as UTF-8, or str) as written to the
        terminal. Sequences and characters may be split across calls."""
        if isinstance(data, (bytes, bytearray)):
            data = self._decoder.decode(bytes(data))
        text = self._pending + data
        self._pending = ""
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == _ESC:
                end = _escape_end(text, i)
                if end is None:  # incomplete: keep it for the next feed
                    self._pending = text[i:]
                    return
                self._escape(text[i:end])
                i = end
                continue
            code = ord(ch)
            if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
                self._control(ch)
            else:
                self._print(ch)
            i += 1

    def _blank_row(self):
        return [(" ", None, self.bg)] * self.cols

    def _print(self, ch):
        if self.pending_wrap:
            self.wrapped[self.row] = True
            self._index()
            self.col = 0
            self.pending_wrap = False
        self.grid[self.row][self.col] = (ch, self.fg, self.bg)
        if self.col == self.cols - 1:
            self.pending_wrap = True
        else:
            self.col += 1

    def _control(self, ch):
        if ch == "\r":
            self.col = 0
        elif ch in "\n\x0b\x0c":
            self._index()
        elif ch == "\b":
            self.col = max(0, self.col - 1)
        elif ch == "\t":
            self.col = min(self.cols - 1, (self.col // 8 + 1) * 8)
        else:
            return  # BEL, NUL, SO, SI, C1 controls...: nothing to draw
        self.pending_wrap = False

    def _index(self):
        """Down one row, scrolling at the bottom."""
        if self.row < self.rows - 1:
            self.row += 1
            return
        top, flag = self.grid.pop(0), self.wrapped.pop(0)
        self._history.append((top, flag))
        self.scrollback.append("".join(cell[0] for cell in top).rstrip(" "))
        self.grid.append(self._blank_row())
        self.wrapped.append(False)

    def _escape(self, seq):
        self.escapes_seen.append(seq)
        if len(seq) < 3 or seq[1] != "[":
            return  # OSC, DCS, charset selection, ESC 7...: ignored
        final, body = seq[-1], seq[2:-1]
        if body[:1] in ("?", ">", "=", "<") or any(" " <= c <= "/" for c in body):
            return  # private modes and sequences with intermediates: ignored
        params = [int(p) if p.isdigit() else None for p in body.replace(":", ";").split(";")] if body else []
        if final == "m":
            self._sgr(params, ":" in body)
            return
        first = params[0] if params and params[0] is not None else 0
        count = max(1, first)
        if final == "K":
            self._erase_line(first)
        elif final == "J":
            self._erase_display(first)
        elif final in "ABCDGHf":
            self._move(final, count, params)
        else:
            return
        self.pending_wrap = False

    def _sgr(self, params, colon):
        if colon:  # ITU T.416 sub-parameters: not modelled, leave colours as they are
            return
        params = params or [0]
        i = 0
        while i < len(params):
            p = params[i]
            p = 0 if p is None else p
            if p == 0:
                self.fg = self.bg = None
            elif 30 <= p <= 37:
                self.fg = p - 30
            elif 40 <= p <= 47:
                self.bg = p - 40
            elif 90 <= p <= 97:
                self.fg = p - 90 + 8
            elif 100 <= p <= 107:
                self.bg = p - 100 + 8
            elif p == 39:
                self.fg = None
            elif p == 49:
                self.bg = None
            elif p in (38, 48):
                colour, used = _extended_colour(params[i + 1:])
                if p == 38:
                    self.fg = colour
                else:
                    self.bg = colour
                i += used
            i += 1

    def _erase_line(self, mode):
        blank = (" ", None, self.bg)
        row = self.grid[self.row]
        start, stop = {0: (self.col, self.cols), 1: (0, self.col + 1), 2: (0, self.cols)}.get(mode, (0, 0))
        for c in range(start, stop):
            row[c] = blank
        if mode in (0, 2):
            self.wrapped[self.row] = False  # as xterm: the row no longer runs on

    def _erase_display(self, mode):
        if mode == 0:
            self._erase_line(0)
            rows = range(self.row + 1, self.rows)
        elif mode == 1:
            self._erase_line(1)
            rows = range(0, self.row)
        elif mode == 2:
            rows = range(self.rows)
        else:
            return
        for r in rows:
            self.grid[r] = self._blank_row()
            self.wrapped[r] = False

    def _move(self, final, count, params):
        if final == "A":
            self.row = max(0, self.row - count)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + count)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + count)
        elif final == "D":
            self.col = max(0, self.col - count)
        elif final == "G":
            self.col = min(self.cols - 1, count - 1)
        else:  # H, f: row;col, 1-based
            col = params[1] if len(params) > 1 and params[1] else 1
            self.row = min(self.rows - 1, count - 1)
            self.col = min(self.cols - 1, col - 1)


def _extended_colour(rest):
    """(colour, parameters used) for what follows a 38 or 48."""
    if len(rest) >= 2 and rest[0] == 5:
        return rest[1], 2
    if len(rest) >= 4 and rest[0] == 2:
        return (rest[1] or 0, rest[2] or 0, rest[3] or 0), 4
    return None, len(rest)  # malformed: xterm gives up on the rest too


def _escape_end(text, i):
    """The index just past the escape sequence at text[i], or None when
    the text ends before the sequence does."""
    n = len(text)
    if i + 1 >= n:
        return None
    kind = text[i + 1]
    if kind == "[":  # CSI: parameters and intermediates, then a final byte
        j = i + 2
        while j < n and not "\x40" <= text[j] <= "\x7e":
            if text[j] == _ESC:  # an ESC cancels the sequence and starts another
                return j
            j += 1
        return j + 1 if j < n else None
    if kind in "]PX^_":  # OSC, DCS, SOS, PM, APC: up to BEL or ST
        j = i + 2
        while j < n:
            if text[j] == "\x07" and kind == "]":
                return j + 1
            if text[j] == _ESC:
                return j + 2 if j + 1 < n else None
            j += 1
        return None
    j = i + 1  # ESC, intermediates (" " to "/"), one final byte
    while j < n and " " <= text[j] <= "/":
        j += 1
    return j + 1 if j < n else None


def _join_wrapped(grid, wrapped):
    lines, current = [], ""
    for row, flag in zip(grid, wrapped):
        text = "".join(cell[0] for cell in row)
        if flag:
            current += text
        else:
            lines.append((current + text).rstrip(" "))
            current = ""
    if current:
        lines.append(current.rstrip(" "))
    return lines


# == reading a QR code back =====================================================
#
# A cell shows its glyph in the foreground colour on the background colour.
# Half blocks split the cell into a top and a bottom half. With no colour
# set, the terminal's defaults are taken to be light ink on a dark
# background (the usual terminal); white (7, 15) is light, black (0) is
# dark; any other colour, or a glyph that covers part of a cell in one
# colour and the rest in another (such as '#' light on dark), is neither.

_LIGHT, _DARK, _UNKNOWN = "0", "1", "?"
_FINDER = ("1111111", "1000001", "1011101", "1011101", "1011101", "1000001", "1111111")


def _shade(colour, default):
    if colour is None:
        return default
    if colour in (WHITE, 15):
        return _LIGHT
    if colour == BLACK:
        return _DARK
    return _UNKNOWN


def cell_halves(cell):
    """(top, bottom) of a cell as _LIGHT '0', _DARK '1' or _UNKNOWN '?'."""
    ch, fg, bg = cell
    ink, paper = _shade(fg, _LIGHT), _shade(bg, _DARK)
    if ch == " ":
        return paper, paper
    if ch == "\u2588":  # full block
        return ink, ink
    if ch == "\u2580":  # upper half block
        return ink, paper
    if ch == "\u2584":  # lower half block
        return paper, ink
    if ink == paper:  # any glyph in the colour of its background: solid
        return ink, ink
    return _UNKNOWN, _UNKNOWN


def _half_block_image(grid):
    """One pixel per half cell: two pixel rows per text row."""
    image = []
    for row in grid:
        halves = [cell_halves(cell) for cell in row]
        image.append("".join(top for top, _ in halves))
        image.append("".join(bottom for _, bottom in halves))
    return image


def _two_column_images(grid):
    """One pixel per pair of cells (the ASCII form), for both alignments:
    a pair whose cells differ, or a cell split in two shades, is unknown."""
    solid = []
    for row in grid:
        line = ""
        for cell in row:
            top, bottom = cell_halves(cell)
            line += top if top == bottom else _UNKNOWN
        solid.append(line)
    images = []
    for start in (0, 1):
        image = []
        for line in solid:
            pairs = [line[c:c + 2] for c in range(start, len(line) - 1, 2)]
            image.append("".join(p[0] if p[0] == p[1] else _UNKNOWN for p in pairs))
        images.append(image)
    return images


def _finder_at(image, y, x):
    return all(image[y + k][x:x + 7] == _FINDER[k] for k in range(7))


def _find_symbol(image):
    """The first QR symbol (finder patterns at three corners, a light
    quiet zone of 4 modules all round) in a list of pixel strings, as a
    matrix of bools, True = dark; None when there is none or a module of
    it is unknown."""
    height = len(image)
    width = max([len(line) for line in image] or [0])
    for y in range(4, height - 4 - 21 + 1):
        x = image[y].find(_FINDER[0], 4)
        while x != -1:
            if _finder_at(image, y, x):
                found = _symbol_at(image, y, x, height, width)
                if found is not None:
                    return found
            x = image[y].find(_FINDER[0], x + 1)
    return None


def _symbol_at(image, y, x, height, width):
    for version in range(1, 41):
        size = 17 + 4 * version
        if y + size + 4 > height or x + size + 4 > width:
            break
        if not (_finder_at(image, y, x + size - 7) and _finder_at(image, y + size - 7, x)):
            continue
        quiet = _LIGHT * (size + 8)
        rows = image[y - 4:y + size + 4]
        if any(line[x - 4:x + size + 4] != quiet for line in rows[:4] + rows[-4:]):
            continue
        body = rows[4:-4]
        if any(line[x - 4:x] != _LIGHT * 4 or line[x + size:x + size + 4] != _LIGHT * 4 for line in body):
            continue
        modules = [line[x:x + size] for line in body]
        if any(_UNKNOWN in line for line in modules):
            return None
        return [[m == _DARK for m in line] for line in modules]
    return None


def read_qr(screen):
    """The QR code on the visible screen as the module matrix without quiet
    zone (lists of bools, True = dark), or None when no whole, readable
    symbol with its quiet zone is there.

    It reads the cells as drawn: half blocks (two module rows per text row)
    or two cells per module (the ASCII form, one text row per module row).
    A symbol cut by the top of the screen, broken by a wrap or overwritten
    reads as None or as a different matrix."""
    found = _find_symbol(_half_block_image(screen.grid))
    if found is not None:
        return found
    for image in _two_column_images(screen.grid):
        found = _find_symbol(image)
        if found is not None:
            return found
    return None


_ART = re.compile("[\u2588\u2580\u2584]{15}|#{10}")


def looks_like_qr_art(screen):
    """True when the screen shows anything like part of a QR code drawn
    with a light quiet zone, whole or not, readable or not: fifteen block
    characters in a row (a quiet zone row is at least 29), ten '#' in a
    row, or ten cells in a row painted with a background colour. Large
    letters (such as the 3-line user code, five blocks wide at most) and
    plain text are not. An inverted symbol, dark quiet zone drawn as
    blanks, may pass unnoticed."""
    for row in screen.grid:
        if _ART.search("".join(cell[0] for cell in row)):
            return True
        run = 0
        for cell in row:
            run = run + 1 if cell[2] is not None else 0
            if run >= 10:
                return True
    return False


# == running a program on a pseudo-terminal =========================================

# Run in the child after setsid() (start_new_session): make the terminal on
# fd 0 the controlling one, as a login shell has it, then become the command.
# In the C locale this interpreter's start-up (PEP 538, 3.7+) puts
# LC_CTYPE=C.UTF-8 into its environment: put LC_CTYPE back as it was given
# (argv[1]: "=" and the value, or "-" for unset), or the command would see
# a UTF-8 locale that the caller never set.
_TAKE_TTY = """if 1:
    import fcntl, os, sys, termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if sys.argv[1] == "-":
        os.environ.pop("LC_CTYPE", None)
    else:
        os.environ["LC_CTYPE"] = sys.argv[1][1:]
    os.execvp(sys.argv[2], sys.argv[2:])
"""


def run_in_pty(argv, rows=24, cols=80, env=None, stop_when=None, timeout=10.0, cwd=None, grace=3.0):
    """Run ``argv`` with stdin, stdout and stderr on a new pseudo-terminal of
    ``rows`` x ``cols`` (its controlling terminal, in a session of its own)
    and feed what it writes to a Screen until ``stop_when(screen)`` is true,
    the program ends or ``timeout`` seconds pass. Then interrupt it (SIGINT
    to its process group, SIGKILL after ``grace`` seconds) and collect the
    rest.

    Return (screen, raw, code): the screen as it was when ``stop_when`` held
    (or at the end), every byte the program wrote (also after the
    interrupt), and its exit status (negative: killed by that signal)."""
    import fcntl
    import pty
    import struct
    import termios

    screen = Screen(rows, cols)
    raw = bytearray()
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        lc_ctype = (os.environ if env is None else env).get("LC_CTYPE")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _TAKE_TTY, "-" if lc_ctype is None else "=" + lc_ctype]
                                + list(argv),
                                stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                start_new_session=True)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)  # the child's copies are the only ones: EOF when it ends
    try:
        done = _pump(master, raw, screen, stop_when, time.monotonic() + timeout)
        if not done:
            _signal_group(proc, signal.SIGINT)
            if not _pump(master, raw, None, None, time.monotonic() + grace):
                _signal_group(proc, signal.SIGKILL)
                _pump(master, raw, None, None, time.monotonic() + 5.0)
        code = proc.wait(5.0)
    finally:
        os.close(master)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return screen, bytes(raw), code


def _pump(master, raw, screen, stop_when, deadline):
    """Read from the master until EOF (True), ``stop_when`` (False) or the
    deadline (False). A None screen only collects bytes."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([master], [], [], min(left, 0.2))
        if not ready:
            continue
        try:
            data = os.read(master, 65536)
        except OSError as exc:  # Linux: EIO once no process has the terminal open
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            return True
        raw.extend(data)
        if screen is not None:
            screen.feed(data)
            if stop_when is not None and stop_when(screen):
                return False


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
