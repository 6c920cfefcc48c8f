"""kill -9 of the real CLI (`python -m orpo_pipeline.cli run`, the main command's job) during training, during the
merge and during registration; each time the same command run again re-executes the dead run from its failed step,
and the last one finishes with nothing left behind: no RUNNING run (Dagster or MLflow), no PENDING LoggedModel, no
held pool slot, no temp or orphaned artifact folder."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import yaml

from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.storage import TEMP_NAME

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = {"ops": {
    "base_model": {"config": {"base_model": "tiny-random-llama"}},
    "tokenized_dataset": {"config": {"max_length": 112}},
    "orpo_adapter": {"config": {"max_steps": 60, "save_steps": 5, "save_minutes": 0, "logging_steps": 1,
                                "per_device_train_batch_size": 2}},
}}


class Cli:
    def __init__(self, tmp: Path, model_cache: Path):
        self.home, self.state, self.data = tmp / "dagster_home", tmp / "state", tmp / "data"
        for d in (self.home, self.state, self.data):
            d.mkdir()
        shutil.copy(ROOT / "dagster_home" / "dagster.yaml", self.home)
        (self.state / "models").symlink_to(model_cache, target_is_directory=True)
        shutil.copy(SAMPLE_DATA_DIR / "factual.jsonl", self.data)
        self.config = tmp / "run.yaml"
        self.config.write_text(yaml.safe_dump(RUN_CONFIG))
        self.logs = tmp
        self.n = 0
        uri = f"sqlite:///{self.state / 'mlflow.db'}"
        self.mlflow = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def start(self) -> subprocess.Popen:
        self.n += 1
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "ORPO_PIPELINE_HOME": str(self.state),
               "PYTHONPATH": str(ROOT)}
        self.log = self.logs / f"cli-{self.n}.log"
        return subprocess.Popen([sys.executable, "-m", "orpo_pipeline.cli", "run", "--data-dir", str(self.data),
                                 "-c", str(self.config)], cwd=ROOT, env=env, stdout=open(self.log, "w"),
                                stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def kill_when(self, proc: subprocess.Popen, what: str, condition, timeout: float = 300) -> None:
        """SIGKILL the CLI process itself the moment `condition()` holds (polled every few ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the CLI ended (rc {proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if condition():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return
            time.sleep(0.005)
        proc.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def checkpoints(self) -> list[Path]:
        return list(self.state.glob("checkpoints/*/checkpoint-*/COMPLETE"))

    def merge_temp(self) -> bool:
        folder = self.state / "artifacts" / "merged_model"
        return folder.is_dir() and any(TEMP_NAME.match(p.name) for p in folder.iterdir())

    def pending_model(self) -> bool:
        exp = self.mlflow.get_experiment_by_name("orpo_pipeline")
        if exp is None:
            return False
        return any(m.status.name == "PENDING" for m in self.mlflow.search_logged_models([exp.experiment_id]))

    def runs(self) -> list[dg.DagsterRun]:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return list(reversed(instance.get_runs()))


def test_kill_9_at_three_points_then_one_re_execution_each_finishes_clean(tmp_path, model_cache, tiny_model_dir):
    cli = Cli(tmp_path, model_cache)

    # 1. during training, once a checkpoint is complete
    cli.kill_when(cli.start(), "a complete training checkpoint", lambda: cli.checkpoints())

    # 2. the same command: re-executes from orpo_adapter, resumes the checkpoint; killed while writing the merge
    proc = cli.start()
    cli.kill_when(proc, "the merged model's temp folder", cli.merge_temp)
    assert "re-executing run" in cli.output()
    assert "marked FAILURE" in cli.output()  # the dead first run, found by this one

    # 3. again: killed while the merged model is being logged to MLflow (LoggedModel PENDING)
    proc = cli.start()
    cli.kill_when(proc, "a PENDING LoggedModel", cli.pending_model)

    # 4. again: finishes
    proc = cli.start()
    assert proc.wait(600) == 0, cli.output()[-5000:]
    out = cli.output()
    assert "re-executing run" in out and "champion: first model: becomes champion" in out

    runs = cli.runs()
    assert [r.status.value for r in runs] == ["FAILURE", "FAILURE", "FAILURE", "SUCCESS"]
    assert [r.parent_run_id for r in runs[1:]] == [r.run_id for r in runs[:-1]]  # each re-executes the one before
    with dg.DagsterInstance.from_config(str(cli.home)) as instance:
        assert not instance.event_log_storage.get_concurrency_run_ids()  # no run holds a pool slot
        steps = {r.run_id: {e.step_key for e in instance.all_logs(r.run_id)
                            if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"} for r in runs}
    # re-execution from failure: the last run did not redo what the dead ones had finished
    assert "orpo_adapter" in steps[runs[1].run_id] and "cleaned_preferences" not in steps[runs[3].run_id]
    assert "orpo_adapter" not in steps[runs[3].run_id] and "merged_model" in steps[runs[3].run_id]

    exp = cli.mlflow.get_experiment_by_name("orpo_pipeline").experiment_id
    statuses = {r.info.run_id: r.info.status for r in cli.mlflow.search_runs([exp])}
    assert "RUNNING" not in statuses.values(), statuses
    models = cli.mlflow.search_logged_models([exp])
    assert "PENDING" not in {m.status.name for m in models}
    # training resumed the first run's checkpoint rather than starting over
    trained = [r for r in cli.mlflow.search_runs([exp]) if r.data.tags.get("dagster.run_id") == runs[1].run_id]
    assert trained and int(trained[0].data.tags["resumed_from_step"]) >= 5
    # the champion is a version the finished run registered and benchmarked
    champion = cli.mlflow.get_model_version_by_alias("orpo-pipeline-model", "champion")
    assert champion.tags["dagster.run_id"] == runs[3].run_id and champion.tags["champion_gate.decision"] == "promoted"

    # nothing left on disk by the dead writers
    leftovers = [p for p in cli.state.rglob("*") if TEMP_NAME.match(p.name)]
    assert not leftovers, leftovers
    merged = sorted(p.name for p in (cli.state / "artifacts" / "merged_model").iterdir() if p.is_dir())
    assert merged == [runs[3].run_id], merged
    assert not list(cli.state.glob("checkpoints/*/checkpoint-*"))  # deleted once the adapter was saved
    assert re.search(r"removed .*merged_model/" + runs[2].run_id, out), out[-3000:]
