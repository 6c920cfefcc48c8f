"""Text kernels (numba) over polars' string columns, for clean.py's normalization.

Deciding which strings a cleaning rule can change took polars five passes over the text (bytes vs chars, a large
regex class, two Aho-Corasick scans, first/last character); `scan` does it in one, and says which rules apply to
each string, so clean.py runs each rule on its own strings only. `nfc` composes the strings that need it about 4x
as fast as polars' NFC, which decomposes and recomposes every character: here only a run of NFC suspects and the
character before it are touched, the rest is copied (code points outside the suspect class are starters that
nothing composes with, so NFC never acts across one).

The kernels read the Arrow string-view buffers polars hands out without a copy, release the GIL (clean.py runs
slices on a thread pool) and are compiled once per install (numba's cache). Tests compare them with plain Python
(unicodedata, re) on every code point and on random strings (tests/test_text_kernels.py, tests/test_cleaning.py).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import polars as pl
import pyarrow as pa

SUSPECT, ODD, WHITE = 1, 2, 4  # bits of the code point classes
# bits of `scan`'s result: which rule may change the string
NFC, CR, ODD_CHAR, BLANK_NEWLINE, THREE_NEWLINES, END_WHITE = 1, 2, 4, 8, 16, 32
ALL = 63


@functools.lru_cache(maxsize=1)
def code_point_classes() -> np.ndarray:
    """One byte per code point: NFC suspect, odd character (zero-width or odd space), Unicode White_Space."""
    from . import clean

    classes = np.zeros(0x110000, dtype=np.uint8)
    for a, b in clean.nfc_suspect_ranges():
        classes[a : b + 1] |= SUSPECT
    for ch in clean.ODD_CHARACTERS:
        classes[ord(ch)] |= ODD
    for ch in clean.WHITE_SPACE:
        classes[ord(ch)] |= WHITE
    return classes


# ---------------------------------------------------------------- buffers


def _view_buffers(arr: pa.Array) -> tuple[np.ndarray, numba.typed.List]:
    """The 16-byte views of a string_view array (from its offset on) and its data buffers, without a copy."""
    bufs = arr.buffers()
    views = np.frombuffer(bufs[1], dtype=np.uint8)[arr.offset * 16 : (arr.offset + len(arr)) * 16]
    data = numba.typed.List.empty_list(numba.types.Array(numba.types.uint8, 1, "C", readonly=True))
    for b in bufs[2:]:
        data.append(np.frombuffer(b, dtype=np.uint8) if b is not None and b.size else _EMPTY)
    if len(data) == 0:
        data.append(_EMPTY)
    return views, data


_EMPTY = np.frombuffer(b"\0", dtype=np.uint8)[:0]


def _string_view(s: pl.Series) -> pa.Array:
    arr = s.to_arrow(compat_level=pl.CompatLevel.newest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string_view())
    return arr


@numba.njit(inline="always")
def _u32(views, v):
    return np.int64(views[v]) | (np.int64(views[v + 1]) << 8) | (np.int64(views[v + 2]) << 16) | (
        np.int64(views[v + 3]) << 24)


@numba.njit(inline="always")
def _locate(views, i):
    """(data buffer, start, length) of string i; buffer -1: the string (up to 12 bytes) sits in the view itself."""
    v = i * 16
    n = _u32(views, v)
    if n <= 12:
        return -1, v + 4, n
    return _u32(views, v + 8), _u32(views, v + 12), n


@numba.njit(inline="always")
def _string(views, data, i, buf, current):
    """(buffer, its index, start, length) of string i, given the buffer of the string before: a data buffer is
    fetched from the typed list only when it changes (a lookup per string cost more than its scan)."""
    b, start, n = _locate(views, i)
    if b < 0:
        return views, -1, start, n
    if b != current:
        return data[b], b, start, n
    return buf, current, start, n


@numba.njit(inline="always")
def _decode(buf, i):
    """(code point, byte length) of the UTF-8 sequence at buf[i] (polars strings are valid UTF-8)."""
    b0 = np.int64(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (buf[i + 1] & 0x3F), 2
    if b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((buf[i + 1] & 0x3F) << 6) | (buf[i + 2] & 0x3F), 3
    return ((b0 & 0x07) << 18) | ((buf[i + 1] & 0x3F) << 12) | ((buf[i + 2] & 0x3F) << 6) | (buf[i + 3] & 0x3F), 4


@numba.njit(inline="always")
def _is_white(cp, classes):
    return (classes[cp] & WHITE) != 0


# ---------------------------------------------------------------- scan


@numba.njit(nogil=True, cache=True)
def _scan(views, data, classes, out):
    current, buf = -1, views
    for i in range(out.shape[0]):
        buf, current, start, n = _string(views, data, i, buf, current)
        if n == 0:
            out[i] = 0
            continue
        end = start + n
        flags = 0
        cp, k = _decode(buf, start)
        if _is_white(cp, classes):
            flags |= END_WHITE
        j = end - 1
        while (buf[j] & 0xC0) == 0x80:
            j -= 1
        cp, k = _decode(buf, j)
        if _is_white(cp, classes):
            flags |= END_WHITE
        prev = 0
        newlines = 0
        j = start
        while j < end:
            b = buf[j]
            if b < 0x80:
                if b == 10:
                    newlines += 1
                    if newlines >= 3:
                        flags |= THREE_NEWLINES
                    if prev == 32 or prev == 9:
                        flags |= BLANK_NEWLINE
                else:
                    newlines = 0
                    if b == 13:
                        flags |= CR
                prev = b
                j += 1
            else:
                cp, k = _decode(buf, j)
                c = classes[cp]
                if c & SUSPECT:
                    flags |= NFC
                if c & ODD:
                    flags |= ODD_CHAR
                newlines = 0
                prev = 0
                j += k
                if flags == ALL:
                    break
        out[i] = flags


def scan(s: pl.Series) -> np.ndarray:
    """Per string of `s`, the rules that may change it, as bits: NFC (an NFC suspect occurs), CR, ODD_CHAR (a
    zero-width or odd space), BLANK_NEWLINE (" \\n" or "\\t\\n"), THREE_NEWLINES, END_WHITE (White_Space at
    an end); 0 for null."""
    arr = _string_view(s)
    out = np.zeros(len(arr), dtype=np.uint8)
    if len(arr):
        views, data = _view_buffers(arr)
        _scan(views, data, code_point_classes(), out)
        if arr.null_count:
            out[s.is_null().to_numpy()] = 0
    return out


# ---------------------------------------------------------------- NFC

HANGUL_S, HANGUL_L, HANGUL_V, HANGUL_T = 0xAC00, 0x1100, 0x1161, 0x11A7
HANGUL_L_COUNT, HANGUL_V_COUNT, HANGUL_T_COUNT = 19, 21, 28
HANGUL_COUNT = HANGUL_L_COUNT * HANGUL_V_COUNT * HANGUL_T_COUNT


@functools.lru_cache(maxsize=1)
def nfc_tables() -> tuple[np.ndarray, ...]:
    """From Python's `unicodedata`: canonical combining classes, full canonical decompositions (flat, with start
    and length per code point), the primary composites (pairs sorted by first << 21 | second), and which code
    points Python's Unicode leaves unassigned (polars' NFC follows a newer Unicode: a string holding one is left
    to polars). About 0.5 s, once per process."""
    import unicodedata

    ccc = np.zeros(0x110000, dtype=np.uint8)
    unassigned = np.zeros(0x110000, dtype=np.bool_)
    start = np.full(0x110000, -1, dtype=np.int32)
    length = np.zeros(0x110000, dtype=np.uint8)
    flat: list[int] = []
    pairs: dict[int, int] = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        if unicodedata.category(ch) == "Cn":
            unassigned[cp] = True
            continue
        ccc[cp] = unicodedata.combining(ch)
        d = unicodedata.decomposition(ch)
        if not d or d.startswith("<") or HANGUL_S <= cp < HANGUL_S + HANGUL_COUNT:
            continue
        full = unicodedata.normalize("NFD", ch)
        start[cp], length[cp] = len(flat), len(full)
        flat.extend(map(ord, full))
        parts = [int(x, 16) for x in d.split()]
        if len(parts) == 2 and unicodedata.is_normalized("NFC", ch):  # not excluded from composition
            pairs[parts[0] << 21 | parts[1]] = cp
    keys = np.array(sorted(pairs), dtype=np.int64)
    values = np.array([pairs[k] for k in keys], dtype=np.int32)
    return ccc, unassigned, start, length, np.array(flat, dtype=np.int32), keys, values


@numba.njit(inline="always")
def _compose(a, b, keys, values):
    """The primary composite of a and b, or -1."""
    if HANGUL_L <= a < HANGUL_L + HANGUL_L_COUNT and HANGUL_V <= b < HANGUL_V + HANGUL_V_COUNT:
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_V_COUNT + (b - HANGUL_V)) * HANGUL_T_COUNT
    if (HANGUL_S <= a < HANGUL_S + HANGUL_COUNT and (a - HANGUL_S) % HANGUL_T_COUNT == 0
            and HANGUL_T < b < HANGUL_T + HANGUL_T_COUNT):
        return a + (b - HANGUL_T)
    key = (np.int64(a) << 21) | b
    i = np.searchsorted(keys, key)
    if i < keys.shape[0] and keys[i] == key:
        return values[i]
    return -1


@numba.njit(inline="always")
def _encode(cp, out, pos):
    if cp < 0x80:
        out[pos] = cp
        return pos + 1
    if cp < 0x800:
        out[pos] = 0xC0 | (cp >> 6)
        out[pos + 1] = 0x80 | (cp & 0x3F)
        return pos + 2
    if cp < 0x10000:
        out[pos] = 0xE0 | (cp >> 12)
        out[pos + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[pos + 2] = 0x80 | (cp & 0x3F)
        return pos + 3
    out[pos] = 0xF0 | (cp >> 18)
    out[pos + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[pos + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[pos + 3] = 0x80 | (cp & 0x3F)
    return pos + 4


@numba.njit(nogil=True, cache=True)
def _nfc(views, data, classes, ccc, unassigned, dstart, dlen, dflat, keys, values, offsets, out, fallback, seg):
    pos = 0
    current, buf = -1, views
    for i in range(offsets.shape[0] - 1):
        offsets[i] = pos
        buf, current, start, n = _string(views, data, i, buf, current)
        end = start + n
        string_start = pos
        # Only a run of NFC suspects and the character before it can change; everything else is copied
        safe_in, safe_out = start, pos  # the last character outside the class: where a run's segment begins
        j = start
        while j < end:
            c0 = buf[j]
            if c0 < 0x80:
                out[pos] = c0
                safe_in, safe_out = j, pos
                pos += 1
                j += 1
                continue
            cp, k = _decode(buf, j)
            if unassigned[cp]:
                fallback[i] = True
                break
            if not classes[cp] & SUSPECT:
                for t in range(k):
                    out[pos + t] = buf[j + t]
                safe_in, safe_out = j, pos
                pos += k
                j += k
                continue
            seg_end = j + k
            while seg_end < end and buf[seg_end] >= 0x80:
                cp2, k2 = _decode(buf, seg_end)
                if not classes[cp2] & SUSPECT:
                    break
                if unassigned[cp2]:
                    fallback[i] = True
                    break
                seg_end += k2
            if fallback[i]:
                break
            # decompose safe_in..seg_end
            m = 0
            t = safe_in if safe_in < j else j
            while t < seg_end:
                cp2, k2 = _decode(buf, t)
                t += k2
                if HANGUL_S <= cp2 < HANGUL_S + HANGUL_COUNT:
                    s_index = cp2 - HANGUL_S
                    seg[m] = HANGUL_L + s_index // (HANGUL_V_COUNT * HANGUL_T_COUNT)
                    seg[m + 1] = HANGUL_V + (s_index % (HANGUL_V_COUNT * HANGUL_T_COUNT)) // HANGUL_T_COUNT
                    m += 2
                    if s_index % HANGUL_T_COUNT:
                        seg[m] = HANGUL_T + s_index % HANGUL_T_COUNT
                        m += 1
                elif dlen[cp2]:
                    for u in range(dlen[cp2]):
                        seg[m + u] = dflat[dstart[cp2] + u]
                    m += dlen[cp2]
                else:
                    seg[m] = cp2
                    m += 1
            # canonical order: a stable sort of each run of non-starters by combining class
            for u in range(1, m):
                c = ccc[seg[u]]
                if c == 0:
                    continue
                v = u
                while v > 0 and ccc[seg[v - 1]] > c:
                    seg[v], seg[v - 1] = seg[v - 1], seg[v]
                    v -= 1
            # canonical composition (UAX #15)
            starter = 0
            last_class = 0 if ccc[seg[0]] == 0 else 256
            w = 1
            for u in range(1, m):
                ch = seg[u]
                c = ccc[ch]
                composite = _compose(seg[starter], ch, keys, values) if last_class < c or last_class == 0 else -1
                if composite >= 0:  # not blocked (checked above) and a primary composite
                    seg[starter] = composite
                    continue
                if c == 0:
                    starter = w
                last_class = c
                seg[w] = ch
                w += 1
            pos = safe_out if safe_in < j else pos
            for u in range(w):
                pos = _encode(seg[u], out, pos)
            j = seg_end
        if fallback[i]:
            pos = string_start
            for t in range(start, end):
                out[pos] = buf[t]
                pos += 1
    offsets[offsets.shape[0] - 1] = pos
    return pos


def nfc(s: pl.Series) -> pl.Series:
    """Unicode NFC of every string of `s` (no nulls): polars' result, faster where few characters change. A
    string holding a code point Python's Unicode leaves unassigned goes to polars' NFC."""
    arr = _string_view(s)
    n = len(arr)
    if n == 0:
        return s
    offsets = np.zeros(n + 1, dtype=np.int64)
    # NFC can lengthen a string (U+0958 is 3 bytes, its NFC 6), by at most 3x (UAX #15)
    out = np.empty(max(3 * int(s.str.len_bytes().sum()), 1), dtype=np.uint8)
    fallback = np.zeros(n, dtype=np.bool_)
    views, data = _view_buffers(arr)
    # a segment's code points, decomposed: at most 4 per byte (the longest canonical decomposition)
    seg = np.empty(4 * int(s.str.len_bytes().max()) + 4, dtype=np.int64)
    used = _nfc(views, data, code_point_classes(), *nfc_tables(), offsets, out, fallback, seg)
    result = pl.Series(s.name, pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out[:used])),
                       dtype=pl.String)
    if fallback.any():
        where = pl.Series(fallback)
        result = result.scatter(where.arg_true(), s.filter(where).str.normalize("NFC"))
    return result
