"""Model assets: base model -> ORPO LoRA adapter -> merged weights -> benchmark scores."""


import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from orpo_pipeline.models import base as base_model_lib
from orpo_pipeline.plots import curves_png, markdown_image
from orpo_pipeline.storage import atomic_file, cached_dir_digest, dir_digest
from resources import ComputeResource, MlflowResource, StorageResource

from .config import EvalConfig, ModelConfig, TrainConfig
from .versions import CODE_VERSIONS, combined_version

GROUP = "model"
TRAIN_CURVES = ["loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"]
STEP_METRICS = TRAIN_CURVES + [
    "log_odds_chosen", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
    "grad_norm", "learning_rate", "tokens_per_second", "peak_memory_mb",
]


@dg.asset(group_name=GROUP, kinds={"huggingface", "safetensors"}, code_version=CODE_VERSIONS["base_model"])
def base_model(
    context: dg.AssetExecutionContext, config: ModelConfig, storage: StorageResource, mlflow_tracking: MlflowResource
) -> dg.Output[dict]:
    """The configured base model as a local safetensors folder (the embedded default is converted from GGUF once)."""
    try:
        path = base_model_lib.resolve_base_model(config.base_model, storage.model_cache, config.revision)
    except base_model_lib.BaseModelError as e:
        raise dg.Failure(str(e)) from e
    cfg = json.loads((path / "config.json").read_text())
    digest = cached_dir_digest(path, storage.root_path / "artifacts" / "base_model" / "digests")
    run_id = mlflow_tracking.run_id_for(context.run.run_id, context.asset_key.to_user_string())
    context.add_output_metadata(
        {
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
            "base_model": config.base_model,
            "path": dg.MetadataValue.path(str(path)),
            "architecture": ", ".join(cfg.get("architectures", [])),
            "hidden_size": cfg.get("hidden_size", 0),
            "layers": cfg.get("num_hidden_layers", 0),
            "vocab_size": cfg.get("vocab_size", 0),
            "digest": digest,
        }
    )
    # the data version is the weights' digest: the same bytes again leave every downstream asset in sync
    return dg.Output({"path": str(path), "name": config.base_model, "digest": digest},
                     data_version=dg.DataVersion(digest))


def _mlflow_step_logger(context: dg.AssetExecutionContext, run_id: str, client):
    """on_log for training: step metrics to MLflow through a bounded background queue, a progress line to Dagster.

    Returns (on_log, sink); close the sink when training ends. A dead tracking server costs dropped metrics and
    a warning in the run log, never a stalled training loop.
    """
    import time

    from mlflow.entities import Metric

    from orpo_pipeline.train.metrics_sink import MetricsSink

    sink = MetricsSink(lambda step, metrics: client.log_batch(run_id, metrics=metrics), warn=context.log.warning)

    def on_log(step: int, logs: dict[str, float]) -> None:
        now = int(time.time() * 1000)  # when it was measured, not when the queue delivered it
        metrics = [Metric(k, v, now, step) for k, v in logs.items() if k in STEP_METRICS]
        if metrics:
            sink.put(step, metrics)
        if "loss" in logs:
            context.log.info(
                f"step {step} ({logs.get('progress', 0):.0%}): loss {logs['loss']:.4f}, "
                f"nll {logs.get('nll_loss', float('nan')):.4f}, log_odds_ratio {logs.get('log_odds_ratio', float('nan')):.4f}, "
                f"reward acc {logs.get('rewards/accuracies', float('nan')):.2f}, {logs.get('tokens_per_second', 0):.0f} tok/s"
            )

    return on_log, sink


def _link_resumed_run(context: dg.AssetExecutionContext, checkpoint_dir: Path, run_id: str, resume: bool) -> None:
    """Tag this MLflow run with the run whose checkpoints it resumes, and record this run as the latest one."""
    import mlflow

    from orpo_pipeline.storage import write_json
    from orpo_pipeline.train.checkpoints import last_complete_checkpoint, resumed_step

    marker = checkpoint_dir / "tracking.json"
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    last = last_complete_checkpoint(checkpoint_dir) if resume else None
    if last is not None:
        context.log.info(f"resuming the training from {last} (step {resumed_step(last)})")
        if previous.get("mlflow_run_id") not in (None, run_id):
            mlflow.set_tags({"resumed_from_mlflow_run": previous["mlflow_run_id"],
                             "resumed_from_dagster_run": previous.get("dagster_run_id", ""),
                             "resumed_from_step": str(resumed_step(last))})
    write_json(marker, {"mlflow_run_id": run_id, "dagster_run_id": context.run.run_id})


# a crash (an OOM kill, a lost node) retries the step, which resumes from the last checkpoint
@dg.asset(group_name=GROUP, kinds={"pytorch", "peft"}, pool="gpu",
          retry_policy=dg.RetryPolicy(max_retries=2, delay=5), code_version=CODE_VERSIONS["orpo_adapter"])
def orpo_adapter(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    tokenized_dataset: dict,
    base_model: dict,
    compute: ComputeResource,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dg.Output[dict]:
    """LoRA adapter trained with ORPO (TRL) on the tokenized train split; metrics stream to MLflow.

    Checkpoints go to the storage root's checkpoints/ folder, one subfolder per key (tokenized data, base model,
    settings): re-executing a failed run resumes the same training there; the subfolder is deleted once the
    adapter is saved.
    """
    import mlflow

    from orpo_pipeline.config import TrainSettings
    from orpo_pipeline.train.checkpoints import checkpoint_key
    from orpo_pipeline.models.merge import write_adapter_card
    from resources.dataset_inputs import log_training_inputs

    settings = TrainSettings.model_validate(config.model_dump(exclude={"init_from_champion"}))
    # the data was tokenized with one chat template; train and save the adapter's tokenizer with the same one
    if settings.chat_template != tokenized_dataset.get("chat_template", ""):
        if settings.chat_template:
            raise dg.Failure("orpo_adapter's chat_template differs from the one tokenized_dataset used; set it there")
        settings = settings.model_copy(update={"chat_template": tokenized_dataset["chat_template"]})
    adapter_init, init_source = None, None
    if config.init_from_champion:
        champion = mlflow_tracking.champion()
        if champion is None:
            context.log.info("init_from_champion: no champion yet, starting from the base model")
        else:
            adapter_init = Path(mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="adapter"))
            init_source = f"champion run {champion.run_id}"  # the download folder differs on every attempt
            context.log.info(f"starting from the adapter of champion version {champion.version}")
    device = compute.resolve_device()
    context.log.info(f"training on {compute.describe()}")
    out = storage.artifact_dir("orpo_adapter", context.run.run_id)
    key = checkpoint_key(dataset_digest=tokenized_dataset["digest"], base_model=base_model["name"], settings=settings,
                         max_length=tokenized_dataset["max_length"], num_processes=compute.num_processes,
                         adapter_init=init_source)
    checkpoint_dir = storage.root_path / "checkpoints" / key
    with mlflow_tracking.active_run(context) as run_id:
        _link_resumed_run(context, checkpoint_dir, run_id, settings.resume)
        client = mlflow_tracking.client()
        params = settings.model_dump()
        if params["chat_template"]:  # MLflow caps a param at 6000 chars; the template itself is in the adapter
            params["chat_template"] = hashlib.sha256(params["chat_template"].encode()).hexdigest()[:16]
        mlflow.log_params({f"train.{k}": v for k, v in params.items()})
        mlflow.log_params({"base_model": base_model["name"], "max_length": tokenized_dataset["max_length"], "device": device})
        # one input per preference file (= partition), so a model version walks back to the files it learned from
        log_training_inputs(tokenized_dataset, lambda key: storage.partition_dir("cleaned_preferences", key))
        mlflow.set_tags({"dagster.partition_keys": ",".join(s["partition_key"] for s in tokenized_dataset["sources"]),
                         "cleaned_digest": tokenized_dataset["cleaned_digest"]})
        on_log, sink = _mlflow_step_logger(context, run_id, client)
        try:
            result = compute.train(
                context, model_dir=Path(base_model["path"]), train_dataset_dir=Path(tokenized_dataset["dir"]) / "train",
                output_dir=out, settings=settings, max_length=tokenized_dataset["max_length"],
                on_log=on_log, adapter_init=adapter_init, checkpoint_dir=checkpoint_dir,
            )
        finally:
            sink.close(timeout_s=30)
        curves = curves_png(result.history, TRAIN_CURVES, out / "training_curves.png", "ORPO training")
        write_adapter_card(out, base_model=base_model["name"], training_config=settings.model_dump(),
                           data=tokenized_dataset, steps=result.global_steps, mlflow_run_id=run_id)
        mlflow.log_metrics({"train/tokens_per_second": result.tokens_per_second,
                            "train/peak_memory_mb": result.peak_memory_mb,
                            "train/runtime_s": result.train_runtime_s})
        mlflow.log_artifacts(str(out), artifact_path="adapter")
    if not result.all_losses_finite:
        raise dg.Failure("training logged a non-finite loss; the adapter was kept for inspection at " + str(out))
    digest = dir_digest(out)
    context.add_output_metadata(
        {
            "device": result.device,
            "steps": result.global_steps,
            "resumed_from_step": result.resumed_from_step,
            "final_loss": round(next((h["loss"] for h in reversed(result.history) if "loss" in h), float("nan")), 4),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "runtime_s": round(result.train_runtime_s, 1),
            "training_curves": dg.MetadataValue.md(markdown_image(curves, "training curves")),
            "digest": digest,
            "path": dg.MetadataValue.path(str(out)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    # dg.Output: with ComputeResource(num_processes > 1) a Pipes session ran, and Dagster then takes no bare value
    return dg.Output({"dir": str(out), "digest": digest, "mlflow_run_id": run_id, "training_config": settings.model_dump(),
                      "partition_keys": ",".join(s["partition_key"] for s in tokenized_dataset["sources"]),
                      "cleaned_digest": tokenized_dataset["cleaned_digest"], "tokenized_digest": tokenized_dataset["digest"]},
                     data_version=dg.DataVersion(digest))


@contextmanager
def _removed_on_failure(folder: Path):
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, code_version=CODE_VERSIONS["merged_model"])
def merged_model(
    context: dg.AssetExecutionContext,
    orpo_adapter: dict,
    base_model: dict,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dg.Output[dict]:
    """Adapter merged into full-precision base weights; logged to MLflow and registered as a new model version."""
    import mlflow

    from orpo_pipeline.models.merge import merge_adapter

    from orpo_pipeline.models.registry import log_merged_model, version_description

    out = storage.artifact_dir("merged_model", context.run.run_id)
    card = {
        "name": mlflow_tracking.registered_model_name,
        "base_model": base_model["name"],
        "cleaned_digest": orpo_adapter["cleaned_digest"],
        "tokenized_digest": orpo_adapter["tokenized_digest"],
        "adapter_digest": orpo_adapter["digest"],
        "training_config": orpo_adapter["training_config"],
    }
    merge_adapter(Path(base_model["path"]), Path(orpo_adapter["dir"]), out, card=card)
    run_id = orpo_adapter["mlflow_run_id"]
    mlflow_tracking.client()
    # a failed registration (disk full, server gone) leaves no merged folder that nothing points at
    with _removed_on_failure(out), mlflow.start_run(run_id=run_id):
        version = log_merged_model(out, mlflow_tracking.registered_model_name, tags={
            "dagster.run_id": context.run.run_id,
            "dagster.asset": context.asset_key.to_user_string(),
            "base_model": base_model["name"],
            "cleaned_digest": orpo_adapter["cleaned_digest"],
            "tokenized_digest": orpo_adapter["tokenized_digest"],
            "dagster.partition_keys": orpo_adapter["partition_keys"],
            "merged_dir": str(out),
        }, description=version_description(card, context.run.run_id))
        mlflow_tracking.link_model_version(run_id, version)
    context.add_output_metadata(
        {
            "path": dg.MetadataValue.path(str(out)),
            "registered_model": mlflow_tracking.registered_model_name,
            "model_version": version,
            "mlflow_model_version": dg.MetadataValue.url(mlflow_tracking.model_version_url(version)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    # merging is deterministic: the same base and adapter give the same weights
    return dg.Output({"dir": str(out), "mlflow_run_id": run_id, "model_version": version, "card": card},
                     data_version=dg.DataVersion(combined_version(base_model.get("digest", ""), orpo_adapter["digest"])))


@dg.asset(group_name=GROUP, kinds={"mlflow"}, code_version=CODE_VERSIONS["benchmark_scores"])
def benchmark_scores(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    merged_model: dict,
    base_model: dict,
    tokenized_dataset: dict,
    mlflow_tracking: MlflowResource,
) -> dg.Output[dict]:
    """Held-out preference accuracy, log-odds margin and chosen NLL for base vs tuned model, plus sample generations."""
    import datasets
    import mlflow

    from orpo_pipeline.models.benchmark_report import kept_section
    from orpo_pipeline.models.evaluate import benchmark_model
    from orpo_pipeline.models.merge import model_card

    eval_data = datasets.load_from_disk(tokenized_dataset["dir"])["eval"]
    kw = dict(prompts=config.generation_prompts, batch_size=config.batch_size, max_pairs=config.max_eval_pairs,
              max_new_tokens=config.max_new_tokens)
    models = [("base", base_model["path"]), ("tuned", merged_model["dir"])]
    champion = mlflow_tracking.champion()
    if champion is not None and str(champion.version) != str(merged_model["model_version"]):
        # re-scored on today's eval split: a score from an older, smaller split would not be comparable
        models.append(("champion", str(mlflow_tracking.model_dir_of(champion))))
    scores = {}
    for name, path in models:
        context.log.info(f"scoring the {name} model on {min(len(eval_data), config.max_eval_pairs)} held-out pairs")
        # both in the template the eval data was tokenized with (the tuned model's tokenizer)
        scores[name] = benchmark_model(Path(path), eval_data, tokenizer_dir=Path(merged_model["dir"]), **kw)
    metrics = ["preference_accuracy", "mean_log_odds_margin", "chosen_nll"]
    names = list(scores)
    table = f"| metric | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n" + "\n".join(
        f"| {m} | " + " | ".join(f"{scores[n][m]:.4f}" for n in names) + " |" for m in metrics
    )
    samples = "\n\n".join(
        f"**{b['prompt']}**\n\n- base: {b['completion']}\n- tuned: {t['completion']}"
        for b, t in zip(scores["base"]["generations"], scores["tuned"]["generations"])
    )
    run_id = merged_model["mlflow_run_id"]
    client = mlflow_tracking.client()
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval/{n}/{m}": scores[n][m] for n in scores for m in metrics})
        mlflow.log_dict(scores, "benchmark_scores.json")
    # same digest = same eval pairs and cap: the promotion compares only scores taken so
    digest = hashlib.sha256(f"{tokenized_dataset['digest']}|{config.max_eval_pairs}".encode()).hexdigest()[:16]
    for m in metrics:
        client.set_model_version_tag(mlflow_tracking.registered_model_name, merged_model["model_version"],
                                     f"eval.{m}", f"{scores['tuned'][m]:.4f}")
    client.set_model_version_tag(mlflow_tracking.registered_model_name, merged_model["model_version"],
                                 "eval.settings_digest", digest)
    # the card written at merge time cannot know the scores yet; lm_eval_scores' section of it is kept
    card = dict(merged_model["card"], scores={f"{n}/{m}": round(scores[n][m], 4) for n in scores for m in metrics})
    readme = Path(merged_model["dir"]) / "README.md"
    kept = kept_section(readme.read_text()) if readme.is_file() else ""
    with atomic_file(readme) as tmp:
        tmp.write_text(model_card(card) + ("\n" + kept if kept else ""))
    context.add_output_metadata(
        {
            "scores": dg.MetadataValue.md(table),
            "generations": dg.MetadataValue.md(samples),
            "base_preference_accuracy": round(scores["base"]["preference_accuracy"], 4),
            "tuned_preference_accuracy": round(scores["tuned"]["preference_accuracy"], 4),
            "eval_pairs": scores["tuned"]["pairs"],
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        }
    )
    out = {n: {m: scores[n][m] for m in metrics + ["pairs"]} for n in scores}
    out["model_version"] = str(merged_model["model_version"])
    out["champion_version"] = str(champion.version) if champion is not None else None
    out["mlflow_run_id"] = run_id
    out["settings_digest"] = digest
    return dg.Output(out, data_version=dg.DataVersion(combined_version(json.dumps(
        {n: {m: round(v, 4) for m, v in ms.items()} for n, ms in out.items() if isinstance(ms, dict)}, sort_keys=True))))
