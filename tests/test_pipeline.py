"""The whole asset graph, materialized on a real Dagster instance against a real MLflow SQLite store."""

from pathlib import Path

import dagster as dg
import datasets
import polars as pl
import pytest

from assets.partitions import range_tags, register_files
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.definitions import all_assets, all_checks
from orpo_pipeline.data.ingest import preference_files
from resources import ComputeResource, MlflowResource, StorageResource


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir, model_cache):
    state = tmp_path_factory.mktemp("state")
    resources = {
        "storage": StorageResource(root=str(state)),
        "compute": ComputeResource(device="cpu"),
        "mlflow_tracking": MlflowResource(state_dir=str(state), registered_model_name="tiny-orpo"),
    }
    # the model cache is shared so the tiny model and the GGUF conversion are built once per session
    (state / "models").symlink_to(model_cache, target_is_directory=True)
    run_config = {
        "ops": {
            "base_model": {"config": {"base_model": "tiny-random-llama"}},
            # the sample pairs have up to 143 tokens here: those over 128 are dropped, those of 113-128 truncated
            "tokenized_dataset": {"config": {"max_length": 112, "max_pair_tokens": 128}},
            "orpo_adapter": {"config": {"max_steps": 4, "logging_steps": 1, "per_device_train_batch_size": 4}},
            "benchmark_scores": {"config": {"max_eval_pairs": 16, "max_new_tokens": 4}},
        }
    }
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, preference_files(SAMPLE_DATA_DIR), resources["storage"].sources_path)
        result = dg.materialize(
            [*all_assets, *all_checks], resources=resources, run_config=run_config, instance=instance,
            tags=range_tags(keys),
        )
        materializations = {
            m.asset_key.to_user_string(): m.metadata
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
        }
        yield result, materializations, resources["mlflow_tracking"], state, keys


ASSETS = ["raw_preferences", "cleaned_preferences", "tokenized_dataset", "base_model", "orpo_adapter", "merged_model",
          "benchmark_scores", "lm_eval_scores", "champion_promotion"]


def test_every_asset_materializes_and_checks_pass(pipeline_run):
    result, mats, _, _, _ = pipeline_run
    assert result.success
    assert sorted(mats) == sorted(ASSETS)
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"cleaned_not_empty": True, "cleaned_has_no_nulls": True,
                           "no_train_eval_prompt_overlap": True, "rejects_share_under_ceiling": False,
                           "rows_in_equal_kept_plus_rejected": True,
                           "champion_alias_matches_decision": True}
    # the shipped dirty.jsonl rejects 10 of its 16 rows: the ceiling check warns about exactly that file
    ceiling = next(e for e in result.get_asset_check_evaluations() if e.check_name == "rejects_share_under_ceiling")
    assert ceiling.severity == dg.AssetCheckSeverity.WARN and ceiling.metadata["over_ceiling"].value == 1


def test_artifacts_exist_and_load(pipeline_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, mats, _, state, keys = pipeline_run
    storage = StorageResource(root=str(state))
    kept = rejected = 0
    for key in keys:
        folder = storage.partition_dir("cleaned_preferences", key)
        kept += pl.read_parquet(folder / "train.parquet").height + pl.read_parquet(folder / "eval.parquet").height
        rejected += pl.read_parquet(folder / "rejects.parquet").height
    # each partition's materialization counts its own file's rows
    raw_rows = [m.metadata["rows"].value for m in (e.event_specific_data.materialization
                                                    for e in result.get_asset_materialization_events())
                if m.asset_key.to_user_string() == "raw_preferences"]
    assert len(raw_rows) == len(keys) and kept + rejected == sum(raw_rows)
    reasons = {r for k in keys for r in pl.read_parquet(storage.partition_dir("cleaned_preferences", k) / "rejects.parquet")["reason"]}
    assert reasons >= {"unparseable", "duplicate_pair", "chosen_equals_rejected"}
    dups = pl.concat([pl.read_parquet(storage.partition_dir("cleaned_preferences", k) / "rejects.parquet")
                      for k in keys]).filter(pl.col("reason") == "duplicate_pair")
    # a duplicate names the copy that was kept (in its own file or an earlier one), never itself
    assert not dups.filter(pl.col("detail") == pl.format("duplicate of {}:{}", "source_file", "source_row")).height
    across = dups.filter(~pl.col("detail").str.starts_with(pl.format("duplicate of {}:", "source_file")))
    assert across.height >= 1 and across["detail"].str.contains(r"^duplicate of \S+\.\w+:\d+$").all()

    tokenized_dir = Path(result.output_for_node("tokenized_dataset")["dir"])
    tokenized = datasets.load_from_disk(tokenized_dir)
    dropped = pl.read_parquet(tokenized_dir.parent / "dropped.parquet")
    assert len(tokenized["train"]) + len(tokenized["eval"]) + dropped.height == kept
    assert dropped.height > 0 and set(dropped["reason"]) == {"too_long"}
    assert mats["tokenized_dataset"]["dropped_too_long"].value == dropped.height
    assert mats["tokenized_dataset"]["truncated_prompt"].value + mats["tokenized_dataset"]["truncated_completion"].value > 0

    base = result.output_for_node("base_model")["path"]
    adapter = result.output_for_node("orpo_adapter")["dir"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert any("lora" in n for n, _ in peft_model.named_parameters())

    merged_dir = Path(result.output_for_node("merged_model")["dir"])
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert model.config.vocab_size == len(tok)
    card = (merged_dir / "README.md").read_text()
    assert "tiny-random-llama" in card and "preference_accuracy" in card
    # lm_eval_scores' section survives benchmark_scores rewriting the card, whichever of the two ran first
    assert "## Benchmarks (lm-eval)" in card and "**nous** skipped" in card
    # no temp folders left behind by atomic writes
    assert not list(state.rglob(".*tmp-*"))


def test_mlflow_has_run_metrics_inputs_and_registered_version(pipeline_run):
    result, mats, tracking, _, keys = pipeline_run
    client = tracking.client()
    run_id = result.output_for_node("orpo_adapter")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert set(run.data.tags["dagster.assets"].split(",")) >= {"cleaned_preferences", "orpo_adapter"}
    assert run.data.tags["dagster.partition_keys"].split(",") == keys
    assert run.data.params["train.beta"] == "0.1"
    for key in ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "tokens_per_second", "peak_memory_mb"]:
        history = client.get_metric_history(run_id, key)
        assert len(history) == 4, key  # logged at every one of the 4 steps
    assert "eval/tuned/preference_accuracy" in run.data.metrics
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert inputs["tokenized_dataset"].dataset.digest == mats["tokenized_dataset"]["digest"].value
    # one input per preference file, with its content digest and partition key
    files = {p.name for p in preference_files(SAMPLE_DATA_DIR)}
    assert files <= set(inputs)
    for name in files:
        tags = {t.key: t.value for t in inputs[name].tags}
        assert tags["dagster.partition_key"] in keys and tags["file_sha256"].startswith(inputs[name].dataset.digest)
    assert run.data.tags["cleaned_digest"] == mats["tokenized_dataset"]["cleaned_digest"].value
    versions = client.search_model_versions("name='tiny-orpo'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    assert versions[0].tags["tokenized_digest"] == mats["tokenized_dataset"]["digest"].value
    assert versions[0].tags["champion_gate.decision"] == "promoted"  # the first model ever becomes champion
    assert client.get_model_version_by_alias("tiny-orpo", "champion").version == versions[0].version
    assert "eval.preference_accuracy" in versions[0].tags
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "benchmark_scores.json"} <= artifacts
    # every asset that talks to MLflow links its run
    for name in ASSETS:
        assert run_id in mats[name]["mlflow_run"].value


def test_benchmark_scores_compare_base_and_tuned(pipeline_run):
    result, mats, _, _, _ = pipeline_run
    scores = result.output_for_node("benchmark_scores")
    for name in ("base", "tuned"):
        assert 0.0 <= scores[name]["preference_accuracy"] <= 1.0
        assert scores[name]["chosen_nll"] > 0 and scores[name]["pairs"] == 16
    assert "| preference_accuracy |" in mats["benchmark_scores"]["scores"].value


def _clean_sample(state: Path, data_config: dict) -> list[str]:
    from assets.preferences import cleaned_preferences, raw_preferences

    resources = {
        "storage": StorageResource(root=str(state)),
        "mlflow_tracking": MlflowResource(state_dir=str(state), registered_model_name="tiny-orpo"),
    }
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, preference_files(SAMPLE_DATA_DIR), resources["storage"].sources_path)
        result = dg.materialize(
            [raw_preferences, cleaned_preferences], resources=resources, instance=instance, tags=range_tags(keys),
            run_config={"ops": {name: {"config": data_config} for name in ("raw_preferences", "cleaned_preferences")}},
        )
        assert result.success
        return [e.user_message for e in instance.all_logs(result.run_id)]


def test_files_read_and_cleaned_a_few_rows_at_a_time_give_the_same_partitions(tmp_path):
    """batch_rows bounds memory on big files; 7-row batches (duplicates across batches and files) change nothing."""
    quiet = _clean_sample(tmp_path / "whole", {})
    told = _clean_sample(tmp_path / "batched", {"batch_rows": 7})
    # big files report progress per batch; small ones do not
    assert any(m.endswith("rows read") for m in told) and any(m.endswith("rows cleaned") for m in told)
    assert not any(m.endswith(("rows read", "rows cleaned")) for m in quiet)
    for asset, files in (("raw_preferences", ["raw.parquet"]),
                         ("cleaned_preferences", ["train.parquet", "eval.parquet", "rejects.parquet"])):
        folders = sorted((tmp_path / "whole" / "artifacts" / asset / "partitions").iterdir())
        assert len(folders) == len(preference_files(SAMPLE_DATA_DIR))
        for whole in folders:
            batched = tmp_path / "batched" / "artifacts" / asset / "partitions" / whole.name
            for name in files:
                assert pl.read_parquet(whole / name).equals(pl.read_parquet(batched / name)), (whole.name, name)
    summaries = sorted((tmp_path / "whole").rglob("summary.json"))
    assert summaries and all(p.read_text() == (tmp_path / "batched" / p.relative_to(tmp_path / "whole")).read_text()
                             for p in summaries)


def test_partitions_hashed_by_an_older_version_stop_cleaning_until_cleaned_again(tmp_path):
    from assets.preferences import _hash_index_path, cleaned_preferences, raw_preferences

    _clean_sample(tmp_path, {})
    storage = StorageResource(root=str(tmp_path))
    index = pl.read_parquet(_hash_index_path(storage))
    old = index.with_columns(pl.col("content_hash") + pl.col("content_hash"))  # 64 digits, as SHA-256 was
    old.write_parquet(_hash_index_path(storage))
    resources = {"storage": storage,
                 "mlflow_tracking": MlflowResource(state_dir=str(tmp_path), registered_model_name="tiny-orpo")}
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, preference_files(SAMPLE_DATA_DIR), storage.sources_path)
        assert sorted(keys) == sorted(index["partition"].unique().to_list())
        last = dg.materialize([raw_preferences, cleaned_preferences], selection=[cleaned_preferences],
                              resources=resources, instance=instance, partition_key=keys[-1], raise_on_error=False)
        assert not last.success
        failure = next(e for e in last.all_events if e.event_type_value == "STEP_FAILURE")
        message = str(failure.event_specific_data.error)
        assert all(k in message for k in keys[:-1]) and "xxh3-128" in message
        every = dg.materialize([raw_preferences, cleaned_preferences], selection=[cleaned_preferences],
                               resources=resources, instance=instance, tags=range_tags(keys))
        assert every.success
    assert pl.read_parquet(_hash_index_path(storage))["content_hash"].str.len_bytes().unique().to_list() == [32]


def test_the_row_accounting_check_counts_the_stored_files(tmp_path):
    """rows_in_equal_kept_plus_rejected passes on what cleaning wrote, and fails, naming the file, once a rejected
    row goes missing from the stored rejects."""
    from assets.preferences import cleaned_preferences, raw_preferences, rows_in_equal_kept_plus_rejected

    storage = StorageResource(root=str(tmp_path))
    resources = {"storage": storage,
                 "mlflow_tracking": MlflowResource(state_dir=str(tmp_path), registered_model_name="tiny-orpo")}
    with dg.instance_for_test() as instance:
        sources, keys = register_files(instance, preference_files(SAMPLE_DATA_DIR), storage.sources_path)
        assert dg.materialize([raw_preferences, cleaned_preferences], resources=resources, instance=instance,
                              tags=range_tags(keys)).success

        def check() -> dg.AssetCheckResult:
            return rows_in_equal_kept_plus_rejected(dg.build_asset_check_context(instance=instance), storage=storage)

        before = check()
        assert before.passed and before.metadata["unbalanced"].value == 0
        dirty = next(s for s in sources if s.name == "dirty.jsonl")
        rejects = storage.partition_dir("cleaned_preferences", dirty.key) / "rejects.parquet"
        pl.read_parquet(rejects).slice(1).write_parquet(rejects)
        after = check()
        assert not after.passed and after.metadata["unbalanced"].value == 1 and "dirty.jsonl" in after.description


def test_no_mlflow_run_is_left_running_and_the_training_run_links_its_model(pipeline_run):
    result, mats, tracking, _, _ = pipeline_run
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id()])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    run = client.get_run(result.output_for_node("orpo_adapter")["mlflow_run_id"])
    version = client.get_model_version("tiny-orpo", mats["merged_model"]["model_version"].value)
    assert version.source == f"models:/{run.data.tags['logged_model_id']}"
    assert f"tiny-orpo version {version.version}" in run.data.tags["mlflow.note.content"]
    assert "LoRA adapter merged" in version.description
    assert {c["name"] for c in version_signature_inputs(tracking, version)} == {"prompt"}
    # the adapter's card is ours, not PEFT's template naming a temp folder as its base model
    card = (Path(result.output_for_node("orpo_adapter")["dir"]) / "README.md").read_text()
    assert "base_model: tiny-random-llama" in card and "## Trained on" in card and "dirty.jsonl" in card
    # "Datasets used": every input has a schema and a profile
    import json

    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert all(d.schema and d.profile for d in inputs.values())
    dirty = json.loads(inputs["dirty.jsonl"].profile)
    assert dirty["rows_in"] == dirty["kept"] + dirty["rejected"] and dirty["rejected_by_reason"]["unparseable"] > 0
    assert len(dirty["file_sha256"]) == 64 and dirty["partition_key"] in dirty["file_sha256"]
    tokens = json.loads(inputs["tokenized_dataset"].profile)
    assert tokens["rows"]["train"] > 0 and tokens["train_prompt_tokens"]["max"] <= 112


def version_signature_inputs(tracking, version) -> list[dict]:
    import mlflow

    tracking.client()
    info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
    return info.signature.inputs.to_dict()
