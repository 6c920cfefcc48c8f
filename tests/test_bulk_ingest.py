"""JSON Lines read in bulk (`bulk_ingest`) give exactly the rows the line-by-line reader gives, for any bytes."""

import gzip
import json

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orpo_pipeline.data import bulk_ingest
from orpo_pipeline.data.bulk_ingest import _bulk, batch_table, parse_options
from orpo_pipeline.data.ingest import (
    PreferenceFormatError,
    iter_file_tables,
    iter_records,
    records_to_table,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

STANDARD = parse_options({"prompt": "", "chosen": "", "rejected": ""})
TRICKY = ["", " ", "\ud800", "\udfff", "\U0001f600", "e\u0301", "\u00a0x\u200b", "\r\n", "\t", "\x00", "\ufeff",
          "}", "{", '"', "\\", "\\u00e9", "\x7f", "\u2028"]
text = st.one_of(st.text(max_size=8), st.sampled_from(TRICKY))


def assert_bulk_reads_as_records(path, fmt: str, batch_rows: int, column_mapping: dict | None = None) -> None:
    """iter_file_tables (bulk) gives the table, or the error, of the record-by-record reader, in batches."""
    try:
        expected = records_to_table(iter_records(path), path.name, fmt, column_mapping)
    except PreferenceFormatError as e:
        with pytest.raises(PreferenceFormatError) as got:
            pl.concat(iter_file_tables(path, path.name, fmt, column_mapping, batch_rows=batch_rows))
        assert str(got.value) == str(e)
        return
    tables = list(iter_file_tables(path, path.name, fmt, column_mapping, batch_rows=batch_rows))
    assert all(t.height <= batch_rows for t in tables)
    assert pl.concat(tables).equals(expected)


def _dump(obj, ascii_only: bool) -> bytes:
    """JSON of obj; the text "<digits>" stands for an integer of 5,000 digits, which Python's json rejects."""
    line = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return line.replace(b'"<digits>"', b"9" * 5000)


# extra keys a file's lines carry besides the texts: ids and sources (bulk), and keys that change the row
score = st.one_of(st.none(), st.integers(-10, 10), st.floats(), st.just("<digits>"), st.just("4.5"), st.booleans())
EXTRA_VALUES = {
    "id": st.one_of(st.integers(-2**64, 2**64), st.none(), st.floats(), st.just("<digits>")),
    "source": st.one_of(text, st.none(), st.integers(0, 3)),
    "flag": st.one_of(st.booleans(), st.none()),
    "system": st.one_of(st.none(), text),
    "score_chosen": score,
    "score_rejected": score,
    "chosen_rating": score,
    "rejected_rating": score,
    "metadata": st.one_of(st.none(), st.just("x"), st.fixed_dictionaries(
        {}, optional={"score_chosen": score, "score_rejected": score, "source": text, "tags": st.just(["t"])})),
}


@st.composite
def a_conversation(draw, texts) -> dict:
    """prompt / chosen / rejected as a conversation: mostly well formed (a shared history, assistant answers, a
    prompt that may repeat the first user turn), sometimes not, in each way the parser checks."""
    roles = st.sampled_from(["user", "assistant", "system", "tool", "Assistant", None])
    message = st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, st.none())})
    if not draw(st.integers(0, 9)):
        message = st.one_of(message, st.none(), st.just({"role": "user"}), st.just({"from": "human", "value": "q"}),
                            st.just({"role": "user", "content": "q", "name": "x"}), st.just({"role": "user", "content": 1}))
    history = draw(st.lists(message, max_size=3))
    answer = st.fixed_dictionaries({"role": st.sampled_from(["assistant"] * 6 + ["user", None]), "content": texts})
    chosen = history + draw(st.lists(answer, min_size=1, max_size=1) if draw(st.integers(0, 9)) else st.just([]))
    rejected = (history if draw(st.integers(0, 5)) else draw(st.lists(message, max_size=2))) + [draw(answer)]
    users = [m.get("content") for m in history if isinstance(m, dict) and m.get("role") == "user"]
    first = users[0] if users and isinstance(users[0], str) else "q"
    prompt = draw(st.one_of(texts, st.none(), st.sampled_from([first, f" {first}\n", f"\x1c{first}", f"{first}."])))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@st.composite
def a_line(draw, extras=(), conversational=False) -> bytes:
    """A pair line with some of `extras`, mostly good, sometimes broken in one of the ways files break."""
    pair = draw(a_conversation(text)) if conversational else {
        "prompt": draw(text), "chosen": draw(text), "rejected": draw(text)}
    if conversational and not draw(st.integers(0, 4)):
        del pair["prompt"]
    pair.update({k: draw(EXTRA_VALUES[k]) for k in extras if draw(st.integers(0, 9))})
    line = _dump(pair, draw(st.booleans()))
    kind = draw(st.integers(0, 30))
    if kind == 1:
        line = line[: draw(st.integers(0, len(line)))]  # truncated
    elif kind == 2:
        line = _dump({**pair, draw(st.sampled_from(["system", "x", "score_chosen"])): draw(text)}, True)
    elif kind == 3:
        line = _dump({**pair, draw(st.sampled_from(list(pair))): draw(
            st.one_of(st.none(), st.integers(), st.floats(), st.lists(text, max_size=2), st.booleans()))}, True)
    elif kind == 4:
        line = _dump({k: v for k, v in pair.items() if draw(st.booleans())}, True)  # missing keys
    elif kind == 5:
        line = line[:-1] + b', "prompt": "dup"}'  # duplicate key: Python keeps the last
    elif kind == 6:
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\t", b"\r", b"\x01",
                                                 b" ", b"\n", b"\xef\xbb\xbf", b"}", b"{"])) + line[at:]
    elif kind == 7:
        line = line + line  # two objects on one line
    elif kind == 8:
        line = draw(st.sampled_from([b"", b"   ", b"[1, 2]", b'"text"', b"null", b"{}", b"NaN", b"\xef\xbb\xbf" + line,
                                     b"  " + line, line + b"  ", line.replace(b", ", b",\t")]))
    elif kind == 9:
        line = _dump({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "assistant", "content": "b"}]}, True)  # another format's record
    return line + draw(st.sampled_from([b"\n"] * 6 + [b"\r\n"]))


lines_of_a_file = st.tuples(st.lists(st.sampled_from(list(EXTRA_VALUES)), max_size=4, unique=True),
                            st.booleans()).flatmap(lambda a: st.lists(a_line(*a), max_size=14))


@SETTINGS
@given(lines=lines_of_a_file, batch_rows=st.sampled_from([1, 2, 3, 5, 1000]),
       fmt=st.sampled_from(["auto", "trl_standard", "trl_conversational", "ultrafeedback"]),
       last_newline=st.booleans(), gz=st.booleans(),
       read_bytes=st.sampled_from([1, 7, 64, bulk_ingest.READ_BYTES]))
def test_bulk_reading_gives_the_rows_of_line_by_line_reading(tmp_path, monkeypatch, lines, batch_rows, fmt,
                                                             last_newline, gz, read_bytes):
    monkeypatch.setattr(bulk_ingest, "READ_BYTES", read_bytes)  # lines cut across the reader's blocks
    data = b"".join(lines)
    if not last_newline:
        data = data.rstrip(b"\r\n")
    path = tmp_path / ("p.jsonl.gz" if gz else "p.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    assert_bulk_reads_as_records(path, fmt, batch_rows)


def _batch(lines):
    data = b"".join(lines)
    return data, np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)


def test_only_the_lines_arrow_cannot_read_as_python_does_go_line_by_line(tmp_path):
    good = [_dump({"prompt": f"q{i}", "chosen": "a\u00e9", "rejected": "b"}, i % 2 == 0) + b"\n" for i in range(40)]
    bad = {3: b'{"prompt": "q", "chosen": 5, "rejected": "b"}\n',       # a number: Arrow refuses, stops here
           9: b'{"prompt": "q", "chosen": "a", "rejected": "b"\n',       # truncated: fails the shape screen
           17: b'{"prompt": null, "chosen": "a", "rejected": "b"}\n',    # null: parsed, then sent back
           25: b'{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}\n',  # lone surrogate
           31: b'{"prompt": "q", "chosen": "a", "rejected": "b", "prompt": "z"}\n',  # duplicate key
           35: b'  {"prompt": "q", "chosen": "a", "rejected": "b"}\n'}  # leading blanks: the line reader takes it
    two_objects = b'{"prompt": "q", "chosen": "a", "rejected": "b"} {"prompt": "q", "chosen": "a", "rejected": "b"}\n'

    lines = [bad.get(i, line) for i, line in enumerate(good)]
    bulk, slow = _bulk(*_batch(lines), 1, "f.jsonl", STANDARD)
    assert slow.tolist() == sorted(bad)
    assert bulk.height == len(lines) - len(bad)
    # Arrow reads two objects on one line as two rows; the segment it sits in goes line by line
    bulk, slow = _bulk(*_batch([*lines[:38], two_objects, *lines[39:]]), 1, "f.jsonl", STANDARD)
    assert 38 in slow.tolist() and bulk.height + len(slow) == len(lines)
    out = batch_table(*_batch(lines), 1, "f.jsonl", "trl_standard", STANDARD)
    assert out["source_row"].to_list() == list(range(1, 41))
    assert out.filter(pl.col("error").is_not_null())["source_row"].to_list() == [4, 10, 18, 26]
    (tmp_path / "f.jsonl").write_bytes(b"".join(lines))
    assert out.equals(records_to_table(iter_records(tmp_path / "f.jsonl"), "f.jsonl", "trl_standard"))
    assert out.filter(pl.col("source_row") == 32)["prompt"].to_list() == [[{"role": "user", "content": "z"}]]


def test_bytes_that_are_not_utf8_send_the_batch_line_by_line_and_are_reported():
    lines = [b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n', b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}\n']
    out = batch_table(*_batch(lines), 1, "f.jsonl", "trl_standard", STANDARD)
    assert out["error"].to_list() == [None, "f.jsonl:2: not UTF-8: byte 0xff at column 14"]


def test_a_large_clean_file_is_read_in_bulk_batches(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "x" * int(rng.integers(1, 50)),
                                        "rejected": "é"}) + "\n" for i in range(20_000)))
    tables = list(iter_file_tables(path, path.name, batch_rows=6_000))
    assert [t.height for t in tables] == [6_000, 6_000, 6_000, 2_000]
    assert pl.concat(tables).equals(records_to_table(iter_records(path), path.name))


def test_a_truncated_gzip_file_fails_naming_the_file_after_its_readable_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk_ingest, "READ_BYTES", 1 << 16)
    rng = np.random.default_rng(0)
    packed = gzip.compress(b"".join(json.dumps({"prompt": str(rng.random()), "chosen": "a", "rejected": "b"}).encode()
                                    + b"\n" for _ in range(20_000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    got = []
    with pytest.raises(PreferenceFormatError, match=r"cut\.jsonl\.gz: unreadable after line \d+"):
        for table in iter_file_tables(path, path.name, batch_rows=1_000):
            got.append(table)
    assert sum(t.height for t in got) > 0


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


def test_only_plain_extra_keys_and_numeric_scores_allow_bulk_reading():
    base = {"prompt": "q", "chosen": "a", "rejected": "b"}
    schema = parse_options({**base, "id": 7, "source": "web", "ok": True, "system": None, "note": None,
                            "score_chosen": 9, "score_rejected": None,
                            "metadata": {"chosen-rating": 4.5, "rejected-rating": 1, "model": "m"}}).explicit_schema
    assert [(f.name, str(f.type)) for f in schema] == [
        ("prompt", "string"), ("chosen", "string"), ("rejected", "string"), ("id", "int64"), ("source", "string"),
        ("ok", "bool"), ("system", "null"), ("note", "null"), ("score_chosen", "double"), ("score_rejected", "double"),
        ("metadata", "struct<chosen-rating: double, rejected-rating: double, model: string>")]
    for extra in ({"system": "be brief"}, {"score_chosen": "2"}, {"score_chosen": True}, {"metadata": "x"},
                  {"metadata": {"tags": ["x"]}}, {"id": 1.5}, {"id": 2**63}, {"tags": ["x"]}, {"meta": {"a": 1}}):
        assert parse_options({**base, **extra}) is None, extra


def test_scores_read_in_bulk_are_the_line_readers(tmp_path):
    """UltraFeedback with text answers: scores at top level or under metadata, the first complete pair wins."""
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": i / 3, "score_rejected": 1}}
            for i in range(30)]
    rows[4]["metadata"] = None
    rows[5]["metadata"] = {"score_chosen": 2}                  # half a pair under metadata: skipped, no scores
    rows[6]["metadata"] = {"score_chosen": 1e400, "score_rejected": 1}  # inf: an error
    rows[7]["metadata"] = {"score_chosen": None, "score_rejected": 3}  # a null half: no scores
    path = tmp_path / "uf.jsonl"
    rows[8]["metadata"] = {"score_chosen": "<digits>", "score_rejected": 1}  # 5,000 digits: Python refuses the line
    rows[9]["metadata"] = {"score_chosen": -1, "score_rejected": "<400 digits>"}  # Arrow: inf; Python: not a number
    path.write_text("".join(json.dumps(r) + "\n" for r in rows).replace("Infinity", "1e400")
                    .replace('"<digits>"', "9" * 5000).replace('"<400 digits>"', "9" * 400))
    expected = records_to_table(iter_records(path), path.name)
    assert expected["format"].unique().to_list() == ["ultrafeedback"]
    assert expected["score_chosen"][3] == 1.0
    assert [e is not None for e in expected["error"][6:10]] == [True, False, True, True]
    got = pl.concat(iter_file_tables(path, path.name, batch_rows=8))
    assert got.equals(expected)


# ---- parquet

storable = st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
                     st.sampled_from([t for t in TRICKY if "\ud800" not in t and "\udfff" not in t]))
maybe_text = st.one_of(st.none(), storable)
maybe_number = st.one_of(st.none(), st.integers(-5, 5), st.floats(), st.just(float("nan")), st.just(float("inf")))
TEXT = ("prompt", "chosen", "rejected")
MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
COLUMNS = {  # column -> (dtype, values), a few alternatives each
    "prompt": [(pl.String, maybe_text), (pl.Int64, st.one_of(st.none(), st.integers(0, 3)))],
    "chosen": [(pl.String, maybe_text), (pl.List(pl.String), st.one_of(st.none(), st.lists(storable, max_size=2)))],
    "rejected": [(pl.String, maybe_text)],
    "score_chosen": [(pl.Float64, maybe_number), (pl.Int32, st.one_of(st.none(), st.integers(-5, 5))),
                     (pl.String, maybe_text), (pl.Boolean, st.one_of(st.none(), st.booleans()))],
    "score_rejected": [(pl.Float64, maybe_number), (pl.Int64, st.one_of(st.none(), st.integers(-5, 5)))],
    "chosen_rating": [(pl.Float32, maybe_number)],
    "rejected_rating": [(pl.Float64, maybe_number)],
    "metadata": [(pl.Struct({"score_chosen": pl.Float64, "score_rejected": pl.Int64, "model": pl.String}),
                  st.one_of(st.none(), st.fixed_dictionaries({"score_chosen": maybe_number,
                                                              "score_rejected": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
                                                              "model": maybe_text}))),
                 (pl.String, maybe_text)],
    "system": [(pl.String, maybe_text), (pl.Int64, st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)))],
    "id": [(pl.Int64, st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)))],
}


@st.composite
def a_parquet_table(draw) -> pl.DataFrame:
    names = ["prompt", "chosen", "rejected"] + draw(st.lists(st.sampled_from(list(COLUMNS)[3:]), max_size=4,
                                                                unique=True))
    n = draw(st.integers(0, 9))
    columns = {}
    if draw(st.booleans()):  # conversations: message lists (their odd messages are nulls, not other types)
        rows = [draw(a_conversation(storable)) for _ in range(n)]
        for row in rows:
            for key in ("chosen", "rejected"):
                row[key] = [m if m is None else {"role": m.get("role"), "content": m.get("content")}
                            for m in row[key] if m is None or isinstance(m.get("content", ""), str | None)]
        columns["chosen"] = pl.Series("chosen", [r["chosen"] for r in rows], dtype=MESSAGES)
        columns["rejected"] = pl.Series("rejected", [r["rejected"] for r in rows], dtype=MESSAGES)
        if draw(st.integers(0, 4)):
            columns["prompt"] = pl.Series("prompt", [r["prompt"] for r in rows], dtype=pl.String)
        names = [k for k in names if k not in TEXT]
    for name in names:
        dtype, values = draw(st.sampled_from(COLUMNS[name][:1] * 4 + COLUMNS[name][1:]))
        columns[name] = pl.Series(name, draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype, strict=False)
    return pl.DataFrame(columns)


ALIASES = {"prompt": "question", "chosen": "good", "rejected": "bad", "metadata": "meta", "score_chosen": "s1"}


@SETTINGS
@given(table=a_parquet_table(), batch_rows=st.sampled_from([1, 2, 3, 1000]),
       fmt=st.sampled_from(["auto", "trl_standard", "ultrafeedback", "trl_conversational"]),
       renames=st.lists(st.sampled_from(list(ALIASES)), unique=True, max_size=3),
       odd_mapping=st.dictionaries(st.sampled_from([*COLUMNS, "question", "absent"]), st.sampled_from(list(COLUMNS)),
                                   max_size=2))
def test_bulk_parquet_reading_gives_the_rows_of_row_by_row_reading(tmp_path, table, batch_rows, fmt, renames,
                                                                   odd_mapping):
    """Also with a column_mapping: columns renamed in the file and mapped back, and arbitrary mappings (to a
    column that exists, from one that does not, two to one)."""
    path = tmp_path / "p.parquet"
    table.rename({k: ALIASES[k] for k in renames if k in table.columns}).write_parquet(path)
    mapping = {ALIASES[k]: k for k in renames} | (odd_mapping if len(renames) < 2 else {})
    assert_bulk_reads_as_records(path, fmt, batch_rows, mapping or None)


def test_a_parquet_file_of_text_pairs_goes_in_bulk_with_only_its_odd_rows_row_by_row(tmp_path):
    n = 2_000
    table = pl.DataFrame({"prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n, "rejected": ["b"] * n,
                          "metadata": [{"score_chosen": i % 7, "score_rejected": 3.5} for i in range(n)]})
    table = table.with_columns(prompt=pl.when(pl.int_range(n) == 5).then(None).otherwise("prompt"))
    path = tmp_path / "uf.parquet"
    table.write_parquet(path)
    from orpo_pipeline.data.bulk_ingest import frame_table

    out = frame_table(table, 1, "uf.parquet", "ultrafeedback")
    assert out.equals(records_to_table(iter_records(path), "uf.parquet"))
    assert out["error"].drop_nulls().to_list() == ["uf.parquet:6: missing field 'prompt'"]
    assert out["score_chosen"][:3].to_list() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_conversations_read_in_bulk_are_the_parsers(tmp_path, ext):
    """trl_conversational rows: the prompt is added unless it repeats the first user turn (compared as Python
    strips, where U+001C is whitespace), the last turns are the answers, and faulty rows get the parser's error."""
    from orpo_pipeline.data.bulk_pairs import bulk_rows

    def conv(prompt, last="assistant", other_history=False):
        history = [{"role": "system", "content": "s"}, {"role": "user", "content": " q "}]
        return {"prompt": prompt, "chosen": [*history, {"role": last, "content": "a"}],
                "rejected": [*(history[:1] if other_history else history), {"role": "assistant", "content": "b"}]}

    rows = [conv("q"), conv("\x1cq"), conv("other"), conv(None), conv("q", last="user"), conv("q", other_history=True)]
    rows = rows * 50
    path = tmp_path / f"c.{ext}"
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pl.DataFrame(rows).write_parquet(path)
    expected = records_to_table(iter_records(path), path.name)
    assert expected["format"].unique().to_list() == ["trl_conversational"]
    assert expected["prompt"][:4].to_list() == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": " q "}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": " q "}],
        [{"role": "user", "content": "other"}, {"role": "system", "content": "s"}, {"role": "user", "content": " q "}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": " q "}]]
    assert expected["error"][4:6].is_not_null().all()
    assert pl.concat(iter_file_tables(path, path.name, batch_rows=100)).equals(expected)
    _, slow = bulk_rows(pl.read_parquet(path) if ext == "parquet" else pl.read_ndjson(path),
                        np.arange(1, len(rows) + 1), path.name, "trl_conversational", halves_known=ext == "parquet")
    assert np.flatnonzero(slow).tolist() == [i for i in range(len(rows)) if i % 6 in (1, 4, 5)]


def test_a_file_whose_first_records_hold_no_pair_is_read_line_by_line_with_the_same_rows(tmp_path, monkeypatch):
    lines = ['{"prompt": "q"}', "not json", '{"chosen": "a"}'] + [
        json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) for i in range(5)]
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert bulk_ingest._options_for(path) is not None  # found at the fourth record
    monkeypatch.setattr(bulk_ingest, "SCHEMA_SEARCH_RECORDS", 3)
    assert bulk_ingest._options_for(path) is None  # not looked for further: no bulk parse
    for fmt in ("trl_standard", "auto"):
        assert_bulk_reads_as_records(path, fmt, batch_rows=4)
