"""Train a LoRA adapter with ORPO on a dataset tokenized by orpo_pipeline.train.tokenize.

The core is one plain function, importable without Dagster, so a CLI, a test, each process under
`accelerate launch` (launch.py) or a Ray worker can call it:

    train_orpo_adapter(model_dir: Path, train_dataset: datasets.Dataset, output_dir: Path,
                       settings: TrainSettings, max_length: int, device: str = "auto",
                       on_log: Callable[[int, dict[str, float]], None] | None = None,
                       adapter_init: Path | None = None, checkpoint_dir: Path | None = None) -> TrainResult

It trains (every rank), saves the adapter, tokenizer and training_metrics.json atomically into `output_dir`
(rank 0 writes) and returns a TrainResult. `on_log(step, logs)` gets each log step on rank 0 (keep it fast:
orpo_pipeline.train.metrics_sink queues for slow receivers). With `checkpoint_dir` it checkpoints by
`settings.save_minutes` / `save_steps` into that folder, resumes from its last complete checkpoint when
`settings.resume` (same optimizer, scheduler, RNG and data order), and deletes it once the adapter is saved;
key the folder with checkpoints.checkpoint_key so another training never resumes it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import torch
from transformers import Trainer, TrainerCallback
from trl.experimental.orpo import ORPOConfig

from ..config import TrainSettings
from ..storage import atomic_dir, write_json
from .checkpoints import (
    CheckpointMarker,
    SaveEveryMinutes,
    discard_all,
    discard_incomplete,
    last_complete_checkpoint,
    resumed_step,
)
from .model_setup import (  # noqa: F401  (the training API in one place)
    check_tokenized_with,
    cpu_has_bf16,
    load_lora_model,
    peak_memory_mb,
    pick_device,
    read_chat_template,
    set_chat_template,
    set_pad_token,
    use_bf16,
)
from .orpo_trainer import LengthBucketSampler, PretokenizedORPOTrainer  # noqa: F401
from .tokenize import TOKEN_COLUMNS

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]
METRICS_FILE = "training_metrics.json"


@dataclass
class TrainResult:
    adapter_dir: Path
    history: list[dict] = field(default_factory=list)
    train_runtime_s: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    all_losses_finite: bool = True
    device: str = "cpu"
    global_steps: int = 0
    num_processes: int = 1
    resumed_from_step: int = 0


def load_train_result(output_dir: Path) -> TrainResult:
    """The TrainResult rank 0 wrote next to the adapter (how a launched run hands it back)."""
    return TrainResult(adapter_dir=Path(output_dir), **json.loads((Path(output_dir) / METRICS_FILE).read_text()))


def replicas_agree(trainer: Trainer) -> bool:
    """Whether every DDP rank ended with the same trainable weights (not so if gradients were never all-reduced)."""
    total = sum(p.detach().float().sum() for p in trainer.model.parameters() if p.requires_grad)
    sums = trainer.accelerator.gather(total.reshape(1))
    return bool(torch.allclose(sums, sums[0].expand_as(sums)))


class _Progress(TrainerCallback):
    """Adds tokens/s and peak memory to each log and forwards it to `on_log`, from rank 0 only."""

    def __init__(self, device: str, on_log: LogFn | None):
        self.device, self.forward = device, on_log
        self.trainer: PretokenizedORPOTrainer | None = None
        self.history: list[dict] = []
        self._t0 = self._t = time.perf_counter()
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t0 = self._t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or self.trainer is None:
            return
        now, tokens = time.perf_counter(), self.trainer.non_pad_tokens
        logs = dict(logs)
        if "loss" in logs:
            logs["tokens_per_second"] = (tokens - self._tokens) / max(now - self._t, 1e-9)
            logs["peak_memory_mb"] = peak_memory_mb(self.device)
            self._t, self._tokens = now, tokens
        logs["progress"] = state.global_step / max(state.max_steps, 1)
        self.history.append({"step": state.global_step, **logs})
        if self.forward is not None and state.is_world_process_zero:
            self.forward(state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})


def orpo_args(settings: TrainSettings, output_dir: Path, device: str, max_length: int,
              checkpoints: bool = False) -> ORPOConfig:
    """The Trainer's arguments; with `checkpoints`, step checkpoints (if save_steps) into output_dir."""
    return ORPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of total steps
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        activation_checkpointing=settings.gradient_checkpointing,
        # reentrant checkpointing fires DDP's gradient hooks twice per step
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=use_bf16(settings, device),
        fp16=False,
        use_cpu=not device.startswith("cuda"),
        optim="paged_adamw_8bit" if settings.load_in_4bit else "adamw_torch",
        logging_steps=settings.logging_steps,
        # time-based checkpoints come from SaveEveryMinutes; the Trainer honours its request under any strategy
        save_strategy="steps" if checkpoints and settings.save_steps > 0 else "no",
        save_steps=settings.save_steps if checkpoints and settings.save_steps > 0 else 500,
        save_total_limit=settings.save_total_limit,
        remove_unused_columns=False,  # the token columns are no arguments of the model's forward
        eval_strategy="no",
        report_to="none",
        seed=settings.seed,
        max_length=max_length,
        length_column_name="length",  # read by LengthBucketSampler
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient each step
        disable_tqdm=False,
    )


def train_orpo_adapter(
    model_dir: Path,
    train_dataset: datasets.Dataset,
    output_dir: Path,
    settings: TrainSettings,
    max_length: int,
    device: str = "auto",
    on_log: LogFn | None = None,
    adapter_init: Path | None = None,
    checkpoint_dir: Path | None = None,
    callbacks_extra: list[TrainerCallback] | None = None,
    resume_from_checkpoint: Path | None = None,
) -> TrainResult:
    """Train and atomically save the adapter (+ tokenizer, metrics) into `output_dir` (rank 0 writes).

    `callbacks_extra` join the Trainer's (a launcher's checkpoint reporting); `resume_from_checkpoint` is a
    Trainer checkpoint folder whose weights, optimizer, scheduler and RNG states the run continues from.
    """
    device = pick_device(device)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_lora_model(Path(model_dir), settings, device, adapter_init)
    if settings.chat_template:
        check_tokenized_with(tokenizer, train_dataset)
    # what a batch pads to: one packed row per pair, or prompt + the longer answer twice
    lengths = [
        p + c + r if settings.shared_prompt else p + max(c, r)
        for p, c, r in zip(train_dataset["prompt_tokens"], train_dataset["chosen_tokens"], train_dataset["rejected_tokens"])
    ]
    data = train_dataset.select_columns(TOKEN_COLUMNS).add_column("length", lengths)
    progress = _Progress(device, on_log)
    callbacks: list[TrainerCallback] = [progress]
    resume_from = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        callbacks.append(CheckpointMarker())
        if settings.save_minutes > 0:
            callbacks.append(SaveEveryMinutes(settings.save_minutes))
        resume_from = last_complete_checkpoint(checkpoint_dir) if settings.resume else None
    callbacks += callbacks_extra or []
    if resume_from_checkpoint is not None:
        resume_from = Path(resume_from_checkpoint)
    with tempfile.TemporaryDirectory(prefix="orpo-trainer-") as scratch:
        trainer = PretokenizedORPOTrainer(
            model=model,
            args=orpo_args(settings, checkpoint_dir or Path(scratch), device, max_length,
                           checkpoints=checkpoint_dir is not None),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=callbacks,
            loss_impl=settings.loss_impl,
            shared_prompt=settings.shared_prompt,
        )
        progress.trainer = trainer
        if checkpoint_dir is not None and trainer.is_world_process_zero():
            if not settings.resume:
                discard_all(checkpoint_dir)
            for stale in discard_incomplete(checkpoint_dir):
                log.warning("removed %s: a killed run left it half-written", stale)
        if resume_from is not None:
            log.info("resuming from %s (step %d)", resume_from, resumed_step(resume_from))
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        runtime = time.perf_counter() - start
        n = trainer.accelerator.num_processes
        if n > 1 and not trainer.is_fsdp_enabled and not replicas_agree(trainer):
            raise RuntimeError("the training processes ended with different adapters: gradients were not all-reduced")
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        losses = [h["loss"] for h in progress.history if "loss" in h]
        result = TrainResult(
            adapter_dir=Path(output_dir),
            history=progress.history,
            train_runtime_s=runtime,
            tokens_per_second=trainer.non_pad_tokens / max(runtime, 1e-9),
            peak_memory_mb=peak_memory_mb(device),
            all_losses_finite=all(math.isfinite(x) for x in losses) and math.isfinite(out.training_loss),
            device=name if n == 1 else f"{n} x {name}",
            global_steps=out.global_step,
            num_processes=n,
            resumed_from_step=resumed_step(resume_from),
        )
        main = trainer.is_world_process_zero()
        # every rank enters save_model (FSDP gathers the weights collectively); only rank 0 writes
        with atomic_dir(Path(output_dir)) if main else nullcontext(Path(scratch) / "unused") as tmp:
            trainer.save_model(str(tmp))
            if main:
                (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the settings are in MLflow
                write_json(tmp / METRICS_FILE, {k: v for k, v in result.__dict__.items() if k != "adapter_dir"})
        trainer.accelerator.wait_for_everyone()
        if main and checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the adapter is saved: nothing left to resume
    return result
