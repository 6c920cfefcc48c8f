"""Raw-table rows built column-wise from a typed frame of records, wherever that gives exactly the rows
ingest's record parser gives; the other rows are handed back to be parsed record by record.

A frame's columns decide whether it can go in bulk at all: text answers (trl_standard, ultrafeedback) or
{role, content} message lists (trl_conversational, ultrafeedback), numeric scores at top level or in a
`metadata` struct, a text `system`. Then each row that the record parser would reject or build differently
goes back to it: a null text, a malformed conversation (an empty list, a null message or field, a last turn
that is not the assistant's, histories that differ), a system prompt, a non-finite score, a prompt whose
comparison with the first user turn would strip differently in Python (U+001C-U+001F are whitespace to
`str.strip`, not to polars), and, where a null may be a missing key (JSON Lines), a half-set score pair.
tests/test_bulk_ingest.py compares both ways on random files.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from orpo_pipeline.data import ingest

TEXT_FIELDS = ("prompt", "chosen", "rejected")
BULK_FORMATS = ("trl_standard", "ultrafeedback", "trl_conversational")
SCORE_NAMES = {k for pair in ingest.SCORE_KEYS for k in pair}
_PYTHON_ONLY_SPACE = "[\x1c-\x1f]"

Place = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (values as float64, null mask), for one score place


def is_messages(dtype: pl.DataType | None) -> bool:
    """A list of {role, content} texts; a `from` or `value` field would make the parser read those instead."""
    if not isinstance(dtype, pl.List) or not isinstance(dtype.inner, pl.Struct):
        return False
    fields = {f.name: f.dtype for f in dtype.inner.fields}
    return fields.get("role") == fields.get("content") == pl.String and not {"from", "value"} & set(fields)


def _numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() and not dtype.is_decimal() or dtype == pl.Null


def answers_kind(schema: pl.Schema, fmt: str) -> str | None:
    """'text', 'messages', or None where no row of a frame with these columns can be read in bulk."""
    if any(k in schema and not _numeric(schema[k]) for k in SCORE_NAMES):
        return None
    meta = schema.get("metadata")
    if isinstance(meta, pl.Struct) and any(f.name in SCORE_NAMES and not _numeric(f.dtype) for f in meta.fields):
        return None
    if schema.get("system", pl.Null) not in (pl.String, pl.Null):
        return None
    chosen, rejected, prompt = schema.get("chosen"), schema.get("rejected"), schema.get("prompt", pl.Null)
    if fmt in ("trl_standard", "ultrafeedback") and chosen == rejected == prompt == pl.String:
        return "text"  # ultrafeedback with text answers is parsed as trl_standard
    if fmt in ("trl_conversational", "ultrafeedback") and is_messages(chosen) and is_messages(rejected):
        return "messages" if prompt in (pl.String, pl.Null) else None
    return None


def _places(df: pl.DataFrame) -> list[Place]:
    """Where ingest._scores looks for score pairs: top level, then `metadata` (a null struct's fields are null)."""
    def floats(column: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        return column.cast(pl.Float64).fill_null(np.nan).to_numpy(), column.is_null().to_numpy()

    places = [{k: floats(df[k]) for k in df.columns if k in SCORE_NAMES}]
    if isinstance(df.schema.get("metadata"), pl.Struct):
        meta = df["metadata"]
        places.append({f.name: floats(meta.struct.field(f.name)) for f in meta.dtype.fields if f.name in SCORE_NAMES})
    return places


def _pick_scores(places: list[Place], n: int, halves_known: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ingest._scores over the rows: the first score pair, top level then `metadata`, whose keys are both there
    and that has a half set; no scores if a half is null. Returns (chosen, rejected) with NaN for no scores, and
    the rows the record parser must take: a non-finite score (an error there) and, unless `halves_known` (every
    row has every key, as in a parquet file), a pair with one half set: in JSON Lines a null half may be a missing
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


def _role_content(messages: pl.Expr) -> pl.Expr:
    return messages.list.eval(pl.struct(pl.element().struct.field("role"), pl.element().struct.field("content")))


def _answered(messages: pl.Expr) -> pl.Expr:
    """A non-empty list of whole messages whose last is the assistant's (otherwise the parser names the fault)."""
    whole = messages.list.eval(pl.element().is_not_null() & pl.element().struct.field("role").is_not_null()
                               & pl.element().struct.field("content").is_not_null()).list.all()
    last = messages.list.last().struct.field("role") == "assistant"
    return (messages.list.len() > 0) & whole & last


def _conversations(schema: pl.Schema) -> tuple[pl.Expr, pl.Expr]:
    """(rows ingest._join_conversation accepts and this builds alike, their prompt messages)."""
    chosen, rejected = pl.col("chosen"), pl.col("rejected")
    history = _role_content(chosen.list.head(chosen.list.len() - 1))
    ok = _answered(chosen) & _answered(rejected) & (history == _role_content(rejected.list.head(
        rejected.list.len() - 1)))
    if schema.get("prompt", pl.Null) == pl.Null:
        return ok.fill_null(False), history
    text = pl.col("prompt")
    first_user = history.list.eval(pl.element().filter(pl.element().struct.field("role") == "user")) \
        .list.first().struct.field("content")
    # UltraFeedback repeats the prompt as the first user turn: then it is not added twice
    repeated = first_user.is_not_null() & (first_user.str.strip_chars() == text.str.strip_chars())
    odd = text.str.contains(_PYTHON_ONLY_SPACE) | first_user.str.contains(_PYTHON_ONLY_SPACE).fill_null(False)
    messages = pl.when(text.is_not_null() & ~repeated).then(
        pl.concat_list(pl.struct(role=pl.lit("user"), content=text), history)).otherwise(history)
    return (ok & ~odd.fill_null(False)).fill_null(False), messages


def bulk_rows(df: pl.DataFrame, rows: np.ndarray, source: str, fmt: str, halves_known: bool
              ) -> tuple[pl.DataFrame | None, np.ndarray]:
    """Raw-table rows (numbered `rows`) of the records in `df` that go in bulk, and a mask of the records left to
    the record parser. `halves_known`: every record has every column's key (parquet), not so in JSON Lines."""
    kind = answers_kind(df.schema, fmt) if fmt in BULK_FORMATS and df.height else None
    if kind is None:
        return None, np.ones(df.height, dtype=bool)
    places = _places(df)
    score_chosen, score_rejected, slow = _pick_scores(places, df.height, halves_known)
    if not halves_known:
        for value, null in (v for place in places for v in place.values()):
            # inf is how Arrow reads an integer of 309+ digits; past 4,300 digits Python refuses the whole line
            slow |= ~null & ~np.isfinite(value)
    if "system" in df.columns:
        slow |= df["system"].is_not_null().to_numpy()  # a system prompt: the parser places it
    if kind == "text":
        slow |= df.select(pl.any_horizontal(pl.col(TEXT_FIELDS).is_null())).to_series().to_numpy()
        built = [pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col("prompt"))).alias("prompt"),
                 pl.col("chosen"), pl.col("rejected")]
    else:
        ok, messages = _conversations(df.schema)
        slow |= ~df.select(ok).to_series().to_numpy()
        built = [messages.alias("prompt"), pl.col("chosen").list.last().struct.field("content").alias("chosen"),
                 pl.col("rejected").list.last().struct.field("content").alias("rejected")]
    kept = df.filter(pl.Series(~slow)) if slow.any() else df
    table = kept.select(
        *built,
        source_file=pl.lit(source, pl.String),
        source_row=pl.Series(rows[~slow], dtype=pl.Int64),
        score_chosen=pl.Series(score_chosen[~slow]).fill_nan(None),
        score_rejected=pl.Series(score_rejected[~slow]).fill_nan(None),
        error=pl.lit(None, pl.String),
        error_reason=pl.lit(None, pl.String),
        format=pl.lit(fmt),
    ).select(list(ingest.RAW_SCHEMA)).cast(ingest.RAW_SCHEMA)  # in the raw table's column order
    return table, slow
