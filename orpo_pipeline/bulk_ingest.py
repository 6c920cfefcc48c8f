"""Preference files read in bulk wherever that gives the rows `ingest` gives record by record.

JSON Lines (below) go through Arrow's JSON reader a batch of lines at a time; parquet batches (at the end) are
typed already, so their text pairs are built column-wise and only odd rows go record by record.

Parsing every line with Python's `json` and checking each record in Python costs ~13-16 µs a pair, which made
ingest the slowest step at millions of pairs. For the most common shape, text pairs (`{"prompt": str, "chosen":
str, "rejected": str}`: trl_standard, or ultrafeedback with score pairs at top level or under `metadata`, plus
plain extra keys such as ids), Arrow parses runs of lines in C++ on every core and the raw-table rows are built
column-wise. A line goes the bulk way only when that gives the row `ingest` gives it line by line; every other
line is read by `ingest`'s line reader, which names the bad line, field and reason exactly as before (the two
are compared on random files in tests/test_bulk_ingest.py):

- the line is one `{…}` (blank lines, leading blanks, a BOM or one object split over lines go line by line);
- Arrow parses it under the file's schema (`parse_options`): a missing text or a null comes back null and goes
  line by line; a number, list or object where text belongs, a duplicate or unknown key, a control character
  or a lone surrogate is an Arrow error, whose row index names the line, and the parse resumes after it; a
  run of lines that yields more rows than lines (two objects on a line) goes line by line;
- its strings are valid UTF-8 (Arrow's JSON reader does not check; Python's decoder rejects the line). A batch
  with bytes that are not, or an error Arrow gives without a row, goes line by line.
"""

from __future__ import annotations

import gzip
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

from orpo_pipeline import ingest

TEXT_FIELDS = ("prompt", "chosen", "rejected")
BULK_FORMATS = ("trl_standard", "ultrafeedback")  # ultrafeedback with text answers is read as trl_standard + scores
_SCORE_NAMES = {k for pair in ingest.SCORE_KEYS for k in pair}
_SCALARS = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), type(None): pa.null()}


def _arrow_type(key: str, value, nested: bool) -> pa.DataType | None:
    """The type a key's values must have in every line, from its value in the first record; None: no bulk."""
    if key in _SCORE_NAMES:
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
    if type(value) not in _SCALARS or type(value) is int and not -2**63 <= value < 2**63:
        return None  # floats too: Python rejects an integer of over 4,300 digits that Arrow would read as one
    return _SCALARS[type(value)]


def parse_options(record: dict) -> pa_json.ParseOptions | None:
    """Arrow's schema for the lines of a file whose first TRL-standard record is `record`: the three texts, score
    pairs (top level or under `metadata`) as floats, and its other keys (ids, sources, ...) typed as there, so a
    line whose key changes type, or that has a key `record` lacks, is refused and read line by line. None where
    the file cannot go in bulk: a system prompt, a non-numeric score, or an extra value that is not a plain
    scalar."""
    fields = [(name, pa.string()) for name in TEXT_FIELDS]
    for key, value in record.items():
        if key not in TEXT_FIELDS:
            fields.append((key, _arrow_type(key, value, False)))
    if any(t is None for _, t in fields):
        return None
    return pa_json.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="error")


Place = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (values as float64, null mask), for one score place


def _arrow_places(table: pa.Table) -> list[Place]:
    """The score places of parsed JSON lines: top level, then `metadata` (flattened: a field is null where its
    struct is)."""
    def floats(column) -> tuple[np.ndarray, np.ndarray]:
        null = column.is_null().to_numpy(zero_copy_only=False)
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64), null

    top = {k: floats(table.column(k)) for k in table.column_names if k in _SCORE_NAMES}
    meta = table.column("metadata") if "metadata" in table.column_names else None
    if meta is None or not pa.types.is_struct(meta.type):
        return [top]
    struct = meta.combine_chunks()
    return [top, {f.name: floats(a) for f, a in zip(struct.type, struct.flatten()) if f.name in _SCORE_NAMES}]


def _pick_scores(places: list[Place], n: int, halves_known: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ingest._scores over the rows: the first score pair, top level then `metadata`, whose keys are both there
    and that has a half set; no scores if a half is null. Returns (chosen, rejected) with NaN for no scores, and
    the rows the line reader must take: a non-finite score (an error there) and, unless `halves_known` (every row
    has every key, as in a parquet file), a pair with one half set: in JSON Lines a null half may be a missing
    key, which Python skips where a null ends the search, and Arrow does not tell them apart."""
    chosen, rejected = np.full(n, np.nan), np.full(n, np.nan)
    decided, scored, slow = (np.zeros(n, dtype=bool) for _ in range(3))
    for place in places:
        for c, r in ingest.SCORE_KEYS:
            if c not in place or r not in place:
                continue
            (value_c, null_c), (value_r, null_r) = place[c], place[r]
            hit = ~(null_c & null_r) & ~decided & ~slow
            both = hit & ~null_c & ~null_r
            if not halves_known:
                slow |= hit & ~both
            decided |= hit if halves_known else both
            chosen[both], rejected[both] = value_c[both], value_r[both]
            scored |= both
    slow |= scored & ~(np.isfinite(chosen) & np.isfinite(rejected))
    return chosen, rejected, slow


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
    # a null text is a "missing field" reject: the line reader words the error
    places = _arrow_places(table)
    score_chosen, score_rejected, slow = _pick_scores(places, table.num_rows, halves_known=False)
    for value, null in (v for place in places for v in place.values()):
        # inf is how Arrow reads an integer of 309+ digits; past 4,300 digits Python refuses the whole line
        slow |= ~null & ~np.isfinite(value)
    for f in TEXT_FIELDS:
        if table.column(f).null_count:
            slow |= table.column(f).combine_chunks().is_null().to_numpy(zero_copy_only=False)
    kept = pl.from_arrow(table.select(list(TEXT_FIELDS))).with_columns(
        score_chosen=pl.Series(score_chosen).fill_nan(None), score_rejected=pl.Series(score_rejected).fill_nan(None))
    if slow.any():
        kept = kept.filter(pl.Series(~slow))
    return _pairs_table(kept, first_row + at[~slow], source, fmt), np.sort(np.concatenate([refused, at[slow]]))


def batch_table(data: bytes, ends: np.ndarray, first_row: int, source: str, fmt: str,
                parse: pa_json.ParseOptions | None) -> pl.DataFrame:
    """The raw-table rows of the lines in `data` (line i ends at ends[i], a newline, and is numbered first_row + i),
    in line order. In a TRL-standard file the lines Arrow reads exactly as `ingest` would go in bulk, the others
    line by line."""
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
    if not tables:
        return ingest.records_to_table([], source, fmt)
    out = pl.concat(tables)
    return out.sort("source_row") if len(tables) > 1 else out


def _pairs_table(df: pl.DataFrame, rows: np.ndarray, source: str, fmt: str) -> pl.DataFrame:
    return df.select(
        source_file=pl.lit(source, pl.String),
        source_row=pl.Series(rows, dtype=pl.Int64),
        prompt=pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col("prompt"))),
        chosen="chosen",
        rejected="rejected",
        score_chosen="score_chosen",
        score_rejected="score_rejected",
        error=pl.lit(None, pl.String),
        error_reason=pl.lit(None, pl.String),
        format=pl.lit(fmt),
    ).cast(ingest.RAW_SCHEMA)


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
        if done // page > start // page:
            mapped.madvise(mmap.MADV_DONTNEED, start // page * page, (done // page - start // page) * page)
        start = done
    # no mapped.close(): a caller may still hold the last batch's view; the map goes with the last view


def _options_for(path: Path) -> pa_json.ParseOptions | None:
    """parse_options for the file's first record that looks TRL-standard."""
    is_standard = ingest.FORMATS["trl_standard"][0]
    records = ingest._iter_jsonl(path)
    try:
        first = next((r for _, r in records if isinstance(r, dict) and is_standard(set(r), r)), None)
    finally:
        records.close()
    return parse_options(first) if first is not None else None


def iter_jsonl_tables(path: Path, source: str, fmt: str = "auto", batch_rows: int = ingest.BATCH_ROWS
                      ) -> Iterator[pl.DataFrame]:
    """`ingest.iter_tables(ingest.iter_records(path), source, fmt)` for a .jsonl / .jsonl.gz file: the same rows
    (tested), a batch of `batch_rows` lines at a time, TRL-standard lines parsed in bulk."""
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


def _numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() and not dtype.is_decimal() or dtype == pl.Null


def _frame_can_go_in_bulk(schema: pl.Schema) -> bool:
    """Columns whose every value ingest's parser reads the same way: text answers, numeric scores (top level or
    in a `metadata` struct; a non-struct `metadata` is ignored there too), a text `system` (rows that set it go
    row by row)."""
    if any(schema.get(f) != pl.String for f in TEXT_FIELDS):
        return False
    if any(k in schema and not _numeric(schema[k]) for k in _SCORE_NAMES):
        return False
    meta = schema.get("metadata")
    if isinstance(meta, pl.Struct) and any(f.name in _SCORE_NAMES and not _numeric(f.dtype) for f in meta.fields):
        return False
    return schema.get("system", pl.Null) in (pl.String, pl.Null)


def _polars_places(df: pl.DataFrame) -> list[Place]:
    def floats(column: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        return column.cast(pl.Float64).fill_null(np.nan).to_numpy(), column.is_null().to_numpy()

    places = [{k: floats(df[k]) for k in df.columns if k in _SCORE_NAMES}]
    if isinstance(df.schema.get("metadata"), pl.Struct):  # read from parquet, a null struct's fields are null
        meta = df["metadata"]
        places.append({f.name: floats(meta.struct.field(f.name)) for f in meta.dtype.fields if f.name in _SCORE_NAMES})
    return places


def frame_table(df: pl.DataFrame, first_row: int, source: str, fmt: str) -> pl.DataFrame:
    """The raw-table rows of parquet rows `df` (numbered first_row, first_row + 1, …): in bulk where the columns
    allow it, the rows with a null text, a system prompt or a non-finite score (and every row otherwise) through
    ingest's record parser, as `pl.from_arrow(batch).iter_rows(named=True)` hands them to it."""
    slow = np.ones(df.height, dtype=bool)
    tables = []
    if fmt in BULK_FORMATS and df.height and _frame_can_go_in_bulk(df.schema):
        chosen, rejected, slow = _pick_scores(_polars_places(df), df.height, halves_known=True)
        for f in (*TEXT_FIELDS, *(["system"] if "system" in df.columns else [])):
            slow |= (df[f].is_null() if f in TEXT_FIELDS else df[f].is_not_null()).to_numpy()
        kept = df.select(TEXT_FIELDS).with_columns(score_chosen=pl.Series(chosen).fill_nan(None),
                                                   score_rejected=pl.Series(rejected).fill_nan(None))
        if slow.any():
            kept = kept.filter(pl.Series(~slow))
        tables.append(_pairs_table(kept, first_row + np.flatnonzero(~slow), source, fmt))
    if slow.any():
        rows = df.filter(pl.Series(slow)) if not slow.all() else df
        numbers = (first_row + np.flatnonzero(slow)).tolist()
        tables.append(ingest.records_to_table(zip(numbers, rows.iter_rows(named=True)), source, fmt))
    if not tables:
        return ingest.records_to_table([], source, fmt)
    out = pl.concat(tables)
    return out.sort("source_row") if len(tables) > 1 else out


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


def iter_parquet_tables(path: Path, source: str, fmt: str = "auto", batch_rows: int = ingest.BATCH_ROWS
                        ) -> Iterator[pl.DataFrame]:
    """`ingest.iter_tables(ingest.iter_records(path), source, fmt)` for a .parquet file: the same rows (tested),
    `batch_rows` rows at a time, text pairs built column-wise."""
    path = Path(path)
    if fmt == "auto":
        records = ingest._iter_parquet(path)
        try:
            fmt = ingest._detect(records, source)[0]
        finally:
            records.close()
        if fmt is None:  # an empty file
            yield from ingest.iter_tables(ingest._iter_parquet(path), source, "auto", batch_rows=batch_rows)
            return
    ingest._parser_for(fmt)
    first_row, yielded = 1, False
    for frame in _parquet_frames(path, batch_rows):
        yield frame_table(frame, first_row, source, fmt)
        first_row += frame.height
        yielded = True
    if not yielded:
        yield ingest.records_to_table([], source, fmt)
