"""Text normalization: NFC, unix newlines, no zero-width or odd spaces, no trailing blanks, no runs of blank
lines, stripped. `normalize_text` is the one definition of the rules; `normalize_series` and
`normalize_messages` give the same strings, doing the work only where it can change something."""

from __future__ import annotations

import functools
from collections.abc import Callable

import polars as pl

ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\ufeff")  # removed
ODD_SPACES = ("\u00a0", *(chr(c) for c in range(0x2000, 0x200B)), "\u202f", "\u205f", "\u3000")  # -> " "
# a string that matches none of these is left as it is by every rule but NFC (`nfc_suspect_class` gates that)
_MAY_CHANGE = "[\r" + "".join(ZERO_WIDTH + ODD_SPACES) + r"]|[ \t]\n|\n\n\n|^\s|\s$"


@functools.lru_cache(maxsize=1)
def nfc_suspect_ranges() -> tuple[tuple[int, int], ...]:
    """The code points that can make a string non-NFC, as sorted, inclusive (first, last) ranges. By UAX #15's
    quick check, a string without one is NFC: those whose NFC_Quick_Check is not Yes (NFC changes them, or they
    may compose with the one before: second halves of canonical pairs, Hangul V and T jamo), combining marks
    (they may need reordering), and whatever Python's Unicode leaves unassigned (polars' is newer). From
    `unicodedata`, about 0.5 s once per process; it is what keeps NFC off the strings that cannot need it."""
    import unicodedata

    suspects = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:  # surrogates cannot occur in polars strings
            continue
        ch = chr(cp)
        if unicodedata.combining(ch) or unicodedata.category(ch) == "Cn" or not unicodedata.is_normalized("NFC", ch):
            suspects.add(cp)
        d = unicodedata.decomposition(ch)
        if d and not d.startswith("<") and len(d.split()) == 2:
            suspects.add(int(d.split()[1], 16))
    ranges: list[list[int]] = []
    for cp in sorted(suspects):
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return tuple((a, b) for a, b in ranges)


@functools.lru_cache(maxsize=1)
def nfc_suspect_class() -> str:
    """`nfc_suspect_ranges` as a regex character class (Rust regex syntax, as polars reads it)."""
    def esc(cp: int) -> str:
        return f"\\x{{{cp:X}}}"

    return "[" + "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in nfc_suspect_ranges()) + "]"


def _normalized(e: pl.Expr, nfc: bool = True) -> pl.Expr:
    e = e.str.normalize("NFC") if nfc else e
    return (
        e.str.replace_all(r"\r\n?", "\n")
        .str.replace_many(list(ZERO_WIDTH + ODD_SPACES), [""] * len(ZERO_WIDTH) + [" "] * len(ODD_SPACES))
        .str.replace_all(r"[ \t]+\n", "\n")
        .str.replace_all(r"\n{3,}", "\n\n")
        .str.strip_chars()
    )


def normalize_text(e: pl.Expr) -> pl.Expr:
    """NFC, unix newlines, no zero-width or odd spaces, no trailing blanks, no 3+ newlines, stripped: the one
    definition of the rules, as an expression for any query."""
    return _normalized(e)


def _rewrite(s: pl.Series, where: pl.Series, fn: Callable[[pl.Expr], pl.Expr]) -> pl.Series:
    """`fn` applied to the strings of `s` where `where` holds; the others are kept as they are."""
    where = where.fill_null(False)
    n = int(where.sum())
    if n == 0:
        return s
    changed = s.filter(where).to_frame("t").select(fn(pl.col("t"))).to_series().alias(s.name)
    if n == len(s):
        return changed
    # each output string's position in concat([s, changed]): its own row, or its rewritten copy
    pos = where.alias("w").to_frame().select(
        pl.when("w").then(pl.col("w").cum_sum().cast(pl.Int64) + (len(s) - 1))
        .otherwise(pl.int_range(pl.len(), dtype=pl.Int64))).to_series()
    return pl.concat([s, changed], rechunk=True).gather(pos)


def normalize_series(s: pl.Series) -> pl.Series:
    """`normalize_text` over a String Series: NFC only on the strings that hold an NFC suspect, the other rules
    only on those they may change (NFC is most of the cost, and most strings need neither)."""
    s = _rewrite(s, s.str.contains(nfc_suspect_class()), lambda e: e.str.normalize("NFC"))
    return _rewrite(s, s.str.contains(_MAY_CHANGE), lambda e: _normalized(e, nfc=False))


def normalize_messages(prompt: pl.Series) -> pl.Series:
    """`normalize_series` on the contents of a List(Struct{role, content}) Series: all rows' contents as one flat
    column, put back into their lists (a null message becomes one with null role and content, as in list.eval)."""
    import pyarrow as pa

    arr = prompt.rechunk().to_arrow(compat_level=pl.CompatLevel.newest())
    offsets = arr.offsets.to_numpy()
    base = int(offsets[0])
    messages = pl.Series(arr.values.slice(base, int(offsets[-1]) - base))
    fields = [messages.struct.field("role"), normalize_series(messages.struct.field("content"))]
    flat = pa.StructArray.from_arrays([f.to_arrow(compat_level=pl.CompatLevel.newest()) for f in fields],
                                      names=["role", "content"])
    lists = type(arr).from_arrays(pa.array(offsets - base), flat, mask=arr.is_null() if arr.null_count else None)
    return pl.Series(prompt.name, lists).cast(prompt.dtype)
