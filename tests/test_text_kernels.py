"""The numba text kernels against plain Python: scan's flags, and NFC on every code point and on random strings."""

import functools
import random
import unicodedata

import numpy as np
import polars as pl
import pytest

from orpo_pipeline.data import text_kernels as tk

from .test_cleaning import CODE_POINTS, _suspects, reference_normalize

ASSIGNED = [cp for cp in CODE_POINTS if unicodedata.category(chr(cp)) != "Cn"]


@pytest.mark.parametrize("text, flags", [
    ("plain text, nothing to do", 0),
    ("", 0),
    ("cafe\u0301", tk.NFC),
    ("café", 0),  # precomposed: already NFC
    ("a\r\nb", tk.CR),
    ("a\u00a0b", tk.ODD_CHAR),
    ("a\u200bb", tk.ODD_CHAR),
    ("a \nb", tk.BLANK_NEWLINE),
    ("a\t\nb", tk.BLANK_NEWLINE),
    ("a\n\n\nb", tk.THREE_NEWLINES),
    ("a\n\nb", 0),
    (" a", tk.END_WHITE),
    ("a\u3000", tk.END_WHITE | tk.ODD_CHAR),
    ("a\u2028", tk.END_WHITE),
    ("x" * 20 + "\u0301 \n\r", tk.NFC | tk.BLANK_NEWLINE | tk.CR | tk.END_WHITE),  # not inline in the view
    ("a\u0316", 0),  # a combining mark that composes with nothing, in order: NFC already
    ("\u092a\u0930\u094d\u092f", 0),  # Devanagari virama (class 9)
    ("\u05b0\u05b1", 0),  # Hebrew points in order (classes 10, 11)
    ("\u05b1\u05b0", tk.NFC),  # out of order: NFC reorders them
    ("\u05b1 x" * 3 + "\u05b0", 0),  # ASCII between them resets the order
    ("a\u0316\u0301", tk.NFC),  # U+0301 may compose (Maybe)
    ("\u212b", tk.NFC),  # NFC changes it on its own (No)
    (None, 0),
])
def test_scan_flags_each_rule_that_may_apply(text, flags):
    assert tk.scan(pl.Series([text], dtype=pl.String)).tolist() == [flags]


def test_scan_reads_sliced_and_long_columns():
    texts = ["short", "a" * 40 + "\r", None, "e\u0301" * 30, " x"] * 1000
    s = pl.Series(texts)
    expected = tk.scan(pl.Series(texts[:5])).tolist() * 1000
    assert tk.scan(s).tolist() == expected
    assert tk.scan(s.slice(3, 10)).tolist() == expected[3:13]


@functools.lru_cache(maxsize=1)
def _not_yes() -> set[int]:
    from orpo_pipeline.data.clean import nfc_not_yes_ranges

    return {cp for a, b in nfc_not_yes_ranges() for cp in range(a, b + 1)}


def _quick_check_yes(text: str) -> bool:
    """UAX #15's NFC quick check says Yes: no code point whose NFC_Quick_Check is No or Maybe, and combining
    classes in order."""
    not_yes = _not_yes()
    last = 0
    for ch in text:
        ccc = unicodedata.combining(ch)
        if ord(ch) in not_yes or (ccc and last > ccc):
            return False
        last = ccc
    return True


def _flags_by_python(text: str, suspects: set[int]) -> int:
    from orpo_pipeline.data.clean import ODD_CHARACTERS

    from .test_cleaning import WHITE_SPACE

    flags = 0
    if not _quick_check_yes(text):
        flags |= tk.NFC
    if "\r" in text:
        flags |= tk.CR
    if any(c in ODD_CHARACTERS for c in text):
        flags |= tk.ODD_CHAR
    if " \n" in text or "\t\n" in text:
        flags |= tk.BLANK_NEWLINE
    if "\n\n\n" in text:
        flags |= tk.THREE_NEWLINES
    if text and (text[0] in WHITE_SPACE or text[-1] in WHITE_SPACE):
        flags |= tk.END_WHITE
    return flags


def test_scan_equals_python_on_random_strings_across_word_boundaries():
    """scan reads 8 bytes at a time and judges a newline by the bytes before it, across words and across
    non-ASCII characters: every rule at every offset, in strings inline in their view and in data buffers, and
    at the very end of a buffer (the last string of the column)."""
    rng = random.Random(5)
    pieces = ["a", "bcdefgh", " ", "\t", "\n", "\r", "é", "\u0301", "\u00a0", "\u200b", "\u3000", "\U0001f600",
              "\x0b", "\u2028"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(30_000)]
    texts += ["x" * k + tail for k in range(17) for tail in (" \n", "\n\n\n", "\r", "\u0301", "é\n\n\n", "é \n")]
    suspects = _suspects()
    for column in (texts, texts[::-1]):
        assert tk.scan(pl.Series(column)).tolist() == [_flags_by_python(t, suspects) for t in column]


def _nfc_of_all(texts: list[str]) -> list[str]:
    return tk.nfc(pl.Series(texts, dtype=pl.String)).to_list()


def test_nfc_equals_python_on_every_code_point_composed_and_decomposed():
    """Each assigned code point alone, decomposed, and between a starter and marks of other classes."""
    contexts = ["{}", "a{}\u0316\u0301", "{}\u0301", "\u1100{}", "{}\u0316", "e\u0327{}"]
    texts = [ctx.format(f(chr(cp))) for cp in ASSIGNED for ctx in contexts
             for f in (str, lambda c: unicodedata.normalize("NFD", c))]
    assert _nfc_of_all(texts) == [unicodedata.normalize("NFC", t) for t in texts]


def test_nfc_equals_python_on_random_runs_of_marks():
    suspects = _suspects()
    rng = random.Random(1)
    marks = [cp for cp in ASSIGNED if cp in suspects]
    plain = [cp for cp in ASSIGNED if cp not in suspects]
    texts = []
    for _ in range(20_000):
        parts = [chr(rng.choice(marks if rng.random() < 0.5 else plain)) for _ in range(rng.randint(1, 12))]
        text = "".join(parts)
        texts.append(unicodedata.normalize("NFD", text) if rng.random() < 0.5 else text)
    assert _nfc_of_all(texts) == [unicodedata.normalize("NFC", t) for t in texts]


def test_nfc_leaves_code_points_newer_than_python_to_polars():
    """U+1E4EC is unassigned in Python's Unicode; polars composes what its newer tables know."""
    s = pl.Series(["a\U0001e4ec\u0301e\u0301", "e\u0301", "\u0915\u093c"])
    assert tk.nfc(s).equals(s.str.normalize("NFC"))


def test_a_string_scan_calls_nfc_is_nfc():
    """Random runs of combining marks (in and out of order), letters they compose with or not, and ASCII: where
    scan does not flag NFC, Python's NFC leaves the string as it is."""
    rng = random.Random(7)
    pieces = ["a", "e", "x", " ", "\u0316", "\u0301", "\u05b0", "\u05b1", "\u094d", "\u0334", "\u0f71", "\u0f72",
              "\u093c", "\u0915", "\u1100", "\u1161", "\u0308", "\u0327", "abcdefghij"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(30_000)]
    flags = tk.scan(pl.Series(texts))
    unflagged = [t for t, f in zip(texts, flags) if not f & tk.NFC]
    assert len(unflagged) > 5_000 and len(unflagged) < len(texts) - 5_000
    assert [t for t in unflagged if unicodedata.normalize("NFC", t) != t] == []


def test_nfc_where_rewrites_only_the_rows_asked_and_shares_the_others():
    """Rows asked: short (inside the view) and long, one polars has to compose (newer Unicode); rows not asked keep
    their text even where NFC would change it; nulls stay null."""
    texts = ["e\u0301", "x" * 30 + "e\u0301", "a\U0001e4ec\u0301e\u0301", None, "e\u0301 not asked", "plain",
             "\u1100\u1161" * 9] * 300
    where = np.array([t is not None and "asked" not in t for t in texts])
    result = tk.nfc_where(pl.Series(texts), where)
    expected = [pl.Series([t]).str.normalize("NFC")[0] if w else t for t, w in zip(texts, where)]
    assert result.to_list() == expected
    assert result.to_list()[4] == "e\u0301 not asked"


def _rules_by_regex(text: str) -> str:
    """Every rule but NFC, one after another with Python's re."""
    return reference_normalize(text, nfc=False)


RULE_PIECES = ["\r", "\n", " ", "\t", "\x0b", "\x0c", "\x85", "\u00a0", "\u2003", "\u200a", "\u3000", "\u202f",
               "\u200b", "\u200d", "\ufeff", "\u2028", "\u1680", "a", "Z", "é", "\u0301", "\U0001f600", "\r\n",
               " \n", "\t\n", "\n\n\n", " \u200b\t\n"]


def test_rules_equal_the_regexes_one_after_another():
    rng = random.Random(2)
    texts = ["".join(rng.choice(RULE_PIECES) for _ in range(rng.randint(0, 16))) for _ in range(50_000)]
    texts += [p * 3 + "x" + p * 3 for p in RULE_PIECES] + ["x" * 30 + " \r\n\n\n y \u3000"]  # long: not in the view
    assert tk.rules(pl.Series(texts)).to_list() == [_rules_by_regex(t) for t in texts]


def test_rules_equal_the_regexes_on_long_strings_read_a_word_at_a_time():
    """Strings long enough for 8-byte words, where a newline is copied as it is only after a plain byte: blanks,
    newlines, CRs and odd characters before it, inside a word and at its first byte."""
    rng = random.Random(4)
    pieces = ["abcdefg", "x", "\n", "\n", " ", "\t", "\r", "\u200b", "\u00a0", "é", "\n\n"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(20_000)]
    assert tk.rules(pl.Series(texts)).to_list() == [_rules_by_regex(t) for t in texts]
    s = pl.Series(texts)
    assert tk.apply_rules(s, tk.scan(s)).to_list() == [reference_normalize(t, nfc=False) for t in texts]


def test_rules_on_a_sliced_column_with_many_buffers():
    texts = [("line \r\n" * 3 + "\u200bword\u00a0" * i + "\n\n\n\n end \t") for i in range(3000)] * 20
    s = pl.Series(texts).slice(7, 50_000)
    assert tk.rules(s).to_list() == [_rules_by_regex(t) for t in texts[7:50_007]]


def test_first_seen_equals_a_dict_of_first_rows_across_batches():
    """Values added in batches, with ids that are not row numbers (negative ones too), through several growths
    of the table."""
    rng = np.random.default_rng(3)
    seen_table, seen = tk.FirstSeen(), {}
    for batch in range(12):
        n = 2_000
        hi = rng.integers(0, 400, n, dtype=np.uint64)  # few values: many repeats
        lo = rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(40)  # low words alike: every probe collides
        use = rng.random(n) < 0.9
        ids = np.arange(n, dtype=np.int64) * 3 - 5_000 + batch * 7_000
        expected = [seen.setdefault((int(h), int(w)), int(i)) if u else int(i) for h, w, u, i in zip(hi, lo, use, ids)]
        assert seen_table.add(hi, lo, use, ids).tolist() == expected
    assert seen_table.count == len(seen) and seen_table.key_id[: seen_table.count].tolist() == list(seen.values())


def test_hex_words_read_back_hex_digests_and_refuse_other_text():
    rng = np.random.default_rng(4)
    hi, lo = rng.integers(0, 2**64, 1000, dtype=np.uint64), rng.integers(0, 2**64, 1000, dtype=np.uint64)
    valid = np.arange(1000) % 97 != 3
    digests = tk.hex_digests(hi, lo, valid, "h")
    expected = pl.Series("h", [f"{int(h):016x}{int(l):016x}" if v else None for h, l, v in zip(hi, lo, valid)])
    assert digests.to_list() == expected.to_list()
    assert digests.equals(expected) and (digests.sort() == expected.sort()).all()  # views' prefixes too
    digests = tk.hex_digests(hi, lo, np.ones(1000, dtype=bool), "h")
    others = pl.Series("h", [None, "", "0" * 31, "0" * 33, "g" + "0" * 31, digests[5].upper()])
    back_hi, back_lo, ok = tk.hex_words(pl.concat([digests, others]))
    assert ok.tolist() == [True] * 1000 + [False] * 5 + [True]
    assert (back_hi[:1000] == hi).all() and (back_lo[:1000] == lo).all()
    assert (back_hi[-1], back_lo[-1]) == (hi[5], lo[5])


def _data_bytes(s: pl.Series) -> dict[int, int]:
    arr = s.to_arrow(compat_level=pl.CompatLevel.newest())
    return {b.address: b.size for b in arr.buffers()[2:] if b is not None}


def test_compact_copies_only_strings_outside_the_kept_buffers():
    """A column gathered from an input and a rewritten copy: after compaction it holds the input's buffers
    (shared) and one new buffer of exactly its own rewritten long strings; values, nulls and short strings
    stay the same, also for a sliced column."""
    source = pl.Series([f"input string number {i}" for i in range(50_000)] + [None, "short"])
    keep = tk.data_buffers([source.to_arrow(compat_level=pl.CompatLevel.newest())])
    rewritten = pl.Series([f"rewritten {i} " * (i % 4) for i in range(50_002)])
    pos = np.r_[np.arange(0, 50_002, 2), 50_002 + np.arange(0, 50_002, 5)]
    mixed = pl.concat([source, rewritten], rechunk=True).gather(pos)
    from_rewritten = pos >= 50_002
    for lo, hi in ((0, len(pos)), (20_000, 40_000), (1_000, 11_000)):
        column = mixed.slice(lo, hi - lo)
        out = tk.compact(column, keep)
        assert out.to_list() == column.to_list()
        new = {a: n for a, n in _data_bytes(out).items() if a not in keep}
        lengths = column.str.len_bytes().fill_null(0).to_numpy()
        own = int(lengths[from_rewritten[lo:hi] & (lengths > 12)].sum())
        assert sum(new.values()) == own and len(new) == (own > 0)
    same = tk.compact(source, keep)  # nothing to copy
    assert same.to_list() == source.to_list() and set(_data_bytes(same)) <= set(keep)


def test_apply_rules_rewrites_flagged_strings_and_keeps_the_others():
    """Strings only stripping changes (views of themselves), strings other rules change (a new buffer),
    strings no rule changes and nulls, short (inside the view) and long, in a sliced column."""
    texts = ["  keep me as I am, a long plain string ", "plain and long enough to leave the view", None, "short",
             " \t strip only, and long enough \n", " x ", "crlf\r\nand odd\u00a0space, long ", "\u200b\r\n",
             "e\u0301 nfc'd first, then stripped  "] * 500
    s = pl.Series(texts).slice(3, 4000)
    s = s.str.normalize("NFC")  # apply_rules expects NFC strings
    expected = [None if t is None else _rules_by_regex(t) for t in s.to_list()]
    assert tk.apply_rules(s, tk.scan(s)).to_list() == expected
