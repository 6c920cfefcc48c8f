"""Read preference files into one raw table, one row per input record.

Every record becomes a row, including the ones that cannot be used: those carry
an `error` and an `error_reason` (file, row and field are in the error), so
cleaning can put them in the rejects table instead of losing them.

Normalized shape: `prompt` is a list of {role, content} messages (the whole
conversation before the answer, system messages included), `chosen` /
`rejected` are the final assistant answers as text, `score_chosen` /
`score_rejected` are floats or null. A plain-string prompt becomes a single
user message; a top-level `system` string becomes a leading system message.

Formats, tried in this order on the first record of a file that matches one
(`column_mapping` renames columns before that; `fmt=` skips detection):

- hh_rlhf: `chosen` is a "\\n\\nHuman: … \\n\\nAssistant: …" transcript (starts
  with a Human turn, has an Assistant turn). The turns both transcripts share
  are the prompt (Human -> user, Assistant -> assistant); the last Assistant
  turns are the completions.
- sharegpt (LLaMA-Factory): a `conversations` list of {from, value} plus
  `chosen` / `rejected` as one {from, value} message (or text). Roles:
  human/user -> user, gpt/assistant/model -> assistant, system -> system.
- pairwise (judgment tables): two responses (response_a/response_b,
  output_1/output_2, response_1/response_2, response_0/response_1 or
  completion_a/completion_b) and a label column (see LABEL_KEYS). The prompt
  is `instruction` (or `prompt` / `question`), with `input` appended after a
  blank line when present. Labels, one value or a list (one per annotator),
  each a value or an {annotator…, label} object: "a"/"b" (also model_a,
  response_a, or the response column's own name, any case); numbers counted
  like the response columns: 1/2 for *_1/*_2 and *_a/*_b, 0/1 for
  response_0/response_1 (numeric text such as "2" from CSV too); "tie…" is a
  vote for neither. The majority picks `chosen`; equal votes reject the row
  as `annotator_tie`.
- ultrafeedback (UltraFeedback / Argilla): `chosen` / `rejected` as text or
  message lists, with a pair of scores (SCORE_KEYS) at top level or under
  `metadata`. A text `prompt` that repeats the first user message of the
  message lists is not added twice.
- trl_conversational: `chosen` / `rejected` message lists, explicit `prompt`
  or implicit (the history shared before the final answers).
- trl_standard: `prompt` / `chosen` / `rejected` text.

Scores are read in every format where a score pair is present. Where a
conversation is split into prompt and answers, chosen and rejected must agree
on everything before their final assistant turns, or the row is rejected
(one of the two histories would otherwise be lost).

Files: .jsonl, .jsonl.gz, .json (an array, {"data": [...]}, or JSON Lines
under a .json name), .parquet, .csv (cells are text: numeric text counts as a
score or label, message lists cannot be expressed); each is read a record or a
batch at a time except a {"data": [...]} document.
anywhere (a number where text belongs, a dict where a list belongs, …) makes
that row a reject naming the field, never an exception.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass, replace
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
    "error_reason": pl.String,  # the rejects reason for `error`: unparseable, annotator_tie
    "format": pl.String,  # the format the file was read as
}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")

SCORE_KEYS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),
    ("rating_chosen", "rating_rejected"),
)
# response column pairs of pairwise tables -> the number a label gives the first one
RESPONSE_PAIRS = {
    ("response_a", "response_b"): 1,
    ("output_1", "output_2"): 1,
    ("response_0", "response_1"): 0,
    ("response_1", "response_2"): 1,
    ("completion_a", "completion_b"): 1,
}
LABEL_KEYS = ("preference", "label", "labels", "annotations", "winner", "choice", "better_response_id")
INSTRUCTION_KEYS = ("instruction", "prompt", "question")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class PreferenceFormatError(ValueError):
    """A whole file cannot be read as preference data."""


class RowError(ValueError):
    """One record is unusable; the message names the field, `reason` is its rejects reason."""

    def __init__(self, message: str, reason: str = "unparseable"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None


# ---- field readers: each raises RowError naming the field, never anything else


def _type(value: Any) -> str:
    return type(value).__name__


def _short(value: Any) -> str:
    """A value for an error message, cut short; huge ints and deep nests cannot even be printed."""
    try:
        return repr(value if isinstance(value, str) else str(value))[:42]
    except (ValueError, RecursionError):
        return f"<{_type(value)}>"


def _check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, str):
        raise RowError(f"field '{field}': expected text, got {_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates that polars cannot store
        raise RowError(f"field '{field}': not valid Unicode (lone surrogate)") from None
    return value


def _text(obj: dict, field: str) -> str:
    return _check_text(obj.get(field), field)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError(f"field '{field}': expected a number, got {_type(value)}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise RowError(f"field '{field}': {_short(value)} is not a number") from None
    if not math.isfinite(x):
        raise RowError(f"field '{field}': {_short(value)} is not a finite number")
    return x


def _message(m: Any, field: str, roles: dict[str, str] | None = None) -> dict[str, str]:
    if not isinstance(m, dict):
        raise RowError(f"field '{field}': expected a message object, got {_type(m)}")
    role_key, text_key = ("from", "value") if "from" in m or "value" in m else ("role", "content")
    role = _check_text(m.get(role_key), f"{field}.{role_key}")
    content = _check_text(m.get(text_key), f"{field}.{text_key}")
    if roles is not None:
        if role.lower() not in roles:
            raise RowError(f"field '{field}.{role_key}': unknown role {role[:30]!r}; known: {sorted(roles)}")
        role = roles[role.lower()]
    return {"role": role, "content": content}


def _messages(value: Any, field: str, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, list):
        raise RowError(f"field '{field}': expected a list of messages, got {_type(value)}")
    return [_message(m, f"{field}[{i}]", roles) for i, m in enumerate(value)]


def _prompt(value: Any, field: str = "prompt") -> list[dict[str, str]]:
    if isinstance(value, list):
        return _messages(value, field)
    if value is not None and not isinstance(value, str):
        raise RowError(f"field '{field}': expected text or a list of messages, got {_type(value)}")
    return [{"role": "user", "content": _check_text(value, field)}]


def _final_answer(messages: list[dict[str, str]], field: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"field '{field}': the last message must be the assistant's answer")
    return messages[-1]["content"]


def _join_conversation(prompt: Any, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Prompt + the history both completions carry; the final answers as text."""
    answers = _final_answer(chosen, "chosen"), _final_answer(rejected, "rejected")
    history = chosen[:-1]
    if history != rejected[:-1]:
        # otherwise one of the two histories would be silently thrown away
        raise RowError("chosen and rejected differ before their final answers; only the last assistant turn may differ")
    if prompt is None:
        head = []
    elif isinstance(prompt, str):
        text = _check_text(prompt, "prompt")
        first_user = next((m["content"] for m in history if m["role"] == "user"), None)
        # UltraFeedback on the Hub repeats the prompt text as the first user message
        head = [] if first_user is not None and first_user.strip() == text.strip() else _prompt(text)
    else:
        head = _prompt(prompt)
    return head + history, *answers


def _scores(obj: dict) -> tuple[float | None, float | None]:
    """The first score pair found (top level, then `metadata`); a pair with a missing half counts as none."""
    places = [obj] + ([obj["metadata"]] if isinstance(obj.get("metadata"), dict) else [])
    for place in places:
        for c, r in SCORE_KEYS:
            if c in place and r in place and (place[c] is not None or place[r] is not None):
                if place[c] is None or place[r] is None:
                    return None, None
                return _number(place[c], c), _number(place[r], r)
    return None, None


def _has_scores(obj: dict) -> bool:
    places = [obj] + ([obj["metadata"]] if isinstance(obj.get("metadata"), dict) else [])
    return any(c in p and r in p for p in places for c, r in SCORE_KEYS)


# ---- parsers: one record -> Pair


def parse_trl_standard(obj: dict) -> Pair:
    return Pair(_prompt(obj.get("prompt")), _text(obj, "chosen"), _text(obj, "rejected"), *_scores(obj))


def parse_trl_conversational(obj: dict) -> Pair:
    chosen, rejected = _messages(obj.get("chosen"), "chosen"), _messages(obj.get("rejected"), "rejected")
    return Pair(*_join_conversation(obj.get("prompt"), chosen, rejected), *_scores(obj))


def parse_ultrafeedback(obj: dict) -> Pair:
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        return parse_trl_conversational(obj)
    return parse_trl_standard(obj)


def _hh_turns(value: Any, field: str) -> list[dict[str, str]]:
    text = _check_text(value, field)
    parts = HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"field '{field}': expected a '\\n\\nHuman: … \\n\\nAssistant: …' transcript")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def parse_hh_rlhf(obj: dict) -> Pair:
    chosen, rejected = _hh_turns(obj.get("chosen"), "chosen"), _hh_turns(obj.get("rejected"), "rejected")
    return Pair(*_join_conversation(None, chosen, rejected), *_scores(obj))


def _sharegpt_answer(obj: dict, field: str) -> str:
    value = obj.get(field)
    if value is None or isinstance(value, str):
        return _check_text(value, field)
    if not isinstance(value, dict):
        raise RowError(f"field '{field}': expected a {{from, value}} message, got {_type(value)}")
    message = _message(value, field, SHAREGPT_ROLES)
    if message["role"] != "assistant":
        raise RowError(f"field '{field}': expected the assistant's answer, got role '{message['role']}'")
    return message["content"]


def parse_sharegpt(obj: dict) -> Pair:
    prompt = _messages(obj.get("conversations"), "conversations", SHAREGPT_ROLES)
    return Pair(prompt, _sharegpt_answer(obj, "chosen"), _sharegpt_answer(obj, "rejected"), *_scores(obj))


def _response_keys(obj: dict) -> tuple[str, str]:
    pair = next((p for p in RESPONSE_PAIRS if p[0] in obj and p[1] in obj), None)
    if pair is None:
        raise RowError(f"missing response columns: one of {[f'{a}/{b}' for a, b in RESPONSE_PAIRS]}")
    return pair


def _instruction(obj: dict) -> list[dict[str, str]]:
    key = next((k for k in INSTRUCTION_KEYS if obj.get(k) is not None), "instruction")
    text = _text(obj, key)
    extra = obj.get("input")
    if extra is not None and _check_text(extra, "input").strip():
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}]


def _vote(value: Any, field: str, names: tuple[str, str], base: int) -> int | None:
    """0: first response, 1: second, None: a tie vote."""
    if isinstance(value, dict):  # one annotation object, e.g. {"annotator": "x", "preference": "a"}
        key = next((k for k in LABEL_KEYS if value.get(k) is not None), None)
        if key is None:
            raise RowError(f"field '{field}': annotation without a label ({', '.join(LABEL_KEYS)})")
        value = value[key]
    if isinstance(value, str):
        s = value.strip().lower()
        if s.startswith("tie"):
            return None
        letters = {"a": 0, "b": 1, "model_a": 0, "model_b": 1, "response_a": 0, "response_b": 1,
                   names[0].lower(): 0, names[1].lower(): 1}
        if s in letters:
            return letters[s]
        value = int(s) if re.fullmatch(r"[0-9]", s) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (base, base + 1):
        return int(value) - base
    raise RowError(f"field '{field}': label {_short(value)} is not one of a, b, {base}, {base + 1}, tie")


def _votes(obj: dict, names: tuple[str, str], base: int) -> list[int | None]:
    key = next((k for k in LABEL_KEYS if obj.get(k) is not None), None)
    if key is None:
        raise RowError(f"missing label: one of {', '.join(LABEL_KEYS)}")
    values = obj[key] if isinstance(obj[key], list) else [obj[key]]
    if not values:
        raise RowError(f"field '{key}': no labels")
    return [_vote(v, key, names, base) for v in values]


def parse_pairwise(obj: dict) -> Pair:
    first, second = _response_keys(obj)
    prompt, a, b = _instruction(obj), _text(obj, first), _text(obj, second)
    votes = _votes(obj, (first, second), RESPONSE_PAIRS[(first, second)])
    n_a, n_b = votes.count(0), votes.count(1)
    if n_a == n_b:
        raise RowError(f"annotator tie: {n_a} vote(s) for '{first}', {n_b} for '{second}'", reason="annotator_tie")
    chosen, rejected = (a, b) if n_a > n_b else (b, a)
    return Pair(prompt, chosen, rejected)


def _is_hh(keys: set, rec: dict) -> bool:
    chosen = rec.get("chosen")
    return isinstance(chosen, str) and chosen.lstrip().startswith("Human:") and "\n\nAssistant:" in chosen


def _is_pairwise(keys: set, rec: dict) -> bool:
    return any({a, b} <= keys for a, b in RESPONSE_PAIRS) and any(k in keys for k in LABEL_KEYS)


# name -> (does it match these keys and this record?, parser); detection tries them in this order
FORMATS: dict[str, tuple[Callable[[set, dict], bool], Callable[[dict], Pair]]] = {
    "hh_rlhf": (lambda keys, rec: {"chosen", "rejected"} <= keys and _is_hh(keys, rec), parse_hh_rlhf),
    "sharegpt": (lambda keys, rec: {"conversations", "chosen", "rejected"} <= keys, parse_sharegpt),
    "pairwise": (_is_pairwise, parse_pairwise),
    "ultrafeedback": (lambda keys, rec: {"chosen", "rejected"} <= keys and _has_scores(rec), parse_ultrafeedback),
    "trl_conversational": (
        lambda keys, rec: {"chosen", "rejected"} <= keys and isinstance(rec.get("chosen"), list),
        parse_trl_conversational,
    ),
    "trl_standard": (
        lambda keys, rec: {"prompt", "chosen", "rejected"} <= keys and not isinstance(rec.get("chosen"), list),
        parse_trl_standard,
    ),
}


def _match(record: dict) -> str | None:
    keys = set(record)
    return next((name for name, (matches, _) in FORMATS.items() if matches(keys, record)), None)


def _no_format(record: dict, where: str) -> PreferenceFormatError:
    return PreferenceFormatError(
        f"{where}: columns {sorted(map(str, record))} match no known preference format; "
        f"known formats: {list(FORMATS)}. Pick a format explicitly (format), or rename columns "
        "(column_mapping, e.g. {'question': 'prompt', 'good': 'chosen', 'bad': 'rejected'})."
    )


def detect_format(record: dict, where: str) -> str:
    name = _match(record)
    if name is None:
        raise _no_format(record, where)
    return name


def _detect(records: Iterator[tuple[int, dict | RowError]], where: str) -> tuple[str | None, Iterator]:
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


def _rename(rec: dict | RowError, column_mapping: dict[str, str] | None) -> dict | RowError:
    if not column_mapping or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in column_mapping}
    out.update({dst: rec[src] for src, dst in column_mapping.items() if src in rec})
    return out


def _with_system(obj: dict, pair: Pair) -> Pair:
    system = obj.get("system")
    if system is None or not _check_text(system, "system").strip():
        return pair
    if pair.prompt and pair.prompt[0]["role"] == "system":
        return pair
    return replace(pair, prompt=[{"role": "system", "content": system}] + pair.prompt)


def _parse(rec: dict | RowError, parser: Callable[[dict], Pair] | None) -> tuple[Pair | None, RowError | None]:
    if isinstance(rec, RowError):
        return None, rec
    if not isinstance(rec, dict):
        return None, RowError(f"expected a record object, got {_type(rec)}")
    try:
        return _with_system(rec, parser(rec)), None
    except RowError as e:
        return None, e


# ---- files


def _decode_json_line(line: bytes, first: bool) -> dict | RowError:
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


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, _decode_json_line(line, lineno == 1)
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        where = f" after line {lineno}" if lineno else ""
        raise PreferenceFormatError(f"{path}: unreadable{where}: {e}") from e


def _json_records(path: Path, data: object) -> Iterator[tuple[int, dict | RowError]]:
    """The records of a .json file that holds one value: an array, or {"data": [...]}."""
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PreferenceFormatError(f"{path}: expected a JSON array of records, got {_type(data)}")
    return enumerate(data, start=1)


def _json_document(path: Path, text: str) -> Iterator[tuple[int, dict | RowError]]:
    """A .json file that starts with neither an array nor an object (so it is no record file): read whole, for
    json.loads' own error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise PreferenceFormatError(f"{path}: malformed JSON: {str(e)[:80]}") from e
    except RecursionError as e:
        raise PreferenceFormatError(f"{path}: malformed JSON: nested too deeply") from e
    return _json_records(path, data)


def _iter_text_file(path: Path, records: Callable[[io.TextIOBase], Iterator]) -> Iterator[tuple[int, dict | RowError]]:
    """records(f) over the file as text, with its errors named by the file."""
    from .text_files import TextFileError, open_text, utf8_error_offset

    try:
        with open_text(path) as f:
            yield from records(f)
    except UnicodeDecodeError:
        raise PreferenceFormatError(f"{path}: not UTF-8 (byte offset {utf8_error_offset(path)})") from None
    except TextFileError as e:
        raise PreferenceFormatError(f"{path}: {e}") from None


def _iter_json(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """A JSON array is read an element at a time, an object a line at a time if more follow it (JSON Lines under
    a .json name; else it is {"data": [...]}, read whole), anything else whole (`text_files`)."""
    from .text_files import first_char, first_value, iter_json_array

    def records(f: io.TextIOBase) -> Iterator[tuple[int, dict | RowError]]:
        first = first_char(f)
        if first == "[":
            elements = enumerate(iter_json_array(f), start=1)
        elif first == "{":
            value, extra = first_value(f)
            if extra is not None:  # one object a line under a .json name: read it as JSON Lines
                yield from _iter_jsonl(path)
                return
            elements = _json_records(path, value)
        else:
            elements = _json_document(path, f.read())
        for i, obj in elements:
            yield i, obj if isinstance(obj, dict) else RowError(f"expected a JSON object, got {_type(obj)}")

    return _iter_text_file(path, records)


def _csv_row(row: dict, width: int) -> dict | RowError:
    if None in row:  # DictReader files surplus cells under the key None
        return RowError(f"{width + len(row[None])} cells, the header has {width}")
    return row


def _iter_csv(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """A row at a time; a BOM at the start (spreadsheet exports write one) is skipped."""
    from .text_files import iter_csv_rows

    def records(f: io.TextIOBase) -> Iterator[tuple[int, dict | RowError]]:
        for i, (header, row) in enumerate(iter_csv_rows(f), start=1):
            yield i, _csv_row(row, len(header or []))

    return _iter_text_file(path, records)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """Row groups are read a batch at a time, so a large file is never held whole."""
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several error types for a damaged file
        raise PreferenceFormatError(f"{path}: unreadable parquet: {e}") from e

    def rows() -> Iterator[tuple[int, dict | RowError]]:
        n = 0
        try:
            for batch in source.iter_batches(batch_size=10_000):
                for row in pl.from_arrow(batch).iter_rows(named=True):
                    n += 1
                    yield n, row
        except Exception as e:
            raise PreferenceFormatError(f"{path}: unreadable parquet after row {n}: {e}") from e

    return rows()


def iter_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    path = Path(path)
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


# ---- tables


def _parser_for(fmt: str) -> Callable[[dict], Pair] | None:
    if fmt == "auto":
        return None
    if fmt not in FORMATS:
        raise PreferenceFormatError(f"unknown format {fmt!r}; known formats: {['auto', *FORMATS]}")
    return FORMATS[fmt][1]


# rows parsed into one table at a time by iter_tables: memory follows this, not the file
BATCH_ROWS = 50_000


def _message_lists(prompts: list[list[dict[str, str]] | None]) -> pl.Series:
    """The prompt column, built from flat role/content columns and list offsets through Arrow (zero-copy): polars
    builds a List(Struct) from Python dicts one row at a time, which halved ingest speed."""
    import numpy as np
    import pyarrow as pa

    offsets, roles, contents, missing = [0], [], [], []
    for messages in prompts:
        missing.append(messages is None)
        for m in messages or ():
            roles.append(m["role"])
            contents.append(m["content"])
        offsets.append(len(roles))
    flat = pl.DataFrame({"role": roles, "content": contents}, schema=RAW_SCHEMA["prompt"].inner.to_schema())
    messages = flat.to_struct("m").to_arrow(compat_level=pl.CompatLevel.newest())
    lists = pa.LargeListArray.from_arrays(pa.array(np.array(offsets, dtype=np.int64)), messages,
                                          mask=pa.array(np.array(missing, dtype=bool)) if any(missing) else None)
    return pl.Series("prompt", lists).cast(RAW_SCHEMA["prompt"])


def _table(rows: dict[str, list]) -> pl.DataFrame:
    prompts = _message_lists(rows["prompt"])
    return pl.DataFrame({**rows, "prompt": [None] * len(prompts)}, schema=RAW_SCHEMA).with_columns(prompts)


def iter_tables(
    records: Iterable[tuple[int, dict | RowError]],
    source: str,
    fmt: str = "auto",
    column_mapping: dict[str, str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pl.DataFrame]:
    """Parse records of one source into raw-table rows, `batch_rows` at a time (at least one table, maybe empty);
    bad records keep their error. The format is detected once, from the first record that matches one."""
    parser = _parser_for(fmt)
    records = ((n, _rename(rec, column_mapping)) for n, rec in records)
    if parser is None:
        fmt, records = _detect(records, source)
        parser = FORMATS[fmt][1] if fmt else None
    rows: dict[str, list] = {k: [] for k in RAW_SCHEMA}
    yielded = False
    for row_no, rec in records:
        pair, error = _parse(rec, parser)
        rows["source_file"].append(source)
        rows["source_row"].append(row_no)
        rows["error"].append(error and f"{source}:{row_no}: {error}")
        rows["error_reason"].append(error and error.reason)
        rows["format"].append(fmt)
        for field in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"):
            rows[field].append(getattr(pair, field) if pair else None)
        if len(rows["source_row"]) >= batch_rows:
            yield _table(rows)
            rows, yielded = {k: [] for k in RAW_SCHEMA}, True
    if rows["source_row"] or not yielded:
        yield _table(rows)


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
) -> Iterator[pl.DataFrame]:
    """`iter_tables(iter_records(path), …)`: the same rows; text pairs in JSON Lines and parquet files are read in
    bulk (`bulk_ingest`), several times faster."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        from orpo_pipeline.data.bulk_ingest import iter_parquet_tables

        return iter_parquet_tables(Path(path), source, fmt, batch_rows, column_mapping)
    if name.endswith((".jsonl", ".jsonl.gz")) and not column_mapping:  # a missing key and a null look alike there
        from orpo_pipeline.data.bulk_ingest import iter_jsonl_tables

        return iter_jsonl_tables(Path(path), source, fmt, batch_rows)
    return iter_tables(iter_records(path), source, fmt, column_mapping, batch_rows)


def preference_files(data_dir: Path) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"preference data folder not found: {data_dir}")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise PreferenceFormatError(f"{data_dir}: no preference files ({', '.join(SUFFIXES)})")
    return files


def read_preference_dir(data_dir: Path, fmt: str = "auto", column_mapping: dict[str, str] | None = None) -> pl.DataFrame:
    data_dir = Path(data_dir)
    tables = [
        pl.concat(iter_file_tables(p, str(p.relative_to(data_dir)), fmt, column_mapping))
        for p in preference_files(data_dir)
    ]
    return pl.concat(tables)
