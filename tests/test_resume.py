"""Crash-safe training: a real training process killed with SIGKILL resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.checkpoints import COMPLETE, checkpoint_key, last_complete_checkpoint
from orpo_pipeline.train.tokenize import tokenize_pairs
from orpo_pipeline.train.trainer import train_orpo_adapter

ROOT = Path(__file__).resolve().parents[1]
# 8 pairs, batch 2: 4 steps an epoch, so step 6 is inside the second epoch (the sampler's epoch-1 order and the
# skipped batches of a resumed epoch are both exercised)
SETTINGS = TrainSettings(max_steps=10, save_steps=2, save_minutes=0, logging_steps=1, per_device_train_batch_size=2,
                         precision="fp32", learning_rate=1e-3, warmup_ratio=0.1)


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(8)
    import datasets

    root = tmp_path_factory.mktemp("resume")
    train = tokenize_pairs(kept, AutoTokenizer.from_pretrained(tiny_model_dir), max_length=128,
                           min_completion_tokens=16).dataset
    # the layout tokenized_dataset writes (a DatasetDict), so the asset can profile it as its MLflow input
    datasets.DatasetDict({"train": train, "eval": train.select(range(2))}).save_to_disk(str(root))
    return root / "train"


def _steps(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r for r in rows if "loss" in r}


def _start(spec: dict, tmp_path: Path, name: str) -> subprocess.Popen:
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.resume_worker", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_training_then_rerun_resumes_and_continues_the_loss_curve(data_dir, tiny_model_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints" / "run"
    spec = {"model_dir": str(tiny_model_dir), "data_dir": str(data_dir), "output_dir": str(tmp_path / "adapter"),
            "checkpoint_dir": str(checkpoints), "settings": SETTINGS.model_dump(),
            "steps_log": str(tmp_path / "first.jsonl"), "step_sleep_s": 0.5}
    first = _start(spec, tmp_path, "first")
    deadline = time.monotonic() + 240
    try:
        while not (checkpoints / "checkpoint-6" / COMPLETE).is_file():
            assert first.poll() is None, f"training ended before it could be killed: {first.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-6 within 240 s"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    killed_at = max(_steps(tmp_path / "first.jsonl"))
    assert 6 <= killed_at < SETTINGS.max_steps and not (tmp_path / "adapter").exists()
    assert last_complete_checkpoint(checkpoints) is not None

    second = _start({**spec, "steps_log": str(tmp_path / "second.jsonl"), "step_sleep_s": 0}, tmp_path, "second")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    resumed = _steps(tmp_path / "second.jsonl")
    assert summary["resumed_from_step"] >= 6 and summary["global_steps"] == SETTINGS.max_steps
    assert min(resumed) == summary["resumed_from_step"] + 1 and max(resumed) == SETTINGS.max_steps
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not checkpoints.exists()  # deleted once the adapter was saved

    # the same steps of one uninterrupted run (in this process): optimizer, schedule, RNG and data order were
    # restored, so the resumed losses are the uninterrupted ones up to float reduction order (fp32, rel 1e-4)
    reference = []
    train_orpo_adapter(tiny_model_dir, __import__("datasets").load_from_disk(str(data_dir)), tmp_path / "ref",
                       SETTINGS, 128, device="cpu", on_log=lambda step, logs: reference.append((step, logs)))
    ref = {step: logs for step, logs in reference if "loss" in logs}
    before = _steps(tmp_path / "first.jsonl")
    for step in before:
        assert before[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
    for step in resumed:
        for key in ("loss", "nll_loss", "log_odds_ratio", "learning_rate"):
            assert resumed[step][key] == pytest.approx(ref[step][key], rel=1e-4), (step, key)


def test_checkpoint_key_changes_with_data_model_or_training_settings_but_not_with_save_cadence():
    base = dict(dataset_digest="d1", base_model="m", settings=SETTINGS, max_length=128)
    key = checkpoint_key(**base)
    assert checkpoint_key(**{**base, "dataset_digest": "d2"}) != key
    assert checkpoint_key(**{**base, "base_model": "m2"}) != key
    assert checkpoint_key(**{**base, "settings": SETTINGS.model_copy(update={"learning_rate": 2e-3})}) != key
    assert checkpoint_key(**{**base, "num_processes": 2}) != key
    assert checkpoint_key(**{**base, "settings": SETTINGS.model_copy(update={"save_steps": 5, "save_minutes": 3})}) == key


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    from orpo_pipeline.train.checkpoints import discard_incomplete

    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in discard_incomplete(tmp_path)] == ["checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_dagster_step_killed_mid_training_is_reexecuted_from_failure_and_resumes(data_dir, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    import dagster as dg
    from mlflow import MlflowClient

    from assets.model import orpo_adapter

    from .dagster_resume_job import get_job

    assert orpo_adapter.op.retry_policy.max_retries == 2  # a crash in production is retried, and resumes
    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"DAGSTER_HOME": str(home), "RESUME_TEST_STATE": str(state), "RESUME_TEST_MODEL": str(tiny_model_dir),
           "RESUME_TEST_TOKENIZED": str(data_dir.parent), "PYTHONPATH": str(ROOT)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train = {"max_steps": 40, "save_steps": 2, "save_minutes": 0, "logging_steps": 1,
             "per_device_train_batch_size": 2, "precision": "fp32"}
    # retries off for the first run only, so the kill fails it and the re-execution is what resumes
    first_config = {"ops": {"orpo_adapter": {"config": train}}, "execution": {"config": {"retries": {"disabled": {}}}}}
    (tmp_path / "run_config.json").write_text(json.dumps(first_config))
    runner = subprocess.Popen([sys.executable, "-m", "tests.dagster_resume_job", str(tmp_path / "run_config.json")],
                              cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 300
    try:
        checkpoints = state / "checkpoints"
        while not list(checkpoints.glob("*/checkpoint-*/" + COMPLETE)):
            assert runner.poll() is None, f"the run ended before a checkpoint: {runner.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        with dg.DagsterInstance.get() as instance:
            (run,) = instance.get_runs()
            # 'Executing step "orpo_adapter" in subprocess.' carries the step process's pid
            started = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED).records
            pids = [r.event_log_entry.dagster_event.event_specific_data.metadata["pid"].value for r in started
                    if r.event_log_entry.dagster_event.step_key == "orpo_adapter"]
        os.kill(int(pids[-1]), signal.SIGKILL)  # the step's own process; the run process records the crash
        out, err = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert json.loads(out.strip().splitlines()[-1])["success"] is False, err[-3000:]
    (key_dir,) = checkpoints.iterdir()
    assert last_complete_checkpoint(key_dir) is not None

    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(dg.reconstructable(get_job), instance=instance,
                            run_config={"ops": {"orpo_adapter": {"config": train}}},
                            reexecution_options=dg.ReexecutionOptions.from_failure(run.run_id, instance)) as result:
            assert result.success
            (mat,) = result.asset_materializations_for_node("orpo_adapter")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert 0 < meta["resumed_from_step"] < 40 and meta["steps"] == 40
    assert not key_dir.exists()  # deleted with the adapter saved
    client = MlflowClient(f"sqlite:///{state.resolve() / 'mlflow.db'}")
    (new_run,) = client.search_runs([client.get_experiment_by_name("orpo_pipeline").experiment_id],
                                    filter_string=f"tags.resumed_from_dagster_run = '{run.run_id}'")
    assert new_run.info.run_id in meta["mlflow_run"]
    old_run = new_run.data.tags["resumed_from_mlflow_run"]
    assert old_run != new_run.info.run_id
    # the old run's curve stops where the new one's starts: metrics continue at the resumed step
    old_steps = [m.step for m in client.get_metric_history(old_run, "loss")]
    new_steps = [m.step for m in client.get_metric_history(new_run.info.run_id, "loss")]
    assert min(new_steps) == meta["resumed_from_step"] + 1 and max(new_steps) == 40
    assert old_steps and max(old_steps) >= meta["resumed_from_step"]


def test_time_based_checkpoints_keep_the_last_two_complete_ones_and_go_once_the_adapter_is_saved(
        data_dir, tiny_model_dir, tmp_path):
    import datasets

    checkpoints, seen = tmp_path / "checkpoints", {}

    def on_log(step, logs):  # a step logs before it saves: step k sees the checkpoints up to k - 1
        if "loss" in logs:  # not the end-of-training summary, logged after the last save
            seen[step] = sorted(p.parent.name for p in checkpoints.glob("checkpoint-*/" + COMPLETE))

    settings = SETTINGS.model_copy(update={"max_steps": 4, "save_steps": 0, "save_minutes": 1e-5})  # due every step
    result = train_orpo_adapter(tiny_model_dir, datasets.load_from_disk(str(data_dir)), tmp_path / "adapter", settings,
                                128, device="cpu", on_log=on_log, checkpoint_dir=checkpoints)
    assert result.global_steps == 4 and result.resumed_from_step == 0
    assert seen[2] == ["checkpoint-1"] and seen[4] == ["checkpoint-2", "checkpoint-3"]  # save_total_limit 2
    assert not checkpoints.exists() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
