"""Training checkpoints: where they live, which one a run may resume, and when they are written.

The Trainer writes `checkpoint-<step>/` (adapter, optimizer, scheduler, RNG states, trainer state) itself; a
checkpoint counts only once `CheckpointMarker` has put `COMPLETE` into it, which happens after the Trainer
finished writing it. A process killed halfway leaves a folder without the marker: it is never resumed and
`discard_incomplete` removes it. The Trainer keeps the newest `save_total_limit` checkpoints (at least 2, so the
previous, complete one survives while the next is written).

The folder is keyed by `checkpoint_key`: a digest of the data, base model and every setting that changes what
is trained, so a run with other data or settings never resumes a foreign checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config import TrainSettings
from ..storage import write_json

COMPLETE = "COMPLETE"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# settings that change when or how often progress is saved or shown, not what is trained
NOT_IN_KEY = {"save_steps", "save_minutes", "save_total_limit", "resume", "logging_steps"}


def checkpoint_key(*, dataset_digest: str, base_model: str, settings: TrainSettings, max_length: int,
                   adapter_init: str | None = None, num_processes: int = 1) -> str:
    """Digest naming the checkpoint folder of one training (data order depends on the process count too)."""
    spec = {"dataset": dataset_digest, "base_model": base_model, "max_length": max_length,
            "adapter_init": adapter_init, "num_processes": num_processes,
            "settings": settings.model_dump(exclude=NOT_IN_KEY)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing, or None."""
    complete = [p for _, p in _checkpoints(Path(root)) if (p / COMPLETE).is_file()]
    return complete[-1] if complete else None


def discard_incomplete(root: Path) -> list[Path]:
    """Remove the checkpoints a killed process left half-written (they would otherwise be overwritten piecemeal)."""
    gone = [p for _, p in _checkpoints(Path(root)) if not (p / COMPLETE).is_file()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def discard_all(root: Path) -> None:
    """Start over: remove every checkpoint (resume is off, and old ones would mix into the rotation)."""
    for _, p in _checkpoints(Path(root)):
        shutil.rmtree(p, ignore_errors=True)


def resumed_step(checkpoint: Path | None) -> int:
    """The optimizer step a checkpoint was written at (0 for none)."""
    if checkpoint is None:
        return 0
    if match := CHECKPOINT_DIR.match(checkpoint.name):
        return int(match.group(1))
    # a launcher's checkpoint (Ray Train's) has a folder name of its own; the Trainer's state file says the step
    state = checkpoint / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.is_file() else 0


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete; on_save runs after the Trainer wrote (and rotated) its checkpoints."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its own RNG state into the folder
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / COMPLETE, {"step": state.global_step, "time": time.time()})


class SaveEveryMinutes(TrainerCallback):
    """Asks for a checkpoint when `minutes` have passed since the last one (or since training started).

    Every rank must take the same decision (a save is collective under FSDP), so with several processes the
    ranks agree on it: one element all-reduced per step.
    """

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self._last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self._last >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(due)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            due = bool(flag.item())
        if due:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last = time.monotonic()
