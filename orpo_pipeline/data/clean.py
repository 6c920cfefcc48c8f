"""Clean the raw preference table with polars.

Rules, in order (a row gets the first reason that applies): unparseable record or annotator tie (found at
ingest) -> pair over `max_pair_chars` characters (as ingested) -> empty prompt / chosen / rejected -> chosen
equals rejected -> score tie / score margin below the minimum (only with `min_score_margin`, only rows with
scores) -> duplicate pair (after normalization, across every source seen). Nothing is lost: rows in = kept +
rejected, and each reject keeps its source and its text as ingested (kept rows hold the normalized text).

Text normalization (`normalize.normalize_text`): NFC, unix newlines, no zero-width or odd spaces, no trailing
blanks, no runs of blank lines, stripped.

Hashes are xxh3-128 as 32 hex digits (xxhash's `xxh3_128_hexdigest`, so users can recompute them): `prompt_hash`
of the prompt key (each message as role + U+001F + content, joined by U+001E), `content_hash` of prompt key,
chosen and rejected joined by U+001D. The train/eval split is the first 8 hex digits of `prompt_hash`, so a
prompt never lands in both and adding data never moves an old row to the other side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import polars_hash  # noqa: F401 (registers the .nchash namespace used by _hex)

from .normalize import normalize_messages, normalize_series, normalize_text  # noqa: F401 (normalize_text: the API)

REASONS = (
    "unparseable",
    "pair_too_long",
    "empty_prompt",
    "empty_chosen",
    "empty_rejected",
    "chosen_equals_rejected",
    "annotator_tie",
    "score_tie",
    "score_margin_below_min",
    "duplicate_pair",
)
# scores like 7.3 - 6.8 must not fall a rounding error short of a 0.5 margin
SCORE_EPSILON = 1e-9
HASH_HEX_CHARS = 32
KEPT_COLUMNS = ["prompt", "chosen", "rejected", "source_file", "source_row", "content_hash", "prompt_hash", "split",
                "score_chosen", "score_rejected"]
REJECT_COLUMNS = ["source_file", "source_row", "reason", "detail", "prompt", "chosen", "rejected"]
# the raw columns cleaning reads; everything else in the raw table (format, ...) is never loaded
INPUT_COLUMNS = ["source_file", "source_row", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                 "error", "error_reason"]
INDEX_SCHEMA = {"content_hash": pl.String, "source_file": pl.String, "source_row": pl.Int64}


@dataclass
class CleanResult:
    kept: pl.DataFrame
    rejects: pl.DataFrame

    @property
    def train(self) -> pl.DataFrame:
        return self.kept.filter(pl.col("split") == "train")

    @property
    def eval(self) -> pl.DataFrame:
        return self.kept.filter(pl.col("split") == "eval")

    def reason_counts(self) -> dict[str, int]:
        counts = dict(self.rejects.group_by("reason").len().iter_rows())
        return {r: int(counts.get(r, 0)) for r in REASONS}


# ---------------------------------------------------------------- cleaning


def _hex(e: pl.Expr) -> pl.Expr:
    return e.nchash.xxh3_128(return_binary=True, byte_order="big").bin.encode("hex")


def _key64(e: pl.Expr) -> pl.Expr:
    """The first 64 bits of a hex hash, as a number: the index is probed with these (a number hashes far cheaper
    than 32 hex digits, and the index is probed once per batch), then the full hashes of the few found are joined."""
    return e.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False).alias("_key")


def _known_index(known_hashes: pl.Series | pl.DataFrame | None) -> pl.DataFrame:
    """(content_hash, source_file, source_row, _key) of pairs accepted elsewhere, one row per hash; sources null
    where not given. An index this built (it has `_key`) is taken as it is."""
    if known_hashes is None:
        known_hashes = pl.DataFrame(schema=INDEX_SCHEMA)
    if isinstance(known_hashes, pl.DataFrame) and "_key" in known_hashes.columns:
        return known_hashes
    known = known_hashes.to_frame("content_hash") if isinstance(known_hashes, pl.Series) else known_hashes
    known = known.select(pl.col(c) if c in known.columns else pl.lit(None, t).alias(c) for c, t in INDEX_SCHEMA.items())
    known = known.cast(INDEX_SCHEMA).unique("content_hash", keep="first", maintain_order=True)
    return known.with_columns(_key64(pl.col("content_hash")))


def _reasons(min_score_margin: float | None, max_pair_chars: int | None) -> pl.Expr:
    """The first reason that applies to a row on its own (duplicates need the whole table)."""
    empty_prompt = (pl.col("_prompt").list.len().fill_null(0).eq(0)
                    | pl.col("_prompt").list.eval(pl.element().struct.field("content").str.len_bytes().eq(0)).list.any())
    reason = pl.when(pl.col("error").is_not_null()).then(pl.col("error_reason").fill_null("unparseable"))
    if max_pair_chars is not None:
        reason = reason.when(pl.col("_too_long")).then(pl.lit("pair_too_long"))
    reason = (
        reason.when(empty_prompt.fill_null(False)).then(pl.lit("empty_prompt"))
        .when(pl.col("_chosen").str.len_bytes().eq(0)).then(pl.lit("empty_chosen"))
        .when(pl.col("_rejected").str.len_bytes().eq(0)).then(pl.lit("empty_rejected"))
        .when(pl.col("_chosen") == pl.col("_rejected")).then(pl.lit("chosen_equals_rejected"))
    )
    if min_score_margin is not None:
        margin = pl.col("score_chosen") - pl.col("score_rejected")  # null without scores: no rule applies
        reason = (reason.when(margin.abs() <= SCORE_EPSILON).then(pl.lit("score_tie"))
                  .when(margin < min_score_margin - SCORE_EPSILON).then(pl.lit("score_margin_below_min")))
    return reason.otherwise(pl.lit(None, pl.String))


def clean_preferences(
    raw: pl.DataFrame | pl.LazyFrame,
    eval_fraction: float = 0.2,
    known_hashes: pl.Series | pl.DataFrame | None = None,
    min_score_margin: float | None = None,
    max_pair_chars: int | None = None,
) -> CleanResult:
    """Apply the cleaning rules; `known_hashes` are content hashes already accepted elsewhere: a Series, or a
    DataFrame with `content_hash` and, to name the kept copy in the rejects' detail, `source_file` / `source_row`.

    With `min_score_margin` set, scored pairs whose scores tie or whose score_chosen - score_rejected is below it
    are rejected; unscored rows are not. Pairs of more than `max_pair_chars` characters are rejected before
    anything else is done with their text.
    """
    known = _known_index(known_hashes)
    lf = raw.lazy()
    names = lf.collect_schema().names()
    # raw tables written before `error_reason` existed: every error was unparseable
    df = lf.select(pl.col(c) if c in names else pl.lit(None, pl.String).alias(c) for c in INPUT_COLUMNS).collect()
    short = df
    if max_pair_chars is not None:  # over-long pairs are not normalized at all: their count is all they cost
        chars = (pl.col("prompt").list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
                 + pl.col("chosen").str.len_chars() + pl.col("rejected").str.len_chars())
        df = df.with_columns(_too_long=(chars > max_pair_chars).fill_null(False))
        if df["_too_long"].any():
            short = df.with_columns(pl.when("_too_long").then(None).otherwise(c).alias(c)
                                    for c in ("prompt", "chosen", "rejected"))
    df = df.with_columns(normalize_messages(short["prompt"]).alias("_prompt"),
                         normalize_series(short["chosen"]).alias("_chosen"),
                         normalize_series(short["rejected"]).alias("_rejected"))
    key = pl.col("_prompt").list.eval(pl.element().struct.field("role") + "\x1f" + pl.element().struct.field("content"))
    df = df.with_columns(_key=key.list.join("\x1e")).with_columns(
        reason=_reasons(min_score_margin, max_pair_chars),
        prompt_hash=_hex(pl.col("_key")),
        content_hash=_hex(pl.concat_str(["_key", "_chosen", "_rejected"], separator="\x1d")),
    ).drop("_key")
    # the first valid occurrence of a pair wins, and its copies name it; a null hash matches nothing
    df = df.with_columns(_h=pl.when(pl.col("reason").is_null()).then(pl.col("content_hash")))
    if known.height:  # the index is probed with this table's hashes, not joined whole
        known = known.join(df.select(_key64(pl.col("_h"))).drop_nulls(), on="_key", how="semi")
    df = df.join(known.drop("_key").rename({"content_hash": "_h", "source_file": "_known_file",
                                            "source_row": "_known_row"})
                 .with_columns(_known=pl.lit(True)), on="_h", how="left", maintain_order="left")
    duplicate = pl.col("_h").is_not_null() & (pl.col("_known").fill_null(False) | ~pl.col("_h").is_first_distinct())
    df = df.with_columns(
        reason=pl.when(duplicate).then(pl.lit("duplicate_pair")).otherwise("reason"),
        _first_file=pl.when(pl.col("_known")).then("_known_file").otherwise(pl.col("source_file").first().over("_h")),
        _first_row=pl.when(pl.col("_known")).then("_known_row").otherwise(pl.col("source_row").first().over("_h")),
    )
    keep = pl.col("reason").is_null()
    bucket = pl.col("prompt_hash").str.slice(0, 8).str.to_integer(base=16) % 10_000
    split = pl.when(bucket < int(round(eval_fraction * 10_000))).then(pl.lit("eval")).otherwise(pl.lit("train"))
    kept = df.filter(keep).select(pl.col("_prompt").alias("prompt"), pl.col("_chosen").alias("chosen"),
                                  pl.col("_rejected").alias("rejected"), "source_file", "source_row", "content_hash",
                                  "prompt_hash", split.alias("split"), "score_chosen", "score_rejected")
    rejects = df.filter(~keep)
    return CleanResult(kept=kept, rejects=rejects.select(*REJECT_COLUMNS[:3], _detail(rejects, max_pair_chars),
                                                         *REJECT_COLUMNS[4:]))


def _detail(rejects: pl.DataFrame, max_pair_chars: int | None) -> pl.Expr:
    """The rejects' detail; a when/then computes every branch on every row, so only the kinds of reject this table
    has get one (the score branch formats floats)."""
    reasons = set(rejects["reason"].unique().to_list())
    at = pl.format("{}:{}: {}", "source_file", "source_row", "reason")
    first_source = pl.format("{}:{}", "_first_file", "_first_row").fill_null("an earlier partition")
    branches = [
        (rejects["error"].null_count() < rejects.height, pl.col("error").is_not_null(), pl.col("error")),
        (bool(reasons & {"score_tie", "score_margin_below_min"}),
         pl.col("reason").is_in(["score_tie", "score_margin_below_min"]),
         pl.format("{} (score_chosen {}, score_rejected {})", at, "score_chosen", "score_rejected")),
        ("pair_too_long" in reasons, pl.col("reason") == "pair_too_long",
         pl.concat_str([at, pl.lit(f" (more than max_pair_chars = {max_pair_chars} characters)")])),
        ("duplicate_pair" in reasons, pl.col("reason") == "duplicate_pair", pl.format("duplicate of {}", first_source)),
    ]
    detail = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for needed, condition, value in branches:
        if needed:
            detail = detail.when(condition).then(value)
    return detail.otherwise(at).alias("detail")


def rows_accounting(raw: pl.DataFrame | pl.LazyFrame, result: CleanResult) -> pl.DataFrame:
    """Per source file: rows in, kept, rejected, and whether rows in = kept + rejected."""
    def count(df: pl.DataFrame | pl.LazyFrame, name: str) -> pl.LazyFrame:
        return df.lazy().group_by("source_file", maintain_order=True).agg(pl.len().cast(pl.Int64).alias(name))

    out = count(raw, "rows_in")
    # full joins, so a source that shows up only on one side still gets a row and reads unbalanced
    for part, name in ((result.kept, "kept"), (result.rejects, "rejected")):
        out = out.join(count(part, name), on="source_file", how="full", coalesce=True, maintain_order="left_right")
    counts = pl.col("rows_in", "kept", "rejected").fill_null(0)
    return (out.with_columns(counts).with_columns(balanced=pl.col("rows_in") == pl.col("kept") + pl.col("rejected"))
            .collect())


def reasons_by_source(result: CleanResult) -> pl.DataFrame:
    """Per source file, how many rows each reason rejected (one column per reason, zeros included)."""
    sources = pl.concat([result.kept.select("source_file"), result.rejects.select("source_file")]).unique(
        maintain_order=True)
    counts = result.rejects.group_by("source_file", maintain_order=True).agg(
        (pl.col("reason") == r).sum().cast(pl.Int64).alias(r) for r in REASONS)
    return sources.join(counts, on="source_file", how="left", maintain_order="left").fill_null(0)


def length_stats(kept: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Character lengths of prompt / chosen / rejected: mean, p50, p90, max."""
    prompt_chars = kept["prompt"].list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    out = {}
    for name, s in (("prompt", prompt_chars), ("chosen", kept["chosen"].str.len_chars()),
                    ("rejected", kept["rejected"].str.len_chars())):
        if len(s) == 0:
            out[name] = {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
            continue
        out[name] = {"mean": round(float(s.mean()), 1), "p50": float(s.quantile(0.5)), "p90": float(s.quantile(0.9)),
                     "max": float(s.max())}
    return out


def table_digest(kept: pl.DataFrame) -> str:
    """Order-free digest of the cleaned pairs and their split: same pairs, same digest."""
    import hashlib

    keys = kept.select(pl.format("{}:{}", "split", "content_hash")).to_series().sort().to_list()
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]  # MLflow caps dataset digests at 36 chars


def clean_in_batches(
    batches: Iterable[pl.DataFrame],
    write: Callable[[int, CleanResult], None],
    eval_fraction: float = 0.2,
    known_hashes: pl.DataFrame | None = None,
    min_score_margin: float | None = None,
    max_pair_chars: int | None = None,
) -> dict:
    """clean_preferences over a table too large to hold, one batch at a time, in source order.

    Each batch's result goes to `write(i, result)` and is dropped; only an index of the kept pairs (hash, file,
    row) grows. The concatenated results equal clean_preferences over the whole table: a pair kept in an earlier
    batch rejects its later copies, and their detail names it.

    Returns counts (rows in, kept, train, eval, rejected, per reason), `accounting` (rows_accounting over all
    batches), `digest` (table_digest of all kept pairs) and `kept_index` (content_hash, source_file, source_row of
    the pairs kept here).
    """
    known = _known_index(known_hashes)
    totals: dict = {"batches": 0, "rows_in": 0, "kept": 0, "train": 0, "eval": 0, "rejected": 0,
                    "reasons": dict.fromkeys(REASONS, 0)}
    new_index, keys, accounting = [], [], []
    for i, batch in enumerate(batches):
        result = clean_preferences(batch, eval_fraction, known, min_score_margin, max_pair_chars)
        write(i, result)
        kept_index = result.kept.select(list(INDEX_SCHEMA))
        known = pl.concat([known, _known_index(kept_index.filter(pl.col("content_hash").is_not_null()))])
        new_index.append(kept_index)
        keys.append(result.kept.select("split", "content_hash"))
        accounting.append(rows_accounting(batch, result))
        totals["batches"] += 1
        totals["rows_in"] += batch.height
        totals["kept"] += result.kept.height
        totals["train"] += int((result.kept["split"] == "train").sum())
        totals["eval"] += int((result.kept["split"] == "eval").sum())
        totals["rejected"] += result.rejects.height
        for reason, n in result.reason_counts().items():
            totals["reasons"][reason] += n
    totals["kept_index"] = pl.concat(new_index) if new_index else pl.DataFrame(schema=INDEX_SCHEMA)
    totals["digest"] = table_digest(pl.concat(keys) if keys else pl.DataFrame(
        schema={"split": pl.String, "content_hash": pl.String}))
    counts = pl.col("rows_in", "kept", "rejected")
    totals["accounting"] = (
        pl.concat(accounting).group_by("source_file", maintain_order=True).agg(counts.sum())
        .with_columns(balanced=pl.col("rows_in") == pl.col("kept") + pl.col("rejected"))
        if accounting else pl.DataFrame()
    )
    return totals


def parquet_batches(path: Path, batch_rows: int, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """A parquet file `batch_rows` rows at a time, only `columns` of it that it has (default all); an empty file
    gives one empty table (its schema)."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    if columns is not None:
        columns = [c for c in columns if c in source.schema_arrow.names]
    if source.metadata.num_rows == 0:
        yield pl.read_parquet(path, columns=columns)
        return
    for b in source.iter_batches(batch_size=batch_rows, columns=columns):
        yield pl.from_arrow(b)


def clean_parquet_file(path: Path, out_dir: Path, batch_rows: int = 50_000,
                       progress: Callable[[int, int], None] | None = None, **kwargs) -> dict:
    """Clean a raw-preference parquet file batch by batch into out_dir/{train,eval,rejects}.parquet, each written
    a batch at a time on a thread of its own while the next batch is cleaned (write into an atomic_dir's temp
    folder); `progress(rows_done, rows_total)` after each batch. Returns clean_in_batches' totals."""
    import pyarrow.parquet as pq

    from ..storage import ParquetAppender

    total, done = pq.ParquetFile(path).metadata.num_rows, 0
    with ParquetAppender(out_dir / "train.parquet", background=True) as train, \
            ParquetAppender(out_dir / "eval.parquet", background=True) as eval_, \
            ParquetAppender(out_dir / "rejects.parquet", background=True) as rejects:
        def write(i: int, result: CleanResult) -> None:
            nonlocal done
            train.write(result.train)
            eval_.write(result.eval)
            rejects.write(result.rejects)
            done += result.kept.height + result.rejects.height
            if progress is not None:
                progress(done, total)

        return clean_in_batches(parquet_batches(Path(path), batch_rows, INPUT_COLUMNS), write, **kwargs)
