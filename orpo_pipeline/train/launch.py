"""One training process under `accelerate launch`, as resources/compute.py starts it:

    accelerate launch --num_processes N --multi_gpu -m orpo_pipeline.train.launch --args-json args.json

args.json holds train_orpo_adapter's arguments (settings as a dict). Every rank trains; rank 0
saves the adapter and training_metrics.json into output_dir. When Dagster Pipes started us, rank 0
also streams each log step back as a custom message {"step", "logs"} and our log records as Pipes
logs; without Pipes (or without the dagster-pipes package) it just trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

try:
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
except ImportError:
    open_dagster_pipes = None


def pipes_session():
    # one writer per session: the other ranks' messages would be duplicates of rank 0's
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if open_dagster_pipes is None or not rank0 or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        return nullcontext(None)
    return open_dagster_pipes()


class PipesLogHandler(logging.Handler):
    def __init__(self, pipes):
        super().__init__(logging.INFO)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        self.pipes.log.log(record.levelno, record.getMessage())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args-json", required=True, type=Path)
    spec = json.loads(parser.parse_args(argv).args_json.read_text())

    import datasets

    from ..config import TrainSettings
    from .trainer import train_orpo_adapter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with pipes_session() as pipes:
        on_log = None
        if pipes is not None:
            logging.getLogger("orpo_pipeline").addHandler(PipesLogHandler(pipes))
            on_log = lambda step, logs: pipes.report_custom_message({"step": step, "logs": logs})  # noqa: E731
        result = train_orpo_adapter(
            Path(spec["model_dir"]),
            datasets.load_from_disk(spec["train_dataset_dir"]),
            Path(spec["output_dir"]),
            TrainSettings.model_validate(spec["settings"]),
            spec["max_length"],
            device=spec.get("device", "auto"),
            on_log=on_log,
            adapter_init=Path(spec["adapter_init"]) if spec.get("adapter_init") else None,
            checkpoint_dir=Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None,
        )
        if pipes is not None:
            pipes.log.info(f"trained {result.global_steps} steps on {result.device} in {result.train_runtime_s:.1f}s")


if __name__ == "__main__":
    main()
