import json
import random
import re
import unicodedata
from unittest import mock

import polars as pl
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orpo_pipeline.data import clean, normalize
from orpo_pipeline.data.clean import clean_preferences, table_digest
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.data.ingest import RAW_SCHEMA, PreferenceFormatError, iter_records, read_preference_dir, records_to_table

from .conftest import ULTRAFEEDBACK


def test_sample_data_is_big_and_varied():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    files = set(raw["source_file"])
    assert {"helpfulness.jsonl", "factual.jsonl", "safety.json", "instructions.csv", "concision.parquet", "dirty.jsonl"} <= files
    clean = clean_preferences(raw)
    assert len(clean.kept) >= 300


def test_dirty_file_rejects_every_defect_with_source_and_reason():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    result = clean_preferences(raw)
    assert len(raw) == len(result.kept) + len(result.rejects)
    dirty = result.rejects.filter(pl.col("source_file") == "dirty.jsonl")
    by_row = dict(zip(dirty["source_row"], dirty["reason"]))
    assert by_row == {
        3: "empty_prompt",
        5: "empty_chosen",
        6: "empty_rejected",
        8: "chosen_equals_rejected",
        9: "chosen_equals_rejected",  # equal once NFC and whitespace are normalized
        10: "duplicate_pair",
        12: "unparseable",
        13: "unparseable",
        14: "unparseable",
    }
    details = dict(zip(dirty["source_row"], dirty["detail"]))
    assert "dirty.jsonl:12" in details[12] and "malformed JSON" in details[12]
    assert "field 'chosen'" in details[13] and "int" in details[13]
    assert "missing field 'rejected'" in details[14]
    assert details[10] == "duplicate of dirty.jsonl:1"
    # the copy of a helpfulness pair is caught across files, whichever came first
    cross = result.rejects.filter((pl.col("reason") == "duplicate_pair") & ~pl.col("detail").str.contains("dirty.jsonl:1$"))
    assert len(cross) == 1


def test_kept_rows_carry_source_hash_and_normalized_text(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Cafe\u0301?\r\n", "chosen": "  Yes\u00a0indeed  ", "rejected": "No"},
        {"prompt": "Café?", "chosen": "Yes indeed", "rejected": "No"},  # same pair after normalization
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = clean_preferences(records_to_table(iter_records(path), "p.jsonl"))
    assert len(result.kept) == 1 and result.rejects["reason"].to_list() == ["duplicate_pair"]
    row = result.kept.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "Café?"}]
    assert row["chosen"] == "Yes indeed"
    assert (row["source_file"], row["source_row"]) == ("p.jsonl", 1)
    # documented, so users can recompute them: xxh3-128 of the prompt key and of key + chosen + rejected
    key = "user\x1fCafé?"
    assert row["prompt_hash"] == xxhash.xxh3_128_hexdigest(key.encode())
    assert row["content_hash"] == xxhash.xxh3_128_hexdigest("\x1d".join([key, "Yes indeed", "No"]).encode())


def test_rejects_keep_the_text_as_ingested():
    """A reject holds what its source said (the duplicate's own surface form, the whitespace that made a field
    empty), not the normalized text."""
    rows = []
    for i in range(300):
        text = f"answer number {i} with enough text to live outside the view"
        rows.append(("s", 2 * i + 1, [{"role": "user", "content": f"question {i} \r\n"}], text + " \r\nmore", "no",
                     *[None] * 5))
        rows.append(("s", 2 * i + 2, [{"role": "user", "content": f"question {i}"}], text + "\u00a0\r\nmore ", "no",
                     *[None] * 5))  # the same pair in another surface form
    rows.append(("s", 601, [{"role": "user", "content": "q"}], " \u200b ", "no", *[None] * 5))
    raw = pl.DataFrame(rows, schema=RAW_SCHEMA, orient="row")
    result = clean_preferences(raw)
    assert result.kept.height == 300 and result.rejects.height == 301
    dups = result.rejects.filter(pl.col("reason") == "duplicate_pair")
    assert dups["chosen"].to_list() == [r[3] for r in rows[1:600:2]]
    assert [p[0]["content"] for p in dups["prompt"].to_list()] == [r[2][0]["content"] for r in rows[1:600:2]]
    empty = result.rejects.filter(pl.col("reason") == "empty_chosen").row(0, named=True)
    assert empty["chosen"] == " \u200b " and empty["source_row"] == 601
    assert result.kept["chosen"].to_list() == [r[3].replace(" \r\n", "\n") for r in rows[0:600:2]]


def test_split_is_by_prompt_and_stable_when_data_is_added():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    full = clean_preferences(raw, eval_fraction=0.3).kept
    half = clean_preferences(raw.head(len(raw) // 2), eval_fraction=0.3).kept
    assert set(full.filter(pl.col("split") == "train")["prompt_hash"]).isdisjoint(full.filter(pl.col("split") == "eval")["prompt_hash"])
    old = dict(zip(half["content_hash"], half["split"]))
    new = dict(zip(full["content_hash"], full["split"]))
    assert all(new[h] == s for h, s in old.items())
    assert table_digest(full) == table_digest(full.reverse())


def test_ultrafeedback_identical_pairs_go_to_rejects():
    raw = records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")
    assert len(raw) == 1000 and raw["score_chosen"].null_count() == 0
    result = clean_preferences(raw)
    counts = result.reason_counts()
    assert counts["chosen_equals_rejected"] == 4
    assert len(result.kept) + len(result.rejects) == 1000
    assert result.kept["chosen"].str.len_chars().min() > 0


def test_unknown_schema_names_columns_and_formats(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(PreferenceFormatError) as e:
        records_to_table(iter_records(path), "odd.jsonl")
    msg = str(e.value)
    assert "odd.jsonl" in msg and "'question'" in msg and "trl_standard" in msg


def test_non_utf8_line_is_reported_not_replaced(tmp_path):
    path = tmp_path / "bytes.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}\n')
    result = clean_preferences(records_to_table(iter_records(path), "bytes.jsonl"))
    assert len(result.kept) == 1
    assert "not UTF-8" in result.rejects["detail"][0] and "bytes.jsonl:2" in result.rejects["detail"][0]


# ---------------------------------------------------------------- fast normalization == straightforward rules

# Unicode White_Space, which polars' strip_chars() trims (Rust str::trim); Python's str.strip() would also trim
# \x1c-\x1f, so the set is named
WHITE_SPACE = "".join(["\t\n\x0b\x0c\r \x85\xa0\u1680", *map(chr, range(0x2000, 0x200B)), "\u2028\u2029\u202f\u205f\u3000"])


def reference_normalize(s, nfc=True):
    """The rules, applied the plain way: Python's NFC on every string (unless `nfc` is false), then each regex."""
    if s is None:
        return None
    if nfc:
        s = unicodedata.normalize("NFC", s)
    s = re.sub(r"\r\n?", "\n", s)
    s = re.sub("[\u200b\u200c\u200d\ufeff]", "", s)
    s = re.sub("[\u00a0\u2000-\u200a\u202f\u205f\u3000]", " ", s)
    s = re.sub(r"[ \t]+\n", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip(WHITE_SPACE)


def reference_series(s: pl.Series) -> pl.Series:
    return pl.Series(s.name, [reference_normalize(x) for x in s.to_list()], dtype=pl.String)


def reference_messages(prompt: pl.Series) -> pl.Series:
    # as list.eval(pl.struct(role=..., content=...)) does it: a null message becomes one with null fields
    rows = [None if msgs is None else [{"role": None if m is None else m["role"],
                                        "content": None if m is None else reference_normalize(m["content"])}
                                       for m in msgs] for msgs in prompt.to_list()]
    return pl.Series(prompt.name, rows, dtype=prompt.dtype)


def all_rules_polars(e: pl.Expr) -> pl.Expr:
    """The rules as polars expressions on every string, NFC included (clean.py before the fast path)."""
    return (
        e.str.normalize("NFC")
        .str.replace_all(r"\r\n?", "\n")
        .str.replace_all("[\u200b\u200c\u200d\ufeff]", "")
        .str.replace_all("[\u00a0\u2000-\u200a\u202f\u205f\u3000]", " ")
        .str.replace_all(r"[ \t]+\n", "\n")
        .str.replace_all(r"\n{3,}", "\n\n")
        .str.strip_chars()
    )


def clean_both_ways(raw, **kwargs):
    fast = clean_preferences(raw, **kwargs)
    with mock.patch.object(clean, "normalize_series", reference_series), \
            mock.patch.object(clean, "normalize_messages", reference_messages):
        ref = clean_preferences(raw, **kwargs)
    return fast, ref


def assert_same_tables(fast, ref):
    assert fast.kept.schema == ref.kept.schema and fast.rejects.schema == ref.rejects.schema
    assert fast.kept.equals(ref.kept)
    assert fast.rejects.equals(ref.rejects)


def _suspects() -> set[int]:
    return {cp for a, b in normalize.nfc_suspect_ranges() for cp in range(a, b + 1)}


ASTRAL_SAMPLE = sorted(
    set(range(0x10000, 0x110000, 97))
    | set(range(0x1D15E, 0x1D165)) | set(range(0x1D1BB, 0x1D1C1))  # musical symbols: composition exclusions
    | set(range(0x2F800, 0x2FA1E))  # CJK compatibility ideographs supplement: singletons
    | {0x1109A, 0x1109C, 0x110AB, 0x110BA, 0x1112E, 0x1112F, 0x11127, 0x11131, 0x11132}  # Kaithi, Chakma pairs
    | {0x1F600, 0x1F44D, 0x1F3FB, 0x1E4EC, 0x113C2, 0x113C5, 0x16D67, 0x16D68}  # emoji, newer-Unicode marks
)
CODE_POINTS = [cp for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF] + ASTRAL_SAMPLE


def test_a_code_point_outside_the_nfc_suspect_class_is_nfc_and_never_composes():
    """Over every BMP code point and a sample of astral ones: what the class leaves out is NFC on its own,
    has combining class 0, and is never the second half of a canonical composition. By the NFC quick check
    (UAX #15), a string of such code points is NFC, so any string NFC changes holds a suspect."""
    suspects = _suspects()
    outside = [cp for cp in CODE_POINTS if cp not in suspects]
    for cp in outside:
        ch = chr(cp)
        assert unicodedata.combining(ch) == 0, hex(cp)
        assert unicodedata.is_normalized("NFC", ch), hex(cp)
    # every canonical pair, over all of Unicode: its second half may compose with what precedes it
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp)) if not 0xD800 <= cp <= 0xDFFF else ""
        if d and not d.startswith("<") and len(d.split()) == 2:
            assert int(d.split()[1], 16) in suspects, hex(cp)
    assert all(cp in suspects for cp in [*range(0x1161, 0x1176), *range(0x11A8, 0x11C3)])  # Hangul V, T jamo
    # polars (a newer Unicode than Python's) agrees on every code point left out, alone and after each
    # character that can start a composition (first halves of canonical pairs, Hangul L jamo and LV syllables)
    starters = {int(d.split()[0], 16) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF
                for d in [unicodedata.decomposition(chr(cp))] if d and not d.startswith("<") and len(d.split()) == 2}
    starters = (starters | set(range(0x1100, 0x1113)) | set(range(0xAC00, 0xD7A4, 28))) - suspects
    body = "".join(map(chr, outside))
    texts = [body, body[::-1]] + ["".join(chr(a) + c for c in body[i::7]) for i, a in enumerate(sorted(starters))]
    assert all(unicodedata.is_normalized("NFC", t) for t in texts)
    series = pl.Series(texts)
    assert series.str.normalize("NFC").equals(series)


def test_strings_nfc_changes_contain_a_suspect():
    """Random strings mixing suspects with plain text: NFC changes a string only if it holds a suspect."""
    suspects = _suspects()
    rng = random.Random(0)
    pool = [cp for cp in CODE_POINTS if unicodedata.category(chr(cp)) != "Cn"]
    marks = [cp for cp in pool if cp in suspects]
    texts = ["".join(chr(rng.choice(marks if rng.random() < 0.2 else pool)) for _ in range(rng.randint(1, 8)))
             for _ in range(20_000)]
    found = pl.Series(texts).str.contains(normalize.nfc_suspect_class()).to_list()
    for text, has_suspect in zip(texts, found):
        assert has_suspect == any(ord(c) in suspects for c in text)  # the regex class is the set
        if not unicodedata.is_normalized("NFC", text):
            assert has_suspect, ascii(text)


def test_normalize_series_equals_the_rules_on_every_code_point():
    """Each code point in a few contexts: the fast path gives what every rule on every string gives, in
    polars (any code point) and in plain Python (code points Python's Unicode assigns)."""
    # alone, then next to what each rule acts on, one rule at a time (so a gate that missed it would show)
    contexts = ["{}", "a{}", "{}\u0301", "\u1100{}", "a{}\n\n\nb", "a \n{}b", "a\t\n{}", "a\r{}", "x{}\u200bz",
                "x\u00a0{}z", " {}z", "z{} "]
    texts = [ctx.format(chr(cp)) for cp in CODE_POINTS for ctx in contexts]
    series = pl.Series("t", texts)
    fast = normalize.normalize_series(series)
    assert fast.equals(series.to_frame().select(all_rules_polars(pl.col("t"))).to_series())
    assert fast.equals(series.to_frame().select(normalize.normalize_text(pl.col("t"))).to_series())
    assigned = [i for i, cp in enumerate(cp for cp in CODE_POINTS for _ in contexts)
                if unicodedata.category(chr(cp)) != "Cn"]
    assert fast.gather(assigned).to_list() == [reference_normalize(texts[i]) for i in assigned]


def _edge_rows():
    def msgs(*contents):
        return [{"role": "user", "content": c} for c in contents]

    none = (None, None, None, None, None)
    return [
        ("a", 1, msgs("Cafe\u0301 ?"), "x\r\n", "y", *none),
        ("a", 2, msgs("Café ?"), "x", "y", *none),
        ("a", 3, None, None, None, None, None, "a:3: malformed JSON", "unparseable", None),
        ("a", 4, [], "x", "y", *none),
        ("a", 5, [None], "x", "y", *none),
        ("a", 6, [{"role": None, "content": "q"}], "x", "y", *none),
        ("a", 7, [{"role": "user", "content": None}], "x", "y", *none),
        ("a", 8, msgs("q"), None, "y", *none),  # no chosen but no error: no hash, never a duplicate
        ("a", 9, msgs("q"), None, "y", *none),
        ("a", 9, msgs("q"), "x", "y", *none),  # the same source row twice: the second is a copy of the first
        ("a", 9, msgs("q"), "x", "y", *none),
        ("b", 1, msgs("q", " \u200b"), "x", "y", 3.0, 3.0, None, None, None),
        ("b", 2, msgs("sys", "q\u3000\n\n\n\nz"), "x", "y", 5.0, 3.0, None, None, None),
        ("b", 3, msgs("\ufeffq"), "x ", "y", 5.0, 4.9, None, None, None),
        ("b", 4, msgs("q"), "x", "y", None, None, "b:4: tie", "annotator_tie", None),
        ("b", 5, msgs("\u1100\u1161"), "\u212b", "\u0958", None, None, None, None, None),
        ("b", 6, msgs("e\u200d\u0301"), "\t x \u2028", "y\u0316\u0301", None, None, None, None, None),
    ]


@pytest.mark.parametrize("kwargs", [{}, {"min_score_margin": 0.5}, {"eval_fraction": 0.5}])
def test_fast_path_equals_reference_on_sample_and_edge_rows(kwargs):
    sample = read_preference_dir(SAMPLE_DATA_DIR)
    edge = pl.DataFrame(_edge_rows(), schema=RAW_SCHEMA, orient="row")
    for raw in (sample, edge, edge.slice(2), pl.concat([edge.head(7), edge.slice(7)], rechunk=False), edge.head(0)):
        assert_same_tables(*clean_both_ways(raw, **kwargs))
    known = clean_preferences(sample).kept["content_hash"].head(20)
    assert_same_tables(*clean_both_ways(sample, known_hashes=known, **kwargs))


def test_an_error_reason_cleaning_does_not_know_is_kept_as_the_reason():
    rows = [r for r in _edge_rows() if r[:2] == ("b", 4)]  # an annotator tie, found at ingest
    rows.append(("c", 1, rows[0][2], "x", "y", None, None, "c:1: held out by the labeling tool", "held_out", None))
    result = clean_preferences(pl.DataFrame(rows, schema=RAW_SCHEMA, orient="row"))
    assert result.kept.height == 0
    assert result.rejects.select("reason", "detail").rows() == [
        ("annotator_tie", "b:4: tie"), ("held_out", "c:1: held out by the labeling tool")]
    assert result.rejects.schema["reason"] == pl.String


def test_a_row_repeated_under_the_same_source_row_is_still_a_duplicate():
    """Copies are told apart by their position, not by their file and row: a table that holds one source row
    twice (two raw tables concatenated) keeps one pair, and the other is rejected as its duplicate."""
    rows = [r for r in _edge_rows() if r[:2] == ("a", 9) and r[3] == "x"]
    assert len(rows) == 2
    result = clean_preferences(pl.DataFrame(rows, schema=RAW_SCHEMA, orient="row"))
    assert result.kept.height == 1 and result.kept["source_row"].to_list() == [9]
    assert result.rejects.select("reason", "detail").rows() == [("duplicate_pair", "duplicate of a:9")]


TRICKY = ["\r", "\n", " ", "\t", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff", "\u200d", "\u0301",
          "\u0316", "\u0308", "e", "A", "\u1100", "\u1161", "\u11a8", "\uac00", "\u212b", "\u0958", "\u2028", "\x85",
          "\U0001d15e", "\U0001f600", "\u0f73", "\u09be", "\u09c7"]
# Python's Unicode (14) is older than polars' (16): code points Python leaves unassigned are left out here,
# because the plain-Python reference would not compose them; the tests above cover them against polars
unicode_text = st.lists(
    st.one_of(st.characters(exclude_categories=("Cs", "Cn")), st.sampled_from(TRICKY),
              st.sampled_from(["\r\n", " \n", "\t\n", "\n\n\n", " \t \n\n\n\n", "e\u0301", "\u1100\u1161\u11a8"])),
    max_size=16,
).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": unicode_text})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(message, max_size=3), unicode_text, unicode_text, st.booleans()),
                min_size=1, max_size=8))
def test_fast_path_equals_reference_on_random_unicode(rows):
    records = []
    for i, (prompt, chosen, rejected, repeat) in enumerate(rows):
        records.append(("r.jsonl", i + 1, prompt, chosen, rejected, None, None, None, None, None))
        if repeat:  # the same pair again, in another surface form
            records.append(("r.jsonl", 100 + i, [{**m, "content": unicodedata.normalize("NFD", m["content"]) + " \r\n"}
                                                 for m in prompt], "\ufeff" + chosen, rejected.replace(" ", "\u00a0"),
                            None, None, None, None, None))
    raw = pl.DataFrame(records, schema=RAW_SCHEMA, orient="row")
    assert_same_tables(*clean_both_ways(raw))


def test_duplicate_of_an_earlier_file_names_that_copy_not_itself():
    from orpo_pipeline.config import SAMPLE_DATA_DIR
    from orpo_pipeline.data.ingest import iter_records, records_to_table

    f = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    raw = records_to_table(iter_records(f), f.name)
    earlier = clean_preferences(raw).kept.head(3)
    hashes_only = clean_preferences(raw, known_hashes=earlier["content_hash"]).rejects
    dups = hashes_only.filter(pl.col("reason") == "duplicate_pair")
    assert dups.height == 3 and set(dups["detail"]) == {"duplicate of an earlier partition"}
    elsewhere = earlier.with_columns(source_file=pl.lit("old.jsonl"), source_row=pl.col("source_row") + 1000)
    named = clean_preferences(raw, known_hashes=elsewhere).rejects.filter(pl.col("reason") == "duplicate_pair")
    assert named.sort("source_row")["detail"].to_list() == [
        f"duplicate of old.jsonl:{r + 1000}" for r in sorted(earlier["source_row"].to_list())]


@pytest.mark.parametrize("batch_rows", [7, 64, 100_000])
def test_cleaning_in_batches_from_parquet_equals_cleaning_the_whole_table(tmp_path, batch_rows):
    from orpo_pipeline.config import SAMPLE_DATA_DIR
    from orpo_pipeline.data.ingest import iter_records, records_to_table

    files = sorted(p for p in SAMPLE_DATA_DIR.iterdir() if p.is_file() and p.suffix in {".jsonl", ".json", ".csv"})
    raw = pl.concat([records_to_table(iter_records(p), p.name) for p in files], how="diagonal_relaxed")
    # copies (from another file) that land in later batches than their first occurrence
    raw = pl.concat([raw, raw.head(40).with_columns(source_file=pl.lit("again.jsonl"))])
    raw.write_parquet(tmp_path / "raw.parquet")
    whole = clean_preferences(raw, eval_fraction=0.25)
    (tmp_path / "out").mkdir()
    totals = clean.clean_parquet_file(tmp_path / "raw.parquet", tmp_path / "out", batch_rows=batch_rows,
                                      eval_fraction=0.25)
    train, eval_, rejects = (pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
                             for name in ("train", "eval", "rejects"))
    assert totals["batches"] == -(-raw.height // batch_rows)
    assert totals["rows_in"] == raw.height == train.height + eval_.height + rejects.height
    assert train.equals(whole.train) and eval_.equals(whole.eval)
    assert rejects.equals(whole.rejects)  # reasons and details, duplicates of earlier batches included
    assert (totals["train"], totals["eval"]) == (whole.train.height, whole.eval.height)
    assert totals["digest"] == clean.table_digest(whole.kept)
    assert totals["kept_index"].equals(whole.kept.select("content_hash", "source_file", "source_row"))
    assert totals["accounting"].equals(clean.rows_accounting(raw, whole))
    assert totals["reasons"] == whole.reason_counts()
    again = rejects.filter(pl.col("source_file") == "again.jsonl")
    assert again.height == 40  # every copy rejected: as a duplicate, or for its original's reason
    details = again.filter(pl.col("reason") == "duplicate_pair")["detail"]
    assert len(details) and details.str.contains(r"^duplicate of \w+\.\w+:\d+$").all()
    assert not details.str.starts_with("duplicate of again.jsonl").any()  # the kept copy is in the earlier file


def test_a_failed_batch_write_stops_cleaning_with_its_error(tmp_path, monkeypatch):
    """Batches are written on a second thread: a write that fails (disk full, ...) must still fail the run."""
    from orpo_pipeline import storage
    from orpo_pipeline.config import SAMPLE_DATA_DIR

    read_preference_dir(SAMPLE_DATA_DIR).write_parquet(tmp_path / "raw.parquet")
    calls = {"n": 0}
    real_write = storage.ParquetAppender.write

    def write(self, df):
        calls["n"] += 1
        if calls["n"] == 4:  # the second batch's train table
            raise OSError("No space left on device")
        real_write(self, df)

    monkeypatch.setattr(storage.ParquetAppender, "write", write)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        clean.clean_parquet_file(tmp_path / "raw.parquet", tmp_path / "out", batch_rows=50)



def test_a_background_appender_writes_the_same_file_and_raises_a_failed_write(tmp_path, monkeypatch):
    """raw_preferences writes each batch on a second thread while the next is parsed."""
    from orpo_pipeline import storage

    tables = [pl.DataFrame({"a": list(range(i, i + 100)), "b": [f"x{i}"] * 100}) for i in range(0, 500, 100)]
    for background in (False, True):
        with storage.ParquetAppender(tmp_path / f"{background}.parquet", background=background) as out:
            for t in tables:
                out.write(t)
    assert pl.read_parquet(tmp_path / "True.parquet").equals(pl.concat(tables))
    assert pl.read_parquet(tmp_path / "False.parquet").equals(pl.concat(tables))

    real, calls = storage.ParquetAppender._write, []

    def failing(self, df):
        calls.append(df.height)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(self, df)

    monkeypatch.setattr(storage.ParquetAppender, "_write", failing)
    with pytest.raises(OSError, match="No space left"), \
            storage.ParquetAppender(tmp_path / "full.parquet", background=True) as out:
        for t in tables:
            out.write(t)
    assert len(calls) == 2  # the write after the failed one raised its error and wrote nothing more
