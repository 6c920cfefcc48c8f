"""Preference files -> records, one reader per file type: (record number, dict or RowError) pairs.

- .jsonl / .jsonl.gz: a line at a time, parsed with orjson (json.loads where orjson refuses a line, for Python's
  reading of NaN, huge integers and lone surrogates, and its error messages); a line that is not UTF-8, not
  JSON or not an object is a RowError naming the column.
- .json: an array streamed an element at a time with ijson; JSON Lines under a .json name; a single
  {"data": [...]} document (read whole, so at most `max_record_bytes`).
- .csv: the csv module, a row at a time; a row with bytes that are not UTF-8 is a RowError, not the file's end.
- .parquet: record batches (pyarrow), so a large file is never held whole.

Reads are bounded: a line, row or array element over `max_record_bytes` is a RowError (JSON Lines) or an
error naming the file and line (CSV, JSON arrays: the reader cannot find the next record's start), never a
buffer that grows with the input. Files that are not regular files (FIFOs, devices) are refused before they
are opened, symlinks unless allowed (`check_file`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Iterator

import orjson

from .formats import PreferenceFormatError, RowError, _type

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
MAX_RECORD_BYTES = 16 * 2**20
Records = Iterator[tuple[int, "dict | RowError"]]


def check_file(path: Path, allow_symlinks: bool = False) -> os.stat_result:
    """The file's stat, or a PreferenceFormatError saying why it is not read: a symlink (unless allowed; it could
    point anywhere, e.g. /etc/passwd), or anything but a regular file (a FIFO would block the reader forever)."""
    path = Path(path)
    try:
        if path.is_symlink() and not allow_symlinks:
            raise PreferenceFormatError(f"{path}: a symbolic link (to {os.readlink(path)}); symlinks are refused "
                                        "unless allowed (StorageResource.allow_symlinks)")
        st = path.stat()
    except OSError as e:
        raise PreferenceFormatError(f"{path}: cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else "special file"
        raise PreferenceFormatError(f"{path}: not a regular file ({kind}); only regular files are read")
    return st


def _too_long(limit: int) -> RowError:
    return RowError(f"record longer than max_record_bytes ({limit:,} bytes)")


def _json_line(line: bytes, first: bool) -> dict | RowError:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:  # json.loads for what orjson refuses and Python reads, and Python's messages
        try:
            text = line.decode("utf-8-sig" if first else "utf-8")  # a BOM only makes sense at the start of a file
        except UnicodeDecodeError as e:
            return RowError(f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}")
        try:
            obj = json.loads(text.rstrip("\r\n"))  # so a column past the end is reported on this line, not the next
        except json.JSONDecodeError as e:
            return RowError(f"malformed JSON: {e.msg} (column {e.colno})")
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            return RowError(f"malformed JSON: {str(e)[:80]}")
        except RecursionError:
            return RowError("malformed JSON: nested too deeply")
    return obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {_type(obj)}")


def _lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of binary file f; None for a line over `limit` bytes, which is skipped, never held whole."""
    while line := f.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def read_jsonl(path: Path, limit: int = MAX_RECORD_BYTES) -> Records:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            readline = f.readline
            while line := readline(limit + 1):  # `_lines`, written out: this loop is most of reading's time
                lineno += 1
                if len(line) > limit and not line.endswith(b"\n"):
                    while (rest := readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    yield lineno, _too_long(limit)
                elif line.strip():
                    yield lineno, _json_line(line, lineno == 1)
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        where = f" after line {lineno}" if lineno else ""
        raise PreferenceFormatError(f"{path}: unreadable{where}: {e}") from e


class _Bounded:
    """A binary file whose reads fail once more than `limit` bytes pass without `reset()` (one record's worth):
    ijson builds each element whole, so an endless one must stop the read, not fill the memory."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.since = f, limit, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n >= 0 else self.limit + 1)
        self.since += len(data)
        if self.since > self.limit + (1 << 16):  # ijson reads 64 KiB ahead of the element it is building
            raise _TooLong
        return data

    def reset(self) -> None:
        self.since = 0


class _TooLong(Exception):
    pass


def _json_array(path: Path, start: int, limit: int) -> Records:
    import ijson

    n = 0
    # the C parser stops at integers over 64 bits and at lone surrogate escapes; Python's reads them (each a
    # row to judge), from the element where the C parser stopped
    for backend in ("yajl2_c", "python"):
        with open(path, "rb") as raw:
            raw.seek(start)
            f = _Bounded(raw, limit)
            try:
                for i, obj in enumerate(ijson.get_backend(backend).items(f, "item", use_float=True), start=1):
                    f.reset()
                    if i > n:
                        n = i
                        yield i, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {_type(obj)}")
                return
            except _TooLong:
                raise PreferenceFormatError(f"{path}: array element {n + 1} is longer than max_record_bytes "
                                            f"({limit:,} bytes)") from None
            except (ijson.JSONError, UnicodeDecodeError) as e:
                if backend == "yajl2_c" and ("integer overflow" in str(e) or isinstance(e, UnicodeDecodeError)):
                    continue
                detail = " ".join(str(e).split())[:200]
                raise PreferenceFormatError(f"{path}: malformed JSON after array element {n}: {detail}") from None


def _json_document(path: Path, data: bytes) -> Records:
    """A .json file that is one document: an array, or {"data": [...]}."""
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise PreferenceFormatError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise PreferenceFormatError(f"{path}: malformed JSON: {str(e)[:80]}") from None
    except RecursionError:
        raise PreferenceFormatError(f"{path}: malformed JSON: nested too deeply") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise PreferenceFormatError(f"{path}: expected a JSON array of records, got {_type(doc)}")
    return ((i, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {_type(obj)}"))
            for i, obj in enumerate(doc, start=1))


def read_json(path: Path, limit: int = MAX_RECORD_BYTES) -> Records:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        start = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        first = head[start:].lstrip(b" \t\r\n")[:1]
        if first == b"[":
            return _json_array(path, start, limit)
        if first == b"{":
            f.seek(0)
            line = f.readline(limit + 1)
            if line.rstrip().endswith(b"}") and isinstance(_json_line(line, True), dict) and any(
                    rest.strip() for rest in _lines(f, limit)):
                return read_jsonl(path, limit)  # one object a line under a .json name
        if path.stat().st_size > limit:
            raise PreferenceFormatError(f"{path}: one JSON document larger than max_record_bytes ({limit:,} bytes); "
                                        "write it as a JSON array of records or as JSON Lines")
        f.seek(0)
        return _json_document(path, f.read())


def _csv_lines(f, path: Path, limit: int) -> Iterator[str]:
    """Lines for the csv module: bytes that are not UTF-8 kept as surrogate escapes, so `_csv_row` can name them."""
    for lineno, line in enumerate(_lines(f, limit), start=1):
        if line is None:
            raise PreferenceFormatError(f"{path}:{lineno}: line longer than max_record_bytes ({limit:,} bytes)")
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # spreadsheet exports start with a BOM
            line = line[3:]
        yield line.decode("utf-8", "surrogateescape")


def _csv_row(row: dict, width: int) -> dict | RowError:
    if None in row:  # DictReader files surplus cells under the key None
        return RowError(f"{width + len(row[None])} cells, the header has {width}")
    for field, cell in row.items():
        try:
            cell is None or cell.isascii() or cell.encode("utf-8")
        except UnicodeEncodeError as e:
            return RowError(f"field '{field}': not UTF-8: byte 0x{ord(cell[e.start]) - 0xDC00:02x} "
                            f"at character {e.start + 1}")
    return row


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_csv(path: Path, limit: int = MAX_RECORD_BYTES) -> Records:
    csv.field_size_limit(limit)
    with open(path, "rb") as f:
        reader = csv.DictReader(_csv_lines(f, path, limit))
        try:
            # the header names every field of every row's error: it has to be text
            bad = next((name for name in reader.fieldnames or [] if not _is_utf8(name)), None)
            if bad is not None:
                raise PreferenceFormatError(f"{path}:1: the header is not UTF-8 (column {bad.encode('utf-8', 'replace')!r})")
            for i, row in enumerate(reader, start=1):
                yield i, _csv_row(row, len(reader.fieldnames or []))
        except csv.Error as e:
            raise PreferenceFormatError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from None


def read_parquet(path: Path, batch_rows: int = 10_000) -> Records:
    import polars as pl
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several error types for a damaged file
        raise PreferenceFormatError(f"{path}: unreadable parquet: {e}") from e
    n = 0
    try:
        for batch in source.iter_batches(batch_size=batch_rows):
            for row in pl.from_arrow(batch).iter_rows(named=True):
                n += 1
                yield n, row
    except Exception as e:
        raise PreferenceFormatError(f"{path}: unreadable parquet after row {n}: {e}") from e


def iter_records(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Records:
    """The records of one preference file, by its type (SUFFIXES)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(SUFFIXES):
        raise PreferenceFormatError(f"{path}: unsupported file type; expected one of {SUFFIXES}")
    check_file(path, allow_symlinks=True)  # links were refused (or allowed) when the file was registered
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path, max_record_bytes)
    if name.endswith(".json"):
        return read_json(path, max_record_bytes)
    if name.endswith(".csv"):
        return read_csv(path, max_record_bytes)
    return read_parquet(path)


def preference_files(data_dir: Path) -> list[Path]:
    """The preference files under a folder, symlinks and special files included (registration refuses them with
    a reason, rather than leaving them out unseen)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"preference data folder not found: {data_dir}")
    files = sorted(p for p in data_dir.rglob("*") if p.name.lower().endswith(SUFFIXES) and not p.is_dir())
    if not files:
        raise PreferenceFormatError(f"{data_dir}: no preference files ({', '.join(SUFFIXES)})")
    return files
