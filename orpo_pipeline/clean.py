"""Clean the raw preference table with polars.

Rules, in order (a row gets the first reason that applies):
unparseable record or annotator tie (found at ingest) -> empty prompt / chosen /
rejected -> chosen equals rejected -> score tie / score margin below the minimum
(only with `min_score_margin`, only rows with scores) -> duplicate pair (after
normalization, across every source seen).
Nothing is lost: rows in = kept + rejected, and each reject keeps its source.

Train/eval split is a hash of the normalized prompt, so a prompt never lands in
both and adding data never moves an old row to the other side.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import polars_hash as plh

REASONS = (
    "unparseable",
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
KEPT_COLUMNS = [
    "prompt",
    "chosen",
    "rejected",
    "source_file",
    "source_row",
    "content_hash",
    "prompt_hash",
    "split",
    "score_chosen",
    "score_rejected",
]
REJECT_COLUMNS = ["source_file", "source_row", "reason", "detail", "prompt", "chosen", "rejected"]


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


def normalize_text(e: pl.Expr) -> pl.Expr:
    """NFC, unix newlines, no zero-width or odd spaces, no trailing blanks."""
    return (
        e.str.normalize("NFC")
        .str.replace_all(r"\r\n?", "\n")
        .str.replace_all("[\u200b\u200c\u200d\ufeff]", "")
        .str.replace_all("[\u00a0\u2000-\u200a\u202f\u205f\u3000]", " ")
        .str.replace_all(r"[ \t]+\n", "\n")
        .str.replace_all(r"\n{3,}", "\n\n")
        .str.strip_chars()
    )


def _prompt_key(prompt: pl.Expr) -> pl.Expr:
    msg = pl.element().struct.field("role") + "\x1f" + pl.element().struct.field("content")
    return prompt.list.eval(msg).list.join("\x1e")


def _with_ingest_columns(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Raw tables written before `error_reason` existed: every error was unparseable."""
    names = lf.collect_schema().names()
    missing = [pl.lit(None, pl.String).alias(c) for c in ("error_reason", "format") if c not in names]
    return lf.with_columns(missing) if missing else lf


def _score_rules(reason: pl.Expr, min_score_margin: float | None) -> pl.Expr:
    if min_score_margin is None:
        return reason
    margin = pl.col("score_chosen") - pl.col("score_rejected")  # null without scores: no rule applies
    return (
        reason.when(margin.abs() <= SCORE_EPSILON)
        .then(pl.lit("score_tie"))
        .when(margin < min_score_margin - SCORE_EPSILON)
        .then(pl.lit("score_margin_below_min"))
    )


def clean_preferences(
    raw: pl.DataFrame | pl.LazyFrame,
    eval_fraction: float = 0.2,
    known_hashes: pl.Series | None = None,
    min_score_margin: float | None = None,
) -> CleanResult:
    """Apply the cleaning rules; `known_hashes` are content hashes already accepted elsewhere.

    With `min_score_margin` set, scored pairs whose scores tie or whose
    score_chosen - score_rejected is below it are rejected; unscored rows are not.
    """
    lf = _with_ingest_columns(raw.lazy())
    content = pl.element().struct.field("content")
    norm = lf.with_columns(
        pl.col("prompt").list.eval(
            pl.struct(role=pl.element().struct.field("role"), content=normalize_text(content))
        ),
        normalize_text(pl.col("chosen")),
        normalize_text(pl.col("rejected")),
    ).with_columns(_prompt_key(pl.col("prompt")).alias("prompt_key"))
    norm = norm.with_columns(
        plh.col("prompt_key").chash.sha2_256().alias("prompt_hash"),
        plh.concat_str(["prompt_key", "chosen", "rejected"], separator="\x1d").chash.sha2_256().alias("content_hash"),
    )
    empty_prompt = (
        pl.col("prompt").list.len().fill_null(0).eq(0)
        | pl.col("prompt").list.eval(pl.element().struct.field("content").str.len_bytes().eq(0)).list.any()
    )
    reason = (
        pl.when(pl.col("error").is_not_null())
        .then(pl.col("error_reason").fill_null("unparseable"))
        .when(empty_prompt)
        .then(pl.lit("empty_prompt"))
        .when(pl.col("chosen").str.len_bytes().eq(0))
        .then(pl.lit("empty_chosen"))
        .when(pl.col("rejected").str.len_bytes().eq(0))
        .then(pl.lit("empty_rejected"))
        .when(pl.col("chosen") == pl.col("rejected"))
        .then(pl.lit("chosen_equals_rejected"))
    )
    norm = norm.with_columns(_score_rules(reason, min_score_margin).alias("reason"))
    # first occurrence wins, in source order; it names the copy it kept
    valid = pl.col("reason").is_null()
    first = (
        norm.filter(valid)
        .group_by("content_hash", maintain_order=True)
        .agg(first_source=pl.format("{}:{}", pl.col("source_file").first(), pl.col("source_row").first()),
             first_file=pl.col("source_file").first(), first_row=pl.col("source_row").first())
    )
    norm = norm.join(first, on="content_hash", how="left", maintain_order="left")
    is_copy = valid & ~((pl.col("source_file") == pl.col("first_file")) & (pl.col("source_row") == pl.col("first_row")))
    if known_hashes is not None:
        is_copy = is_copy | (valid & pl.col("content_hash").is_in(known_hashes.implode()))
    norm = norm.with_columns(
        pl.when(is_copy).then(pl.lit("duplicate_pair")).otherwise(pl.col("reason")).alias("reason"),
    ).with_columns(
        pl.when(pl.col("error").is_not_null())
        .then(pl.col("error"))
        .when(pl.col("reason").is_in(["score_tie", "score_margin_below_min"]))
        .then(pl.format("{}:{}: {} (score_chosen {}, score_rejected {})", "source_file", "source_row", "reason",
                        "score_chosen", "score_rejected"))
        .when(pl.col("reason") == "duplicate_pair")
        .then(pl.format("duplicate of {}", pl.col("first_source").fill_null("an earlier partition")))
        .when(pl.col("reason").is_not_null())
        .then(pl.format("{}:{}: {}", pl.col("source_file"), pl.col("source_row"), pl.col("reason")))
        .alias("detail")
    )
    bucket = pl.col("prompt_hash").str.slice(0, 8).str.to_integer(base=16) % 10_000
    norm = norm.with_columns(
        pl.when(bucket < int(round(eval_fraction * 10_000))).then(pl.lit("eval")).otherwise(pl.lit("train")).alias("split")
    ).collect()
    kept = norm.filter(pl.col("reason").is_null()).select(KEPT_COLUMNS)
    rejects = norm.filter(pl.col("reason").is_not_null()).select(REJECT_COLUMNS)
    return CleanResult(kept=kept, rejects=rejects)


def rows_accounting(raw: pl.DataFrame | pl.LazyFrame, result: CleanResult) -> pl.DataFrame:
    """Per source file: rows in, kept, rejected, and whether rows in = kept + rejected."""
    def count(df: pl.DataFrame | pl.LazyFrame, name: str) -> pl.LazyFrame:
        return df.lazy().group_by("source_file", maintain_order=True).agg(pl.len().cast(pl.Int64).alias(name))

    out = count(raw, "rows_in")
    # full joins, so a source that shows up only on one side still gets a row and reads unbalanced
    for part, name in ((result.kept, "kept"), (result.rejects, "rejected")):
        out = out.join(count(part, name), on="source_file", how="full", coalesce=True, maintain_order="left_right")
    counts = pl.col("rows_in", "kept", "rejected").fill_null(0)
    return (
        out.with_columns(counts)
        .with_columns(balanced=pl.col("rows_in") == pl.col("kept") + pl.col("rejected"))
        .collect()
    )


def reasons_by_source(result: CleanResult) -> pl.DataFrame:
    """Per source file, how many rows each reason rejected (one column per reason, zeros included)."""
    sources = pl.concat([result.kept.select("source_file"), result.rejects.select("source_file")]).unique(
        maintain_order=True
    )
    counts = result.rejects.group_by("source_file", maintain_order=True).agg(
        (pl.col("reason") == r).sum().cast(pl.Int64).alias(r) for r in REASONS
    )
    return sources.join(counts, on="source_file", how="left", maintain_order="left").fill_null(0)


def length_stats(kept: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Character lengths of prompt / chosen / rejected: mean, p50, p90, max."""
    prompt_chars = kept["prompt"].list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    out = {}
    for name, s in (("prompt", prompt_chars), ("chosen", kept["chosen"].str.len_chars()), ("rejected", kept["rejected"].str.len_chars())):
        if len(s) == 0:
            out[name] = {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
            continue
        out[name] = {
            "mean": round(float(s.mean()), 1),
            "p50": float(s.quantile(0.5)),
            "p90": float(s.quantile(0.9)),
            "max": float(s.max()),
        }
    return out


def table_digest(kept: pl.DataFrame) -> str:
    """Order-free digest of the cleaned pairs and their split: same pairs, same digest."""
    import hashlib

    keys = kept.select(pl.format("{}:{}", "split", "content_hash")).to_series().sort().to_list()
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]  # MLflow caps dataset digests at 36 chars
