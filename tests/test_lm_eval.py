"""lm_eval_scores and the promotion on a real Dagster instance, real lm-eval and a real MLflow SQLite store.

The tiny random model scores near chance; what is tested is the path: tasks built over the shared benchmark
files and over a user's own YAML folder, the table, MLflow metrics, results artifact, model card, and the
promotion deciding on a suite score recorded under the same settings. Upstream of lm_eval_scores, small assets
hand it a real model folder and a real registered version in the shapes merged_model / benchmark_scores return.
"""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.benchmarks import lm_eval_scores
from assets.champion import champion_alias_matches_decision, champion_promotion
from resources import MlflowResource, StorageResource
from tests.conftest import SHARED

BENCHMARKS = SHARED / "benchmarks"
NAME = "lm-eval-test"
USER_TASK = """task: my_team_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def _user_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": "What colour is the sky on a clear day?", "choices": ["blue", "green"], "label": 0},
            {"question": "How many legs has a spider?", "choices": ["six", "eight"], "label": 1},
            {"question": "Which is a fruit?", "choices": ["apple", "brick"], "label": 0}]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "my_team_task.yaml").write_text(USER_TASK.format(data=folder / "docs.jsonl"))
    return folder


def _materialize(state: Path, tiny: Path, version: str, run_id: str, lm_config: dict, promotion: dict,
                 tolerance: float = 0.0, instance=None):
    merged = state / f"merged-v{version}"
    if not merged.exists():
        shutil.copytree(tiny, merged)
        (merged / "README.md").write_text("# tiny\n\n## Scores\n")

    @dg.asset(name="base_model")
    def base_stand_in() -> dict:
        return {"path": str(tiny), "name": "tiny-random-llama"}

    @dg.asset(name="merged_model")
    def merged_stand_in() -> dict:
        return {"dir": str(merged), "mlflow_run_id": run_id, "model_version": version, "card": {}}

    @dg.asset(name="benchmark_scores")
    def benchmark_stand_in() -> dict:
        return {"tuned": {"preference_accuracy": 0.5}, "model_version": version, "mlflow_run_id": run_id,
                "champion_version": None, "settings_digest": "unused-here"}

    tracking = MlflowResource(state_dir=str(state), registered_model_name=NAME, champion_tolerance=tolerance)
    return dg.materialize(
        [base_stand_in, merged_stand_in, benchmark_stand_in, lm_eval_scores, champion_promotion,
         champion_alias_matches_decision],
        resources={"storage": StorageResource(root=str(state)), "mlflow_tracking": tracking},
        run_config={"ops": {"lm_eval_scores": {"config": lm_config}, "champion_promotion": {"config": promotion}}},
        instance=instance,
    ), tracking, merged


def _new_version(tracking: MlflowResource, source: Path) -> tuple[str, str]:
    client = tracking.client()
    run = client.create_run(tracking.experiment_id())
    try:
        client.create_registered_model(NAME)
    except Exception:  # registered by an earlier version
        pass
    mv = client.create_model_version(NAME, source=source.as_uri(), run_id=run.info.run_id)
    return str(mv.version), run.info.run_id


def _metadata(result, key: str) -> dict:
    return next(e.event_specific_data.materialization.metadata for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == key)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """v1 then v2 through the same tasks (three from the shared files, one from a user folder), promoting on the
    arc_easy score; v2 must beat v1 by 1.0 (tolerance -1), so it cannot."""
    state = tmp_path_factory.mktemp("lm_eval_state")
    user = _user_tasks(tmp_path_factory.mktemp("user_tasks"))
    config = {"suites": ["arc_easy", "boolq", "bigbench_snarks", "my_team_task"], "benchmark_dir": str(BENCHMARKS),
              "task_dirs": [str(user)], "limit": 3, "batch_size": "4"}
    promotion = {"metric": "arc_easy/average"}
    tracking = MlflowResource(state_dir=str(state), registered_model_name=NAME)
    with dg.instance_for_test() as instance:
        v1, run1 = _new_version(tracking, tiny_model_dir)
        first = _materialize(state, tiny_model_dir, v1, run1, config, promotion, instance=instance)
        v2, run2 = _new_version(tracking, tiny_model_dir)
        second = _materialize(state, tiny_model_dir, v2, run2, config, promotion, tolerance=-1.0, instance=instance)
        yield {"first": first, "second": second, "v1": v1, "v2": v2, "run1": run1, "tracking": tracking}


def test_local_and_user_tasks_score_base_and_tuned(two_runs):
    (result, tracking, merged) = two_runs["first"]
    assert result.success
    out = result.output_for_node("lm_eval_scores")
    for model in ("base", "tuned"):
        scores = out["scores"][model]
        for key in ("arc_easy/arc_easy/acc_norm", "boolq/boolq/acc", "bigbench_snarks/bigbench_snarks/acc",
                    "my_team_task/my_team_task/acc", "arc_easy/average", "my_team_task/average"):
            assert 0.0 <= scores[key] <= 1.0, (model, key)
    assert out["skipped"] == {} and out["errors"] == {}
    meta = _metadata(result, "lm_eval_scores")
    table = meta["scores"].value
    assert "| arc_easy | arc_easy | acc_norm |" in table and "my_team_task" in table and "Δ tuned − base" in table
    assert meta["chart"].value.startswith("![lm-eval scores](data:image/png;base64,")
    client = tracking.client()
    run = client.get_run(two_runs["run1"])
    assert {"lm_eval/base/arc_easy/average", "lm_eval/tuned/arc_easy/average",
            "lm_eval/tuned/boolq/boolq/acc_stderr"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(two_runs["run1"], "lm_eval")}
    assert {"lm_eval/results_base.json", "lm_eval/results_tuned.json", "lm_eval/scores.json"} <= artifacts
    full = json.loads(Path(client.download_artifacts(two_runs["run1"], "lm_eval/results_tuned.json")).read_text())
    assert {"local_arc_easy", "local_boolq", "local_bigbench_snarks", "my_team_task"} <= set(full["results"])
    card = (merged / "README.md").read_text()
    assert "## Benchmarks (lm-eval)" in card and "arc_easy" in card and card.startswith("# tiny")
    tags = client.get_model_version(NAME, two_runs["v1"]).tags
    assert float(tags["lm_eval.arc_easy/average"]) == pytest.approx(out["scores"]["tuned"]["arc_easy/average"], abs=1e-6)


def test_promotion_decides_on_a_suite_score(two_runs):
    first, _, _ = two_runs["first"]
    second, tracking, _ = two_runs["second"]
    p1 = first.output_for_node("champion_promotion")
    assert p1["promoted"] and p1["reason"] == "first model: becomes champion"
    p2 = second.output_for_node("champion_promotion")
    assert not p2["promoted"] and "champion kept" in p2["reason"]
    lm2 = second.output_for_node("lm_eval_scores")
    # v1's scores were taken under the same settings: reused from its tags, not re-run
    assert lm2["champion_source"] == "recorded (same settings digest)"
    client = tracking.client()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == two_runs["v1"]
    t1 = client.get_model_version(NAME, two_runs["v1"]).tags
    t2 = client.get_model_version(NAME, two_runs["v2"]).tags
    assert t1["champion_gate.decision"] == "promoted" and t1["champion_gate.champion_version"] == "none"
    assert t2["champion_gate.decision"] == "rejected" and t2["champion_gate.champion_version"] == two_runs["v1"]
    assert t2["champion_gate.metric"] == "arc_easy/average"
    assert float(t2["champion_gate.champion_score"]) == pytest.approx(float(t1["lm_eval.arc_easy/average"]), abs=1e-4)
    assert all(v != "" for v in t2.values())
    meta1 = _metadata(first, "champion_promotion")
    assert "champion_score" not in meta1  # no champion: no made-up score
    checks = {e.check_name: e.passed for r in (first, second) for e in r.get_asset_check_evaluations()}
    assert checks == {"champion_alias_matches_decision": True}


def test_offline_without_folder_records_suites_skipped(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tracking = MlflowResource(state_dir=str(tmp_path), registered_model_name=NAME)
    version, run_id = _new_version(tracking, tiny_model_dir)
    with dg.instance_for_test() as instance:
        result, tracking, merged = _materialize(tmp_path, tiny_model_dir, version, run_id, {}, {}, instance=instance)
    assert result.success
    out = result.output_for_node("lm_eval_scores")
    assert set(out["skipped"]) == {"nous", "ifeval"}
    assert "no benchmark folder given" in out["skipped"]["nous"] and "HF_HUB_OFFLINE" in out["skipped"]["nous"]
    assert out["scores"]["tuned"] == {} and out["scores"]["base"] == {}
    meta = _metadata(result, "lm_eval_scores")
    assert "**nous** skipped" in meta["skipped"].value
    tags = tracking.client().get_run(run_id).data.tags
    assert "no benchmark folder given" in tags["lm_eval.skipped.nous"] and tags["lm_eval.skipped.ifeval"]
    assert "nous** skipped" in (merged / "README.md").read_text()
