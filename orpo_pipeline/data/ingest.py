"""Records -> the raw table: one row per input record, the unusable ones included.

Every record becomes a row: those that cannot be used carry an `error` (file, row and field) and an
`error_reason`, so cleaning can put them in the rejects table instead of losing them. Formats are in
`formats`, file types in `readers`.
"""

from __future__ import annotations

import gc
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import polars as pl

from .formats import FORMATS, Pair, PreferenceFormatError, RowError, _match, parse
from .readers import MAX_RECORD_BYTES, SUFFIXES, iter_records, preference_files

__all__ = ["FORMATS", "MESSAGE", "RAW_SCHEMA", "SUFFIXES", "PreferenceFormatError", "RowError", "iter_records",
           "iter_tables", "iter_file_tables", "preference_files", "read_preference_dir", "records_to_table"]

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
RAW_SCHEMA = {
    "source_file": pl.String,
    "source_row": pl.Int64,
    "prompt": pl.List(MESSAGE),
    "chosen": pl.String,
    "rejected": pl.String,
    "score_chosen": pl.Float64,
    "score_rejected": pl.Float64,
    "error": pl.String,
    "error_reason": pl.String,  # the rejects reason for `error`: unparseable, annotator_tie
    "format": pl.String,  # the format the file was read as
}
# rows parsed into one table at a time by iter_tables: memory follows this, not the file
BATCH_ROWS = 50_000


def _no_format(record: dict, where: str) -> PreferenceFormatError:
    return PreferenceFormatError(
        f"{where}: columns {sorted(map(str, record))} match no known preference format; "
        f"known formats: {list(FORMATS)}. Pick a format explicitly (format), or rename columns "
        "(column_mapping, e.g. {'question': 'prompt', 'good': 'chosen', 'bad': 'rejected'})."
    )


def parser_for(fmt: str) -> Callable[[dict], Pair] | None:
    """The parser of a named format; None for auto (detected per file)."""
    if fmt == "auto":
        return None
    if fmt not in FORMATS:
        raise PreferenceFormatError(f"unknown format {fmt!r}; known formats: {['auto', *FORMATS]}")
    return FORMATS[fmt][1]


def detect(records: Iterator[tuple[int, dict | RowError]], where: str) -> tuple[str | None, Iterator]:
    """The format of the first record that has one, and all records again (those read to find it first)."""
    seen = []
    for item in records:
        seen.append(item)
        if isinstance(item[1], dict) and (name := _match(item[1])):
            return name, itertools.chain(seen, records)
    first = next((rec for _, rec in seen if isinstance(rec, dict)), None)
    if first is not None:
        raise _no_format(first, where)
    return None, iter(seen)  # nothing but unreadable records: each is already a reject


def apply_mapping(rec: dict | RowError, column_mapping: dict[str, str] | None) -> dict | RowError:
    """Columns renamed ({source: target}); sources mapped to `name[]` are gathered into the list `name`, in the
    mapping's order (absent sources left out): {"a1": "labels[]", "a2": "labels[]"} -> labels = [a1, a2]."""
    if not column_mapping or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in column_mapping}
    for src, dst in column_mapping.items():
        if dst.endswith("[]"):
            out.setdefault(dst[:-2], [])
            if src in rec:
                out[dst[:-2]].append(rec[src])
        elif src in rec:
            out[dst] = rec[src]
    return out


def _message_lists(prompts: list[list[dict[str, str]] | None]) -> pl.Series:
    """The prompt column, built from flat role/content columns and list offsets through Arrow: polars builds a
    List(Struct) from Python dicts one row at a time, which halved ingest speed."""
    import numpy as np
    import pyarrow as pa

    offsets, roles, contents, missing = [0], [], [], []
    for messages in prompts:
        missing.append(messages is None)
        for m in messages or ():
            roles.append(m["role"])
            contents.append(m["content"])
        offsets.append(len(roles))
    flat = pl.DataFrame({"role": roles, "content": contents}, schema=MESSAGE.to_schema())
    messages = flat.to_struct("m").to_arrow(compat_level=pl.CompatLevel.newest())
    lists = pa.LargeListArray.from_arrays(pa.array(np.array(offsets, dtype=np.int64)), messages,
                                          mask=pa.array(np.array(missing, dtype=bool)) if any(missing) else None)
    return pl.Series("prompt", lists).cast(RAW_SCHEMA["prompt"])


NO_PAIR = Pair(None, None, None, None, None)


def _without_surrogates(rows: list[tuple]) -> list[tuple]:
    """Rows whose text holds a lone surrogate (a JSON "\\ud800" escape read by Python) made rejects naming the
    field; looked for only when polars refuses a batch (orjson never returns one)."""
    def bad(pair: Pair) -> str | None:
        texts = [("prompt", m["content"]) for m in pair.prompt or ()] + [("chosen", pair.chosen),
                                                                         ("rejected", pair.rejected)]
        texts += [("prompt", m["role"]) for m in pair.prompt or ()]
        for field, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return field
        return None

    out = []
    for n, pair, error in rows:
        field = None if pair is NO_PAIR else bad(pair)
        out.append((n, pair, error) if field is None else
                   (n, NO_PAIR, RowError(f"field '{field}': not valid Unicode (lone surrogate)")))
    return out


def _table(rows: list[tuple], source: str, fmt: str | None) -> pl.DataFrame:
    try:
        return _columns(rows, source, fmt)
    except UnicodeEncodeError:
        return _columns(_without_surrogates(rows), source, fmt)


def _columns(rows: list[tuple], source: str, fmt: str | None) -> pl.DataFrame:
    columns = {
        "source_file": pl.repeat(source, len(rows), dtype=pl.String, eager=True),
        "source_row": [r[0] for r in rows], "prompt": [None] * len(rows),
        **{name: [r[1][i] for r in rows] for i, name in
           ((1, "chosen"), (2, "rejected"), (3, "score_chosen"), (4, "score_rejected"))},
        "error": [r[2] and f"{source}:{r[0]}: {r[2]}" for r in rows],
        "error_reason": [r[2] and r[2].reason for r in rows],
        "format": pl.repeat(fmt, len(rows), dtype=pl.String, eager=True),
    }
    return pl.DataFrame(columns, schema=RAW_SCHEMA).with_columns(_message_lists([r[1][0] for r in rows]))


def iter_tables(
    records: Iterable[tuple[int, dict | RowError]],
    source: str,
    fmt: str = "auto",
    column_mapping: dict[str, str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pl.DataFrame]:
    """Parse records of one source into raw-table rows, `batch_rows` at a time (at least one table, maybe empty);
    bad records keep their error. The format is detected once, from the first record that matches one."""
    parser = parser_for(fmt)
    if column_mapping:
        records = ((n, apply_mapping(rec, column_mapping)) for n, rec in records)
    if parser is None:
        fmt, records = detect(records, source)
        parser = FORMATS[fmt][1] if fmt else None
    rows: list[tuple] = []  # (row number, Pair or NO_PAIR, RowError or None); columns are cut per batch
    yielded = False
    # The cyclic collector would scan every record of the growing batch again and again (a third of the reading
    # time); parsing makes no cycles but a rejected row's traceback, collected once the batch is out.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for row_no, rec in records:
            pair, error = parse(rec, parser)
            rows.append((row_no, pair or NO_PAIR, error))
            if len(rows) >= batch_rows:
                table, rows, yielded = _table(rows, source, fmt), [], True
                if collecting:
                    gc.enable()
                yield table
                gc.disable()
    finally:
        if collecting:
            gc.enable()
    if rows or not yielded:
        yield _table(rows, source, fmt)


def records_to_table(
    records: Iterable[tuple[int, dict | RowError]],
    source: str,
    fmt: str = "auto",
    column_mapping: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Parse records of one source into raw-table rows; bad records keep their error."""
    return pl.concat(iter_tables(records, source, fmt, column_mapping))


def iter_file_tables(
    path: Path,
    source: str,
    fmt: str = "auto",
    column_mapping: dict[str, str] | None = None,
    batch_rows: int = BATCH_ROWS,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[pl.DataFrame]:
    """One file's raw rows, `batch_rows` at a time."""
    return iter_tables(iter_records(path, max_record_bytes), source, fmt, column_mapping, batch_rows)


def read_preference_dir(data_dir: Path, fmt: str = "auto", column_mapping: dict[str, str] | None = None) -> pl.DataFrame:
    data_dir = Path(data_dir)
    return pl.concat([records_to_table(iter_records(p), str(p.relative_to(data_dir)), fmt, column_mapping)
                      for p in preference_files(data_dir)])
