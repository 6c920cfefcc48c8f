"""Promotion: the new model version takes the MLflow alias 'champion' only if it is not worse (an asset, because
it decides and moves the alias); the check after it only checks that the alias is where the decision put it."""

from pathlib import Path

import dagster as dg

from orpo_pipeline.models.promotion import BENCHMARK_METRICS, alias_version, decide, promote
from resources import MlflowResource

from .config import PromotionConfig
from .model import GROUP

__all__ = ["champion_promotion", "champion_alias_matches_decision", "decide"]


def _challenger(metric: str, benchmark_scores: dict, lm_eval_scores: dict) -> tuple[float, str, str | None, float | None]:
    """(score, settings digest, champion version the benchmark saw, its score there) for `metric`."""
    if metric in BENCHMARK_METRICS:
        seen = benchmark_scores.get("champion_version")
        return (benchmark_scores["tuned"][metric], benchmark_scores["settings_digest"], seen,
                benchmark_scores.get("champion", {}).get(metric))
    tuned = lm_eval_scores["scores"]["tuned"]
    if metric not in tuned:
        skipped = "; ".join(f"{k}: {v}" for k, v in lm_eval_scores["skipped"].items()) or "none"
        raise dg.Failure(f"promotion metric {metric!r} was not measured by lm_eval_scores (measured: "
                         f"{', '.join(sorted(tuned)) or 'nothing'}; skipped: {skipped})")
    return (tuned[metric], lm_eval_scores["settings_digest"], lm_eval_scores.get("champion_version"),
            lm_eval_scores["scores"].get("champion", {}).get(metric))


@dg.asset(group_name=GROUP, kinds={"mlflow"}, pool="champion")
def champion_promotion(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    benchmark_scores: dict,
    lm_eval_scores: dict,
    mlflow_tracking: MlflowResource,
) -> dict:
    """Compare the new version with the 'champion' alias on the configured metric (held-out preference accuracy
    by default, or an lm-eval suite score) and move the alias unless it is worse beyond the tolerance
    (resource mlflow_tracking.champion_tolerance). One promotion at a time: pool `champion`, and a
    compare-and-set against the alias as it stands when the decision is made."""
    metric, tolerance = config.metric, mlflow_tracking.champion_tolerance
    score, digest, seen, seen_score = _challenger(metric, benchmark_scores, lm_eval_scores)
    client = mlflow_tracking.client()
    name, version = mlflow_tracking.registered_model_name, str(benchmark_scores["model_version"])
    lock = Path(mlflow_tracking.state_dir).expanduser().resolve() / "locks" / f"champion-{name}.lock"
    d = promote(client, name, version, metric, score, digest, tolerance, seen, seen_score, lock,
                run_id=benchmark_scores["mlflow_run_id"])
    context.log.info(f"{metric}: v{version} {score:.4f} vs champion "
                     f"{'none' if d.champion_version is None else 'v' + d.champion_version}: {d.reason}")
    metadata = {
        "decision": "promoted" if d.promoted else "rejected",
        "reason": d.reason,
        "metric": metric,
        "challenger_version": version,
        "challenger_score": round(score, 4),
        "champion_version": d.champion_version or "none",
        "champion_score_source": d.champion_source,
        "tolerance": tolerance,
        "champion_now": d.alias_now,
        "mlflow_model_version": dg.MetadataValue.url(mlflow_tracking.model_version_url(version)),
        "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(benchmark_scores["mlflow_run_id"])),
    }
    if d.champion_score is not None:  # no champion: no score, rather than a made-up one
        metadata["champion_score"] = round(d.champion_score, 4)
    context.add_output_metadata(metadata)
    return {"promoted": d.promoted, "reason": d.reason, "metric": metric, "version": version,
            "champion_version": d.champion_version, "champion_now": d.alias_now}


@dg.asset_check(asset=champion_promotion, description="The 'champion' alias is where the promotion decided: on "
                "the new version if it was promoted, elsewhere if not.")
def champion_alias_matches_decision(champion_promotion: dict, mlflow_tracking: MlflowResource) -> dg.AssetCheckResult:
    now = alias_version(mlflow_tracking.client(), mlflow_tracking.registered_model_name)
    version = champion_promotion["version"]
    ok = (now == version) if champion_promotion["promoted"] else (now != version)
    return dg.AssetCheckResult(passed=ok, metadata={"alias_on": now or "none", "version": version,
                                                    "promoted": champion_promotion["promoted"]},
                               description=None if ok else f"alias on {now}, decision: {champion_promotion['reason']}")
