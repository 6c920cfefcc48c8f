"""Kernels (numba) over polars' string columns, for clean.py's normalization, hashing and deduplication.

- `scan`: one pass tells, per string, which normalization rules may change it (polars took five passes).
- `nfc` / `nfc_where`: composes the strings that need it about 4x as fast as polars' NFC, which decomposes and
  recomposes every character: here only a run of NFC suspects and the character before it are touched, the rest
  is copied (code points outside the suspect class are starters that nothing composes with, so NFC never acts
  across one), and a run the quick check passes is left as it is.
- `apply_rules` / `rules`: every other rule in one pass over each string that needs it, instead of a chain of
  regexes; a string that only needs stripping becomes a view of part of itself, the others share one new buffer.
- `pair_texts`: the prompt key and the pair that clean.py hashes, built in one pass over one buffer.
- `hex_digests`, `hex_words`, `FirstSeen`: hex text of 128-bit hashes and back, and the first row of each hash
  (a hash table that grows slice by slice).
- `compact`: a filtered column's rewritten strings copied out of the buffers it shares with dropped rows.

The kernels read the Arrow string-view buffers polars hands out without a copy, and make string views over new
buffers; they read 8 bytes at a time (unaligned loads) where text is ASCII, release the GIL (clean.py runs slices
on a thread pool) and are compiled once per install (numba's cache). Tests compare them with plain Python
(unicodedata, re, dict) on every code point and on random strings (tests/test_text_kernels.py,
tests/test_cleaning.py).
"""

from __future__ import annotations

import functools

import numba
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic
import numpy as np
import polars as pl
import pyarrow as pa

SUSPECT, ODD, WHITE, NOT_YES = 1, 2, 4, 8  # bits of the code point classes
# bits of `scan`'s result: which rule may change the string
NFC, CR, ODD_CHAR, BLANK_NEWLINE, THREE_NEWLINES, END_WHITE = 1, 2, 4, 8, 16, 32
ALL = 63


@functools.lru_cache(maxsize=1)
def code_point_classes() -> np.ndarray:
    """One byte per code point: NFC suspect, odd character (zero-width or odd space), Unicode White_Space, and
    NFC_Quick_Check not Yes (a suspect that is not a mere combining mark)."""
    from . import clean

    # `_rules` tells the two kinds of odd character apart by the White_Space bit
    assert set(clean.ODD_SPACES) <= set(clean.WHITE_SPACE) and not set(clean.ZERO_WIDTH) & set(clean.WHITE_SPACE)
    classes = np.zeros(0x110000, dtype=np.uint8)
    for a, b in clean.nfc_suspect_ranges():
        classes[a : b + 1] |= SUSPECT
    for a, b in clean.nfc_not_yes_ranges():
        classes[a : b + 1] |= NOT_YES
    for ch in clean.ODD_CHARACTERS:
        classes[ord(ch)] |= ODD
    for ch in clean.WHITE_SPACE:
        classes[ord(ch)] |= WHITE
    return classes


# ---------------------------------------------------------------- buffers


def _view_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 16-byte views of a string_view array (from its offset on; a copy, ~1 MB a slice) and its data buffers
    as (address, size) rows, for `_bytes` to read without a copy. The caller keeps `arr` alive.

    Not a numba typed List of arrays: building one cost ~5 us a buffer, and a slice of a 2M-row column shares
    its ~240 buffers, which made that 15 ms a kernel call, 10% of cleaning's time."""
    bufs = arr.buffers()
    views = _scratch(16 * len(arr))
    views[:] = np.frombuffer(bufs[1], dtype=np.uint8)[arr.offset * 16 : (arr.offset + len(arr)) * 16]
    data = np.array([(b.address, b.size) if b is not None and b.size else (_EMPTY_ADDRESS, 0) for b in bufs[2:]]
                    or [(_EMPTY_ADDRESS, 0)], dtype=np.int64)
    return views, data


def _lengths(views: np.ndarray) -> np.ndarray:
    """The byte length of each string, from its view (undefined for a null)."""
    return views.view(np.uint32)[0::4]


_EMPTY_BACKING = np.zeros(1, dtype=np.uint64)  # an aligned address for empty buffers
_EMPTY_ADDRESS = _EMPTY_BACKING.ctypes.data
# a string view holds a 32-bit offset into its buffer: new buffers of 2 GiB or more take the polars way
MAX_VIEW_BUFFER = 2**31


@intrinsic
def _u8_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return numba.types.CPointer(numba.types.uint8)(numba.types.int64), codegen


@intrinsic
def _load_u64(typingctx, address):
    """The 8 bytes at `address` as a little-endian uint64, at any alignment (x86 loads unaligned words at full
    speed)."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))), align=1)

    return numba.types.uint64(numba.types.int64), codegen


@numba.njit(inline="always")
def _bytes(data, b):
    """Data buffer b as a byte array (no copy, no reference count)."""
    return numba.carray(_u8_pointer(data[b, 0]), (data[b, 1],))


def _scratch(n: int) -> np.ndarray:
    """An uninitialized byte array from pyarrow's memory pool (mimalloc), for a buffer dropped with its slice:
    the pool hands its memory to the next slice's, where numpy's malloc gives fresh pages that fault on first
    write (pair_texts ran 18% faster this way)."""
    return np.frombuffer(pa.allocate_buffer(max(n, 1)), dtype=np.uint8)[:n]


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


_HIGH = np.uint64(0x8080808080808080)
_NEWLINES = np.uint64(0x0A0A0A0A0A0A0A0A)
_CRS = np.uint64(0x0D0D0D0D0D0D0D0D)


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
def _copy(src, a, b, out, pos):
    """src[a:b] to out[pos:], returning the position after it. A loop over two slices: a store per byte into
    `out` ran at ~0.3 GB/s (numba reloads the arrays' pointers after every store), a slice assignment costs
    ~100 ns a call (it checks for overlap); this one runs ~7 GB/s on 250-byte strings, 2 GB/s on 8-byte ones."""
    n = b - a
    s = src[a:b]
    o = out[pos : pos + n]
    for t in range(n):
        o[t] = s[t]
    return pos + n


# ---------------------------------------------------------------- scan


# bytes that end a run of plain ASCII: a newline, a CR, or the lead byte of any non-ASCII character
_SPECIAL_BYTES = np.zeros(256, dtype=np.uint8)
_SPECIAL_BYTES[[10, 13]] = 1
_SPECIAL_BYTES[0x80:] = 1


_SPACES = np.uint64(0x2020202020202020)
_TABS = np.uint64(0x0909090909090909)
_SEVENS = np.uint64(0x7F7F7F7F7F7F7F7F)


@numba.njit(inline="always")
def _zero_bytes(x):
    """0x80 in each byte of x that is zero, 0 elsewhere (exact: no borrow crosses bytes)."""
    return ~(((x & _SEVENS) + _SEVENS) | x | _SEVENS)


@numba.njit(inline="always")
def _newline_flags(buf, start, j):
    """The rules a newline at buf[j] sets, judged by the bytes before it (only those of its own string)."""
    flags = 0
    if j > start:
        p = buf[j - 1]
        if p == 32 or p == 9:
            flags |= BLANK_NEWLINE
        elif p == 10 and j - 1 > start and buf[j - 2] == 10:
            flags |= THREE_NEWLINES
    return flags


_TOP = np.uint64(0x80) << np.uint64(56)
_ALL_BYTES = np.uint64(0xFFFFFFFFFFFFFFFF)


@numba.njit(inline="always")
def _below_first_high(w, n):
    """How many of the first n (at most 8) bytes of w come before its first non-ASCII byte."""
    high = w & _HIGH
    if high == 0:
        return n
    return min(n, np.int64(trailing_zeros(high)) >> 3)


@numba.njit(inline="always")
def _scan_string(buf, start, n, classes, ccc):
    """The rules that may change the string buf[start:start + n] (bits of `scan`).

    ASCII text is read 8 bytes at a time (unaligned loads), without a branch per newline: each newline is judged by
    the byte masks of its word shifted one and two bytes up (little endian: byte i + 1 is 8 bits higher), with
    the previous word's top bytes carried in. A non-ASCII character is decoded on its own (nothing carries across
    it: it is neither a blank nor a newline). This took ~15% less time than reading aligned words and leaving the
    word at each newline; what is left is mostly per-string and per-non-ASCII-character work.

    NFC is flagged as the NFC quick check of UAX #15 finds it: at a code point whose NFC_Quick_Check is not Yes,
    or at a combining mark whose class is lower than the one right before it (a string whose only suspects are
    marks in canonical order is NFC: flagging it took a fifth of cleaning's NFC time on text in Indic scripts)."""
    if n == 0:
        return 0
    end = start + n
    flags = 0
    cp, k = _decode(buf, start)
    if classes[cp] & WHITE:
        flags |= END_WHITE
    j = end - 1
    while (buf[j] & 0xC0) == 0x80:
        j -= 1
    cp, k = _decode(buf, j)
    if classes[cp] & WHITE:
        flags |= END_WHITE
    base = np.int64(buf.ctypes.data)
    limit = buf.shape[0] - 8  # the last position 8 bytes can be loaded from
    prev_nl = np.uint64(0)
    prev_blank = np.uint64(0)
    cr = np.uint64(0)
    blank_newline = np.uint64(0)
    three = np.uint64(0)
    last_class = 0  # canonical combining class of the previous code point
    j = start
    while j < end:
        if j <= limit:
            w = _load_u64(base + j)
            valid = _ALL_BYTES
            step = 8
            if j + 8 > end or w & _HIGH:  # the string's last bytes, or those before a non-ASCII one
                step = _below_first_high(w, min(end - j, 8))
                valid = (np.uint64(1) << np.uint64(8 * step)) - np.uint64(1)
            nl = _zero_bytes(w ^ _NEWLINES) & valid
            blank = _zero_bytes(w ^ _SPACES) | _zero_bytes(w ^ _TABS)
            cr |= _zero_bytes(w ^ _CRS) & valid
            blank_newline |= nl & ((blank << np.uint64(8)) | (prev_blank >> np.uint64(56)))
            three |= nl & ((nl << np.uint64(8)) | (prev_nl >> np.uint64(56))) & (
                (nl << np.uint64(16)) | (prev_nl >> np.uint64(48)))
            j += step
            if step:
                last_class = 0
            if step == 8:
                prev_nl = nl
                prev_blank = blank
                continue
            prev_nl = np.uint64(0)
            prev_blank = np.uint64(0)
            if j == end:
                break
        # a non-ASCII character, or a byte too near the end of the buffer to load a word
        b = buf[j]
        if b < 0x80:
            last_class = 0
        if b == 10:
            flags |= _newline_flags(buf, start, j)
            j += 1
        elif b == 13:
            flags |= CR
            j += 1
        elif b < 0x80:
            j += 1
        else:
            cp, k = _decode(buf, j)
            c = classes[cp]
            mark_class = 0
            if c & NOT_YES:
                flags |= NFC
            elif c & SUSPECT:  # a combining mark that composes with nothing: NFC only reorders it
                mark_class = ccc[cp]
                if last_class > mark_class:
                    flags |= NFC
            last_class = mark_class
            if c & ODD:
                flags |= ODD_CHAR
            j += k
    if cr:
        flags |= CR
    if blank_newline:
        flags |= BLANK_NEWLINE
    if three:
        flags |= THREE_NEWLINES
    return flags


@numba.njit(nogil=True, cache=True)
def _scan(views, data, classes, ccc, out):
    current, buf = -1, _bytes(data, 0)
    for i in range(out.shape[0]):
        b, start, n = _locate(views, i)
        if b < 0:
            out[i] = _scan_string(views, start, n, classes, ccc)
            continue
        if b != current:
            buf, current = _bytes(data, b), b
        out[i] = _scan_string(buf, start, n, classes, ccc)


def scan(s: pl.Series) -> np.ndarray:
    """Per string of `s`, the rules that may change it, as bits: NFC (UAX #15's NFC quick check does not say
    Yes), CR, ODD_CHAR (a zero-width or odd space), BLANK_NEWLINE (" \\n" or "\\t\\n"), THREE_NEWLINES,
    END_WHITE (White_Space at an end); 0 for null."""
    arr = _string_view(s)
    out = np.zeros(len(arr), dtype=np.uint8)
    if len(arr):
        views, data = _view_buffers(arr)
        _scan(views, data, code_point_classes(), nfc_tables()[0], out)
        if arr.null_count:
            out[s.is_null().to_numpy()] = 0
    return out


# ---------------------------------------------------------------- every rule but NFC


@numba.njit(inline="always")
def _plain_before(buf, start, j):
    """Whether buf[j - 1] is in the string, ASCII, and none of blank, newline, CR: a newline after it needs no
    rule (what precedes it in the output is that byte)."""
    if j <= start:
        return False
    p = buf[j - 1]
    return p < 0x80 and p != 32 and p != 9 and p != 10 and p != 13


@numba.njit(inline="always")
def _copied_as_is(w, buf, start, j):
    """Whether the 8 bytes w = buf[j:j + 8] go to the output as they are: ASCII, no CR, and each newline after a
    byte `_plain_before` would pass (within the word by the masks shifted a byte up, at its start by reading)."""
    if w & _HIGH or _zero_bytes(w ^ _CRS):
        return False
    nl = _zero_bytes(w ^ _NEWLINES)
    if nl == 0:
        return True
    after_special = (nl | _zero_bytes(w ^ _SPACES) | _zero_bytes(w ^ _TABS)) << np.uint64(8)
    if not _plain_before(buf, start, j):
        after_special |= np.uint64(0x80)
    return (nl & after_special) == 0


@numba.njit(inline="always")
def _rules_string(buf, start, n, classes, special, out, pos):
    end = start + n
    first = pos
    j = start
    # leading White_Space and zero-width characters: stripping removes all of them (a CR is a newline)
    while j < end:
        b = buf[j]
        if b < 0x80:
            if b == 32 or 9 <= b <= 13:
                j += 1
                continue
            break
        cp, k = _decode(buf, j)
        if classes[cp] & (WHITE | ODD):
            j += k
            continue
        break
    run = j  # start of the input not yet copied; only newlines, CRs and odd characters break a run
    base = np.int64(buf.ctypes.data)
    limit = min(buf.shape[0], end) - 8  # the last position a word of the string can be loaded from
    while j < end:
        if j <= limit and _copied_as_is(_load_u64(base + j), buf, start, j):
            j += 8
            continue
        b = buf[j]
        if special[b] == 0 or b == 10 and _plain_before(buf, start, j):
            j += 1
            continue
        if b >= 0x80:
            cp, k = _decode(buf, j)
            c = classes[cp]
            if not c & ODD:
                j += k
                continue
            pos = _copy(buf, run, j, out, pos)
            j += k
            run = j
            if c & WHITE:  # an odd space becomes a space; a zero-width character goes
                out[pos] = 32
                pos += 1
            continue
        pos = _copy(buf, run, j, out, pos)
        j += 1
        if b == 13 and j < end and buf[j] == 10:  # CRLF and CR are one newline
            j += 1
        run = j
        # the output so far is final but for blanks at its end: those before a newline go
        while pos > first and (out[pos - 1] == 32 or out[pos - 1] == 9):
            pos -= 1
        if not (pos - first >= 2 and out[pos - 1] == 10 and out[pos - 2] == 10):  # at most two in a row
            out[pos] = 10
            pos += 1
    pos = _copy(buf, run, end, out, pos)
    while pos > first:  # trailing White_Space
        t = pos - 1
        while (out[t] & 0xC0) == 0x80:
            t -= 1
        cp, k = _decode(out, t)
        if not classes[cp] & WHITE:
            break
        pos = t
    return pos


@numba.njit(nogil=True, cache=True)
def _rules(views, data, classes, special, offsets, out):
    pos = 0
    current, buf = -1, _bytes(data, 0)
    for i in range(offsets.shape[0] - 1):
        offsets[i] = pos
        b, start, n = _locate(views, i)
        if b < 0:
            pos = _rules_string(views, start, n, classes, special, out, pos)
            continue
        if b != current:
            buf, current = _bytes(data, b), b
        pos = _rules_string(buf, start, n, classes, special, out, pos)
    offsets[offsets.shape[0] - 1] = pos
    return pos


def rules(s: pl.Series) -> pl.Series:
    """Every normalization rule but NFC, in one pass over each string of `s` (no nulls): CRLF and CR to LF,
    zero-width characters removed, odd spaces to a space, blanks before a newline removed, 3+ newlines to two,
    White_Space stripped at both ends. The same strings as those rules applied one after another with polars'
    regexes (`clean._rules` after its NFC; tests/test_text_kernels.py compares them)."""
    arr = _string_view(s)
    n = len(arr)
    if n == 0:
        return s
    offsets = np.zeros(n + 1, dtype=np.int64)
    out = np.empty(max(int(s.str.len_bytes().sum()), 1), dtype=np.uint8)  # no rule lengthens a string
    views, data = _view_buffers(arr)
    used = _rules(views, data, code_point_classes(), _SPECIAL_BYTES, offsets, out)
    return _from_buffers(s.name, n, offsets, out[:used])


@intrinsic
def _store_u64(typingctx, address, value):
    """Stores a uint64 at `address` (any alignment)."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))), align=1)
        return context.get_dummy_value()

    return numba.types.void(numba.types.int64, numba.types.uint64), codegen


@numba.njit(inline="always")
def _same_view(out_views, views, i):
    """View i copied as it is (the string it points to is shared, not copied)."""
    for t in range(16):
        out_views[i * 16 + t] = views[i * 16 + t]


@numba.njit(inline="always")
def _view_to(views, i, src, start, n, buffer):
    """Writes view i for src[start:start + n], a string in data buffer `buffer` (unless it fits the view), as two
    64-bit stores (16 byte stores ran at ~0.3 GB/s: numba reloads the array pointer after each store)."""
    address = np.int64(views.ctypes.data) + 16 * i
    if n <= 12:
        low = np.uint64(n)
        high = np.uint64(0)
        for t in range(min(n, 4)):
            low |= np.uint64(src[start + t]) << np.uint64(32 + 8 * t)
        for t in range(4, n):
            high |= np.uint64(src[start + t]) << np.uint64(8 * (t - 4))
    else:
        prefix = np.uint64(src[start]) | (np.uint64(src[start + 1]) << np.uint64(8)) | (
            np.uint64(src[start + 2]) << np.uint64(16)) | (np.uint64(src[start + 3]) << np.uint64(24))
        low = np.uint64(n) | (prefix << np.uint64(32))
        high = np.uint64(buffer) | (np.uint64(start) << np.uint64(32))
    _store_u64(address, low)
    _store_u64(address + 8, high)


@numba.njit(nogil=True, cache=True)
def _apply_rules(views, data, flags, classes, special, out_views, out, new_buffer):
    # the current data buffer is cached and looked up inline here and in the other kernels: a helper returning
    # the buffer would cost ~80 ns a call (numba increfs it)
    pos = 0
    current, buf = -1, _bytes(data, 0)
    for i in range(flags.shape[0]):
        f = flags[i] & (ALL ^ NFC)  # a string flagged NFC is NFC already, and NFC gives no other rule work
        if f == 0:  # unchanged: the same view
            _same_view(out_views, views, i)
            continue
        b, start, n = _locate(views, i)
        if b < 0:
            sbuf = views
        else:
            if b != current:
                buf, current = _bytes(data, b), b
            sbuf = buf
        if f == END_WHITE:  # only stripping to do: a view of part of the string, nothing copied
            end = start + n
            while start < end:
                cp, k = _decode(sbuf, start)
                if not classes[cp] & WHITE:
                    break
                start += k
            while end > start:
                t = end - 1
                while (sbuf[t] & 0xC0) == 0x80:
                    t -= 1
                cp, k = _decode(sbuf, t)
                if not classes[cp] & WHITE:
                    break
                end = t
            _view_to(out_views, i, sbuf, start, end - start, b)
            continue
        first = pos
        pos = _rules_string(sbuf, start, n, classes, special, out, pos)
        _view_to(out_views, i, out, first, pos - first, new_buffer)
        if pos - first <= 12:  # inside its view: no need to keep it in `out`
            pos = first
    return pos


def apply_rules(s: pl.Series, flags: np.ndarray) -> pl.Series:
    """Every rule but NFC on the strings of `s` whose `scan` flags are not 0; the rest keep their views. Strings
    flagged NFC must be NFC already (NFC never makes work for another rule: the only characters it turns into
    White_Space, U+2000 and U+2001, are odd spaces already). A string that only needs stripping becomes a view of
    part of itself; the others are rewritten by `rules` into one new buffer. Nothing else is copied: the result
    shares `s`'s buffers."""
    rewrite = (flags & (ALL ^ NFC)) != 0
    n = len(s)
    if n == 0 or not rewrite.any():
        return s
    arr = _string_view(s)
    views, data = _view_buffers(arr)
    size = int(_lengths(views)[rewrite].sum(dtype=np.int64))
    if size >= MAX_VIEW_BUFFER:
        from .clean import _rewrite

        return _rewrite(s, pl.Series(rewrite), rules)
    buffers = [b if b is not None else pa.py_buffer(b"") for b in arr.buffers()[2:]]  # as `data` indexes them
    out_views = _scratch(16 * n)
    out = _scratch(max(size, 1))
    used = _apply_rules(views, data, flags, code_point_classes(), _SPECIAL_BYTES, out_views,
                        out, len(buffers))
    return _with_views(s.name, arr, out_views, buffers, out[:used])


def _from_buffers(name: str, n: int, offsets: np.ndarray, data: np.ndarray) -> pl.Series:
    return pl.Series(name, pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)),
                     dtype=pl.String)


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


@numba.njit(inline="always")
def _run_is_nfc(buf, j, end, classes, ccc):
    """Whether the run of suspects buf[j:end], after a starter that composes with nothing, has only code points
    whose NFC_Quick_Check is Yes, in canonical order."""
    last = 0
    while j < end:
        cp, k = _decode(buf, j)
        if classes[cp] & NOT_YES:
            return False
        c = ccc[cp]
        if c != 0 and last > c:
            return False
        last = c
        j += k
    return True


@numba.njit(inline="always")
def _nfc_string(buf, start, n, classes, ccc, unassigned, dstart, dlen, dflat, keys, values, out, pos, seg):
    end = start + n
    string_start = pos
    fell_back = False
    # Only a run of NFC suspects and the character before it can change; everything else is copied
    run = start  # start of the input not yet copied
    j = start
    while j < end:
        if buf[j] < 0x80:
            j += 1
            continue
        cp, k = _decode(buf, j)
        if unassigned[cp]:
            fell_back = True
            break
        if not classes[cp] & SUSPECT:
            j += k
            continue
        seg_end = j + k
        while seg_end < end and buf[seg_end] >= 0x80:
            cp2, k2 = _decode(buf, seg_end)
            if not classes[cp2] & SUSPECT:
                break
            if unassigned[cp2]:
                fell_back = True
                break
            seg_end += k2
        if fell_back:
            break
        # marks that compose with nothing, in canonical order, are NFC as they are (UAX #15's quick check): in
        # Indic scripts most runs (a virama, a vowel sign) are, and decomposing and recomposing them took most
        # of NFC's time
        if _run_is_nfc(buf, j, seg_end, classes, ccc):
            j = seg_end
            continue
        # the segment starts at the character before the run (a non-suspect, not yet copied), if any
        safe_in = j
        if j > run:
            safe_in = j - 1
            while (buf[safe_in] & 0xC0) == 0x80:
                safe_in -= 1
        pos = _copy(buf, run, safe_in, out, pos)
        # decompose safe_in..seg_end
        m = 0
        t = safe_in
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
        for u in range(w):
            pos = _encode(seg[u], out, pos)
        j = seg_end
        run = j
    if fell_back:
        pos = _copy(buf, start, end, out, string_start)
    else:
        pos = _copy(buf, run, end, out, pos)
    return pos, fell_back


@numba.njit(nogil=True, cache=True)
def _nfc(views, data, classes, ccc, unassigned, dstart, dlen, dflat, keys, values, offsets, out, fallback, seg):
    pos = 0
    current, buf = -1, _bytes(data, 0)
    for i in range(offsets.shape[0] - 1):
        offsets[i] = pos
        b, start, n = _locate(views, i)
        if b < 0:
            pos, fallback[i] = _nfc_string(views, start, n, classes, ccc, unassigned, dstart, dlen, dflat, keys,
                                           values, out, pos, seg)
            continue
        if b != current:
            buf, current = _bytes(data, b), b
        pos, fallback[i] = _nfc_string(buf, start, n, classes, ccc, unassigned, dstart, dlen, dflat, keys, values,
                                       out, pos, seg)
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
    result = _from_buffers(s.name, n, offsets, out[:used])
    if fallback.any():
        where = pl.Series(fallback)
        result = result.scatter(where.arg_true(), s.filter(where).str.normalize("NFC"))
    return result


@numba.njit(nogil=True, cache=True)
def _nfc_views(views, data, where, classes, ccc, unassigned, dstart, dlen, dflat, keys, values, out_views, out,
               new_buffer, fallback, seg):
    pos = 0
    current, buf = -1, _bytes(data, 0)
    for i in range(where.shape[0]):
        if not where[i]:
            _same_view(out_views, views, i)
            continue
        b, start, n = _locate(views, i)
        if b < 0:
            sbuf = views
        else:
            if b != current:
                buf, current = _bytes(data, b), b
            sbuf = buf
        first = pos
        pos, fallback[i] = _nfc_string(sbuf, start, n, classes, ccc, unassigned, dstart, dlen, dflat, keys, values,
                                       out, pos, seg)
        _view_to(out_views, i, out, first, pos - first, new_buffer)
        if pos - first <= 12:  # inside its view
            pos = first
    return pos


def nfc_where(s: pl.Series, where: np.ndarray) -> pl.Series:
    """`nfc` on the strings of `s` where `where` holds (never on a null); the others keep their views, so the result
    shares `s`'s buffers and adds one of the rewritten strings (a filter, NFC and a gather back took 3x as long)."""
    arr = _string_view(s)
    n = len(arr)
    if n == 0 or not where.any():
        return s
    views, data = _view_buffers(arr)
    lengths = _lengths(views)[where]
    size = 3 * int(lengths.sum(dtype=np.int64))  # NFC lengthens a string by at most 3x
    if size >= MAX_VIEW_BUFFER:
        from .clean import _rewrite

        return _rewrite(s, pl.Series(where), nfc)
    buffers = [b if b is not None else pa.py_buffer(b"") for b in arr.buffers()[2:]]  # as `data` indexes them
    out_views = _scratch(16 * n)
    out = _scratch(max(size, 1))
    fallback = np.zeros(n, dtype=np.bool_)
    seg = np.empty(4 * int(lengths.max()) + 4, dtype=np.int64)
    used = _nfc_views(views, data, where, code_point_classes(), *nfc_tables(), out_views, out, len(buffers),
                      fallback, seg)
    result = _with_views(s.name, arr, out_views, buffers, out[:used])
    if fallback.any():
        rows = pl.Series(fallback)
        result = result.scatter(rows.arg_true(), s.filter(rows).str.normalize("NFC"))
    return result


def _with_views(name: str, arr: pa.Array, views: np.ndarray, buffers: list[pa.Buffer], new: np.ndarray) -> pl.Series:
    """A string_view Series with `arr`'s validity, `views`, and `arr`'s data buffers followed by `new`."""
    bitmap, nulls = _validity(_valid(arr))
    return pl.Series(name, pa.Array.from_buffers(pa.string_view(), len(arr), [bitmap, pa.py_buffer(views), *buffers,
                                                                              pa.py_buffer(new)], nulls))


# ---------------------------------------------------------------- hash inputs and hex digests
# The strings made here are Arrow string views over one new buffer: a view is 16 bytes (length; then the string
# itself if it has at most 12 bytes, else its first 4 bytes, buffer index and offset).


@numba.njit(nogil=True, cache=True)
def _pair_texts(list_offsets, list_valid, message_valid, role_views, role_data, content_views, content_data,
                chosen_views, chosen_data, chosen_valid, rejected_views, rejected_data, rejected_valid,
                out, key_views, full_views):
    # each column's current data buffer is cached, and changed only when a string lies in another one; the four
    # copies are written out because a helper returning the buffer would cost ~80 ns a call (numba increfs it)
    pos = 0
    role_buf, role_at = _bytes(role_data, 0), -1
    content_buf, content_at = _bytes(content_data, 0), -1
    chosen_buf, chosen_at = _bytes(chosen_data, 0), -1
    rejected_buf, rejected_at = _bytes(rejected_data, 0), -1
    for i in range(list_valid.shape[0]):
        if not list_valid[i]:
            _view_to(key_views, i, out, pos, 0, 0)
            _view_to(full_views, i, out, pos, 0, 0)
            continue
        first = pos
        any_message = False
        for m in range(list_offsets[i], list_offsets[i + 1]):
            if not message_valid[m]:  # as list.join: a null element is left out
                continue
            if any_message:
                out[pos] = 0x1E
                pos += 1
            any_message = True
            b, start, n = _locate(role_views, m)
            if b < 0:
                pos = _copy(role_views, start, start + n, out, pos)
            else:
                if b != role_at:
                    role_buf, role_at = _bytes(role_data, b), b
                pos = _copy(role_buf, start, start + n, out, pos)
            out[pos] = 0x1F
            pos += 1
            b, start, n = _locate(content_views, m)
            if b < 0:
                pos = _copy(content_views, start, start + n, out, pos)
            else:
                if b != content_at:
                    content_buf, content_at = _bytes(content_data, b), b
                pos = _copy(content_buf, start, start + n, out, pos)
        key_end = pos
        if chosen_valid[i] and rejected_valid[i]:
            out[pos] = 0x1D
            pos += 1
            b, start, n = _locate(chosen_views, i)
            if b < 0:
                pos = _copy(chosen_views, start, start + n, out, pos)
            else:
                if b != chosen_at:
                    chosen_buf, chosen_at = _bytes(chosen_data, b), b
                pos = _copy(chosen_buf, start, start + n, out, pos)
            out[pos] = 0x1D
            pos += 1
            b, start, n = _locate(rejected_views, i)
            if b < 0:
                pos = _copy(rejected_views, start, start + n, out, pos)
            else:
                if b != rejected_at:
                    rejected_buf, rejected_at = _bytes(rejected_data, b), b
                pos = _copy(rejected_buf, start, start + n, out, pos)
        _view_to(key_views, i, out, first, key_end - first, 0)
        _view_to(full_views, i, out, first, pos - first, 0)
    return pos


def list_values(s: pl.Series) -> tuple[pa.Array, np.ndarray, pl.Series]:
    """A List Series as its Arrow array (one chunk, zero-copy), its offsets rebased to its own elements, and those
    elements as a Series. Arrow's `values` of a sliced list array is the whole child array: only the slice's own
    elements are taken."""
    arr = s.to_arrow(compat_level=pl.CompatLevel.newest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    return arr, offsets - start, pl.from_arrow(arr.values.slice(start, end - start))


def _validity(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = int(valid.size - np.count_nonzero(valid))
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def _view_array(n: int, views: np.ndarray, data: np.ndarray, valid: np.ndarray) -> pa.Array:
    bitmap, nulls = _validity(valid)
    return pa.Array.from_buffers(pa.string_view(), n, [bitmap, pa.py_buffer(views), pa.py_buffer(data)], nulls)


def _valid(arr: pa.Array) -> np.ndarray:
    return np.ones(len(arr), dtype=np.bool_) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)


def pair_texts(prompt: pl.Series, chosen: pl.Series, rejected: pl.Series) -> tuple[pl.Series, pl.Series] | None:
    """The strings clean.py hashes, built in one pass: the prompt key (each message's role, 0x1F and content,
    joined by 0x1E; null messages and messages with a null field left out, as `list.join` does) and the pair
    (prompt key, chosen and rejected joined by 0x1D; null if any of them is null). The key is a prefix of the
    pair, so both share one buffer. None where that buffer would pass 2 GiB (Arrow views hold 32-bit offsets)."""
    arr, offsets, messages = list_values(prompt)
    role, content = messages.struct.field("role"), messages.struct.field("content")
    size = 2 * (len(messages) + len(chosen)) + sum(
        int(x.str.len_bytes().sum() or 0) for x in (role, content, chosen, rejected))
    if size >= MAX_VIEW_BUFFER:
        return None
    role_arr, content_arr, chosen_arr, rejected_arr = map(_string_view, (role, content, chosen, rejected))
    message_valid = _valid(role_arr) & _valid(content_arr)  # a null message has null fields here
    n = len(arr)
    out = _scratch(max(size, 1))  # the strings are hashed and dropped
    key_views, full_views = _scratch(16 * n), _scratch(16 * n)
    list_valid = _valid(arr)
    chosen_valid, rejected_valid = _valid(chosen_arr), _valid(rejected_arr)
    used = _pair_texts(np.ascontiguousarray(offsets), list_valid, message_valid,
                       *_view_buffers(role_arr), *_view_buffers(content_arr),
                       *_view_buffers(chosen_arr), chosen_valid, *_view_buffers(rejected_arr), rejected_valid,
                       out, key_views, full_views)
    data = out[:used]
    key = _view_array(n, key_views, data, list_valid)
    full = _view_array(n, full_views, data, list_valid & chosen_valid & rejected_valid)
    return pl.Series("prompt_key", key), pl.Series("pair", full)


@numba.njit(inline="always")
def _hex8(x):
    """The 32-bit value x as 8 lowercase hex digits, packed in a uint64 in text order (little endian)."""
    y = ((x & np.uint64(0xFFFF0000)) << np.uint64(16)) | (x & np.uint64(0xFFFF))
    y = ((y & np.uint64(0x0000FF000000FF00)) << np.uint64(8)) | (y & np.uint64(0x000000FF000000FF))
    y = ((y & np.uint64(0x00F000F000F000F0)) << np.uint64(4)) | (y & np.uint64(0x000F000F000F000F))
    # byte k now holds nibble k (lowest first); the text starts with the highest
    y = ((y & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8)) | ((y >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF))
    y = ((y & np.uint64(0x0000FFFF0000FFFF)) << np.uint64(16)) | ((y >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF))
    y = (y << np.uint64(32)) | (y >> np.uint64(32))
    letters = ((y + np.uint64(0x0606060606060606)) >> np.uint64(4)) & np.uint64(0x0101010101010101)  # nibble >= 10
    return y + np.uint64(0x3030303030303030) + letters * np.uint64(0x27)


@numba.njit(nogil=True, cache=True)
def _hex_digests(hi, lo, out, views):
    # whole 64-bit words: a store per byte ran ~0.3 GB/s (numba reloads the array pointer after each store)
    for i in range(hi.shape[0]):
        first = _hex8(hi[i] >> np.uint64(32))
        out[4 * i] = first
        out[4 * i + 1] = _hex8(hi[i] & np.uint64(0xFFFFFFFF))
        out[4 * i + 2] = _hex8(lo[i] >> np.uint64(32))
        out[4 * i + 3] = _hex8(lo[i] & np.uint64(0xFFFFFFFF))
        # the view: length 32 and the first 4 bytes; buffer 0 and the offset
        views[2 * i] = np.uint64(32) | (first << np.uint64(32))
        views[2 * i + 1] = np.uint64(32 * i) << np.uint64(32)


def hex_digests(hi: np.ndarray, lo: np.ndarray, valid: np.ndarray, name: str) -> pl.Series:
    """128-bit values given as high and low 64-bit words, as 32 lowercase hex digits; null where not valid."""
    n = hi.shape[0]
    out, views = np.empty(max(4 * n, 1), dtype=np.uint64), np.empty(2 * n, dtype=np.uint64)
    _hex_digests(hi, lo, out, views)
    return pl.Series(name, _view_array(n, views.view(np.uint8), out.view(np.uint8)[: 32 * n], valid))


# ---------------------------------------------------------------- first occurrences

_HEX_VALUES = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_c] = _HEX_VALUES[ord(chr(_c).upper())] = _i


@numba.njit(nogil=True, cache=True)
def _hex_words(views, data, valid, values, hi, lo, ok):
    for i in range(valid.shape[0]):
        b, start, n = _locate(views, i)
        ok[i] = False
        if not valid[i] or n != 32:
            continue
        buf = views if b < 0 else _bytes(data, b)
        h, w = np.uint64(0), np.uint64(0)
        bad = False
        for t in range(32):
            d = values[buf[start + t]]
            if d > 15:
                bad = True
                break
            if t < 16:
                h = (h << np.uint64(4)) | np.uint64(d)
            else:
                w = (w << np.uint64(4)) | np.uint64(d)
        if not bad:
            hi[i], lo[i], ok[i] = h, w, True


def hex_words(s: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`hex_digests` read back: the high and low words of each 32-hex-digit string, and where it is one (a null,
    or text of another length or with other characters, is not)."""
    arr = _string_view(s)
    n = len(arr)
    hi, lo, ok = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.bool_)
    if n:
        views, data = _view_buffers(arr)
        _hex_words(views, data, _valid(arr), _HEX_VALUES, hi, lo, ok)
    return hi, lo, ok


@numba.njit(nogil=True, cache=True)
def _first_seen(hi, lo, use, ids, slots, key_hi, key_lo, key_id, count, first):
    mask = slots.shape[0] - 1
    for i in range(use.shape[0]):
        if not use[i]:
            first[i] = ids[i]
            continue
        h = np.int64(lo[i] & np.uint64(mask))  # xxh3's low word is uniform: no further mixing needed
        while True:
            k = slots[h]
            if k < 0:  # open addressing: a new value takes the first free slot
                slots[h] = count
                key_hi[count], key_lo[count], key_id[count] = hi[i], lo[i], ids[i]
                count += 1
                first[i] = ids[i]
                break
            if key_lo[k] == lo[i] and key_hi[k] == hi[i]:
                first[i] = key_id[k]
                break
            h = (h + 1) & mask
    return count


@numba.njit(nogil=True, cache=True)
def _rehash(key_lo, count, slots):
    mask = slots.shape[0] - 1
    for k in range(count):
        h = np.int64(key_lo[k] & np.uint64(mask))
        while slots[h] >= 0:
            h = (h + 1) & mask
        slots[h] = k


class FirstSeen:
    """128-bit values (high and low words) seen so far, each with the id of the row that showed it first.

    Rows are added in batches (`add`), in order; each gets the id of the first row with its value, its own id
    if none came before. One hash table for every batch, so a table cleaned slice by slice dedups across slices
    without holding them all, and batches across batches. `key_id[:count]` are the ids of the values, in the
    order they came first; a caller may rename them (clean.py: ids >= 0 are rows of the table being cleaned,
    ids < 0 pairs kept earlier)."""

    def __init__(self, capacity: int = 0):
        self.count = 0
        self._allocate(max(capacity, 1024))

    def _allocate(self, capacity: int) -> None:
        size = 1
        while size < 2 * capacity:
            size *= 2
        old = (self.key_hi[: self.count], self.key_lo[: self.count], self.key_id[: self.count]) if self.count else None
        self.key_hi = np.empty(capacity, dtype=np.uint64)
        self.key_lo = np.empty(capacity, dtype=np.uint64)
        self.key_id = np.empty(capacity, dtype=np.int64)
        self.slots = np.full(size, -1, dtype=np.int64)
        if old is not None:
            self.key_hi[: self.count], self.key_lo[: self.count], self.key_id[: self.count] = old
            _rehash(self.key_lo, self.count, self.slots)

    def add(self, hi: np.ndarray, lo: np.ndarray, use: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """For each row where `use` holds, the id of the first row seen with its value (its own id if new);
        its own id elsewhere."""
        need = self.count + int(np.count_nonzero(use))
        if need > self.key_id.shape[0]:
            self._allocate(max(need, 2 * self.key_id.shape[0]))
        first = np.empty(use.shape[0], dtype=np.int64)
        self.count = _first_seen(hi, lo, use, ids, self.slots, self.key_hi, self.key_lo, self.key_id, self.count,
                                 first)
        return first


# ---------------------------------------------------------------- compaction


@numba.njit(nogil=True, cache=True)
def _compact_size(views, copy):
    """Bytes of the strings `_compact` copies (numpy's fancy indexing took 4x as long)."""
    size = 0
    for i in range(views.shape[0] // 16):
        n = _u32(views, 16 * i)
        if n > 12 and copy[_u32(views, 16 * i + 8)]:
            size += n
    return size


@numba.njit(nogil=True, cache=True)
def _compact(views, data, copy, remap, out_views, out, new_buffer):
    pos = 0
    for i in range(views.shape[0] // 16):
        b, start, n = _locate(views, i)
        if b < 0 or not copy[b]:
            _same_view(out_views, views, i)
            if b >= 0:
                r = remap[b]
                for t in range(4):
                    out_views[i * 16 + 8 + t] = (r >> (8 * t)) & 0xFF
            continue
        _copy(_bytes(data, b), start, start + n, out, pos)
        _view_to(out_views, i, out, pos, n, new_buffer)
        pos += n
    return pos


def data_buffers(arrays: list[pa.Array]) -> dict[int, pa.Buffer]:
    """The data buffers of string_view arrays (children of lists and structs included), by address."""
    out: dict[int, pa.Buffer] = {}
    stack = list(arrays)
    while stack:
        a = stack.pop()
        if isinstance(a, pa.ChunkedArray):
            stack.extend(a.chunks)
            continue
        if pa.types.is_string_view(a.type):
            out.update((b.address, b) for b in a.buffers()[2:] if b is not None)
        elif pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
            stack.append(a.values)
        elif pa.types.is_struct(a.type):
            stack.extend(a.field(k) for k in range(a.type.num_fields))
    return out


def compact(s: pl.Series, keep: dict[int, pa.Buffer]) -> pl.Series:
    """`s` with its strings that lie in data buffers other than `keep`'s (by address) copied into one new buffer
    of just their bytes, and its views and validity copied: the result refers to `keep`'s buffer objects and its
    own, nothing else.

    A filtered column still holds every buffer its strings came from, and a buffer that came through the Arrow
    C interface (polars -> pyarrow) keeps its whole exported array alive: this lets a table keep only the
    rewritten strings of its own rows and share its input's (`keep`, exported from the input once)."""
    arr = _string_view(s)
    buffers = [b if b is not None else pa.py_buffer(b"") for b in arr.buffers()[2:]]
    copy = np.array([b.address not in keep for b in buffers], dtype=np.bool_)
    if len(arr) == 0:
        return s
    views, data = _view_buffers(arr)
    kept = [keep[b.address] for b, c in zip(buffers, copy) if not c]
    remap = np.cumsum(~copy) - 1
    size = _compact_size(views, copy) if copy.any() else 0
    if size >= MAX_VIEW_BUFFER:
        return s
    out_views = np.empty(16 * len(arr), dtype=np.uint8)
    out = np.empty(max(size, 1), dtype=np.uint8)
    _compact(views, data, copy, remap.astype(np.int64), out_views, out, len(kept))
    bitmap, nulls = _validity(_valid(arr))
    return pl.Series(s.name, pa.Array.from_buffers(pa.string_view(), len(arr),
                                                   [bitmap, pa.py_buffer(out_views), *kept,
                                                    *([pa.py_buffer(out)] if size else [])], nulls))
