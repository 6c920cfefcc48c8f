"""Preference files read in bulk wherever that gives the rows `ingest` gives record by record.

JSON Lines go through Arrow's JSON reader a batch of lines at a time; parquet batches (at the end) are typed
already. Either way the typed records become raw-table rows column-wise in `bulk_pairs`, which hands back the
records it cannot build exactly as ingest's parser would; those are parsed record by record, with the same
errors as before. Parsing every record in Python costs ~13-20 µs a pair, which made ingest the slowest step at
millions of pairs.

A JSON line goes to Arrow only when it cannot come out different there (the two readers are compared on random
files in tests/test_bulk_ingest.py):

- the line is one `{…}` (blank lines, leading blanks, a BOM or one object split over lines go line by line);
- Arrow parses it under the file's schema (`parse_options`, from its first record): a missing key comes back
  null, which bulk_pairs sends back; a number, list or object where text belongs, a duplicate or unknown key,
  a control character or a lone surrogate is an Arrow error, whose row index names the line, and the parse
  resumes after it; a run of lines that yields more rows than lines (two objects on a line) goes line by line;
- its strings are valid UTF-8 (Arrow's JSON reader does not check; Python's decoder rejects the line). A batch
  with bytes that are not, or an error Arrow gives without a row, goes line by line.
"""

from __future__ import annotations

import gzip
import itertools
import mmap
import os
import re
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json

from orpo_pipeline.data import ingest
from orpo_pipeline.data.bulk_pairs import BULK_FORMATS, SCORE_NAMES, TEXT_FIELDS, bulk_rows

_SCALARS = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), type(None): pa.null()}
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _arrow_type(key: str, value, nested: bool) -> pa.DataType | None:
    """The type a key's values must have in every line, from its value in the first record; None: no bulk."""
    if key in SCORE_NAMES:
        # a float column: Arrow's conversion, like Python's float(), rounds correctly; an integer of over 4,300
        # digits (an error in Python) overflows to inf, and non-finite scores go line by line
        return pa.float64() if value is None or type(value) in (int, float) else None
    if key == "metadata" and not nested:
        if value is None:
            return pa.null()
        if not isinstance(value, dict):
            return None
        fields = [(k, _arrow_type(k, v, True)) for k, v in value.items()]
        return None if any(t is None for _, t in fields) else pa.struct(fields)
    if key == "system" and not nested:
        return pa.null() if value is None else None  # a system prompt changes the row: such files go line by line
    if key in TEXT_FIELDS and not nested:
        if isinstance(value, list) and key != "prompt":
            keys = {k for m in value if isinstance(m, dict) for k in m}
            ok = all(isinstance(m, dict) for m in value) and keys <= {"role", "content"}
            return _MESSAGES if ok else None
        return pa.string() if value is None or isinstance(value, str) else None
    if type(value) not in _SCALARS or type(value) is int and not -2**63 <= value < 2**63:
        return None  # floats too: Python rejects an integer of over 4,300 digits that Arrow would read as one
    return _SCALARS[type(value)]


def parse_options(record: dict) -> pa_json.ParseOptions | None:
    """Arrow's schema for the lines of a file whose first pair is `record`: the prompt as text, the answers as
    text or {role, content} message lists, score pairs (top level or under `metadata`) as floats, and its other
    keys (ids, sources, ...) typed as there, so a line whose key changes type, or that has a key `record` lacks,
    is refused and read line by line. None where the file cannot go in bulk: a system prompt, a non-numeric
    score, a message list as prompt, or an extra value that is not a plain scalar."""
    fields = [(key, _arrow_type(key, record.get(key), False)) for key in TEXT_FIELDS]
    fields += [(key, _arrow_type(key, value, False)) for key, value in record.items() if key not in TEXT_FIELDS]
    if any(t is None for _, t in fields):
        return None
    return pa_json.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="error")


_ROW = re.compile(r" in row (\d+)$")


def _starts(ends: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], ends[:-1] + 1))


def _shaped(b: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines are one `{…}` (an optional CR before the newline): only those go to Arrow, so that a row of
    Arrow's is a line. A blank line, leading blanks or a BOM fail this; the line reader takes them."""
    starts = _starts(ends)
    cr = (ends > starts) & (b[ends - 1] == 0x0D)
    last = ends - 1 - cr
    return (last > starts) & (b[starts] == ord("{")) & (b[last] == ord("}"))


def _parse(buffer: pa.Buffer, parse: pa_json.ParseOptions) -> pa.Table:
    # one block: Arrow then stops at the first bad row, and its error gives that row's index in the buffer
    options = pa_json.ReadOptions(block_size=max(buffer.size + 1, 1 << 16), use_threads=False)
    return pa_json.read_json(pa.BufferReader(buffer), read_options=options, parse_options=parse)


def _bulk_rows(buffer: pa.Buffer, parse: pa_json.ParseOptions, starts: np.ndarray, ends: np.ndarray, lo: int,
               hi: int) -> tuple[list[pa.Table], list[np.ndarray], list[int]]:
    """Parse lines lo..hi-1: tables with the indices of their lines, and the lines Arrow refused. A refused line
    is found where the parse stopped, and parsing resumes after it."""
    tables, rows, refused = [], [], []

    def take(a: int, b: int) -> None:
        if b > a:
            table = _parse(buffer.slice(starts[a], ends[b - 1] + 1 - starts[a]), parse)
            if table.num_rows == b - a:
                tables.append(table)
                rows.append(np.arange(a, b))
            else:  # some line holds two objects: which one is not worth finding
                refused.extend(range(a, b))

    while lo < hi:
        try:
            take(lo, hi)
            break
        except pa.ArrowInvalid as e:
            m = _ROW.search(str(e))
            if m is None or lo + int(m.group(1)) >= hi:
                raise
            bad = lo + int(m.group(1))
            take(lo, bad)
            refused.append(bad)
            lo = bad + 1
    return tables, rows, refused


def _pieces(shaped: np.ndarray) -> list[tuple[int, int]]:
    """Runs of shaped lines, long ones cut so that every thread gets a share (Arrow parses without the GIL)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], shaped.view(np.int8), [0])))).tolist()
    most = max(1_000, -(-len(shaped) // pl.thread_pool_size()))
    return [(a, min(a + most, hi)) for lo, hi in zip(edges[::2], edges[1::2]) for a in range(lo, hi, most)]


def _bulk(data: bytes, ends: np.ndarray, first_row: int, source: str, parse: pa_json.ParseOptions,
          fmt: str = "trl_standard") -> tuple[pl.DataFrame | None, np.ndarray]:
    """The rows of the lines Arrow reads as the line reader would, and the indices of the lines left to it."""
    b = np.frombuffer(data, dtype=np.uint8)
    starts, shaped = _starts(ends), _shaped(b, ends)
    buffer = pa.py_buffer(data)
    pieces = _pieces(shaped)
    if len(pieces) > 1:
        with ThreadPoolExecutor(max_workers=pl.thread_pool_size()) as pool:
            done = list(pool.map(lambda p: _bulk_rows(buffer, parse, starts, ends, *p), pieces))
    else:
        done = [_bulk_rows(buffer, parse, starts, ends, *p) for p in pieces]
    parsed = [t for d in done for t in d[0]]
    refused = np.array(np.flatnonzero(~shaped).tolist() + [i for d in done for i in d[2]], dtype=np.int64)
    if not parsed:
        return None, np.sort(refused)
    table, at = pa.concat_tables(parsed), np.concatenate([r for d in done for r in d[1]])
    table.validate(full=True)  # Arrow's JSON reader does not check UTF-8; Python's decoder does
    bulk, slow = bulk_rows(pl.from_arrow(table), first_row + at, source, fmt, halves_known=False)
    return bulk, np.sort(np.concatenate([refused, at[slow]]))


def _in_row_order(tables: list[pl.DataFrame], source: str, fmt: str) -> pl.DataFrame:
    """The bulk rows and the record-by-record rows of a batch as one table in source order."""
    if not tables:
        return ingest.records_to_table([], source, fmt)
    out = pl.concat(tables)
    return out.sort("source_row") if len(tables) > 1 else out


def batch_table(data: bytes, ends: np.ndarray, first_row: int, source: str, fmt: str,
                parse: pa_json.ParseOptions | None) -> pl.DataFrame:
    """The raw-table rows of the lines in `data` (line i ends at ends[i], a newline, and is numbered first_row + i),
    in line order. In a file of pairs (BULK_FORMATS) the lines that Arrow and bulk_rows read as `ingest` would go
    in bulk, the others line by line."""
    slow, tables = np.arange(len(ends)), []
    if len(ends) and fmt in BULK_FORMATS and parse is not None:
        try:
            bulk, slow = _bulk(data, ends, first_row, source, parse, fmt)
            tables = [bulk] if bulk is not None else []
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            slow = np.arange(len(ends))  # e.g. bytes that are not UTF-8 somewhere: the batch is read line by line
    if len(slow):
        starts = _starts(ends)
        lines = ((first_row + i, bytes(data[starts[i]:ends[i] + 1])) for i in slow.tolist())
        records = ((n, ingest._decode_json_line(line, n == 1)) for n, line in lines if line.strip())
        tables.append(ingest.records_to_table(records, source, fmt))
    return _in_row_order(tables, source, fmt)


READ_BYTES = 1 << 22


def _line_batches(path: Path, batch_rows: int) -> Iterator[tuple[int, bytes | memoryview, np.ndarray]]:
    """(number of the first line, bytes of up to batch_rows whole lines, where each line's newline is)."""
    if not path.name.lower().endswith(".gz"):
        yield from _mapped_batches(path, batch_rows)
        return
    lineno, buf, newlines = 1, bytearray(), []
    try:
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(READ_BYTES)
                if block:
                    newlines.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A) + len(buf))
                    buf += block
                elif buf and buf[-1] != 0x0A:  # a last line without its newline
                    newlines.append(np.array([len(buf)]))
                    buf += b"\n"
                ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
                while len(ends) >= batch_rows or (not block and len(ends)):
                    cut = ends[: min(batch_rows, len(ends))]
                    size = int(cut[-1]) + 1
                    with memoryview(buf) as view:
                        data = bytes(view[:size])
                    del buf[:size]
                    yield lineno, data, cut
                    lineno += len(cut)
                    ends = ends[len(cut):] - size
                newlines = [ends]
                if not block:
                    return
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        read = lineno - 1 + sum(len(n) for n in newlines)
        where = f" after line {read}" if read else ""
        raise ingest.PreferenceFormatError(f"{path}: unreadable{where}: {e}") from e


def _mapped_batches(path: Path, batch_rows: int) -> Iterator[tuple[int, memoryview | bytes, np.ndarray]]:
    """_line_batches of a plain file, as views of the file mapped in memory: no copy (three copies cost a third of
    the bulk path's time), and each batch's pages are handed back to the page cache once the next batch is asked
    for, so the process never holds the whole file. The file must not shrink while it is read (the pipeline
    reads its own registered copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    file = np.frombuffer(view, dtype=np.uint8)
    start, lineno = 0, 1
    while start < size:
        ends, scanned = [], start
        while scanned < size and sum(map(len, ends)) < batch_rows:
            window = file[scanned:scanned + READ_BYTES]
            ends.append(np.flatnonzero(window == 0x0A) + (scanned - start))
            scanned += len(window)
        cut = np.concatenate(ends)[:batch_rows]
        if len(cut) < batch_rows and (not len(cut) or cut[-1] != size - 1 - start):  # a last line without newline
            data = bytes(view[start:size]) + b"\n"
            cut = np.append(cut, size - start)
        else:
            data = view[start:start + int(cut[-1]) + 1]
        yield lineno, data, cut
        lineno += len(cut)
        done = start + int(cut[-1]) + 1
        page = mmap.PAGESIZE
        if done // page > start // page and hasattr(mapped, "madvise"):  # not on Windows
            mapped.madvise(mmap.MADV_DONTNEED, start // page * page, (done // page - start // page) * page)
        start = done
    # no mapped.close(): a caller may still hold the last batch's view; the map goes with the last view


# records looked at for a schema: a file whose first ones have no pair (all malformed, say) is read line by line
# rather than parsed in Python twice
SCHEMA_SEARCH_RECORDS = 10_000


def _options_for(path: Path) -> pa_json.ParseOptions | None:
    """parse_options for the file's first record with both answers, among its first SCHEMA_SEARCH_RECORDS."""
    records = ingest._iter_jsonl(path)
    try:
        first = next((r for _, r in itertools.islice(records, SCHEMA_SEARCH_RECORDS)
                      if isinstance(r, dict) and {"chosen", "rejected"} <= set(r)), None)
    finally:
        records.close()
    return parse_options(first) if first is not None else None


def iter_jsonl_tables(path: Path, source: str, fmt: str = "auto", batch_rows: int = ingest.BATCH_ROWS
                      ) -> Iterator[pl.DataFrame]:
    """`ingest.iter_tables(ingest.iter_records(path), source, fmt)` for a .jsonl / .jsonl.gz file: the same rows
    (tested), a batch of `batch_rows` lines at a time, the lines of pairs parsed in bulk."""
    path = Path(path)
    if fmt == "auto":
        records = ingest._iter_jsonl(path)
        try:
            fmt = ingest._detect(records, source)[0]  # reads up to the first record that has a format
        finally:
            records.close()
        if fmt is None:  # nothing readable: every line is a reject, and there is no bulk path for that
            yield from ingest.iter_tables(ingest._iter_jsonl(path), source, "auto", batch_rows=batch_rows)
            return
    ingest._parser_for(fmt)  # an unknown name fails here, before any line is read
    yielded = False
    parse = _options_for(path) if fmt in BULK_FORMATS else None
    for first_row, data, ends in _line_batches(path, batch_rows):
        yielded = True
        yield batch_table(data, ends, first_row, source, fmt, parse)
    if not yielded:
        yield ingest.records_to_table([], source, fmt)


# ---- parquet: the columns are typed already, so a whole column either can go in bulk or cannot


def frame_table(df: pl.DataFrame, first_row: int, source: str, fmt: str) -> pl.DataFrame:
    """The raw-table rows of parquet rows `df` (numbered first_row, first_row + 1, …): in bulk where bulk_rows
    can, the others through ingest's record parser, as `pl.from_arrow(batch).iter_rows(named=True)` hands them to
    it in ingest._iter_parquet."""
    numbers = np.arange(first_row, first_row + df.height)
    bulk, slow = bulk_rows(df, numbers, source, fmt, halves_known=True)
    tables = [bulk] if bulk is not None else []
    if slow.any():
        rows = df.filter(pl.Series(slow)) if not slow.all() else df
        tables.append(ingest.records_to_table(zip(numbers[slow].tolist(), rows.iter_rows(named=True)), source, fmt))
    return _in_row_order(tables, source, fmt)


def _parquet_frames(path: Path, batch_rows: int) -> Iterator[pl.DataFrame]:
    """ingest._iter_parquet's batches and its errors, as frames."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several error types for a damaged file
        raise ingest.PreferenceFormatError(f"{path}: unreadable parquet: {e}") from e
    n, batches = 0, reader.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
            frame = None if batch is None else pl.from_arrow(batch)
        except Exception as e:
            raise ingest.PreferenceFormatError(f"{path}: unreadable parquet after row {n}: {e}") from e
        if frame is None:
            return
        yield frame
        n += frame.height


def renamed(df: pl.DataFrame, column_mapping: dict[str, str] | None) -> pl.DataFrame:
    """ingest._rename on every row: mapped columns dropped, then each target set from its source (a later
    mapping to the same target wins). Exact for parquet, where every row has every column."""
    if not column_mapping:
        return df
    out = df.drop([c for c in column_mapping if c in df.columns])
    for src, dst in column_mapping.items():
        if src in df.columns:
            out = out.with_columns(df[src].alias(dst))
    return out


def iter_parquet_tables(path: Path, source: str, fmt: str = "auto", batch_rows: int = ingest.BATCH_ROWS,
                        column_mapping: dict[str, str] | None = None) -> Iterator[pl.DataFrame]:
    """`ingest.iter_tables(ingest.iter_records(path), source, fmt, column_mapping)` for a .parquet file: the same
    rows (tested), `batch_rows` rows at a time, pairs built column-wise."""
    path = Path(path)
    if fmt == "auto":
        records = ingest._iter_parquet(path)
        try:
            fmt = ingest._detect(((n, ingest._rename(r, column_mapping)) for n, r in records), source)[0]
        finally:
            records.close()
        if fmt is None:  # an empty file
            yield from ingest.iter_tables(ingest._iter_parquet(path), source, "auto", column_mapping, batch_rows)
            return
    ingest._parser_for(fmt)
    first_row, yielded = 1, False
    for frame in _parquet_frames(path, batch_rows):
        yield frame_table(renamed(frame, column_mapping), first_row, source, fmt)
        first_row += frame.height
        yielded = True
    if not yielded:
        yield ingest.records_to_table([], source, fmt)
