"""ComputeResource's Ray path: submit orpo_pipeline.train.ray_launch as a Ray job through dagster-ray's Pipes client.

The job's stdout carries the driver's Pipes messages; dagster-ray's PipesRayJobMessageReader tails it, and
the tap below hands each custom message ({"step", "logs"} from rank 0) to the asset's on_log as it arrives,
as StreamingMessageReader does for `accelerate launch`.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_ray import PipesRayJobClient, PipesRayJobMessageReader

from .pipes import Tap


class StreamingRayJobMessageReader(PipesRayJobMessageReader):
    """dagster-ray's reader, handing each Pipes custom message to `on_message` as it arrives."""

    def __init__(self, on_message, **kwargs):
        super().__init__(**kwargs)
        self.on_message = on_message

    @contextmanager
    def read_messages(self, handler):
        with super().read_messages(Tap(handler, self.on_message)) as params:
            yield params


def storage_path(resource, output_dir: Path) -> tuple[str, bool]:
    """Where Ray Train keeps this run's checkpoints, and whether to delete them once the adapter is saved."""
    if resource.ray_storage_path:
        return resource.ray_storage_path, False
    # beside the adapter, on the storage root every node reads; dropped once the adapter is saved
    return str(Path(output_dir).parent / f".{Path(output_dir).name}.ray-checkpoints"), True


def run_on_ray(resource, context: dg.AssetExecutionContext, spec: dict, on_message) -> dict:
    """Run the training spec as a Ray Train job; blocks until the job ends; raises if it failed."""
    path, delete = storage_path(resource, Path(spec["output_dir"]))
    spec = spec | {"workers": resource.ray_workers, "distributed": resource.distributed,
                   "max_failures": resource.ray_max_failures, "checkpoint_steps": resource.ray_checkpoint_steps,
                   "storage_path": path, "delete_checkpoints": delete, "run_name": f"orpo-{context.run.run_id}",
                   "resources_per_worker": dict(resource.ray_resources_per_worker)}
    client = PipesRayJobClient(address=resource.ray_address, poll_interval=1,
                               message_reader=StreamingRayJobMessageReader(on_message))
    entrypoint = f"{shlex.quote(resource.ray_python)} -m orpo_pipeline.train.ray_launch"
    context.log.info(f"submitting Ray Train job to {resource.ray_address}: {resource.ray_workers} workers "
                     f"({resource.distributed}), checkpoints under {path}")
    invocation = client.run(context=context, submit_job_params={"entrypoint": entrypoint},
                            extras={"train_spec": spec})
    return invocation.metadata


def tokenize_on_ray(resource, context: dg.AssetExecutionContext, paths: dict[str, list[str]], tokenizer_dir: str,
                    chat_template: str, kwargs: dict, output_dir: Path) -> dict:
    """Tokenize each split's parquet files as Ray Data in a Ray job; return {split: TokenizedSplit}.

    The job saves the DatasetDict into `output_dir` (on storage the cluster shares) and sends drops and
    truncation counts back as one Pipes custom message; the splits returned are read from `output_dir`.
    """
    import datasets

    from orpo_pipeline.train.tokenize import TokenizedSplit

    summaries = []

    def on_message(payload) -> None:
        if isinstance(payload, dict) and "tokenized" in payload:
            summaries.append(payload["tokenized"])

    spec = {"paths": paths, "tokenizer_dir": str(tokenizer_dir), "chat_template": chat_template, "kwargs": kwargs,
            "output_dir": str(output_dir), "concurrency": resource.ray_workers,
            "num_cpus": float(resource.ray_resources_per_worker.get("CPU", 1))}
    client = PipesRayJobClient(address=resource.ray_address, poll_interval=1,
                               message_reader=StreamingRayJobMessageReader(on_message))
    context.log.info(f"tokenizing on Ray at {resource.ray_address}: {resource.ray_workers} Ray Data actors")
    client.run(context=context, submit_job_params={
        "entrypoint": f"{shlex.quote(resource.ray_python)} -m orpo_pipeline.train.ray_tokenize"},
        extras={"tokenize_spec": spec})
    if not summaries:
        raise dg.Failure(f"the Ray tokenization job ended without reporting its splits (output {output_dir})")
    saved = datasets.load_from_disk(str(output_dir))
    return {s: TokenizedSplit(dataset=saved[s], dropped=m["dropped"], truncated_prompt=m["truncated_prompt"],
                              truncated_completion=m["truncated_completion"]) for s, m in summaries[-1].items()}
