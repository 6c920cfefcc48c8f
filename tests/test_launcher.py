"""ComputeResource(num_processes=2): training under `accelerate launch` as a Dagster Pipes subprocess, on CPU (gloo)."""

import math
from pathlib import Path

import dagster as dg
import pytest

from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.tokenize import tokenize_pairs
from orpo_pipeline.train.trainer import set_chat_template
from resources import ComputeResource

from .test_training import TURNS_TEMPLATE


@pytest.fixture(scope="module")
def train_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """8 sample pairs in a chat template that adds a token (so the core logs a message, and embeddings train)."""
    from transformers import AutoTokenizer

    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    set_chat_template(tokenizer, TURNS_TEMPLATE)
    out = tmp_path_factory.mktemp("tokenized") / "train"
    tokenize_pairs(kept, tokenizer, max_length=128, min_completion_tokens=16).dataset.save_to_disk(str(out))
    return out


def test_two_processes_stream_each_step_once_and_rank0_saves(train_dir, tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=2, logging_steps=1, per_device_train_batch_size=2, precision="fp32",
                             chat_template=TURNS_TEMPLATE)
    logged, results = [], []

    @dg.asset
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.Output[dict]:
        results.append(compute.train(context, model_dir=tiny_model_dir, train_dataset_dir=train_dir,
                                 output_dir=tmp_path / "adapter", settings=settings, max_length=128,
                                 on_log=lambda step, logs: logged.append((step, logs))))
        context.add_output_metadata({"steps": results[0].global_steps})
        # after a Pipes session Dagster takes no bare return values: wrap the asset's own value in Output
        return dg.Output({"dir": str(tmp_path / "adapter")})

    with dg.instance_for_test() as instance:
        run = dg.materialize([adapter], resources={"compute": ComputeResource(device="cpu", num_processes=2)},
                             instance=instance)
        messages = [e.user_message for e in instance.all_logs(run.run_id)]
    assert run.success
    assert run.output_for_node("adapter") == {"dir": str(tmp_path / "adapter")}
    assert run.get_asset_materialization_events()[0].materialization.metadata["steps"].value == 2
    (result,) = results
    assert result.num_processes == 2 and result.global_steps == 2 and result.device == "2 x cpu"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # rank 1 left no temp folder behind
    # each step reached the parent once (rank 0 only), with the gathered metrics
    steps = [step for step, logs in logged if "loss" in logs]
    assert steps == [1, 2]
    losses = [logs["loss"] for _, logs in logged if "loss" in logs]
    assert all(math.isfinite(x) for x in losses) and result.all_losses_finite
    assert all(math.isfinite(logs["nll_loss"]) and 0 <= logs["rewards/accuracies"] <= 1
               for _, logs in logged if "loss" in logs)
    assert [h["loss"] for h in result.history if "loss" in h] == losses  # TrainResult came back from rank 0
    # Pipes logs, from rank 0 only: the core's own log records and the CLI's summary
    assert sum("chat_template added 1 tokens" in m for m in messages) == 1
    assert sum("trained 2 steps on 2 x cpu" in m for m in messages) == 1
    assert not any("do not end with" in m for m in messages)


def test_one_process_trains_in_process_with_the_same_logs(train_dir, tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=1, logging_steps=1, per_device_train_batch_size=2, precision="fp32",
                             chat_template=TURNS_TEMPLATE)
    logged = []

    @dg.asset
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource) -> dict:
        result = compute.train(context, model_dir=tiny_model_dir, train_dataset_dir=train_dir,
                           output_dir=tmp_path / "adapter", settings=settings, max_length=128,
                           on_log=lambda step, logs: logged.append(step))
        return {"processes": result.num_processes}  # no Pipes session: a bare value is fine

    with dg.instance_for_test() as instance:
        run = dg.materialize([adapter], resources={"compute": ComputeResource(device="cpu")}, instance=instance)
        messages = [e.user_message for e in instance.all_logs(run.run_id)]
    assert run.success and run.output_for_node("adapter") == {"processes": 1} and 1 in logged
    assert sum("chat_template added 1 tokens" in m for m in messages) == 1
