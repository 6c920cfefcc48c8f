"""lm_eval_scores: standard benchmarks (the Nous suite, IFEval, any lm-eval task) for base vs tuned model."""

import json
from pathlib import Path

import dagster as dg

from orpo_pipeline.config import CPU_DEFAULT_LIMIT, CPU_MAX_GEN_TOKS
from orpo_pipeline.plots import markdown_image
from orpo_pipeline.storage import atomic_file
from resources import MlflowResource, StorageResource

from .config import LmEvalConfig
from .model import GROUP


def _run_settings(config: LmEvalConfig, device: str):
    from orpo_pipeline.models.benchmarks import RunSettings

    cpu = not device.startswith("cuda")
    limit = (CPU_DEFAULT_LIMIT if cpu else None) if config.limit == -1 else (config.limit or None)
    gen = (CPU_MAX_GEN_TOKS if cpu else None) if config.max_gen_toks == -1 else (config.max_gen_toks or None)
    return RunSettings(limit=limit, num_fewshot=None if config.num_fewshot == -1 else config.num_fewshot,
                       apply_chat_template=config.apply_chat_template, max_gen_toks=gen)


def _recorded(version, digest: str) -> dict | None:
    """A version's lm-eval scores from its tags, if they were taken under the same settings digest."""
    tags = version.tags
    if tags.get("lm_eval.settings_digest") != digest:
        return None
    return {k.removeprefix("lm_eval."): float(v) for k, v in tags.items()
            if k.startswith("lm_eval.") and k != "lm_eval.settings_digest" and not k.startswith("lm_eval.skipped")}


@dg.asset(group_name=GROUP, kinds={"mlflow"}, pool="gpu")
def lm_eval_scores(
    context: dg.AssetExecutionContext,
    config: LmEvalConfig,
    merged_model: dict,
    base_model: dict,
    storage: StorageResource,
    mlflow_tracking: MlflowResource,
) -> dict:
    """Base and tuned model through lm-evaluation-harness with the same tasks, shots, limit and chat-template
    setting: per task and per suite (the Nous table), deltas, stderr; in MLflow and the merged model's card."""
    import mlflow
    import torch

    from orpo_pipeline.models import benchmark_report as report
    from orpo_pipeline.models.benchmarks import score_model
    from orpo_pipeline.models.lm_eval_tasks import plan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = _run_settings(config, device)
    batch = config.batch_size if config.batch_size != "auto" or device == "cuda" else 8
    out = storage.artifact_dir("lm_eval_scores", context.run.run_id)
    out.mkdir(parents=True, exist_ok=True)
    try:
        task_plan = plan(config.suites, config.benchmark_dir, config.task_dirs, out / "tasks")
    except FileNotFoundError as e:
        raise dg.Failure(f"lm_eval_scores: {e}") from e
    digest = task_plan.digest(settings.as_dict())
    for key, why in task_plan.skipped.items():
        context.log.warning(f"lm-eval {key} skipped: {why}")
    context.log.info(f"lm-eval: {len(task_plan.tasks)} tasks per model on {device}, limit {settings.limit}, "
                     f"settings digest {digest}")
    name, version = mlflow_tracking.registered_model_name, str(merged_model["model_version"])
    models = [("base", Path(base_model["path"])), ("tuned", Path(merged_model["dir"]))]
    client = mlflow_tracking.client()
    champion = mlflow_tracking.champion()
    champion_scores, champion_source = None, "none"
    if champion is not None and str(champion.version) != version and task_plan.tasks:
        champion_scores = _recorded(champion, digest)
        if champion_scores is not None:
            champion_source = "recorded (same settings digest)"
        elif config.score_champion:
            models.append(("champion", mlflow_tracking.model_dir_of(champion)))
            champion_source = "scored in this run"
    results: dict[str, dict] = {}
    for label, path in models:
        results[label] = score_model(path, task_plan, settings, batch_size=batch, device=device,
                                     progress=context.log.info, label=f"{label}: ")
        if task_plan.tasks:
            context.log.info(f"lm-eval {label} model: {results[label]['seconds']} s")
    scores = {k: r["scores"] for k, r in results.items()}
    stderr = {k: r["stderr"] for k, r in results.items()}
    if champion_scores is not None:
        scores["champion"], stderr["champion"] = champion_scores, {}
    nous = report.nous_table(scores, stderr)
    tasks = report.task_table(scores, stderr)
    skipped = report.skipped_list(task_plan.skipped)
    errors = {r["task"]: r["error"] for res in results.values() for r in res["rows"] if "error" in r}
    chart = report.bars_png(scores, stderr, out / "lm_eval_scores.png")

    run_id = merged_model["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):
        metrics = {f"lm_eval/{m}/{k}": v for m in ("base", "tuned") for k, v in scores[m].items()}
        metrics |= {f"lm_eval/{m}/{k}_stderr": v for m in ("base", "tuned") for k, v in stderr[m].items()
                    if v is not None}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.set_tags({f"lm_eval.skipped.{k}": why[:5000] for k, why in task_plan.skipped.items()}
                        | {"lm_eval.settings_digest": digest})
        for label, res in results.items():
            if res["lm_eval"]:
                mlflow.log_dict(res["lm_eval"], f"lm_eval/results_{label}.json")
        mlflow.log_dict({"settings": settings.as_dict(), "digest": digest, "scores": scores, "stderr": stderr,
                         "skipped": task_plan.skipped, "errors": errors,
                         "tasks": [t.__dict__ for t in task_plan.tasks]}, "lm_eval/scores.json")
        if chart is not None:
            mlflow.log_artifact(str(chart), "lm_eval")
    for k, v in scores["tuned"].items():
        client.set_model_version_tag(name, version, f"lm_eval.{k}", f"{v:.6f}")
    client.set_model_version_tag(name, version, "lm_eval.settings_digest", digest)

    readme = Path(merged_model["dir"]) / "README.md"
    if readme.is_file():
        section = report.card_section(nous, tasks, skipped, settings.as_dict())
        with atomic_file(readme) as tmp:
            tmp.write_text(report.upsert_section(readme.read_text(), section))
    (out / "scores.json").write_text(json.dumps({"scores": scores, "stderr": stderr, "skipped": task_plan.skipped},
                                                indent=1))
    metadata = {
        "tasks_per_model": len(task_plan.tasks),
        "limit": settings.limit if settings.limit is not None else "none",
        "settings_digest": digest,
        "device": device,
        "skipped": dg.MetadataValue.md(skipped or "nothing skipped"),
        "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        "champion_scores": champion_source,
    }
    if nous:
        metadata["nous"] = dg.MetadataValue.md(nous)
    if tasks:
        metadata["scores"] = dg.MetadataValue.md(tasks)
    if chart is not None:
        metadata["chart"] = dg.MetadataValue.md(markdown_image(chart, "lm-eval scores"))
    if errors:
        metadata["errors"] = dg.MetadataValue.json(errors)
    for m in ("base", "tuned"):
        if "nous/average" in scores[m]:
            metadata[f"{m}_nous_average"] = round(scores[m]["nous/average"], 4)
    context.add_output_metadata(metadata)
    return {"scores": scores, "stderr": stderr, "skipped": task_plan.skipped, "errors": errors,
            "settings_digest": digest, "model_version": version, "mlflow_run_id": run_id,
            "champion_version": str(champion.version) if champion is not None else None,
            "champion_source": champion_source}
