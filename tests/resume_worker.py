"""Test harness: train the tiny model with checkpoints in this process, one JSON line per log step.

    python -m tests.resume_worker spec.json

spec: model_dir, data_dir, output_dir, checkpoint_dir, settings (TrainSettings as a dict), steps_log (file the
steps are appended to), step_sleep_s (a pause per step, so a test can kill the process mid-training).
"""

import json
import sys
import time
from pathlib import Path

import datasets

from orpo_pipeline.config import TrainSettings
from orpo_pipeline.train.trainer import train_orpo_adapter


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())

    def on_log(step: int, logs: dict) -> None:
        with open(spec["steps_log"], "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
        time.sleep(spec.get("step_sleep_s", 0))

    result = train_orpo_adapter(Path(spec["model_dir"]), datasets.load_from_disk(spec["data_dir"]),
                                Path(spec["output_dir"]), TrainSettings.model_validate(spec["settings"]), 128,
                                device="cpu", on_log=on_log, checkpoint_dir=Path(spec["checkpoint_dir"]))
    print(json.dumps({"global_steps": result.global_steps, "resumed_from_step": result.resumed_from_step}))


if __name__ == "__main__":
    main(sys.argv[1])
