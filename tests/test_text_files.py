"""JSON arrays and CSV files read a record at a time (`text_files`) give exactly what reading them whole gave:
the same values, the same errors at the same line and column, wherever the chunks end, without holding the file."""

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orpo_pipeline.data import text_files
from orpo_pipeline.data.ingest import PreferenceFormatError, iter_records
from orpo_pipeline.data.text_files import TextFileError, iter_csv_rows, iter_json_array, utf8_error_offset

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.one_of(st.text(max_size=6), st.sampled_from(["\\", '"', "\n", "\u00e9", "\U0001f600", "\ud800", "]", ","]))
numbers = st.one_of(st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(text, inner, max_size=3)), max_leaves=8)
layout = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}, {"indent": 0}])
# where a chunk ends: inside every kind of token, and past the 16-character window of a cut token
chunks = st.sampled_from([1, 2, 3, 5, 8, 13, 17, 31, 64, 4096])


def whole(doc: str):
    """What json.loads says of the document: ("ok", values) or ("error", message) in text_files' words."""
    try:
        data = json.loads(doc)
    except json.JSONDecodeError as e:
        return "error", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    except ValueError as e:
        return "error", f"malformed JSON: {str(e)[:80]}"
    except RecursionError:
        return "error", "malformed JSON: nested too deeply"
    return "ok", json.dumps(data)  # NaN != NaN, so compare the values as text


def streamed(doc: str, chunk: int, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_CHARS", chunk)
    try:
        return "ok", json.dumps(list(iter_json_array(io.StringIO(doc))))
    except TextFileError as e:
        return "error", str(e)


@st.composite
def json_arrays(draw):
    """A JSON array as some writer lays it out, then maybe broken: a character changed, added or dropped, or the
    text cut short. Broken texts that no longer start with an array are not iter_json_array's to read."""
    doc = json.dumps(draw(st.lists(values, max_size=5)), **draw(layout))
    doc = draw(st.sampled_from(["", " ", "\n", "\r\n\t"])) + doc + draw(st.sampled_from(["", "\n", " x", "[]", ","]))
    edit = draw(st.sampled_from(["none", "replace", "insert", "delete", "cut"]))
    if edit != "none" and len(doc) > 1:
        at = draw(st.integers(1, len(doc) - 1))
        c = draw(st.sampled_from(list(',:[]{}"\\ \n0-e.tfn') + ["\x00", "\u00e9"]))
        doc = {"replace": doc[:at] + c + doc[at + 1:], "insert": doc[:at] + c + doc[at:],
               "delete": doc[:at] + doc[at + 1:], "cut": doc[:at]}[edit]
    return doc


@SETTINGS
@given(doc=json_arrays(), chunk=chunks)
def test_json_array_read_in_chunks_is_json_loads(doc, chunk, monkeypatch):
    if not doc.lstrip(" \t\n\r").startswith("["):
        return
    expected = whole(doc)
    if expected[0] == "ok" and not isinstance(json.loads(doc), list):
        return
    assert streamed(doc, chunk, monkeypatch) == expected


@pytest.mark.parametrize("doc", [
    "[1,]", "[1 2]", "[1", "[", '[{"a":1}', "[1] x", "[\n1,\n\n  ]", "[]", " [ ] ", "[1,2]  ", "[12345678901234567890]",
    "[true, fals]", "[-Infinity, NaN]", '["a\\u00e9\\u12"]', '["unterminated', "[1]\n\n  ]", "[[[[]]]]" + "]",
    "[" + "[" * 100_000 + "]" * 100_000 + "]", "[" + "9" * 5000 + "]", '[{"k": 1e400}]', "[1,\n2,\r\n3 4]",
])
@pytest.mark.parametrize("chunk", [1, 3, 16, 4096])
def test_json_array_edge_documents(doc, chunk, monkeypatch):
    assert streamed(doc, chunk, monkeypatch) == whole(doc)


class CountingText(io.StringIO):
    def __init__(self, doc: str):
        super().__init__(doc)
        self.chars = 0

    def read(self, n: int = -1) -> str:
        out = super().read(n)
        self.chars += len(out)
        return out


def test_a_json_array_is_read_as_it_is_used(monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_CHARS", 1000)
    records = [{"prompt": f"q{i}", "chosen": "a" * 50, "rejected": "b" * 50} for i in range(10_000)]
    f = CountingText(json.dumps(records, indent=1))
    elements = iter_json_array(f)
    for _ in range(100):
        next(elements)
    assert f.chars <= 100 * 150 + 2000  # about 100 records' worth, not the 1.5 MB file
    assert list(elements) == records[100:]


def test_a_csv_file_is_read_as_it_is_used(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerows([f"q{i}", "a\nb" * 20, "c,d" * 20] for i in range(50_000))
    with open(path, newline="") as f:
        rows = iter_csv_rows(f)
        next(rows)
        assert f.buffer.tell() < path.stat().st_size // 10  # what the text layer has taken from the file


cells = st.one_of(st.text(max_size=6), st.sampled_from(['"', '""', "\r", "\n", "\r\n", ",", "a\"b", "\x00", " "]))


@SETTINGS
@given(rows=st.lists(st.lists(cells, max_size=4), max_size=6), raw_tail=st.sampled_from(["", '\n"open', "\nx\x00y", "\n\"a\"b"]))
def test_csv_read_as_it_is_used_is_the_whole_file(rows, raw_tail):
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["prompt", "chosen", "rejected"], *rows])
    doc = buf.getvalue() + raw_tail
    reader = csv.DictReader(io.StringIO(doc, newline=""))
    try:
        expected = ("ok", [(reader.fieldnames, r) for r in list(reader)])
    except csv.Error as e:
        expected = ("error", f"malformed CSV at line {reader.line_num}: {e}")
    try:
        got = ("ok", list(iter_csv_rows(io.StringIO(doc, newline=""))))
    except TextFileError as e:
        got = ("error", str(e))
    assert got == expected


@SETTINGS
@given(data=st.binary(max_size=64), block=st.sampled_from([1, 2, 3, 7, 1 << 24]))
def test_utf8_error_offset_is_the_first_bad_byte(tmp_path, data, block):
    path = tmp_path / "b.bin"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
        expected = None
    except UnicodeDecodeError as e:
        expected = e.start
    assert utf8_error_offset(path, block) == expected


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_bytes_that_are_not_utf8_name_the_file_and_the_offset(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_CHARS", 8)
    body = b'[{"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": "\xff"}]' if suffix == ".json" else \
        b"prompt,chosen,rejected\nq,a,b\nq\xff,a,b\n"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body)  # after a BOM: the offset counts it, as a hex editor does
    with pytest.raises(PreferenceFormatError) as e:
        list(iter_records(path))
    offset = 3 + body.index(b"\xff")
    assert str(e.value) == f"{path}: not UTF-8 (byte offset {offset})"


def test_a_json_array_after_a_bom_and_other_documents_still_read(tmp_path):
    rec = {"prompt": "q", "chosen": "a", "rejected": "b"}
    cases = {
        "bom.json": b"\xef\xbb\xbf" + json.dumps([rec, 1]).encode(),
        "wrapped.json": json.dumps({"data": [rec]}).encode(),
        "lines.json": (json.dumps(rec) + "\n" + json.dumps(rec) + "\n").encode(),
    }
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
    assert [r for _, r in iter_records(tmp_path / "bom.json")][0] == rec
    assert str([r for _, r in iter_records(tmp_path / "bom.json")][1]) == "expected a JSON object, got int"
    assert [r for _, r in iter_records(tmp_path / "wrapped.json")] == [rec]
    assert [r for _, r in iter_records(tmp_path / "lines.json")] == [rec, rec]
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(PreferenceFormatError, match="scalar.json: expected a JSON array of records, got int"):
        list(iter_records(tmp_path / "scalar.json"))


def read_whole_as_before(path):
    """How ingest read a .json file before text_files: decoded and parsed whole."""
    from orpo_pipeline.data.ingest import RowError, _iter_jsonl, _type

    text = path.read_bytes().decode("utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _iter_jsonl(path)
        raise PreferenceFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except ValueError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON: {str(e)[:80]}") from e
    except RecursionError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON: nested too deeply") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PreferenceFormatError(f"{path}: expected a JSON array of records, got {_type(data)}")
    return ((i, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {_type(obj)}"))
            for i, obj in enumerate(data, start=1))


def outcome(read, path):
    try:
        return "ok", [(i, json.dumps(r) if isinstance(r, dict) else f"{type(r).__name__}: {r}") for i, r in read(path)]
    except PreferenceFormatError as e:
        return "error", str(e)


@st.composite
def json_documents(draw):
    """Whatever a .json file may hold: an array, {"data": [...]}, objects a line (JSON Lines under a .json
    name), a lone value; laid out any way, maybe broken as json_arrays breaks them."""
    records = st.lists(st.one_of(st.dictionaries(text, values, max_size=3), values), max_size=4)
    kind = draw(st.sampled_from(["array", "data", "lines", "value"]))
    if kind == "array":
        doc = draw(json_arrays())
    elif kind == "data":
        doc = json.dumps({"data": draw(records), **draw(st.dictionaries(text, values, max_size=1))}, **draw(layout))
    elif kind == "lines":
        doc = "\n".join(json.dumps(r) for r in draw(st.lists(st.dictionaries(text, values, max_size=3), max_size=4)))
    else:
        doc = json.dumps(draw(values))
    if kind != "array" and draw(st.booleans()) and len(doc) > 1:
        at = draw(st.integers(1, len(doc) - 1))
        doc = doc[:at] + draw(st.sampled_from(list(',:[]{}"\\ \n0x'))) + doc[at + 1:]
    return draw(st.sampled_from(["", "\n", "\ufeff", " \ufeff"])) + doc


@SETTINGS
@given(doc=json_documents(), chunk=chunks)
def test_a_json_file_reads_as_it_did_whole(tmp_path, doc, chunk, monkeypatch):
    path = tmp_path / "doc.json"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    monkeypatch.setattr(text_files, "CHUNK_CHARS", chunk)
    assert outcome(iter_records, path) == outcome(read_whole_as_before, path)
