"""JSON arrays and CSV files read a record at a time, so a file of millions of pairs is never held whole.

`json.loads` of a whole JSON array held every record as Python objects at once (8.5 GB for 2M pairs in a 1.4 GB
file), and CSV was read into a list of every row; JSON Lines and parquet were already read in batches. Errors
read as before: the file, and line and column (JSON) or line (CSV), or the byte offset of the first byte that is
not UTF-8. A file that fails part way has yielded its first records: a caller that writes them writes into a
temporary folder that the failure discards (`storage.atomic_dir`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

CHUNK_CHARS = 1 << 22
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what json itself skips between values
_NEXT = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")
_SCAN = json.JSONDecoder().scan_once  # raw_decode without its wrapper: a fifth of the time per record


class TextFileError(ValueError):
    """A file that cannot be read as a whole: `str()` is the reason, without the file's name."""


def utf8_error_offset(path: Path, block: int = 1 << 24) -> int | None:
    """The file offset of the first byte that is not UTF-8, or None."""
    pending, start = b"", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = pending + chunk
            try:
                _, used = codecs.utf_8_decode(data, "strict", not chunk)
            except UnicodeDecodeError as e:
                return start + e.start
            if not chunk:
                return None
            pending, start = data[used:], start + used


class _Text:
    """A text file read a chunk at a time into a window `buf` that starts at file position `base`."""

    def __init__(self, f: io.TextIOBase):
        self.f, self.buf, self.base, self.eof = f, "", 0, False

    def more(self, keep_from: int) -> None:
        """Drop buf[:keep_from] (keep_from becomes 0) and read the next chunk."""
        self.base += keep_from
        chunk = self.f.read(CHUNK_CHARS)
        self.eof = not chunk
        self.buf = self.buf[keep_from:] + chunk

    def skip_whitespace(self, pos: int) -> int:
        """The position of the next non-whitespace character, reading on as needed; len(buf) at the end of the file."""
        while True:
            pos = _WHITESPACE.match(self.buf, pos).end()
            if pos < len(self.buf) or self.eof:
                return pos
            self.more(pos)
            pos = 0

    def error(self, msg: str, pos: int) -> TextFileError:
        """The error at buf[pos], at its line and column in the file as json.loads counts them: read again from
        the start (an error is rare; counting lines as the chunks went by cost a tenth of the reading)."""
        at, line, line_start, done = self.base + pos, 1, 0, 0
        self.f.seek(0)
        while done < at:
            part = self.f.read(min(CHUNK_CHARS, at - done))
            if not part:
                break
            if (n := part.count("\n")):
                line, line_start = line + n, done + part.rindex("\n") + 1
            done += len(part)
        return TextFileError(f"malformed JSON at line {line}, column {at - line_start + 1}: {msg}")


def _value(text: _Text, pos: int) -> tuple[object, int]:
    """The JSON value at buf[pos], reading on until it is whole: a value that fails, or ends, near the window's
    end may go on in the next chunk."""
    while True:
        try:
            value, end = _SCAN(text.buf, pos)
        except StopIteration as e:  # no value starts here (what raw_decode calls "Expecting value")
            error = ("Expecting value", e.value)  # not a JSONDecodeError: it counts the window's lines
        except json.JSONDecodeError as e:
            error = (e.msg, e.pos)
        except ValueError as e:  # an integer of more than 4300 digits: its count is only right once it is whole
            if text.eof or not text.buf[-1:].isdigit():
                raise TextFileError(f"malformed JSON: {str(e)[:80]}") from None
            error = None
        except RecursionError:
            raise TextFileError("malformed JSON: nested too deeply") from None
        else:  # a number that ends near the window's end may go on ("0." of "0.5")
            if end + 16 < len(text.buf) or text.eof:
                return value, end
            error = None
        # the end of the window stops the parser within a token of it, or inside a string it started; an error
        # anywhere else is in the file (so a bad file is not read to its end first)
        if error is not None and (text.eof or not (error[1] >= len(text.buf) - 16
                                                   or error[0].startswith("Unterminated string"))):
            raise text.error(*error) from None
        text.more(pos)
        pos = 0


def first_char(f: io.TextIOBase) -> str:
    """The first character of f that is not whitespace ("" for none); f is left at its start."""
    head = f.read(CHUNK_CHARS)
    while head and not head.strip(" \t\n\r"):
        head = f.read(CHUNK_CHARS)
    f.seek(0)
    return head.lstrip(" \t\n\r")[:1]


def first_value(f: io.TextIOBase) -> tuple[object, TextFileError | None]:
    """The first JSON value in f, and the "Extra data" error json.loads would raise if more than whitespace
    follows it (None if nothing does). Only that value is read whole."""
    text = _Text(f)
    value, end = _value(text, text.skip_whitespace(0))
    pos = text.skip_whitespace(end)
    return value, text.error("Extra data", pos) if pos < len(text.buf) else None


def iter_json_array(f: io.TextIOBase) -> Iterator[object]:
    """The elements of the JSON array that f holds, one at a time: the values and errors of json.loads(f.read())."""
    text = _Text(f)
    pos = text.skip_whitespace(0)
    assert text.buf[pos:pos + 1] == "[", "iter_json_array needs a file that starts with an array"
    pos = text.skip_whitespace(pos + 1)
    if text.buf[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            value, pos = _value(text, pos)
            yield value
            step = _NEXT.match(text.buf, pos)  # the usual case in one regex: `,` or `]` between whitespace
            if step is not None:
                pos = step.end()
                if step.group(1) == "]":
                    break
                continue
            pos = text.skip_whitespace(pos)
            sep = text.buf[pos:pos + 1]
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                raise text.error("Expecting ',' delimiter", pos)
            pos = text.skip_whitespace(pos + 1)
    pos = text.skip_whitespace(pos)
    if pos < len(text.buf):
        raise text.error("Extra data", pos)


def iter_csv_rows(f: io.TextIOBase) -> Iterator[tuple[list[str], dict]]:
    """(header, row) for each CSV row, as csv.DictReader gives it; TextFileError names the line of a bad row."""
    csv.field_size_limit(2**31 - 1)  # long answers exceed the 128 KiB default
    reader = csv.DictReader(f)
    try:
        for row in reader:
            yield reader.fieldnames, row
    except csv.Error as e:
        raise TextFileError(f"malformed CSV at line {reader.line_num}: {e}") from None


def open_text(path: Path) -> io.TextIOWrapper:
    """The file as UTF-8 text (a BOM at the start skipped, as spreadsheet exports write one), line ends kept."""
    f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 -- the caller closes it
    # the wrapper decodes 8 KiB at a time by default: reading 150 MB in 4M-character chunks took 1.0 s, 0.5 s so
    f._CHUNK_SIZE = CHUNK_CHARS
    return f
