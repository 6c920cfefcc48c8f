"""The Ray path on a real local Ray cluster (one head on 127.0.0.1, 2 CPUs): training as a Ray Train job of
2 gloo workers submitted through dagster-ray's Pipes client, a killed worker resuming from a checkpoint,
and tokenization as Ray Data."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.tokenize import tokenize_pairs
from orpo_pipeline.train.trainer import train_orpo_adapter
from resources import ComputeResource

from .ray_cluster import ray_head

pytest.importorskip("dagster_ray", reason="the Ray path needs the `ray` extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def cluster():
    with ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def train_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("tokenized") / "train"
    tokenize_pairs(kept, tokenizer, max_length=128, min_completion_tokens=16).dataset.save_to_disk(str(out))
    return out


def _adapter_asset(compute_kwargs, settings, model_dir, train_dir, out_dir, logged, results, mlflow_db=None):
    @dg.asset
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.Output[dict]:
        on_log = None
        if mlflow_db is not None:
            import mlflow

            from assets.model import _mlflow_step_logger

            client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
            run_id = client.create_run(client.create_experiment("ray")).info.run_id
            mlflow_log, sink = _mlflow_step_logger(context, run_id, client)
            results.append(run_id)
        else:
            mlflow_log = sink = None

        def on_log(step, logs):
            logged.append((step, logs))
            if mlflow_log is not None:
                mlflow_log(step, logs)

        try:
            results.append(compute.train(context, model_dir=model_dir, train_dataset_dir=train_dir,
                                         output_dir=out_dir, settings=settings, max_length=128, on_log=on_log))
        finally:
            if sink is not None:
                sink.close(timeout_s=30)  # the step metrics go through a background queue: flush them
        return dg.Output({"dir": str(out_dir)})

    return adapter


def test_ray_train_two_gloo_workers_rank0_reports_once(cluster, train_dir, tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=3, logging_steps=1, per_device_train_batch_size=2, precision="fp32")
    logged, results = [], []
    out = tmp_path / "artifacts" / "orpo_adapter" / "run"
    asset = _adapter_asset({}, settings, tiny_model_dir, train_dir, out, logged, results, tmp_path / "mlflow.db")
    compute = ComputeResource(device="cpu", ray_address=cluster.dashboard_url, ray_workers=2, ray_checkpoint_steps=2)
    with dg.instance_for_test() as instance:
        run = dg.materialize([asset], resources={"compute": compute}, instance=instance)
        messages = [e.user_message for e in instance.all_logs(run.run_id)]
    assert run.success
    run_id, result = results
    assert result.num_processes == 2 and result.global_steps == 3 and result.device == "2 x cpu"
    # the adapter saved once, by rank 0; the finished run's Ray checkpoints are gone, no temp folder is left
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"], list(out.parent.iterdir())
    # each step came back once, from rank 0 only, finite, and reached MLflow once
    assert [s for s, logs in logged if "loss" in logs] == [1, 2, 3]
    losses = [logs["loss"] for _, logs in logged if "loss" in logs]
    assert all(math.isfinite(x) for x in losses) and result.all_losses_finite
    assert [h["loss"] for h in result.history if "loss" in h] == losses
    import mlflow

    history = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert any("Ray Train finished: 2 workers" in m for m in messages)
    # the same result shape as the in-process path
    local = train_orpo_adapter(tiny_model_dir, __import__("datasets").load_from_disk(str(train_dir)),
                               tmp_path / "local", settings.model_copy(update={"max_steps": 1}), 128, device="cpu")
    assert set(local.__dict__) == set(result.__dict__)
    assert {k for h in local.history for k in h} == {k for h in result.history for k in h}
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == sorted(p.name for p in out.iterdir())


def _ray_worker_pids(dashboard_url: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                         ("state", "=", "ALIVE")], timeout=10)
    return [a.pid for a in actors]


def _registered_checkpoint(storage: Path) -> bool:
    """Whether Ray Train's controller has recorded a checkpoint (its snapshot file, written after every ranks'
    report): only then does a restarted worker group get it from ray.train.get_checkpoint()."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # caught mid-write
            pass
    return False


def test_killed_ray_worker_resumes_from_checkpoint(cluster, train_dir, tiny_model_dir, tmp_path):
    steps = 16
    settings = TrainSettings(max_steps=steps, logging_steps=1, per_device_train_batch_size=2, precision="fp32")
    logged, results = [], []
    out = tmp_path / "adapter"
    ckpts = tmp_path / "ray"
    asset = _adapter_asset({}, settings, tiny_model_dir, train_dir, out, logged, results)
    compute = ComputeResource(device="cpu", ray_address=cluster.dashboard_url, ray_workers=2, ray_checkpoint_steps=2,
                              ray_storage_path=str(ckpts), ray_max_failures=2)
    outcome = {}

    def materialize():
        with dg.instance_for_test() as instance:
            run = dg.materialize([asset], resources={"compute": compute}, instance=instance)
            outcome["success"] = run.success
            outcome["messages"] = [e.user_message for e in instance.all_logs(run.run_id)]

    thread = threading.Thread(target=materialize, daemon=True)
    thread.start()
    killed, seen = None, []
    deadline = time.monotonic() + 150
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        if _registered_checkpoint(ckpts):
            pids = _ray_worker_pids(cluster.dashboard_url)
            seen.append(pids)
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=240)
    assert killed is not None, f"no checkpoint, or no live worker, before the run ended: {seen[:3]}"
    assert not thread.is_alive(), "the run did not finish within 240 s of the kill"
    assert outcome["success"]
    (result,) = results
    resumed = [m for m in outcome["messages"] if "resumed from the checkpoint at step" in m]
    assert resumed, "Ray did not restart the workers from a checkpoint"
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert step > 0 and step % 2 == 0
    assert result.global_steps == steps and (out / "adapter_model.safetensors").is_file()
    # the restarted rank 0 continued after the checkpoint: its own history starts there, not at step 1
    assert min(h["step"] for h in result.history) > step
    assert all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)


def test_ray_data_tokenization_matches_the_local_path(cluster, smollm2_dir, tmp_path):
    """ComputeResource.tokenize_on_ray (the tokenized_dataset asset's Ray branch): a Ray job running Ray Data."""
    import polars as pl
    from transformers import AutoTokenizer

    from orpo_pipeline.train.tokenize import TOKEN_COLUMNS, dataset_digest

    from .conftest import ULTRAFEEDBACK

    kept = clean_preferences(records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")).kept
    # two partitions, as cleaned_preferences writes them; their order is the dataset's order
    paths = []
    for i, part in enumerate((kept.head(600), kept.slice(600))):
        (tmp_path / f"p{i}").mkdir()
        part.write_parquet(tmp_path / f"p{i}" / "train.parquet")
        paths.append(str(tmp_path / f"p{i}" / "train.parquet"))
    settings = {"max_length": 512, "max_prompt_length": 0, "min_completion_tokens": 32, "max_pair_tokens": 1400,
                "min_answer_tokens": 0}
    local = tokenize_pairs(pl.concat([pl.read_parquet(p) for p in paths]), AutoTokenizer.from_pretrained(smollm2_dir),
                           **settings)
    got = {}

    @dg.asset
    def tokenized(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.Output[dict]:
        got.update(compute.tokenize_on_ray(context, {"train": paths}, smollm2_dir, "", settings, tmp_path / "ray"))
        return dg.Output({})

    compute = ComputeResource(ray_address=cluster.dashboard_url, ray_workers=2, ray_tokenize=True,
                              ray_resources_per_worker={"CPU": 0.5})  # leave CPU for the parquet reads
    with dg.instance_for_test() as instance:
        assert dg.materialize([tokenized], resources={"compute": compute}, instance=instance).success
    remote = got["train"]
    assert len(remote.dataset) == len(local.dataset) > 900
    assert local.truncated_prompt + local.truncated_completion > 0 and local.dropped  # the bounds were exercised
    assert remote.dataset["content_hash"] == local.dataset["content_hash"]
    for column in TOKEN_COLUMNS:
        assert remote.dataset[column] == local.dataset[column], column
    assert dataset_digest(remote.dataset) == dataset_digest(local.dataset)
    assert remote.dataset.features == local.dataset.features
    assert (remote.truncated_prompt, remote.truncated_completion) == (local.truncated_prompt, local.truncated_completion)
    assert remote.dropped == local.dropped
