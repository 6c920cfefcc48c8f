"""Property-based: whatever lands in a preference file, ingest + cleaning never crash and never lose a row.

The only exception allowed is PreferenceFormatError, and it must name the file.
"""

import copy
import csv
import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orpo_pipeline.data.clean import clean_preferences, rows_accounting
from orpo_pipeline.data.ingest import FORMATS, PreferenceFormatError, iter_records, records_to_table

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = [
    "prompt", "chosen", "rejected", "conversations", "system", "instruction", "input", "question",
    "response_a", "response_b", "output_1", "output_2", "response_0", "response_1", "preference", "labels",
    "annotations", "winner", "score_chosen", "score_rejected", "chosen-rating", "rejected-rating", "metadata",
]
TRICKY = ["", " ", "\ud800", "\udfff", "e\u0301", "\u00a0x\u200b", "\r\n", "\n\nHuman: hi", "\n\nAssistant: yo",
          "Human:", "a", "b", "tie", "1", "2", "nan", "inf", "1e400", "gpt", "human", "user", "assistant", "system"]

text = st.one_of(st.text(st.characters(categories=["Cs", "L", "N", "P", "Z", "Cc"]), max_size=12), st.sampled_from(TRICKY))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYS), text), inner, max_size=3)),
    max_leaves=10,
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "model", "tool"]), json_values)
message = st.one_of(
    st.fixed_dictionaries({}, optional={"role": role, "content": st.one_of(text, json_values)}),
    st.fixed_dictionaries({}, optional={"from": role, "value": st.one_of(text, json_values)}),
)
transcript = st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "H"]), text), max_size=4).map(
    lambda turns: "".join(f"\n\n{who}: {what}" for who, what in turns)
)
field_value = st.one_of(json_values, st.lists(message, max_size=3), message, transcript,
                        st.sampled_from(["a", "b", "tie", 0, 1, 2, 3, ["a", "b"], ["b"]]))

TEMPLATES = {
    "trl_standard": {"prompt": "q", "chosen": "a", "rejected": "b", "system": "s"},
    "trl_conversational": {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    "hh_rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: x\n\nHuman: q2\n\nAssistant: a",
                "rejected": "\n\nHuman: q\n\nAssistant: x\n\nHuman: q2\n\nAssistant: b"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"},
                                   {"from": "human", "value": "q2"}],
                 "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}, "system": "s"},
    "pairwise": {"instruction": "q", "input": "i", "output_1": "a", "output_2": "b",
                 "annotations": [{"annotator": "x", "preference": 1}, {"annotator": "y", "preference": "2"}, "a"]},
    "ultrafeedback": {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
                      "metadata": {"score_chosen": 2.5, "score_rejected": 1}, "chosen-rating": 3, "rejected-rating": 1},
}


@st.composite
def corrupted(draw, value):
    """`value` with some nodes, at any depth, replaced by anything; some keys dropped, some texts made odd."""
    if draw(st.integers(0, 5)) == 0:
        return draw(field_value)
    if isinstance(value, dict):
        return {k: draw(corrupted(v)) for k, v in value.items() if draw(st.integers(0, 7))}
    if isinstance(value, list):
        return [draw(corrupted(v)) for v in value]
    if isinstance(value, str) and draw(st.booleans()):
        return draw(st.sampled_from(["", value + draw(st.sampled_from(TRICKY)), draw(text)]))
    return value


def mutated_template():
    """A valid record of some format, corrupted: reaches deep into each parser."""
    return st.sampled_from(list(TEMPLATES.values())).flatmap(corrupted)


records = st.one_of(mutated_template(), st.dictionaries(st.sampled_from(KEYS), field_value, max_size=5))
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    text.map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates make invalid UTF-8
    st.binary(max_size=20),
)
formats = st.sampled_from(["auto", *FORMATS])


def check(path, fmt="auto"):
    """Read and clean one file; assert the invariants. Returns the raw table, or None after a format error."""
    try:
        raw = records_to_table(iter_records(path), path.name, fmt)
    except PreferenceFormatError as e:
        assert path.name in str(e)
        return None
    result = clean_preferences(raw, min_score_margin=0.5)
    assert len(raw) == len(result.kept) + len(result.rejects)
    assert rows_accounting(raw, result)["balanced"].all()
    for row in raw.filter(pl.col("error").is_not_null()).iter_rows(named=True):
        assert row["error"].startswith(f"{path.name}:{row['source_row']}: ")
        assert row["prompt"] is None and row["chosen"] is None
    kept = result.kept
    assert kept.filter(pl.col("chosen") == pl.col("rejected")).is_empty()
    assert kept.filter((pl.col("chosen") == "") | (pl.col("rejected") == "") | (pl.col("prompt").list.len() == 0)).is_empty()
    assert set(result.rejects["detail"].str.contains(path.name, literal=True)) <= {True}
    return raw


@SETTINGS
@given(body=st.lists(lines, max_size=8), fmt=formats)
def test_any_jsonl_lines(tmp_path, body, fmt):
    path = tmp_path / "random.jsonl"
    data = b"\n".join(body)
    path.write_bytes(data)
    try:
        raw = records_to_table(iter_records(path), path.name, fmt)
    except PreferenceFormatError as e:
        assert fmt == "auto"  # a named format never needs detection: bad rows become rejects
        assert "match no known preference format" in str(e) and "known formats" in str(e)
        return
    assert len(raw) == sum(1 for line in data.split(b"\n") if line.strip())
    assert check(path, fmt) is not None


@SETTINGS
@given(
    content=st.one_of(
        st.lists(st.one_of(records, records, json_values), max_size=6),
        st.fixed_dictionaries({"data": st.lists(records, max_size=4)}),
        json_values,
    ),
    fmt=formats,
)
def test_any_json_document(tmp_path, content, fmt):
    path = tmp_path / "random.json"
    try:
        path.write_text(json.dumps(content, allow_nan=False))
        standard = True
    except ValueError:  # NaN and Infinity are not JSON: an array holding one is refused, naming the file
        path.write_text(json.dumps(content))
        standard = False
    raw = check(path, fmt)
    items = content["data"] if isinstance(content, dict) and isinstance(content.get("data"), list) else content
    if not standard and isinstance(content, list):
        assert raw is None
    elif raw is not None:
        assert isinstance(items, list) and len(raw) == len(items)
    elif fmt != "auto":
        assert not isinstance(items, list)  # a named format only fails on a file that is not a record array


@SETTINGS
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]))
def test_any_bytes(tmp_path, data, suffix):
    path = tmp_path / f"bytes{suffix}"
    path.write_bytes(data)
    check(path)


@SETTINGS
@given(
    header=st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True),
    rows=st.lists(st.lists(text, max_size=8), max_size=5),
    fmt=formats,
)
def test_any_csv_cells(tmp_path, header, rows, fmt):
    path = tmp_path / "random.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    check(path, fmt)


@pytest.mark.parametrize(("name", "fmt"), [(n, f) for n in TEMPLATES for f in ("auto", n)])
@SETTINGS
@given(data=st.data())
def test_any_corruption_of_each_format(tmp_path, name, fmt, data):
    batch = data.draw(st.lists(corrupted(TEMPLATES[name]), min_size=1, max_size=4))
    path = tmp_path / "corrupt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in batch))
    raw = check(path, fmt)
    assert raw is None or len(raw) == len(batch)


@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
@SETTINGS
@given(batch=st.lists(records, min_size=1, max_size=5))
def test_any_python_records(batch, fmt):
    """What a Hugging Face dataset hands over: dicts with any values, no file involved."""
    try:
        raw = records_to_table(enumerate(batch, start=1), "hf[train]", fmt)
    except PreferenceFormatError as e:
        assert fmt == "auto" and "hf[train]" in str(e)
        return
    result = clean_preferences(raw)
    assert len(raw) == len(batch) == len(result.kept) + len(result.rejects)


HUGE = 10**5000  # json.dumps refuses it; written into the file by hand
FAULTS = [None, 1, 2.5, True, float("inf"), 10**400, HUGE, "", " ", "\ud800", "tie", {}, {"x": 1}, [], ["x"], [{"role": 1}], [[]]]


def node_paths(value, prefix=()):
    """Every place in a nested record: ("chosen",), ("chosen", 0, "content"), ..."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from node_paths(child, prefix + (key,))


def to_json(value):
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return "__HUGE__" if value is HUGE else value


def with_fault(record, path, fault):
    out = copy.deepcopy(record)
    *parents, last = path
    target = out
    for key in parents:
        target = target[key]
    if fault is DELETE:
        del target[last]
    else:
        target[last] = fault
    return out


DELETE = object()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_single_fault_in_every_place(tmp_path, name):
    """Exhaustive complement to the random tests: each node of a valid record, replaced by each odd value or deleted."""
    template = TEMPLATES[name]
    places = [p for p in node_paths(template) if p]
    batch = [template] + [with_fault(template, p, f) for p in places for f in FAULTS + [DELETE]]
    path = tmp_path / "faults.jsonl"
    lines = (json.dumps(to_json(r)) for r in batch)
    path.write_text("".join(line.replace('"__HUGE__"', "9" * 5000) + "\n" for line in lines))
    for fmt in ("auto", name):
        raw = check(path, fmt)
        assert raw is not None and len(raw) == len(batch)
        assert raw["error"][0] is None  # the untouched template itself reads fine
        in_memory = records_to_table(enumerate(batch, start=1), "hf[train]", fmt)  # as a HF dataset hands them over
        result = clean_preferences(in_memory)
        assert len(in_memory) == len(batch) == len(result.kept) + len(result.rejects)



parsed_prompt = st.one_of(st.none(), st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=8)}), max_size=3))


@SETTINGS
@given(st.lists(parsed_prompt, max_size=12))
def test_prompt_column_through_arrow_is_what_polars_builds_from_dicts(prompts):
    """Null prompts, empty lists and empty tables included."""
    from orpo_pipeline.data.ingest import RAW_SCHEMA, _message_lists

    assert _message_lists(prompts).equals(pl.Series("prompt", prompts, dtype=RAW_SCHEMA["prompt"]))


@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
def test_batches_concatenate_to_the_whole_table(batch_rows):
    from orpo_pipeline.config import SAMPLE_DATA_DIR
    from orpo_pipeline.data.ingest import iter_tables

    path = sorted(SAMPLE_DATA_DIR.glob("*.jsonl"))[0]
    tables = list(iter_tables(iter_records(path), path.name, batch_rows=batch_rows))
    whole = records_to_table(iter_records(path), path.name)
    assert all(t.height == batch_rows for t in tables[:-1]) and 0 < tables[-1].height <= batch_rows
    assert pl.concat(tables).equals(whole)
    assert [t.height for t in iter_tables([], "empty.jsonl", "trl_standard")] == [0]


def test_parquet_is_read_a_batch_at_a_time_with_rows_numbered_across_batches(tmp_path):
    n = 25_001  # three of the reader's 10k-row batches
    path = tmp_path / "big.parquet"
    pl.DataFrame({"prompt": [f"q{i}" for i in range(n)], "chosen": ["c"] * n, "rejected": ["r"] * n}).write_parquet(
        path, row_group_size=7_000)
    raw = records_to_table(iter_records(path), path.name)
    assert raw["source_row"].to_list() == list(range(1, n + 1))
    assert raw["prompt"].list.first().struct.field("content").to_list() == [f"q{i}" for i in range(n)]
