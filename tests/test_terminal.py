"""Tests of the terminal model in terminal.py (not of standcloud_auth).

The screen tests (test_screen.py) are only as good as this model: here it
is checked on hand-made input, including QR renderings of known matrices in
every form the login may draw, whole and damaged.
"""

import ast
import os
import random
import sys
import time

import pytest

from terminal import BLACK, WHITE, Screen, looks_like_qr_art, read_qr, run_in_pty


def screen_of(rows, cols, *chunks):
    screen = Screen(rows, cols)
    for chunk in chunks:
        screen.feed(chunk)
    return screen


# -- text, wrapping, scrolling ---------------------------------------------------


def test_printable_text_and_cursor():
    screen = screen_of(3, 10, "abc")
    assert screen.text_lines() == ["abc", "", ""]
    assert (screen.row, screen.col) == (0, 3)
    assert screen.cell(0, 1) == ("b", None, None)
    assert screen.cell(0, 5) == (" ", None, None)


def test_lf_keeps_the_column_and_cr_lf_starts_a_line():
    # The pty's ONLCR turns "\n" into "\r\n"; the terminal itself does not.
    assert screen_of(3, 10, "ab\ncd").text_lines() == ["ab", "  cd", ""]
    assert screen_of(3, 10, "ab\r\ncd").text_lines() == ["ab", "cd", ""]


def test_writing_the_last_column_does_not_wrap_yet():
    screen = screen_of(3, 10, "0123456789")
    assert (screen.row, screen.col, screen.pending_wrap) == (0, 9, True)
    assert screen.text_lines() == ["0123456789", "", ""]
    assert screen.wrapped == [False, False, False]


def test_the_next_printable_character_wraps_and_marks_the_row():
    screen = screen_of(3, 10, "0123456789", "X")
    assert screen.text_lines() == ["0123456789", "X", ""]
    assert screen.wrapped == [True, False, False]
    assert screen.logical_lines() == ["0123456789X", ""]
    assert (screen.row, screen.col) == (1, 1)


@pytest.mark.parametrize("between, expected", [
    ("\r\n", ["0123456789", "X", ""]),  # a full line then a newline: no blank line
    ("\r", ["X123456789", "", ""]),
    ("\b", ["01234567X9", "", ""]),  # xterm: back from the last column
    ("\x1b[K", ["012345678X", "", ""]),  # xterm: EL erases at the cursor, cancels the wrap
    ("\n", ["0123456789", "         X", ""]),
])
def test_controls_cancel_the_pending_wrap(between, expected):
    screen = screen_of(3, 10, "0123456789" + between + "X")
    assert screen.text_lines() == expected
    assert screen.wrapped == [False, False, False]


def test_a_long_line_wraps_over_several_rows():
    screen = screen_of(4, 4, "abcdefghij\r\nk")
    assert screen.text_lines() == ["abcd", "efgh", "ij", "k"]
    assert screen.wrapped == [True, True, False, False]
    assert screen.logical_lines() == ["abcdefghij", "k"]


def test_a_wrapped_row_keeps_its_trailing_spaces_in_the_logical_line():
    screen = screen_of(2, 4, "ab  cd")
    assert screen.logical_lines() == ["ab  cd"]


def test_lf_on_the_bottom_row_scrolls_into_the_scrollback():
    screen = screen_of(3, 10, "a\r\nb\r\nc\r\nd\r\ne")
    assert screen.text_lines() == ["c", "d", "e"]
    assert screen.scrollback == ["a", "b"]
    assert (screen.row, screen.col) == (2, 1)


def test_a_wrapped_line_cut_by_the_top_is_not_whole_on_screen():
    screen = screen_of(2, 4, "abcdefghij")
    assert screen.scrollback == ["abcd"]
    assert screen.text_lines() == ["efgh", "ij"]
    assert screen.logical_lines() == ["efghij"]
    whole = screen.with_scrollback()
    assert whole.logical_lines() == ["abcdefghij"]
    assert whole.text_lines() == ["abcd", "efgh", "ij"]


def test_with_scrollback_is_a_copy():
    screen = screen_of(2, 4, "a\r\nb\r\nc")
    whole = screen.with_scrollback()
    screen.feed("\rZ")
    assert whole.text_lines() == ["a", "b", "c"]
    assert screen.text_lines() == ["b", "Z"]


def test_backspace_and_tab():
    assert screen_of(1, 20, "abc\bX").text_lines() == ["abX"]
    assert screen_of(1, 20, "\bX").text_lines() == ["X"]  # not past the left margin
    assert screen_of(1, 20, "a\tb").text_lines() == ["a       b"]
    assert screen_of(1, 10, "a\t\tb").text_lines() == ["a        b"]  # not past the right margin


def test_bell_and_other_controls_draw_nothing():
    screen = screen_of(1, 10, "a\x07b\x00c\x0ed\x9be")
    assert screen.text_lines() == ["abcde"]


# -- the countdown line -------------------------------------------------------------


def test_the_countdown_overwrites_itself_in_place():
    screen = screen_of(3, 20, "Waiting\r\n", "\r  9:59 left ", "\r  9:58 left ")
    assert screen.text_lines() == ["Waiting", "  9:58 left", ""]
    assert (screen.row, screen.col) == (1, 12)


def test_a_shorter_countdown_leaves_the_rest_without_erase_line():
    screen = screen_of(2, 20, "\r  10:00 left ", "\r  9:59 left")
    assert screen.text_lines()[0] == "  9:59 leftt"


def test_erase_line_clears_what_was_left():
    screen = screen_of(2, 20, "\r  10:00 left ", "\r  9:59 left\x1b[K")
    assert screen.text_lines()[0] == "  9:59 left"


@pytest.mark.parametrize("mode, expected", [("", "abc"), ("0", "abc"), ("1", "    ef"), ("2", "")])
def test_erase_line_modes(mode, expected):
    screen = screen_of(1, 10, "abcdef\x1b[3D\x1b[" + mode + "K")
    assert screen.text_lines() == [expected]
    assert screen.col == 3  # EL does not move the cursor


def test_erase_line_takes_the_background_colour():
    screen = screen_of(1, 4, "abcd\r\x1b[44m\x1b[K")
    assert [screen.cell(0, c) for c in range(4)] == [(" ", None, 4)] * 4


def test_erase_to_the_end_clears_the_soft_wrap_of_the_row():
    screen = screen_of(3, 4, "abcdef\x1b[1;3H\x1b[K")
    assert screen.text_lines() == ["ab", "ef", ""]
    assert screen.wrapped == [False, False, False]


def test_erase_display_and_cursor_moves():
    screen = screen_of(3, 5, "aaaaa\r\nbbbbb\r\nccccc")
    screen.feed("\x1b[2;3H\x1b[J")
    assert screen.text_lines() == ["aaaaa", "bb", ""]
    screen.feed("\x1b[1J")
    assert screen.text_lines() == ["", "", ""]
    screen.feed("\x1b[HX\x1b[BY\x1b[CZ\x1b[AW\x1b[5GV\x1b[2J")
    assert screen.text_lines() == ["", "", ""]
    screen.feed("\x1b[HX\x1b[BY\x1b[CZ\x1b[AW\x1b[5GV")
    assert screen.text_lines() == ["X   V", " Y Z", ""]


def test_cursor_moves_stop_at_the_edges():
    screen = screen_of(2, 5, "\x1b[9A\x1b[9DX\x1b[9B\x1b[9CY\x1b[9;9HZ")
    assert screen.text_lines() == ["X", "    Z"]


# -- colours and escape sequences ------------------------------------------------


def test_sgr_colours_are_kept_per_cell():
    screen = screen_of(1, 10, "\x1b[37;40mA\x1b[0mB\x1b[31mC\x1b[39;44mD\x1b[mE\x1b[97;100mF\x1b[30;47mG\x1b[49mH")
    cells = [screen.cell(0, c) for c in range(8)]
    assert cells == [("A", WHITE, BLACK), ("B", None, None), ("C", 1, None), ("D", None, 4),
                     ("E", None, None), ("F", 15, 8), ("G", BLACK, WHITE), ("H", BLACK, None)]


def test_extended_colours():
    screen = screen_of(1, 10, "\x1b[38;5;196;48;2;1;2;3mA\x1b[1;4;38;5;7mB")
    assert screen.cell(0, 0) == ("A", 196, (1, 2, 3))
    assert screen.cell(0, 1) == ("B", 7, (1, 2, 3))  # bold and underline: ignored


def test_every_escape_sequence_is_recorded_whole_even_when_split():
    screen = Screen(1, 20)
    for chunk in ["a\x1b", "[3", "7m", "b\x1b]0;title\x07", "c\x1b[?25l", "\x1b(B", "d\x1b[K", "\x1b]2;x\x1b", "\\e"]:
        screen.feed(chunk)
    assert screen.escapes_seen == ["\x1b[37m", "\x1b]0;title\x07", "\x1b[?25l", "\x1b(B", "\x1b[K", "\x1b]2;x\x1b\\"]
    assert screen.text_lines() == ["abcde"]
    assert screen.cell(0, 1) == ("b", WHITE, None)


def test_utf8_split_across_feeds():
    screen = Screen(1, 5)
    data = "\u2588\u2580".encode("utf-8")
    for i in range(len(data)):
        screen.feed(data[i:i + 1])
    assert screen.text_lines() == ["\u2588\u2580"]


def test_an_escape_interrupted_by_another_is_dropped():
    screen = screen_of(1, 10, "\x1b[31\x1b[32mX")
    assert screen.cell(0, 0) == ("X", 2, None)
    assert screen.escapes_seen == ["\x1b[31", "\x1b[32m"]


def test_scrolling_brings_in_rows_of_the_current_background():
    screen = screen_of(2, 3, "a\r\nb\x1b[41m\r\n")
    assert screen.cell(1, 0) == (" ", None, 1)
    assert screen.cell(0, 0) == ("b", None, None)


# -- reading a QR code back --------------------------------------------------------------


def synthetic_symbol(size, seed):
    """A matrix with QR finder patterns (and separators) at three corners
    and random modules elsewhere: all that read_qr looks for."""
    rng = random.Random(seed)
    matrix = [[rng.random() < 0.5 for _ in range(size)] for _ in range(size)]
    for top, left in ((0, 0), (0, size - 7), (size - 7, 0)):
        for r in range(-1, 8):
            for c in range(-1, 8):
                y, x = top + r, left + c
                if 0 <= y < size and 0 <= x < size:
                    ring = max(abs(r - 3), abs(c - 3))
                    matrix[y][x] = ring in (0, 1, 3)
    return matrix


def light_grid(matrix, quiet=4):
    """True for light, the quiet zone included."""
    width = len(matrix) + 2 * quiet
    return ([[True] * width] * quiet + [[True] * quiet + [not m for m in row] + [True] * quiet for row in matrix]
            + [[True] * width] * quiet)


def half_blocks(matrix, colour=False, indent="", quiet=4, light_ink=True):
    grid = light_grid(matrix, quiet)
    if len(grid) % 2:
        grid.append([True] * len(grid[0]))
    glyphs = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}
    if not light_ink:
        glyphs = {(not a, not b): g for (a, b), g in glyphs.items()}
    lines = ["".join(glyphs[pair] for pair in zip(top, bottom)) for top, bottom in zip(grid[0::2], grid[1::2])]
    if colour:
        lines = ["\x1b[37;40m" + line + "\x1b[0m" for line in lines]
    return "".join(indent + line + "\r\n" for line in lines)


def ascii_cells(matrix, indent="", quiet=4):
    """Form (b): two spaces per module on a white or black background."""
    lines = ["".join(("\x1b[47m" if light else "\x1b[40m") + "  " for light in row) + "\x1b[0m"
             for row in light_grid(matrix, quiet)]
    return "".join(indent + line + "\r\n" for line in lines)


def ascii_hashes(matrix, colour):
    """v1's ASCII form: '##' for dark, '  ' for light; in colour, black '#'
    on black and spaces on white."""
    lines = []
    for row in light_grid(matrix):
        if colour:
            lines.append("\x1b[30;47m" + "".join(("\x1b[47m  " if light else "\x1b[40m##") for light in row) + "\x1b[0m")
        else:
            lines.append("".join("  " if light else "##" for light in row))
    return "".join(line + "\r\n" for line in lines)


SYMBOL = synthetic_symbol(21, 1)
TEXT_ABOVE = "To log in, open this address:\r\n\r\n    https://example.invalid/x\r\n\r\n"
TEXT_BELOW = "\r\nWaiting for approval...\r\n\r  9:58 left \x1b[K"


@pytest.mark.parametrize("render", [
    lambda m: half_blocks(m),
    lambda m: half_blocks(m, colour=True),
    lambda m: half_blocks(m, indent="    "),
    lambda m: half_blocks(m, colour=True, indent="   "),
    lambda m: ascii_cells(m),
    lambda m: ascii_cells(m, indent=" "),  # odd column: the other pairing of cells
    lambda m: ascii_cells(m, indent="    "),
    lambda m: ascii_hashes(m, colour=True),
], ids=["bare", "white-on-black", "bare-indented", "colour-indented", "ascii", "ascii-odd", "ascii-indented", "v1-ascii"])
def test_read_qr_reads_every_form(render):
    screen = screen_of(40, 80, TEXT_ABOVE, render(SYMBOL), TEXT_BELOW)
    assert read_qr(screen) == SYMBOL
    assert looks_like_qr_art(screen)


@pytest.mark.parametrize("size", [21, 25, 29, 41, 45])
def test_read_qr_finds_the_size(size):
    matrix = synthetic_symbol(size, size)
    screen = screen_of(60, 120, TEXT_ABOVE, half_blocks(matrix), TEXT_BELOW)
    assert read_qr(screen) == matrix
    screen = screen_of(size + 20, 2 * size + 30, TEXT_ABOVE, ascii_cells(matrix), TEXT_BELOW)
    assert read_qr(screen) == matrix


def test_read_qr_on_real_encoder_output():
    """The module's own encoder, when it is there (its matrix is a real
    symbol, with timing and alignment patterns)."""
    sca = pytest.importorskip("standcloud_auth")
    encode = getattr(sca, "_qr_encode", None) or sca._qr_module()._qr_encode
    matrix = encode(b"https://company.standcloud.io/auth/consent/openid/device-authorization"
                                         b"?user_code=BCDFGHJK")[0]
    screen = screen_of(40, 80, half_blocks(matrix, colour=True))
    assert read_qr(screen) == matrix


def test_read_qr_none_without_a_symbol():
    assert read_qr(screen_of(24, 80, TEXT_ABOVE, TEXT_BELOW)) is None
    assert read_qr(Screen(24, 80)) is None
    assert not looks_like_qr_art(screen_of(24, 80, TEXT_ABOVE, TEXT_BELOW))


@pytest.mark.parametrize("render", [
    lambda m: half_blocks(m, light_ink=False),  # dark modules as ink: inverted on this terminal
    lambda m: ascii_hashes(m, colour=False),  # '#' is no solid cell
    lambda m: half_blocks(m).replace("\u2588", "\x1b[32m\u2588\x1b[0m"),  # green is neither light nor dark
], ids=["inverted", "plain-hashes", "green"])
def test_read_qr_refuses_what_a_camera_could_not_read(render):
    screen = screen_of(40, 80, render(SYMBOL))
    assert read_qr(screen) is None


def test_read_qr_a_symbol_cut_by_the_top_of_the_screen():
    # 15 text lines of symbol and 5 of text on a 16-row screen.
    screen = screen_of(16, 80, TEXT_ABOVE, half_blocks(SYMBOL), TEXT_BELOW)
    assert screen.scrollback
    assert read_qr(screen) is None
    assert looks_like_qr_art(screen)
    assert read_qr(screen.with_scrollback()) == SYMBOL  # it was drawn whole: only the cut matters


def test_read_qr_a_quiet_zone_cut_by_the_top_of_the_screen():
    screen = screen_of(15, 80, half_blocks(SYMBOL), "\r  9:58 left")  # the first line scrolls away
    assert screen.scrollback == ["\u2588" * 29]
    assert read_qr(screen) is None
    assert read_qr(screen.with_scrollback()) == SYMBOL


@pytest.mark.parametrize("cols", [28, 40])
def test_read_qr_a_symbol_wrapped_by_a_narrow_screen(cols):
    # 29 cells of half blocks; 58 cells in the ASCII form.
    render = half_blocks if cols < 29 else ascii_cells
    screen = screen_of(80, cols, render(SYMBOL))
    assert any(screen.wrapped)
    assert read_qr(screen) is None
    assert looks_like_qr_art(screen)


def test_read_qr_a_narrow_quiet_zone():
    assert read_qr(screen_of(40, 80, TEXT_ABOVE, half_blocks(SYMBOL, quiet=3), TEXT_BELOW)) is None
    assert read_qr(screen_of(40, 80, TEXT_ABOVE, ascii_cells(SYMBOL, quiet=3), TEXT_BELOW)) is None


@pytest.mark.parametrize("column", [1, 4 + 21 + 2], ids=["left", "right"])
def test_read_qr_something_in_the_side_quiet_zone(column):
    # A dark cell (a blank) in the quiet zone beside the symbol, on text row 7
    # (module rows 10 and 11), as text drawn beside the code would put there.
    screen = screen_of(40, 80, half_blocks(SYMBOL))
    screen.feed("\x1b[8;%dH " % (column + 1))
    assert read_qr(screen) is None


def test_read_qr_text_over_the_quiet_zone():
    # The countdown written on the last line of the symbol (no newline after it).
    screen = screen_of(40, 80, TEXT_ABOVE, half_blocks(SYMBOL).rstrip("\r\n"), "\r  9:58 left ")
    assert read_qr(screen) is None


def test_read_qr_a_changed_module_reads_as_a_different_matrix():
    screen = screen_of(40, 80, half_blocks(SYMBOL))
    # Modules (10, 10) and (11, 10) are the cell at text row (10 + 4) // 2,
    # column 10 + 4: make both dark (a blank cell) or, if they are, light.
    dark = not (SYMBOL[10][10] and SYMBOL[11][10])
    screen.feed("\x1b[8;15H" + (" " if dark else "\u2588"))
    expected = [list(row) for row in SYMBOL]
    expected[10][10] = expected[11][10] = dark
    assert expected != SYMBOL
    assert read_qr(screen) == expected


def test_read_qr_an_overwritten_module_is_unreadable():
    screen = screen_of(40, 80, half_blocks(SYMBOL))
    screen.feed("\x1b[8;15Hx")  # a letter: partly ink, partly background
    assert read_qr(screen) is None


def test_looks_like_qr_art_ignores_the_large_code():
    big = ("    \u2588\u2580\u2580\u2580\u2584 \u2584\u2580\u2580\u2580\u2580 \u2588\u2580\u2580\u2580\u2584\r\n"
           "    \u2588\u2580\u2580\u2580\u2584 \u2588     \u2588   \u2588\r\n"
           "    \u2580\u2580\u2580\u2580   \u2580\u2580\u2580\u2580 \u2580\u2580\u2580\u2580\r\n")
    assert not looks_like_qr_art(screen_of(10, 80, big))
    assert looks_like_qr_art(screen_of(10, 80, "\u2588\u2580\u2584" * 5))
    assert not looks_like_qr_art(screen_of(10, 80, "\u2588\u2580\u2584" * 4 + " " + "\u2588\u2580\u2584" * 4))
    assert looks_like_qr_art(screen_of(10, 80, "#" * 10))
    assert not looks_like_qr_art(screen_of(10, 80, "#" * 9))
    assert looks_like_qr_art(screen_of(10, 80, ascii_hashes(SYMBOL, colour=False)))
    assert looks_like_qr_art(screen_of(10, 80, "\x1b[47m" + " " * 10 + "\x1b[0m"))
    assert not looks_like_qr_art(screen_of(10, 80, "\x1b[47m" + " " * 9 + "\x1b[0m"))


# -- running a program on a pseudo-terminal -----------------------------------------

PROBE = r"""
import os, shutil, sys, time
size = shutil.get_terminal_size((1, 1))
print("size", size.columns, size.lines, [os.isatty(fd) for fd in (0, 1, 2)])
print("ctty", os.getsid(0) == os.getpid(), os.tcgetpgrp(0) == os.getpgrp())
sys.stderr.write("\x1b[31mred\x1b[0m\n")
sys.stdout.flush()
try:
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    time.sleep(30)
except KeyboardInterrupt:
    sys.stdout.write("interrupted\n")
    sys.stdout.flush()
    sys.exit(42)
"""


def open_fds():
    return sorted(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_run_in_pty_size_tty_and_interrupt():
    before = open_fds()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    started = time.monotonic()
    screen, raw, code = run_in_pty([sys.executable, "-c", PROBE], rows=30, cols=100, env=env,
                                   stop_when=lambda s: "READY" in s.text_lines(), timeout=20)
    assert time.monotonic() - started < 10  # stopped at READY, not at the timeout
    assert "size 100 30 [True, True, True]" in screen.text_lines()
    assert "ctty True True" in screen.text_lines()
    assert "red" in screen.text_lines() and screen.cell(2, 0) == ("r", 1, None)
    assert b"\r\n" in raw and b"\n\n" not in raw  # ONLCR
    assert "interrupted" not in screen.text_lines()  # the screen as it was at the stop
    assert b"interrupted" in raw
    assert code == 42
    assert open_fds() == before


def test_run_in_pty_program_that_ends():
    screen, raw, code = run_in_pty([sys.executable, "-c", "print('bye'); raise SystemExit(3)"], rows=5, cols=20,
                                   timeout=20)
    assert screen.text_lines()[0] == "bye"
    assert code == 3


def test_run_in_pty_kills_what_ignores_sigint():
    program = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('x', flush=True); time.sleep(60)"
    screen, raw, code = run_in_pty([sys.executable, "-c", program], rows=5, cols=20, timeout=20, grace=0.3,
                                   stop_when=lambda s: s.text_lines()[0] == "x")
    assert screen.text_lines()[0] == "x"
    assert code == -9


def test_run_in_pty_timeout():
    started = time.monotonic()
    screen, raw, code = run_in_pty([sys.executable, "-c", "import time; time.sleep(60)"],
                                   rows=5, cols=20, timeout=1.0, stop_when=lambda s: False)
    assert 1.0 <= time.monotonic() - started < 4.0  # SIGINT at the timeout, well before SIGKILL
    assert code in (1, -2)  # KeyboardInterrupt: 3.8+ end by SIGINT itself, earlier ones with 1


@pytest.mark.parametrize("extra", [{}, {"LC_CTYPE": "C.UTF-8"}, {"LC_CTYPE": ""}], ids=["unset", "utf8", "empty"])
def test_run_in_pty_passes_the_environment_unchanged(extra):
    """Also in the C locale, where a Python start-up (PEP 538) would add
    LC_CTYPE=C.UTF-8 on the way to the command."""
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_CTYPE")}
    env.update(LANG="C", **extra)
    env["PYTHONCOERCECLOCALE"] = "0"  # the command (Python too) must not add it itself
    dump = "import os, sys; sys.stdout.write(repr(sorted(os.environ.items())))"
    screen, raw, code = run_in_pty([sys.executable, "-c", dump], rows=5, cols=80, env=env, timeout=20)
    assert dict(ast.literal_eval(raw.decode("utf-8"))) == env
    assert code == 0
