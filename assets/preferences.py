"""Preference data assets: raw files -> cleaned polars tables (one partition per file) -> tokenized Arrow dataset."""

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from orpo_pipeline.data import clean
from orpo_pipeline.data import drops
from orpo_pipeline.data import ingest
from orpo_pipeline.train import tokenize as tokenization
from orpo_pipeline.plots import histograms_png, markdown_image, markdown_table
from orpo_pipeline.storage import ParquetAppender, atomic_dir, write_json
from resources import ComputeResource, MlflowResource, StorageResource

from .config import CleanConfig, ReadConfig, TokenizeConfig
from .versions import CODE_VERSIONS, combined_version
from .partitions import preference_files, registered_keys

GROUP = "preferences"
ONE_RUN = dg.BackfillPolicy.single_run()


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"}, partitions_def=preference_files, backfill_policy=ONE_RUN,
          code_version=CODE_VERSIONS["raw_preferences"])
def raw_preferences(
    context: dg.AssetExecutionContext, config: ReadConfig, storage: StorageResource, mlflow_tracking: MlflowResource
) -> dg.MaterializeResult:
    """Every record of one preference file, parsed; records that cannot be read keep their error (file, row, field)."""
    for key in context.partition_keys:
        src = drops.load_source(storage.sources_path, key)
        tables = ingest.iter_file_tables(src.path, src.name, config.format, config.column_mapping,
                                         batch_rows=config.batch_rows, max_record_bytes=config.max_record_bytes)
        row = {"format": None, "rows": 0, "unparseable": 0}
        try:  # a batch at a time: a file of millions of pairs is never held whole
            with atomic_dir(storage.partition_dir("raw_preferences", key)) as tmp, \
                    ParquetAppender(tmp / "raw.parquet", background=True) as out:
                for t in tables:
                    out.write(t)
                    row["format"] = row["format"] or t["format"].drop_nulls().first()
                    row["rows"] += t.height
                    row["unparseable"] += int(t["error"].is_not_null().sum())
                    if t.height == config.batch_rows:  # a big file: say how far it got
                        context.log.info(f"{key} ({src.name}): {row['rows']:,} rows read")
        except ingest.PreferenceFormatError as e:
            raise dg.Failure(f"partition {key} ({src.name}): {e}") from e
        # this file's own figures on its own partition's materialization
        metadata = {"file_name": src.name, **row, "format": str(row["format"] or "?")}
        if row["rows"] == 0:
            metadata["warning"] = f"{src.name} holds no records (an empty array, only blank lines or a bare header)"
            context.log.warning(f"{key}: {metadata['warning']}")
        context.add_asset_metadata(metadata, partition_key=key)
    run_id = mlflow_tracking.run_id_for(context.run.run_id, context.asset_key.to_user_string())
    return dg.MaterializeResult(metadata={"mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id))},
                                data_version=_settings_version("raw_preferences", config))


def _settings_version(asset: str, config: dg.Config) -> dg.DataVersion:
    """A partition is a file by content (its key is the file's hash), so what it holds changes only with the code or
    the settings it was read or cleaned with: one data version for every partition a run writes (Dagster records a
    run's data version for all its partitions), the same on a refresh with the same settings."""
    # batch_rows changes how much is held at once, not what is written
    return dg.DataVersion(combined_version(CODE_VERSIONS[asset], config.model_dump_json(exclude={"batch_rows"})))


def _hash_index_path(storage: StorageResource) -> Path:
    return storage.root_path / "artifacts" / "cleaned_preferences" / "hash_index.parquet"


def _read_hash_index(storage: StorageResource) -> pl.DataFrame:
    """(partition, content_hash, source_file, source_row) of every accepted pair: one file, so dedup cost does not
    grow with file count. Indexes written before the source columns existed read with them empty."""
    schema = {"partition": pl.String, "content_hash": pl.String, "source_file": pl.String, "source_row": pl.Int64}
    path = _hash_index_path(storage)
    if path.is_file():
        return pl.concat([pl.DataFrame(schema=schema), pl.read_parquet(path)], how="diagonal_relaxed")
    return pl.DataFrame(schema=schema)


def _write_hash_index(storage: StorageResource, index: pl.DataFrame) -> None:
    from orpo_pipeline.storage import atomic_file

    with atomic_file(_hash_index_path(storage)) as tmp:
        # random hex compresses little: zstd took 6x as long to write 100k rows, for every cleaning run
        index.write_parquet(tmp, compression="uncompressed")


def _refuse_other_hashes(index: pl.DataFrame, cleaning: list[str]) -> None:
    """Partitions cleaned by a version that hashed with SHA-256 (64 hex digits) would never match a new pair's
    hash, so their duplicates would pass unseen: stop, and say which partitions to clean again."""
    stale = index.filter(~pl.col("partition").is_in(cleaning)
                         & (pl.col("content_hash").str.len_bytes() != clean.HASH_HEX_CHARS))
    if stale.height:
        names = sorted(stale["partition"].unique().to_list())
        raise dg.Failure(
            f"cleaned_preferences partitions {names} were cleaned by an earlier version, whose content hashes "
            f"(SHA-256) cannot be compared with this version's (xxh3-128): materialize cleaned_preferences for "
            f"those partitions too (a backfill of all partitions does it), so every pair shares one hash")


# pool: the hash index is read-modify-write, so two cleaning runs must not interleave (default_limit 1)
@dg.asset(group_name=GROUP, kinds={"polars", "parquet"}, partitions_def=preference_files, backfill_policy=ONE_RUN,
          deps=[raw_preferences], pool="preference_index", code_version=CODE_VERSIONS["cleaned_preferences"])
def cleaned_preferences(
    context: dg.AssetExecutionContext,
    config: CleanConfig,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dg.MaterializeResult:
    """Usable pairs of one file (normalized, deduplicated against every earlier file, split by prompt hash); rejects kept with reasons."""
    order = registered_keys(context.instance)
    summary = []
    index = _read_hash_index(storage)
    _refuse_other_hashes(index, context.partition_keys)
    margins_seen: list[float] = []
    for key in sorted(context.partition_keys, key=order.index):
        raw_path = storage.partition_dir("raw_preferences", key) / "raw.parquet"
        earlier = set(order[: order.index(key)])
        known = index.filter(pl.col("partition").is_in(earlier)).drop("partition")
        with atomic_dir(storage.partition_dir("cleaned_preferences", key)) as tmp:
            def progress(done: int, total: int, key=key) -> None:
                if total > config.batch_rows:
                    context.log.info(f"{key}: {done:,} / {total:,} rows cleaned")

            totals = clean.clean_parquet_file(raw_path, tmp, batch_rows=config.batch_rows, progress=progress,
                                              eval_fraction=config.eval_fraction, known_hashes=known,
                                              min_score_margin=config.min_score_margin,
                                              max_pair_chars=config.max_pair_chars)
            accounting = totals["accounting"]
            if not accounting["balanced"].all():
                raise dg.Failure(f"row accounting broke in {key}: {accounting.filter(~pl.col('balanced')).to_dicts()}")
            counts = totals["reasons"]
            write_json(tmp / "summary.json", {"digest": totals["digest"], "rows_in": totals["rows_in"],
                                              "kept": totals["kept"], "reasons": counts})
        unreadable = pl.scan_parquet(storage.partition_dir("cleaned_preferences", key) / "rejects.parquet").filter(
            pl.col("reason").is_in(["unparseable", "annotator_tie"])).head(20).collect()
        for detail in unreadable["detail"]:
            context.log.warning(f"rejected {detail}")
        margins_seen += pl.scan_parquet(raw_path).select(pl.col("score_chosen") - pl.col("score_rejected")) \
            .drop_nulls().collect().to_series().to_list()
        index = pl.concat([index.filter(pl.col("partition") != key),
                           totals["kept_index"].select(pl.lit(key).alias("partition"), "content_hash", "source_file",
                                                       "source_row")], how="diagonal_relaxed")
        file_name = drops.load_source(storage.sources_path, key).name
        summary.append({"partition": key, "file": file_name, "rows_in": totals["rows_in"],
                        "reject_share": round(totals["rejected"] / max(totals["rows_in"], 1), 4),
                        "kept": totals["kept"], "train": totals["train"], "eval": totals["eval"],
                        "rejected": totals["rejected"], **counts})
        # this file's own counts on its own partition's materialization
        context.add_asset_metadata({"file_name": file_name, "rows_in": totals["rows_in"], "kept": totals["kept"],
                                    "train_pairs": totals["train"], "eval_pairs": totals["eval"],
                                    "rejected": totals["rejected"],
                                    "rejected_by_reason": dg.MetadataValue.json(counts)}, partition_key=key)
    _write_hash_index(storage, index)
    table = pl.DataFrame(summary)
    reasons = {r: int(table[r].sum()) for r in clean.REASONS}
    margins = margins_seen
    report_dir = storage.artifact_dir("data_quality", context.run.run_id)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "cleaning_report.json", {"per_file": summary, "rejected_by_reason": reasons})
    extra = {}
    if margins:
        png = histograms_png({"score_chosen - score_rejected": margins}, report_dir / "score_margins.png",
                             "Score margins of scored pairs", "margin")
        extra["score_margin_histogram"] = dg.MetadataValue.md(markdown_image(png, "score margins"))
    with mlflow_tracking.active_run(context) as run_id:
        import mlflow

        # one count per run, not a curve: params, so the run's charts open on training curves and scores
        mlflow.log_params({f"data.rejected_{k}": v for k, v in reasons.items()})
        mlflow.log_params({"data.kept_pairs": int(table["kept"].sum()), "data.train_pairs": int(table["train"].sum()),
                           "data.eval_pairs": int(table["eval"].sum())})
        mlflow.log_artifacts(str(report_dir), artifact_path="data_quality")
    # the run's totals are in MLflow and the cleaning report; each partition carries its own file's counts
    return dg.MaterializeResult(metadata={**extra, "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id))},
                                data_version=_settings_version("cleaned_preferences", config))


def accepted_partitions(instance: dg.DagsterInstance, storage: StorageResource) -> list[tuple[str, Path]]:
    """Registered partitions that have been cleaned, in registration order."""
    out = []
    for key in registered_keys(instance):
        folder = storage.partition_dir("cleaned_preferences", key)
        if (folder / "summary.json").is_file():
            out.append((key, folder))
    return out


def _read_all(parts: list[tuple[str, Path]], split: str, columns=None) -> pl.DataFrame:
    frames = [pl.read_parquet(folder / f"{split}.parquet", columns=columns) for _, folder in parts]
    return pl.concat(frames) if frames else pl.DataFrame()


@dg.asset_check(asset=cleaned_preferences, blocking=True, description="At least one train and one eval pair, over all files.")
def cleaned_not_empty(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    parts = accepted_partitions(context.instance, storage)
    n_train, n_eval = len(_read_all(parts, "train", ["split"])), len(_read_all(parts, "eval", ["split"]))
    return dg.AssetCheckResult(passed=n_train > 0 and n_eval > 0, metadata={"train_pairs": n_train, "eval_pairs": n_eval})


@dg.asset_check(asset=cleaned_preferences, blocking=True, description="No nulls in any kept column, over all files.")
def cleaned_has_no_nulls(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    parts = accepted_partitions(context.instance, storage)
    cols = ["prompt", "chosen", "rejected", "source_file", "source_row", "content_hash", "split"]
    nulls: dict[str, int] = {}
    for split in ("train", "eval"):
        df = _read_all(parts, split, cols)
        if len(df):
            for c, n in df.null_count().row(0, named=True).items():
                nulls[c] = nulls.get(c, 0) + n
    return dg.AssetCheckResult(passed=sum(nulls.values()) == 0, metadata={"nulls": dg.MetadataValue.json(nulls)})


@dg.asset_check(asset=cleaned_preferences, blocking=True, description="No prompt in both train and eval; no pair twice.")
def no_train_eval_prompt_overlap(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    parts = accepted_partitions(context.instance, storage)
    train = _read_all(parts, "train", ["prompt_hash", "content_hash"])
    eval_ = _read_all(parts, "eval", ["prompt_hash", "content_hash"])
    if not len(train) or not len(eval_):
        return dg.AssetCheckResult(passed=True, metadata={"shared_prompts": 0, "duplicate_pairs": 0})
    overlap = train.join(eval_, on="prompt_hash", how="semi")["prompt_hash"].n_unique()
    both = pl.concat([train, eval_])
    dupes = len(both) - both["content_hash"].n_unique()
    return dg.AssetCheckResult(passed=overlap == 0 and dupes == 0,
                               metadata={"shared_prompts": overlap, "duplicate_pairs": dupes})


@dg.asset_check(asset=cleaned_preferences, blocking=True,
                description="Every file's rows are all accounted for: rows read = kept (train + eval) + rejected, "
                            "counted in the stored parquet files.")
def rows_in_equal_kept_plus_rejected(context: dg.AssetCheckExecutionContext,
                                     storage: StorageResource) -> dg.AssetCheckResult:
    import pyarrow.parquet as pq

    def rows(path: Path) -> int:  # from the footer: no data read
        return pq.ParquetFile(path).metadata.num_rows

    table = []
    for key, folder in accepted_partitions(context.instance, storage):
        row = {"partition": key, "file": drops.load_source(storage.sources_path, key).name,
               "rows_in": rows(storage.partition_dir("raw_preferences", key) / "raw.parquet"),
               "kept": rows(folder / "train.parquet") + rows(folder / "eval.parquet"),
               "rejected": rows(folder / "rejects.parquet")}
        table.append(row | {"balanced": row["rows_in"] == row["kept"] + row["rejected"]})
    unbalanced = [r for r in table if not r["balanced"]]
    return dg.AssetCheckResult(
        passed=not unbalanced,
        description=f"rows lost or added in {[r['file'] for r in unbalanced]}" if unbalanced else None,
        metadata={"files": dg.MetadataValue.md(markdown_table(pl.DataFrame(table))) if table else "none",
                  "unbalanced": len(unbalanced)},
    )


class RejectsCeilingConfig(dg.Config):
    # per file: above this a warning, since one bad export should be looked at
    max_reject_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of rejected rows per file above which the check warns.")


@dg.asset_check(asset=cleaned_preferences, blocking=False,
                description="Share of rejected rows per file stays under a ceiling (a warning, not a failure).")
def rejects_share_under_ceiling(context: dg.AssetCheckExecutionContext, config: RejectsCeilingConfig,
                                storage: StorageResource) -> dg.AssetCheckResult:
    import json

    rows = []
    for key, folder in accepted_partitions(context.instance, storage):
        summary = json.loads((folder / "summary.json").read_text())
        share = (summary["rows_in"] - summary["kept"]) / max(summary["rows_in"], 1)
        rows.append({"partition": key, "rows_in": summary["rows_in"], "reject_share": round(share, 4)})
    over = [r for r in rows if r["reject_share"] > config.max_reject_share]
    return dg.AssetCheckResult(
        passed=not over, severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(over)} file(s) reject more than {config.max_reject_share:.0%} of their rows" if over else None,
        metadata={"files": dg.MetadataValue.md(markdown_table(pl.DataFrame(rows))) if rows else "none",
                  "over_ceiling": len(over)},
    )


def _token_histogram(dataset, out: Path) -> Path:
    series = {
        "prompt": dataset["prompt_tokens"],
        "chosen": dataset["chosen_tokens"],
        "rejected": dataset["rejected_tokens"],
    }
    return histograms_png(series, out, "Token lengths after truncation (train)", "tokens")


@dg.asset(group_name=GROUP, kinds={"huggingface", "arrow"}, deps=[cleaned_preferences],
          code_version=CODE_VERSIONS["tokenized_dataset"])
def tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    base_model: dict,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[dict]:
    """All accepted pairs, chat-templated and tokenized once in the trainer's layout; pairs that cannot fit are dropped with a reason."""
    import datasets
    from transformers import AutoTokenizer

    parts = accepted_partitions(context.instance, storage)
    if not parts:
        raise dg.Failure("no cleaned preference partitions yet: add files to the drop folder or run scripts/run_pipeline.sh")
    tables = {s: _read_all(parts, s) for s in ("train", "eval")}
    cleaned_digest = clean.table_digest(pl.concat([tables["train"], tables["eval"]]))
    from orpo_pipeline.train.trainer import set_chat_template

    tokenizer = AutoTokenizer.from_pretrained(base_model["path"])
    added = set_chat_template(tokenizer, config.chat_template)  # the same call training makes: same token ids
    if added:
        context.log.info(f"chat_template added tokens {tokenizer.convert_ids_to_tokens(added)}")
    kwargs = config.model_dump(exclude={"chat_template"})  # every other setting is tokenize_pairs' keyword
    scratch = None
    if compute.ray_address and compute.ray_tokenize:  # Ray Data on the cluster: the same ids
        scratch = storage.artifact_dir("tokenized_dataset", f".{context.run.run_id}.ray")
        paths = {s: [str(folder / f"{s}.parquet") for _, folder in parts] for s in tables}
        splits = compute.tokenize_on_ray(context, paths, base_model["path"], config.chat_template, kwargs, scratch)
    else:
        splits = {s: tokenization.tokenize_pairs(t, tokenizer, **kwargs) for s, t in tables.items()}
    dropped = [d | {"split": s} for s, t in splits.items() for d in t.dropped]
    dropped_counts = {r: sum(d["reason"] == r for d in dropped) for r in tokenization.DROP_REASONS}
    for d in dropped[:20]:
        context.log.warning(f"dropped {d['detail']}")
    digest = tokenization.dataset_digest(splits["train"].dataset, splits["eval"].dataset)
    out = storage.artifact_dir("tokenized_dataset", context.run.run_id)
    with atomic_dir(out) as tmp:
        datasets.DatasetDict({s: t.dataset for s, t in splits.items()}).save_to_disk(str(tmp / "dataset"))
        pl.DataFrame(dropped, schema=["content_hash", "source", "reason", "detail", "split"]).write_parquet(
            tmp / "dropped.parquet"
        )
        hist = _token_histogram(splits["train"].dataset, tmp / "token_lengths.png")
        write_json(tmp / "tokenize_config.json", kwargs | {"digest": digest, "base_model": base_model["path"],
                                                           "chat_template": tokenizer.chat_template})
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    train = splits["train"].dataset
    sources = [drops.load_source(storage.sources_path, k).to_json() | {"partition_key": k} for k, _ in parts]
    with mlflow_tracking.active_run(context) as run_id:
        import mlflow

        mlflow.log_params({"data.truncated_prompt": sum(t.truncated_prompt for t in splits.values()),
                           "data.truncated_completion": sum(t.truncated_completion for t in splits.values()),
                           **{f"data.dropped_{r}": n for r, n in dropped_counts.items()}})
        mlflow.log_artifact(str(out / hist.name), artifact_path="data_quality")
    context.add_output_metadata(
        {
            "partitions": len(parts),
            "train_pairs": len(train),
            "eval_pairs": len(splits["eval"].dataset),
            "truncated_prompt": sum(t.truncated_prompt for t in splits.values()),
            "truncated_completion": sum(t.truncated_completion for t in splits.values()),
            **{f"dropped_{r}": n for r, n in dropped_counts.items()},
            "token_length_histogram": dg.MetadataValue.md(markdown_image(out / hist.name, "token lengths")),
            "cleaned_digest": cleaned_digest,
            "digest": digest,
            "path": dg.MetadataValue.path(str(out)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    # dg.Output: after the Ray path's Pipes session Dagster takes no bare return value
    return dg.Output({"dir": str(out / "dataset"), "digest": digest, "max_length": config.max_length,
                      "cleaned_digest": cleaned_digest, "sources": sources, "chat_template": config.chat_template},
                     data_version=dg.DataVersion(digest))
