"""Training on a Ray cluster: the driver of a Ray job that runs `train_orpo_adapter` under Ray Train.

ComputeResource(ray_address=...) submits, through dagster-ray's PipesRayJobClient,

    python -m orpo_pipeline.train.ray_launch

as a Ray job. This driver builds a `TorchTrainer` with N workers (gloo on CPU, NCCL on GPU); each worker
runs the same core function as in-process training and `accelerate launch` do. Ray Train sets up the
process group, so the Trainer inside runs DDP (or FSDP, by accelerate's environment variables) as it
does under accelerate.

Rank 0 alone sends its log steps and log records to the driver through a Ray queue; the driver turns them
into Pipes messages (the job's stdout is what Dagster reads), the same {"step", "logs"} custom messages
launch.py sends. Every `checkpoint_steps` the Trainer saves a checkpoint and Ray Train persists it under
`storage_path`; a lost worker makes Ray restart the group, which resumes from the last one.

The training arguments come as the Pipes extra "train_spec", or from --args-json without Dagster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
except ImportError:
    open_dagster_pipes = None

log = logging.getLogger(__name__)

# what `accelerate launch --use_fsdp ...` (resources/compute.py) sets for its processes: the Trainer reads them
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_USE_ORIG_PARAMS": "true", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
}
RESUMED = "resumed_from_step"


class SaveEvery(TrainerCallback):
    """Asks the Trainer for a checkpoint every `steps` steps, and keeps only the newest on the worker's disk.

    Placed after Ray's RayTrainReportCallback, whose on_save has already copied the newest to Ray storage.
    """

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kw):
        if self.steps and state.global_step % self.steps == 0 and state.global_step < state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        folders = sorted(Path(args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
                         key=lambda p: int(p.name.rsplit("-", 1)[1]))
        for old in folders[:-1]:
            shutil.rmtree(old, ignore_errors=True)


class QueueLogHandler(logging.Handler):
    def __init__(self, queue):
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put({"level": record.levelno, "message": record.getMessage()})


def checkpoint_step(folder: Path) -> int:
    state = json.loads((folder / "trainer_state.json").read_text())
    return int(state["global_step"])


def worker_loop(config: dict) -> None:
    """One Ray Train worker: train (resuming from Ray's latest checkpoint if there is one); rank 0 reports."""
    import datasets
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from ..config import TrainSettings
    from .trainer import train_orpo_adapter

    spec, queue = config["spec"], config["queue"]
    if spec.get("distributed") == "fsdp":
        os.environ.update(FSDP_ENV)
    rank0 = ray.train.get_context().get_world_rank() == 0
    core = logging.getLogger("orpo_pipeline")
    handler = QueueLogHandler(queue) if rank0 else None
    if handler is not None:
        core.addHandler(handler)
        core.setLevel(logging.INFO)
    on_log = (lambda step, logs: queue.put({"step": step, "logs": logs})) if rank0 else None  # noqa: E731
    checkpoint = ray.train.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as ckpt:
            resume = Path(ckpt) / RayTrainReportCallback.CHECKPOINT_NAME if ckpt else None
            if resume is not None and rank0:
                step = checkpoint_step(resume)
                log.info("resuming from the checkpoint at step %d (%s)", step, checkpoint.path)
                queue.put({RESUMED: step})
            train_orpo_adapter(
                Path(spec["model_dir"]),
                datasets.load_from_disk(spec["train_dataset_dir"]),
                Path(spec["output_dir"]),
                TrainSettings.model_validate(spec["settings"]),
                spec["max_length"],
                device="cuda" if spec["use_gpu"] else "cpu",
                on_log=on_log,
                adapter_init=Path(spec["adapter_init"]) if spec.get("adapter_init") else None,
                callbacks_extra=[RayTrainReportCallback(), SaveEvery(spec["checkpoint_steps"])],
                resume_from_checkpoint=resume,
            )
    finally:
        if handler is not None:
            core.removeHandler(handler)


def use_gpu(device: str, workers: int) -> bool:
    import ray

    if device == "cuda":
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) >= workers


class Forwarder(threading.Thread):
    """Drains rank 0's queue into the Pipes session (or the driver's log without Dagster)."""

    def __init__(self, queue, pipes):
        super().__init__(daemon=True)
        self.queue, self.pipes, self.done = queue, pipes, threading.Event()

    def run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.send(self.queue.get(timeout=0.5))
            except Empty:
                if self.done.is_set():
                    return

    def send(self, item: dict) -> None:
        if "message" in item:
            if self.pipes is not None:
                self.pipes.log.log(item["level"], item["message"])
            else:
                log.log(item["level"], item["message"])
        elif self.pipes is not None:
            self.pipes.report_custom_message(item)

    def finish(self, timeout: float = 60) -> None:
        self.done.set()
        self.join(timeout)


def run_trainer(spec: dict, pipes=None):
    """Fit the TorchTrainer; return Ray Train's Result. The adapter is in spec['output_dir'] (rank 0 wrote it)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    spec = dict(spec, use_gpu=use_gpu(spec.get("device", "auto"), spec["workers"]))
    if spec.get("distributed") == "fsdp" and not spec["use_gpu"]:
        raise RuntimeError("distributed: fsdp needs CUDA GPUs on the Ray workers; use ddp on CPU")
    queue = Queue()
    forwarder = Forwarder(queue, pipes)
    forwarder.start()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec, "queue": queue},
        torch_config=TorchConfig(backend="nccl" if spec["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec["workers"], use_gpu=spec["use_gpu"],
                                     resources_per_worker=spec.get("resources_per_worker") or None),
        run_config=RunConfig(
            name=spec["run_name"],
            storage_path=spec["storage_path"],
            failure_config=FailureConfig(max_failures=spec["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        forwarder.finish()
    if spec.get("delete_checkpoints"):
        delete_dir(spec["storage_path"])
    return result


def delete_dir(storage_path: str) -> None:
    """Drop a finished run's checkpoints (its adapter is saved): a local path or any pyarrow filesystem URI."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path if "://" in storage_path else os.path.abspath(storage_path))
    try:
        fs.delete_dir(root)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args-json", type=Path, help="the training spec; under Dagster Pipes it is an extra")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    piped = open_dagster_pipes is not None and DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ
    with open_dagster_pipes() if piped else nullcontext(None) as pipes:
        if args.args_json is not None:
            spec = json.loads(args.args_json.read_text())
        elif pipes is not None:
            spec = pipes.get_extra("train_spec")
        else:
            parser.error("--args-json is required outside Dagster Pipes")
        result = run_trainer(spec, pipes)
        summary = (f"Ray Train finished: {spec['workers']} workers, last checkpoint "
                   f"{result.checkpoint.path if result.checkpoint else 'none'}")
        if pipes is not None:
            pipes.log.info(summary)
        else:
            log.info(summary)


if __name__ == "__main__":
    main()
