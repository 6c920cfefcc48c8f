"""Read preference files into one raw table, one row per input record.

Every record becomes a row, including the ones that cannot be parsed: those
carry an `error` (file, row and field are in the row), so cleaning can put them
in the rejects table instead of losing them.

Normalized shape: `prompt` is a list of {role, content} messages (the whole
conversation before the answer), `chosen` / `rejected` are the final assistant
answers as text. A plain-string prompt becomes a single user message.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import polars as pl

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
}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


class PreferenceFormatError(ValueError):
    """A whole file cannot be read as preference data."""


class RowError(ValueError):
    """One record is unusable; the message names the field."""


@dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None


def _text(obj: dict, field: str) -> str:
    if field not in obj or obj[field] is None:
        raise RowError(f"missing field '{field}'")
    value = obj[field]
    if not isinstance(value, str):
        raise RowError(f"field '{field}': expected text, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(f"field '{field}': expected a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"field '{field}[{i}]': expected {{role, content}}, got {str(m)[:60]!r}")
        if not isinstance(m["content"], str) or not isinstance(m["role"], str):
            raise RowError(f"field '{field}[{i}].content': expected text, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _final_answer(messages: list[dict[str, str]], field: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"field '{field}': the last message must be the assistant's answer")
    return messages[-1]["content"]


def _scores(obj: dict) -> tuple[float | None, float | None]:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else obj
    sc, sr = meta.get("score_chosen"), meta.get("score_rejected")
    ok = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (sc, sr))
    return (float(sc), float(sr)) if ok else (None, None)


def parse_trl_standard(obj: dict) -> Pair:
    prompt = _text(obj, "prompt")
    return Pair([{"role": "user", "content": prompt}], _text(obj, "chosen"), _text(obj, "rejected"), *_scores(obj))


def parse_trl_conversational(obj: dict) -> Pair:
    for f in ("chosen", "rejected"):
        if f not in obj or obj[f] is None:
            raise RowError(f"missing field '{f}'")
    chosen = _messages(obj["chosen"], "chosen")
    rejected = _messages(obj["rejected"], "rejected")
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], "prompt")
    else:
        # implicit prompt: the shared history before the two answers
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    # a completion list may carry earlier turns; only the final answer is the completion
    return Pair(
        prompt + chosen[:-1],
        _final_answer(chosen, "chosen"),
        _final_answer(rejected, "rejected"),
        *_scores(obj),
    )


# name -> (does it match these keys and this sample record?, parser)
FORMATS: dict[str, tuple[Callable[[set, dict], bool], Callable[[dict], Pair]]] = {
    "trl_conversational": (
        lambda keys, rec: {"chosen", "rejected"} <= keys and isinstance(rec.get("chosen"), list),
        parse_trl_conversational,
    ),
    "trl_standard": (
        lambda keys, rec: {"prompt", "chosen", "rejected"} <= keys and not isinstance(rec.get("chosen"), list),
        parse_trl_standard,
    ),
}


def detect_format(record: dict, where: str) -> str:
    keys = set(record)
    for name, (matches, _) in FORMATS.items():
        if matches(keys, record):
            return name
    raise PreferenceFormatError(
        f"{where}: columns {sorted(keys)} match no known preference format; known formats: {sorted(FORMATS)}. "
        "Rename the columns or pick a format explicitly."
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError(f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, RowError(f"malformed JSON: {e.msg} (column {e.colno})")
                continue
            yield lineno, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {type(obj).__name__}")


def _iter_json(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PreferenceFormatError(f"{path}: not UTF-8 (byte offset {e.start})") from e
    except json.JSONDecodeError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PreferenceFormatError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, obj in enumerate(data, start=1):
        yield i, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {type(obj).__name__}")


def _iter_csv(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceFormatError(f"{path}: not UTF-8 (byte offset {e.start})") from e
    for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
        yield i, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    for i, row in enumerate(pl.read_parquet(path).iter_rows(named=True), start=1):
        yield i, row


def iter_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _iter_jsonl(path)
    if name.endswith(".json"):
        return _iter_json(path)
    if name.endswith(".csv"):
        return _iter_csv(path)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    raise PreferenceFormatError(f"{path}: unsupported file type; expected one of {SUFFIXES}")


def records_to_table(records: Iterable[tuple[int, dict | RowError]], source: str, fmt: str = "auto") -> pl.DataFrame:
    """Parse records of one source into raw-table rows; bad records keep their error."""
    rows: dict[str, list] = {k: [] for k in RAW_SCHEMA}
    parser = None if fmt == "auto" else FORMATS[fmt][1]
    for row_no, rec in records:
        pair, error = None, None
        if isinstance(rec, RowError):
            error = str(rec)
        else:
            if parser is None:
                parser = FORMATS[detect_format(rec, source)][1]
            try:
                pair = parser(rec)
            except RowError as e:
                error = str(e)
        rows["source_file"].append(source)
        rows["source_row"].append(row_no)
        rows["error"].append(error and f"{source}:{row_no}: {error}")
        rows["prompt"].append(pair.prompt if pair else None)
        rows["chosen"].append(pair.chosen if pair else None)
        rows["rejected"].append(pair.rejected if pair else None)
        rows["score_chosen"].append(pair.score_chosen if pair else None)
        rows["score_rejected"].append(pair.score_rejected if pair else None)
    return pl.DataFrame(rows, schema=RAW_SCHEMA)


def preference_files(data_dir: Path) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"preference data folder not found: {data_dir}")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise PreferenceFormatError(f"{data_dir}: no preference files ({', '.join(SUFFIXES)})")
    return files


def read_preference_dir(data_dir: Path, fmt: str = "auto") -> pl.DataFrame:
    data_dir = Path(data_dir)
    tables = [records_to_table(iter_records(p), str(p.relative_to(data_dir)), fmt) for p in preference_files(data_dir)]
    return pl.concat(tables)


def read_hf_dataset(name_or_path: str, split: str = "train", config: str = "", fmt: str = "auto") -> pl.DataFrame:
    """A hub dataset (needs internet) or a folder written by `Dataset.save_to_disk`."""
    import datasets

    if Path(name_or_path).is_dir():
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, config or None, split=split)
    source = f"{name_or_path}[{split}]"
    return records_to_table(enumerate(ds, start=1), source, fmt)
