"""Champion / challenger gate: the new model takes the MLflow alias 'champion' only if it is not worse."""

import dagster as dg

from resources import MlflowResource
from resources.tracking import CHAMPION

from .model import benchmark_scores


def decide(challenger: float, champion: float | None, tolerance: float) -> tuple[bool, str]:
    if champion is None:
        return True, "first model: becomes champion"
    if challenger >= champion - tolerance:
        return True, f"challenger {challenger:.4f} >= champion {champion:.4f} - tolerance {tolerance:g}: promoted"
    return False, f"challenger {challenger:.4f} < champion {champion:.4f} - tolerance {tolerance:g}: champion kept"


@dg.asset_check(asset=benchmark_scores, blocking=True,
                description="Promote the new model version to the 'champion' alias unless it is worse than the champion "
                            "on held-out preference accuracy (same eval split) beyond the configured tolerance.")
def champion_gate(benchmark_scores: dict, mlflow_tracking: MlflowResource) -> dg.AssetCheckResult:
    challenger = benchmark_scores["tuned"]["preference_accuracy"]
    champion = benchmark_scores.get("champion", {}).get("preference_accuracy")
    tolerance = mlflow_tracking.champion_tolerance
    promote, why = decide(challenger, champion, tolerance)
    client = mlflow_tracking.client()
    name, version = mlflow_tracking.registered_model_name, benchmark_scores["model_version"]
    tags = {
        "champion_gate.decision": "promoted" if promote else "rejected",
        "champion_gate.reason": why,
        "champion_gate.challenger_accuracy": f"{challenger:.4f}",
        "champion_gate.champion_accuracy": "" if champion is None else f"{champion:.4f}",
        "champion_gate.champion_version": benchmark_scores.get("champion_version") or "",
        "champion_gate.tolerance": str(tolerance),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_tag(benchmark_scores["mlflow_run_id"], "champion_gate.decision", tags["champion_gate.decision"])
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return dg.AssetCheckResult(
        passed=promote,
        # a kept champion is the gate working, not a broken pipeline: warn, do not fail the run
        severity=dg.AssetCheckSeverity.WARN,
        description=why,
        metadata={
            "decision": tags["champion_gate.decision"],
            "challenger_version": version,
            "challenger_accuracy": challenger,
            "champion_version": benchmark_scores.get("champion_version") or "none",
            "champion_accuracy": -1.0 if champion is None else champion,
            "tolerance": tolerance,
            "champion_now": version if promote else (benchmark_scores.get("champion_version") or "none"),
            "mlflow_model_version": dg.MetadataValue.url(mlflow_tracking.model_version_url(version)),
        },
    )
