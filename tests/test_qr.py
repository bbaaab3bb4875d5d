"""Tests of §10 QR code of standcloud_auth (ISO/IEC 18004, "18004").

Known-answer vectors live in fixtures/qr_vectors.json. They were made once
by fixtures/make_qr_vectors.py (run by hand, not by this suite, and not a
dependency), which checked every vector against two independent programs:

- encoder: python-qrcode 8.2 built each symbol with the same version, level
  and mask, and its module matrix was identical to ours (the same script
  compared all 40 versions x L/M x 8 masks before the vectors were kept),
  and its Reed-Solomon block table for all 40 versions is kept in the JSON;
- decoders: zxing-cpp 3.1.1 and zbarimg 0.23.92 (Debian zbar-tools) read
  a PNG of our matrix back to the original bytes, at the expected level.

Everything else here is checked from first principles: the function
patterns, format and version information (BCH) decoded by brute force, a
plain re-implementation of the mask penalty, and a parser for the rendered
text. Only pytest is needed.
"""

import json
import os
import re

import pytest

import standcloud_auth as sca

QR = sca._qr_module()  # the encoder, compiled on first use (see §10)

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "fixtures", "qr_vectors.json")) as _fh:
    _FIXTURE = json.load(_fh)
VECTORS = _FIXTURE["vectors"]
RS_BLOCKS = _FIXTURE["rs_blocks"]  # python-qrcode's 18004 Table 9

_CACHE = {}  # (data, ecl, version, mask) -> _qr_encode result


def encode(data, ecl=None, version=None, mask=None):
    """QR._qr_encode, memoised: several tests look at the same symbol."""
    key = (data, ecl, version, mask)
    if key not in _CACHE:
        _CACHE[key] = QR._qr_encode(data, ecl=ecl, version=version,
                                     mask=mask)
    return _CACHE[key]


def rows_from_hex(rows):
    n = len(rows)
    return [[ch == "1" for ch in format(int(row, 16), f"0{n}b")]
            for row in rows]


# ---- independent helpers -------------------------------------------------


def alignment_centres(version):
    """18004 Annex E rule: first centre 6, last size - 7, the others evenly
    spaced from the last by an even step; version 32 is the one exception
    (step 26, not 28)."""
    if version == 1:
        return []
    size = 4 * version + 17
    count = version // 7 + 2
    step = -(-(size - 13) // (count - 1))
    step += step % 2
    if version == 32:
        step = 26
    return [6] + [size - 7 - step * k for k in range(count - 2, -1, -1)]


def bch_codeword(value, poly, degree):
    rem = value << degree
    for bit in range(rem.bit_length() - 1, degree - 1, -1):
        if rem >> bit & 1:
            rem ^= poly << (bit - degree)
    return value << degree | rem


def read_format(m):
    """Both copies of the 15 format bits (18004 Figure 25), bit 0 first."""
    n = len(m)
    one = [m[k][8] for k in range(6)] + [m[7][8], m[8][8], m[8][7]]
    one += [m[8][k] for k in (5, 4, 3, 2, 1, 0)]
    two = [m[8][n - 1 - k] for k in range(8)]
    two += [m[n - 7 + k][8] for k in range(7)]
    return [sum(bit << k for k, bit in enumerate(bits)) for bits in (one, two)]


def read_version(m):
    """Both 18-bit version blocks (18004 Figure 27), bit 0 first."""
    n = len(m)
    top = sum(m[k // 3][n - 11 + k % 3] << k for k in range(18))
    left = sum(m[n - 11 + k % 3][k // 3] << k for k in range(18))
    return top, left


def reference_penalty(m):
    """18004 §7.8.3.1 penalty, written plainly, module by module. N3
    counts a 1:1:3:1:1 pattern once when 4 light modules (the quiet zone
    beyond the edge is light) lie on at least one side."""
    n = len(m)
    lines = [list(row) for row in m] + [[m[r][c] for r in range(n)]
                                        for c in range(n)]
    score = 0
    for line in lines:
        run = 1
        for k in range(1, n + 1):
            if k < n and line[k] == line[k - 1]:
                run += 1
                continue
            if run >= 5:
                score += 3 + run - 5
            run = 1
        padded = [False] * 4 + line + [False] * 4
        for k in range(4, n + 4 - 6):
            core = padded[k:k + 7] == [True, False, True, True, True, False,
                                       True]
            if core and not (any(padded[k - 4:k]) and any(padded[k + 7:k + 11])):
                score += 40
    for r in range(n - 1):
        for c in range(n - 1):
            if m[r][c] == m[r][c + 1] == m[r + 1][c] == m[r + 1][c + 1]:
                score += 3
    dark = sum(map(sum, m))
    percent = 100.0 * dark / (n * n)
    return score + 10 * int(abs(percent - 50) // 5)


_SGR = re.compile("\x1b\\[[0-9;]*m")


def parse_render(text, unicode):
    """Turn _qr_render output back into a matrix (True = dark), checking
    that the quiet zone is 4 light modules on every side."""
    assert text.endswith("\n")
    lines = _SGR.sub("", text).split("\n")[:-1]
    grid = []
    if unicode:
        light = {"\u2588": (True, True), "\u2580": (True, False),
                 "\u2584": (False, True), " ": (False, False)}
        for line in lines:
            pairs = [light[ch] for ch in line]
            grid.append([not top for top, _ in pairs])
            grid.append([not bottom for _, bottom in pairs])
    else:
        for line in lines:
            assert len(line) % 2 == 0
            cells = [line[k:k + 2] for k in range(0, len(line), 2)]
            assert set(cells) <= {"##", "  "}
            grid.append([cell == "##" for cell in cells])
    width = len(grid[0])
    n = width - 8
    assert all(len(row) == width for row in grid)
    quiet = grid[:4] + grid[4 + n:]
    quiet += [row[:4] + row[4 + n:] for row in grid[4:4 + n]]
    assert not any(any(row) for row in quiet), "quiet zone not light"
    return [row[4:4 + n] for row in grid[4:4 + n]]


# ---- known answers ---------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_qr_known_answer_vectors(vector):
    data = bytes.fromhex(vector["data_hex"])
    modules, version, ecl, mask = encode(
        data, ecl=vector["ecl"], version=vector["version"])
    expect = vector["expect"]
    assert (version, ecl, mask) == (
        expect["version"], expect["ecl"], expect["mask"])
    assert modules == rows_from_hex(vector["rows"])


def test_qr_source_compiles_lazily_with_file_line_numbers():
    # The encoder is compiled only when asked for, and its code objects
    # carry standcloud_auth.py's own line numbers.
    import inspect

    with open(sca.__file__, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    line = QR._qr_encode.__code__.co_firstlineno
    assert lines[line - 1].startswith("def _qr_encode(")
    assert QR.__file__ if hasattr(QR, "__file__") else True
    assert inspect.getsourcefile(QR._qr_encode) == sca.__file__
    assert sca._qr_module() is QR


def test_qr_vectors_cover_the_required_cases():
    seen = {(v["expect"]["version"], v["expect"]["ecl"]) for v in VECTORS}
    assert {1, 2, 7, 10, 40} <= {version for version, _ in seen}
    assert {"L", "M"} == {ecl for _, ecl in seen}


@pytest.mark.parametrize("ecl", ["L", "M"])
def test_qr_block_table_matches_independent_encoder(ecl):
    for version in range(1, 41):
        blocks = [tuple(map(int, block.split("/")))
                  for block in RS_BLOCKS[f"{version}-{ecl}"].split()]
        row = QR._QR_EC_TABLE[version - 1]
        ec, count = (row[1], row[2]) if ecl == "L" else (row[3], row[4])
        assert row[0] == version
        assert [total - data for total, data in blocks] == [ec] * count
        assert sum(total for total, _ in blocks) == \
            QR._qr_raw_modules(version) // 8
        assert sum(data for _, data in blocks) == \
            QR._qr_data_capacity(version, ecl)


def test_qr_reed_solomon_matches_18004_annex_i():
    # 18004 Annex I: "01234567" as 1-M, 16 data codewords, 10 EC codewords.
    data = [0x10, 0x20, 0x0C, 0x56, 0x61, 0x80, 0xEC, 0x11,
            0xEC, 0x11, 0xEC, 0x11, 0xEC, 0x11, 0xEC, 0x11]
    generator = QR._qr_rs_generator(10)
    assert QR._qr_rs_remainder(data, generator, {}) == [
        0xA5, 0x24, 0xD4, 0xC1, 0xED, 0x36, 0xC7, 0x87, 0x2C, 0x55]


# ---- structure on every version ------------------------------------------

VERSIONS = list(range(1, 41))


def structure_symbol(version):
    """One symbol per version; level and mask vary with the version so
    that every mask and both levels show up across the table."""
    data = b"standcloud.io/"  # 14 bytes: fits version 1 at L and M
    return encode(data, ecl="LM"[version % 2], version=version,
                  mask=version % 8)


@pytest.mark.parametrize("version", VERSIONS)
def test_qr_structure_every_version(version):
    m, got_version, ecl, mask = structure_symbol(version)
    n = 4 * version + 17
    assert got_version == version
    assert len(m) == n and all(len(row) == n for row in m)
    check_function_patterns(m, version)
    # §7.9.1 format information: both copies equal; decoding by search
    # over all 32 codewords finds exactly the level and mask used.
    one, two = read_format(m)
    assert one == two
    matches = [(level, k) for level in (0, 1, 2, 3) for k in range(8)
               if bch_codeword(level << 3 | k, 0x537, 10) ^ 0x5412 == one]
    assert matches == [({"M": 0, "L": 1}[ecl], mask)]
    assert (ecl, mask) == ("LM"[version % 2], version % 8)
    # §7.10 version information from version 7 on (below, data modules).
    if version >= 7:
        top, left = read_version(m)
        assert top == left
        assert [v for v in range(7, 41)
                if bch_codeword(v, 0x1F25, 12) == top] == [version]


def check_function_patterns(m, version):
    n = len(m)
    # §6.3.3 finders and §6.3.4 separators, at three corners.
    for top, left in ((0, 0), (0, n - 7), (n - 7, 0)):
        for i in range(-1, 8):
            for j in range(-1, 8):
                r, c = top + i, left + j
                if 0 <= r < n and 0 <= c < n:
                    ring = max(abs(i - 3), abs(j - 3))
                    assert m[r][c] == (ring != 2 and ring != 4), (r, c)
    # §6.3.5 timing patterns.
    for k in range(8, n - 8):
        assert m[6][k] == m[k][6] == (k % 2 == 0), k
    # §6.3.6 alignment patterns at the Annex E centres, none on a finder.
    centres = alignment_centres(version)
    for r in centres:
        for c in centres:
            if (r, c) in ((6, 6), (6, n - 7), (n - 7, 6)):
                continue
            for i in range(-2, 3):
                for j in range(-2, 3):
                    assert m[r + i][c + j] == (max(abs(i), abs(j)) != 1)
    # §7.9.1 the dark module.
    assert m[n - 8][8] is True


def test_qr_alignment_table_matches_annex_e_rule():
    for version in VERSIONS:
        assert list(QR._QR_ALIGN_TABLE[version - 1][1]) == \
            alignment_centres(version), version


@pytest.mark.parametrize("version", range(1, 12))
def test_qr_chosen_mask_has_lowest_penalty(version):
    # Versions 1-11 are all that the 250-byte limit reaches on its own
    # (larger ones cost too much here: nine encodings each).
    data = bytes(range(242, 256))  # 14 bytes: fits version 1 at M
    chosen, _, ecl, mask = encode(data, version=version)
    forced = [encode(data, ecl=ecl, version=version, mask=k)[0]
              for k in range(8)]
    scores = [QR._qr_penalty(symbol) for symbol in forced]
    assert mask == scores.index(min(scores))
    assert chosen == forced[mask]


def test_qr_mask_ties_go_to_the_lowest_number(monkeypatch):
    monkeypatch.setattr(QR, "_qr_penalty_rows", lambda rows, n: 7)
    assert QR._qr_encode(b"tie")[3] == 0


@pytest.mark.parametrize("name", [v["name"] for v in VECTORS[:8]])
def test_qr_penalty_matches_plain_reference(name):
    vector = next(v for v in VECTORS if v["name"] == name)
    m = rows_from_hex(vector["rows"])
    assert QR._qr_penalty(m) == reference_penalty(m)


@pytest.mark.parametrize("mask", range(8))
def test_qr_penalty_matches_plain_reference_each_mask(mask):
    m = encode(b"standcloud", version=2, mask=mask)[0]
    assert QR._qr_penalty(m) == reference_penalty(m)


@pytest.mark.parametrize("matrix, expected", [
    # 21 x 21 all light: N1 42 lines x (3 + 16), N2 20 x 20 x 3, N4 10 x 10.
    ([[False] * 21 for _ in range(21)], 42 * 19 + 400 * 3 + 100),
    # A checkerboard: no runs, no blocks, no patterns, 221/441 dark.
    ([[(r + c) % 2 == 0 for c in range(21)] for r in range(21)], 0),
    # One row with a finder-like pattern light on both sides: N3 once.
    ([[False] * 4 + [True, False, True, True, True, False, True] + [False] * 4
      if r == 0 else [(r + c) % 2 == 1 for c in range(15)]
      for r in range(15)], None),
])
def test_qr_penalty_hand_computed(matrix, expected):
    if expected is None:
        expected = reference_penalty(matrix)
        assert expected >= 40
    assert QR._qr_penalty(matrix) == expected


# ---- choices, limits, errors ----------------------------------------------


def test_qr_size_limit_250_bytes():
    modules, version, ecl, _ = encode(b"\xff" * 250)
    assert (version, ecl, len(modules)) == (11, "M", 61)
    with pytest.raises(ValueError):
        QR._qr_encode(b"\xff" * 251)


@pytest.mark.parametrize("length, version", [
    (0, 1), (14, 1), (15, 2), (26, 2), (122, 7), (123, 8), (213, 10),
    (214, 11), (250, 11)])
def test_qr_smallest_version_at_level_m(length, version):
    assert QR._qr_choose(length, None, None) == (version, "M")


def test_qr_falls_back_to_level_l_only_when_m_does_not_fit():
    assert QR._qr_choose(213, None, 10) == (10, "M")
    assert QR._qr_choose(214, None, 10) == (10, "L")
    with pytest.raises(ValueError):
        QR._qr_choose(272, None, 10)


@pytest.mark.parametrize("kwargs", [
    {"ecl": "Q"}, {"ecl": "m"}, {"version": 0}, {"version": 41},
    {"mask": -1}, {"mask": 8}, {"version": 1, "ecl": "M"}])
def test_qr_rejects_bad_choices(kwargs):
    with pytest.raises(ValueError):
        QR._qr_encode(b"x" * 20, **kwargs)


def test_qr_capacity_matches_18004_table_7():
    # Byte-mode capacities at L and M for a few versions (18004 Table 7).
    table = {1: (17, 14), 2: (32, 26), 7: (154, 122), 10: (271, 213),
             11: (321, 251), 40: (2953, 2331)}
    for version, (at_l, at_m) in table.items():
        for ecl, most in (("L", at_l), ("M", at_m)):
            bits = 8 * QR._qr_data_capacity(version, ecl)
            assert QR._qr_bits_needed(most, version) <= bits
            assert QR._qr_bits_needed(most + 1, version) > bits


# ---- rendering ------------------------------------------------------------


@pytest.mark.parametrize("unicode", [True, False])
@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("name", ["v1-M", "v11-M-250-bytes"])
def test_qr_render_round_trips(name, unicode, color):
    vector = next(v for v in VECTORS if v["name"] == name)
    m = rows_from_hex(vector["rows"])
    text = QR._qr_render(m, unicode, color=color)
    assert parse_render(text, unicode) == m


def test_qr_render_unicode_draws_light_modules_as_blocks():
    m = [[True, False], [False, True]]  # not a QR code, just a matrix
    lines = QR._qr_render(m, True).split("\n")
    # 2 + 8 = 10 rows -> 5 lines of 10 characters, and a final "".
    assert len(lines) == 6 and lines[-1] == ""
    assert lines[0] == lines[1] == "\u2588" * 10
    # Rows 4 and 5 of the grid: quiet, dark light, light dark, quiet.
    assert lines[2] == "\u2588" * 4 + "\u2584\u2580" + "\u2588" * 4
    assert lines[4] == "\u2588" * 10  # quiet row + the padding row


def test_qr_render_ascii_marks_dark_modules():
    lines = QR._qr_render([[True]], False).split("\n")
    assert len(lines) == 10 and lines[-1] == ""
    assert lines[4] == "  " * 4 + "##" + "  " * 4


@pytest.mark.parametrize("unicode", [True, False])
def test_qr_render_color_paints_and_resets_every_line(unicode):
    m = rows_from_hex(VECTORS[0]["rows"])
    text = QR._qr_render(m, unicode, color=True)
    plain = QR._qr_render(m, unicode)
    assert _SGR.sub("", text) == plain
    for line in text.split("\n")[:-1]:
        assert line.startswith("\x1b[37;40m" if unicode else "\x1b[30;47m")
        assert line.endswith("\x1b[0m")


def test_qr_render_color_ascii_fills_dark_cells():
    lines = QR._qr_render([[True, True, False]], False, color=True)
    row = lines.split("\n")[4]
    assert row == ("\x1b[30;47m" + "  " * 4 + "\x1b[40m####"
                   + "\x1b[47m" + "  " * 5 + "\x1b[0m")
