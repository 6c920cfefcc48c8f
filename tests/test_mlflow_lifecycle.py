"""No MLflow run is left RUNNING: one asset alone, a job whose training fails, and runs orphaned by a dead process.

(The full job's runs are checked in test_pipeline.py; a real SIGKILL of a run worker in test_run_monitoring.py.)
"""

from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import range_tags, register_files
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.definitions import all_assets
from resources import ComputeResource, MlflowResource, StorageResource
from resources.io_manager import ArtifactHandleIOManager
from resources.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG


def _resources(state: Path) -> dict:
    storage = StorageResource(root=str(state))
    return {"storage": storage, "compute": ComputeResource(device="cpu"), "io_manager": ArtifactHandleIOManager(storage=storage),
            "mlflow_tracking": MlflowResource(state_dir=str(state), registered_model_name="tiny-orpo")}


def _runs(tracking: MlflowResource):
    return tracking.client().search_runs([tracking.experiment_id()])


@pytest.fixture
def state(tmp_path, model_cache, tiny_model_dir):
    (tmp_path / "models").symlink_to(model_cache, target_is_directory=True)
    return tmp_path


def test_one_asset_alone_leaves_its_run_finished_and_the_experiment_opens_on_runs(state):
    from assets.model import base_model

    resources = _resources(state)
    with dg.instance_for_test() as instance:
        for _ in range(2):  # the second materialization resumes nothing left open by the first
            assert dg.materialize([base_model], resources=resources, instance=instance,
                                  run_config={"ops": {"base_model": {"config": {"base_model": "tiny-random-llama"}}}}).success
    tracking = resources["mlflow_tracking"]
    runs = _runs(tracking)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    experiment = tracking.client().get_experiment(tracking.experiment_id())
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_failing_training_step_ends_its_run_failed_and_orphans_are_closed_by_the_next_run(state):
    from mlflow.entities import LoggedModelStatus

    from assets.model import base_model

    resources = _resources(state)
    tracking = resources["mlflow_tracking"]
    run_config = {"ops": {
        "base_model": {"config": {"base_model": "tiny-random-llama"}},
        "tokenized_dataset": {"config": {"max_length": 112}},
        # found only when peft wraps the model, inside the training step: a failure after the MLflow run was resumed
        "orpo_adapter": {"config": {"max_steps": 1, "lora_target_modules": ["no_such_module"]}},
    }}
    training = [a for a in all_assets if a.key.to_user_string() in
                {"raw_preferences", "cleaned_preferences", "tokenized_dataset", "base_model", "orpo_adapter"}]
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, sorted(SAMPLE_DATA_DIR.glob("factual.jsonl")), resources["storage"].sources_path)
        result = dg.materialize(training, resources=resources, run_config=run_config, instance=instance,
                                tags=range_tags(keys), raise_on_error=False)
        assert not result.success
        failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failed == ["orpo_adapter"]
        (run,) = _runs(tracking)
        assert run.info.status == "FAILED"
        assert set(run.data.tags["dagster.assets"].split(",")) >= {"raw_preferences", "orpo_adapter"}

        # what a process killed inside log_model leaves: its run RUNNING and a LoggedModel PENDING
        client = tracking.client()
        client.update_run(run.info.run_id, status="RUNNING")
        model = client.create_logged_model(tracking.experiment_id(), source_run_id=run.info.run_id, name="merged_model")
        assert client.get_logged_model(model.model_id).status == LoggedModelStatus.PENDING
        assert dg.materialize([base_model], resources=resources, instance=instance,
                              run_config={"ops": {"base_model": run_config["ops"]["base_model"]}}).success
        assert client.get_run(run.info.run_id).info.status == "KILLED"
        assert "FAILURE" in client.get_run(run.info.run_id).data.tags["orpo.orphaned"]
        assert client.get_logged_model(model.model_id).status == LoggedModelStatus.FAILED
        assert not [r for r in _runs(tracking) if r.info.status == "RUNNING"]


def test_a_failed_registration_leaves_no_pending_model_no_running_run_and_no_merged_folder(state):
    """A write that fails while MLflow copies the merged weights (here: a file where its models folder must go,
    a real OS error, as a full disk gives one): the step fails, its run is FAILED, the LoggedModel MLflow left
    PENDING is FAILED at once, and the merged folder nothing points at is gone."""
    from urllib.parse import urlparse

    from mlflow.entities import LoggedModelStatus

    resources = _resources(state)
    tracking = resources["mlflow_tracking"]
    client = tracking.client()
    location = Path(urlparse(client.get_experiment(tracking.experiment_id()).artifact_location).path)
    location.mkdir(parents=True, exist_ok=True)
    (location / "models").write_text("a file where MLflow's models folder would go")
    run_config = {"ops": {
        "base_model": {"config": {"base_model": "tiny-random-llama"}},
        "tokenized_dataset": {"config": {"max_length": 112}},
        "orpo_adapter": {"config": {"max_steps": 1}},
    }}
    upto_merge = [a for a in all_assets if a.key.to_user_string() in {
        "raw_preferences", "cleaned_preferences", "tokenized_dataset", "base_model", "orpo_adapter", "merged_model"}]
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, [SAMPLE_DATA_DIR / "factual.jsonl"], resources["storage"].sources_path)
        result = dg.materialize(upto_merge, resources=resources, run_config=run_config, instance=instance,
                                tags=range_tags(keys), raise_on_error=False)
    assert [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"] == ["merged_model"]
    assert {r.info.status for r in _runs(tracking)} == {"FAILED"}
    models = client.search_logged_models([tracking.experiment_id()])
    assert models and {m.status for m in models} == {LoggedModelStatus.FAILED}
    merged = state / "artifacts" / "merged_model"
    assert not [p for p in merged.iterdir() if p.is_dir()] if merged.is_dir() else True
