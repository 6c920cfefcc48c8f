"""The compute runtime training runs on: CUDA when there is one, else CPU."""


from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field


class GpuResource(dg.ConfigurableResource):
    """Device for training and evaluation. Training assets using it run in the Dagster pool `gpu`."""

    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto: CUDA when torch sees a GPU, else CPU."
    )
    num_processes: int = Field(
        default=1, description="Processes for data-parallel training; more than 1 launches `accelerate launch`."
    )

    def resolve_device(self) -> str:
        from orpo_pipeline.training import pick_device

        return pick_device(self.device)

    def train(self, context: dg.AssetExecutionContext, *, model_dir: Path, train_dataset_dir: Path, output_dir: Path,
              settings, max_length: int, on_log=None, adapter_init: Path | None = None):
        """Train an ORPO LoRA adapter on this runtime and return the core's TrainResult."""
        import datasets

        from orpo_pipeline.training import train_orpo_adapter

        train = datasets.load_from_disk(str(train_dataset_dir))
        return train_orpo_adapter(Path(model_dir), train, Path(output_dir), settings, max_length,
                                  device=self.resolve_device(), on_log=on_log, adapter_init=adapter_init)

    def describe(self) -> str:
        import torch

        device = self.resolve_device()
        if device == "cuda":
            return f"cuda ({torch.cuda.get_device_name()}, {torch.cuda.device_count()} visible)"
        return f"cpu ({torch.get_num_threads()} threads)"
