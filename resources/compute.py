"""The compute runtime training runs on: CUDA when there is one, else CPU; one process, or N under accelerate."""


import json
import logging
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from .pipes import StreamingMessageReader


class ComputeResource(dg.ConfigurableResource):
    """Device for training and evaluation. Training assets using it run in the Dagster pool `gpu`."""

    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto: CUDA when torch sees a GPU, else CPU."
    )
    num_processes: int = Field(
        default=1, ge=1,
        description="Processes for data-parallel training (one per GPU); more than 1 runs `accelerate launch` "
        "as a Dagster Pipes subprocess.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="With num_processes > 1: ddp keeps a full model copy per process; fsdp shards it (CUDA only).",
    )
    # Ray: a third way to train, on a cluster (resources/ray_client.py); empty ray_address leaves the above as is
    ray_address: str = Field(
        default="", description="Ray dashboard address of a cluster (http://head:8265); set, training runs there as "
        "a Ray Train job of ray_workers workers, submitted through Dagster Pipes. Empty: train on this machine.",
    )
    ray_workers: int = Field(
        default=2, ge=1, description="Ray Train workers (one per GPU on GPU nodes; each uses ray_resources_per_worker)."
    )
    ray_resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources each worker reserves, e.g. {CPU: 8, GPU: 1}; "
        "empty: Ray's default (1 CPU, plus 1 GPU when the workers train on CUDA).",
    )
    ray_storage_path: str = Field(
        default="", description="Where Ray Train keeps checkpoints: a path every node mounts, or an s3:// / gs:// "
        "URI. Empty: beside the adapter under the storage root (which must then be shared by the cluster).",
    )
    ray_checkpoint_steps: int = Field(
        default=50, ge=1, description="On Ray: save a checkpoint every this many optimizer steps; a lost worker "
        "costs at most this many steps.",
    )
    ray_max_failures: int = Field(
        default=3, ge=0, description="On Ray: worker-group restarts (from the last checkpoint) before the run fails.",
    )
    ray_tokenize: bool = Field(
        default=False, description="With ray_address: tokenized_dataset tokenizes as Ray Data on the cluster "
        "(same ids as the local path), ray_workers actors. Off: in the asset's process.",
    )
    ray_python: str = Field(
        default="python", description="On Ray: the Python on the cluster's nodes that has orpo_pipeline installed.",
    )

    def resolve_device(self) -> str:
        from orpo_pipeline.train.trainer import pick_device

        return pick_device(self.device)

    def train(self, context: dg.AssetExecutionContext, *, model_dir: Path, train_dataset_dir: Path, output_dir: Path,
              settings, max_length: int, on_log=None, adapter_init: Path | None = None,
              checkpoint_dir: Path | None = None):
        """Train an ORPO LoRA adapter on this runtime and return the core's TrainResult.

        With num_processes > 1 this opens a Dagster Pipes session, after which Dagster takes only typed
        results from the asset: it must return dg.Output(value) (or a MaterializeResult), not a bare value.
        """
        if self.ray_address:
            return self._launch_ray(context, model_dir=model_dir, train_dataset_dir=train_dataset_dir,
                                    output_dir=output_dir, settings=settings, max_length=max_length, on_log=on_log,
                                    adapter_init=adapter_init)
        device = self.resolve_device()
        if self.num_processes > 1:
            return self._launch(context, device, model_dir=model_dir, train_dataset_dir=train_dataset_dir,
                                output_dir=output_dir, settings=settings, max_length=max_length, on_log=on_log,
                                adapter_init=adapter_init, checkpoint_dir=checkpoint_dir)
        import datasets

        from orpo_pipeline.train.trainer import train_orpo_adapter

        train = datasets.load_from_disk(str(train_dataset_dir))
        with _core_logs_to(context.log):
            return train_orpo_adapter(Path(model_dir), train, Path(output_dir), settings, max_length,
                                      device=device, on_log=on_log, adapter_init=adapter_init,
                                      checkpoint_dir=checkpoint_dir)

    def launch_command(self, device: str, args_json: Path, port: int) -> list[str]:
        """`accelerate launch` running orpo_pipeline.train.launch in num_processes processes on this machine."""
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.num_processes),
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no"]
        if self.distributed == "fsdp":
            cmd += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                    "--fsdp_use_orig_params", "true",  # LoRA mixes frozen and trainable weights in one layer
                    "--fsdp_sync_module_states", "true", "--fsdp_cpu_ram_efficient_loading", "false"]
        else:
            # not --cpu: accelerate then starts a single process (it expects MPI to start the rest); on CPU
            # the Trainer's use_cpu makes each process join with gloo instead of NCCL
            cmd += ["--multi_gpu"]
        return cmd + ["-m", "orpo_pipeline.train.launch", "--args-json", str(args_json)]

    def _launch(self, context, device: str, *, model_dir, train_dataset_dir, output_dir, settings, max_length,
                on_log, adapter_init, checkpoint_dir):
        from orpo_pipeline.train.trainer import load_train_result

        if self.distributed == "fsdp" and (device != "cuda" or settings.load_in_4bit):
            raise dg.Failure("distributed: fsdp needs CUDA GPUs and full-precision weights; use ddp on CPU or "
                             "with load_in_4bit")
        spec = {"model_dir": str(model_dir), "train_dataset_dir": str(train_dataset_dir), "output_dir": str(output_dir),
                "settings": settings.model_dump(), "max_length": max_length, "device": device,
                "adapter_init": str(adapter_init) if adapter_init else None,
                "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None}

        client = dg.PipesSubprocessClient(message_reader=StreamingMessageReader(_step_forwarder(context, on_log)))
        with tempfile.TemporaryDirectory(prefix="orpo-launch-") as tmp:
            args_json = Path(tmp) / "train_args.json"
            args_json.write_text(json.dumps(spec))
            cmd = self.launch_command(device, args_json, free_port())
            context.log.info(f"launching {self.num_processes} training processes ({self.distributed}): {' '.join(cmd)}")
            client.run(context=context, command=cmd)  # a failed rank fails this step; stderr is in its logs
        return load_train_result(Path(output_dir))

    def _launch_ray(self, context, *, model_dir, train_dataset_dir, output_dir, settings, max_length, on_log,
                    adapter_init):
        from orpo_pipeline.train.trainer import load_train_result

        from .ray_client import run_on_ray

        # the workers pick their device: the Dagster machine may have no GPU while the cluster does
        spec = {"model_dir": str(model_dir), "train_dataset_dir": str(train_dataset_dir), "output_dir": str(output_dir),
                "settings": settings.model_dump(), "max_length": max_length, "device": self.device,
                "adapter_init": str(adapter_init) if adapter_init else None}
        run_on_ray(self, context, spec, _step_forwarder(context, on_log))
        return load_train_result(Path(output_dir))

    def tokenize_on_ray(self, context, paths: dict[str, list[str]], tokenizer_dir, chat_template: str, kwargs: dict,
                        output_dir: Path) -> dict:
        """{split: TokenizedSplit} of each split's parquet files, tokenized as Ray Data in a Ray job (Pipes)."""
        from .ray_client import tokenize_on_ray

        return tokenize_on_ray(self, context, paths, tokenizer_dir, chat_template, kwargs, Path(output_dir))

    def describe(self) -> str:
        import torch

        if self.ray_address:
            return f"Ray cluster {self.ray_address} ({self.ray_workers} workers, {self.distributed})"

        device = self.resolve_device()
        procs = f", {self.num_processes} processes ({self.distributed})" if self.num_processes > 1 else ""
        if device == "cuda":
            return f"cuda ({torch.cuda.get_device_name()}, {torch.cuda.device_count()} visible{procs})"
        return f"cpu ({torch.get_num_threads()} threads{procs})"


def _step_forwarder(context, on_log):
    """Pipes custom messages from rank 0 (accelerate or Ray) -> on_log(step, logs); a Ray resume notice goes to
    the run log."""

    def on_message(payload) -> None:
        if isinstance(payload, dict) and "resumed_from_step" in payload:
            context.log.info(f"Ray restarted the workers: resumed from the checkpoint at step "
                             f"{payload['resumed_from_step']}")
        if on_log is None or not isinstance(payload, dict) or "step" not in payload:
            return
        try:
            on_log(int(payload["step"]), payload["logs"])
        except Exception as e:  # raised in Pipes' reader thread, it would drop every later message
            context.log.warning(f"on_log failed for streamed step {payload['step']}: {e!r}")

    return on_message


def free_port() -> int:
    # the default 29500 collides with any other run on this machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _core_logs_to(dagster_log):
    """Show the training core's log records (pad token, added tokens) in the Dagster run log."""

    class Forward(logging.Handler):
        def emit(self, record):
            dagster_log.log(record.levelno, record.getMessage())

    handler, core = Forward(logging.INFO), logging.getLogger("orpo_pipeline")
    level = core.level
    core.addHandler(handler)
    core.setLevel(min(level or logging.INFO, logging.INFO))  # the root logger's WARNING would drop info records
    try:
        yield
    finally:
        core.removeHandler(handler)
        core.setLevel(level)
