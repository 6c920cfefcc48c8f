"""Preference data assets: raw files -> cleaned polars tables -> tokenized Arrow dataset."""


from pathlib import Path

import dagster as dg
import polars as pl

from orpo_pipeline import clean, ingest, tokenization
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.plots import histograms_png, markdown_image, markdown_table
from orpo_pipeline.storage import atomic_dir, write_json
from resources import MlflowResource, StorageResource

from .config import DataConfig, TokenizeConfig

GROUP = "preferences"


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def raw_preferences(
    context: dg.AssetExecutionContext, config: DataConfig, storage: StorageResource, mlflow_tracking: MlflowResource
) -> dict:
    """Every record of the configured preference files (or Hugging Face dataset), parsed; bad records keep their error."""
    if config.hf_dataset:
        raw = ingest.read_hf_dataset(config.hf_dataset, config.hf_split, config.hf_config)
        origin = f"hf:{config.hf_dataset}[{config.hf_split}]"
    else:
        data_dir = Path(config.data_dir).expanduser() if config.data_dir else SAMPLE_DATA_DIR
        raw = ingest.read_preference_dir(data_dir)
        origin = str(data_dir.resolve())
    out = storage.artifact_dir("raw_preferences", context.run.run_id)
    with atomic_dir(out) as tmp:
        raw.write_parquet(tmp / "raw.parquet")
    per_source = raw.group_by("source_file", maintain_order=True).agg(
        rows=pl.len(), unparseable=pl.col("error").is_not_null().sum()
    )
    run_id = mlflow_tracking.run_id_for(context.run.run_id, context.asset_key.to_user_string())
    mlflow_tracking.client().log_param(run_id, "data.origin", origin)
    context.add_output_metadata(
        {
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
            "origin": origin,
            "rows": len(raw),
            "unparseable": int(raw["error"].is_not_null().sum()),
            "sources": dg.MetadataValue.md(markdown_table(per_source)),
            "path": dg.MetadataValue.path(str(out)),
        }
    )
    return {"path": str(out / "raw.parquet"), "rows": len(raw), "origin": origin}


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def cleaned_preferences(
    context: dg.AssetExecutionContext,
    config: DataConfig,
    raw_preferences: dict,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dict:
    """One row per usable pair, with source and content hash, split train/eval by prompt hash; rejects kept with reasons."""
    raw = pl.read_parquet(raw_preferences["path"])
    result = clean.clean_preferences(raw, eval_fraction=config.eval_fraction)
    if len(raw) != len(result.kept) + len(result.rejects):
        raise dg.Failure(f"row accounting broke: {len(raw)} in, {len(result.kept)} kept + {len(result.rejects)} rejected")
    for row in result.rejects.filter(pl.col("reason") == "unparseable").head(20).iter_rows(named=True):
        context.log.warning(f"rejected {row['detail']}")
    digest = clean.table_digest(result.kept)
    out = storage.artifact_dir("cleaned_preferences", context.run.run_id)
    with atomic_dir(out) as tmp:
        result.train.write_parquet(tmp / "train.parquet")
        result.eval.write_parquet(tmp / "eval.parquet")
        result.rejects.write_parquet(tmp / "rejects.parquet")
        write_json(tmp / "summary.json", {"digest": digest, "reasons": result.reason_counts()})
    counts = result.reason_counts()
    stats = clean.length_stats(result.kept)
    with mlflow_tracking.active_run(context) as run_id:
        import mlflow

        mlflow.log_metrics({f"data/rejected_{k}": v for k, v in counts.items()})
        mlflow.log_metrics({"data/train_pairs": len(result.train), "data/eval_pairs": len(result.eval)})
    context.add_output_metadata(
        {
            "rows_in": len(raw),
            "kept": len(result.kept),
            "rejected": len(result.rejects),
            "train_pairs": len(result.train),
            "eval_pairs": len(result.eval),
            "rejected_by_reason": dg.MetadataValue.json(counts),
            "length_chars": dg.MetadataValue.json(stats),
            "digest": digest,
            "rejects_preview": dg.MetadataValue.md(markdown_table(result.rejects.select("reason", "detail").head(15))),
            "path": dg.MetadataValue.path(str(out)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    return {
        "dir": str(out),
        "train": str(out / "train.parquet"),
        "eval": str(out / "eval.parquet"),
        "rejects": str(out / "rejects.parquet"),
        "digest": digest,
        "train_pairs": len(result.train),
        "eval_pairs": len(result.eval),
    }


@dg.asset_check(asset=cleaned_preferences, blocking=True)
def cleaned_not_empty(cleaned_preferences: dict) -> dg.AssetCheckResult:
    n = cleaned_preferences["train_pairs"]
    return dg.AssetCheckResult(passed=n > 0 and cleaned_preferences["eval_pairs"] > 0,
                               metadata={"train_pairs": n, "eval_pairs": cleaned_preferences["eval_pairs"]})


@dg.asset_check(asset=cleaned_preferences, blocking=True)
def cleaned_has_no_nulls(cleaned_preferences: dict) -> dg.AssetCheckResult:
    cols = ["prompt", "chosen", "rejected", "source_file", "source_row", "content_hash", "split"]
    nulls = {}
    for split in ("train", "eval"):
        df = pl.read_parquet(cleaned_preferences[split], columns=cols)
        for c, n in df.null_count().row(0, named=True).items():
            nulls[c] = nulls.get(c, 0) + n
    return dg.AssetCheckResult(passed=sum(nulls.values()) == 0, metadata={"nulls": dg.MetadataValue.json(nulls)})


@dg.asset_check(asset=cleaned_preferences, blocking=True)
def no_train_eval_prompt_overlap(cleaned_preferences: dict) -> dg.AssetCheckResult:
    train = pl.read_parquet(cleaned_preferences["train"], columns=["prompt_hash"])
    eval_ = pl.read_parquet(cleaned_preferences["eval"], columns=["prompt_hash"])
    overlap = train.join(eval_, on="prompt_hash", how="semi").n_unique()
    return dg.AssetCheckResult(passed=overlap == 0, metadata={"shared_prompts": overlap})


def _token_histogram(dataset, out: Path) -> Path:
    series = {
        "prompt": dataset["prompt_tokens"],
        "chosen": dataset["chosen_tokens"],
        "rejected": dataset["rejected_tokens"],
    }
    return histograms_png(series, out, "Token lengths after truncation (train)", "tokens")


@dg.asset(group_name=GROUP, kinds={"huggingface", "arrow"})
def tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    cleaned_preferences: dict,
    base_model: dict,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dict:
    """Chat-templated, tokenized train/eval splits in the trainer's layout; pairs that cannot fit are dropped with a reason."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model["path"])
    kwargs = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                  min_completion_tokens=config.min_completion_tokens)
    splits = {s: tokenization.tokenize_pairs(pl.read_parquet(cleaned_preferences[s]), tokenizer, **kwargs)
              for s in ("train", "eval")}
    dropped = [d | {"split": s} for s, t in splits.items() for d in t.dropped]
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
        write_json(tmp / "tokenize_config.json", kwargs | {"digest": digest, "base_model": base_model["path"]})
    train = splits["train"].dataset
    with mlflow_tracking.active_run(context) as run_id:
        import mlflow

        mlflow.log_metrics({"data/truncated_prompt": sum(t.truncated_prompt for t in splits.values()),
                            "data/truncated_completion": sum(t.truncated_completion for t in splits.values()),
                            "data/dropped_does_not_fit": len(dropped)})
        mlflow.log_artifact(str(out / hist.name), artifact_path="data_quality")
    context.add_output_metadata(
        {
            "train_pairs": len(train),
            "eval_pairs": len(splits["eval"].dataset),
            "truncated_prompt": sum(t.truncated_prompt for t in splits.values()),
            "truncated_completion": sum(t.truncated_completion for t in splits.values()),
            "dropped_does_not_fit": len(dropped),
            "min_completion_tokens_seen": min(min(train["chosen_tokens"], default=0), min(train["rejected_tokens"], default=0)),
            "token_length_histogram": dg.MetadataValue.md(markdown_image(out / hist.name, "token lengths")),
            "digest": digest,
            "path": dg.MetadataValue.path(str(out)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    return {"dir": str(out / "dataset"), "digest": digest, "max_length": config.max_length,
            "cleaned_digest": cleaned_preferences["digest"], "cleaned_dir": cleaned_preferences["dir"]}
