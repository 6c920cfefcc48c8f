"""Train a LoRA adapter with ORPO on a dataset tokenized by `tokenization`.

`PretokenizedORPOTrainer` is TRL's ORPOTrainer (its loss, metrics and logging)
minus its constructor's dataset pass: ours is already tokenized, truncated
safely and in TRL's column layout, so it is used as it is.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from trl.experimental.utils import DPODataCollatorWithPadding
from trl.trainer.utils import disable_dropout_in_model

from .config import TrainSettings
from .orpo_loss import causal_lm_hidden_and_head, orpo_loss_fused, orpo_loss_from_logits
from .storage import atomic_dir, write_json
from .tokenization import TOKEN_COLUMNS

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]


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


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU")
    return requested


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def cpu_has_bf16() -> bool:
    # AMX / AVX512-BF16 CPUs run bf16 matmuls about 2x faster than fp32; older ones emulate it slowly
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(settings: TrainSettings, device: str) -> bool:
    if settings.precision != "auto":
        return settings.precision == "bf16"
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def load_lora_model(model_dir: Path, settings: TrainSettings, device: str, adapter_init: Path | None = None):
    """Base model (4-bit when asked, on CUDA only) wrapped with a trainable LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        log.warning("tokenizer has no pad token; using eos")
        tokenizer.pad_token = tokenizer.eos_token
    # on CPU, bf16 runs as autocast over fp32 master weights; on CUDA the weights themselves are bf16
    dtype = torch.bfloat16 if use_bf16(settings, device) and device.startswith("cuda") else torch.float32
    kwargs: dict = {"dtype": dtype}
    if settings.load_in_4bit:
        if not device.startswith("cuda"):
            raise RuntimeError(
                "load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has none. "
                "Set load_in_4bit: false to train in full precision on CPU."
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        model.enable_input_require_grads()
    if adapter_init is not None:
        return PeftModel.from_pretrained(model, adapter_init, is_trainable=True), tokenizer
    targets = settings.lora_target_modules
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


class PretokenizedORPOTrainer(ORPOTrainer):
    """TRL's ORPO loss and metrics over an already tokenized dataset."""

    def __init__(
        self, model, args: ORPOConfig, train_dataset, processing_class, eval_dataset=None, callbacks=None, loss_impl="fused"
    ):
        # ORPOTrainer.__init__ would map tokenize_row over the data again; set up what its methods read instead
        self.is_encoder_decoder = False
        self.beta = args.beta
        self.max_length = args.max_length
        self.max_completion_length = None
        self.padding_value = processing_class.pad_token_id
        self.aux_loss_enabled = getattr(model.config, "output_router_logits", False)
        self.aux_loss_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
        self.generate_during_eval = False
        self.use_dpo_data_collator = True
        self._peft_has_been_casted_to_bf16 = False
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self.non_pad_tokens = 0
        self.loss_impl = loss_impl
        if args.disable_dropout:
            disable_dropout_in_model(model)
        args.remove_unused_columns = False
        Trainer.__init__(
            self,
            model=model,
            args=args,
            data_collator=DPODataCollatorWithPadding(pad_token_id=processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.non_pad_tokens += int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """Our ORPO loss (completion-token NLL), fused unless `loss_impl` says otherwise; TRL's metric names."""
        cat = self.concatenated_inputs(batch, padding_value=self.padding_value, device=self.accelerator.device)
        ids, mask, labels = cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            if self.loss_impl == "fused":
                hidden, weight, bias = causal_lm_hidden_and_head(model, ids, mask)
                hidden, labels = completion_window(hidden, labels)
                out = orpo_loss_fused(hidden, weight, labels, self.beta, lm_head_bias=bias)
            else:
                logits = model(ids, attention_mask=mask, use_cache=False).logits
                out = orpo_loss_from_logits(logits, labels, self.beta)
        chosen_r, rejected_r = self.beta * out.chosen_logps.detach(), self.beta * out.rejected_logps.detach()
        gather = lambda t: self.accelerator.gather_for_metrics(t.detach().float()).mean().item()  # noqa: E731
        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {
            "rewards/chosen": gather(chosen_r),
            "rewards/rejected": gather(rejected_r),
            "rewards/accuracies": gather((chosen_r > rejected_r).float()),
            "rewards/margins": gather(chosen_r - rejected_r),
            "logps/chosen": gather(out.chosen_logps),
            "logps/rejected": gather(out.rejected_logps),
            "nll_loss": gather(out.nll_loss),
            "log_odds_ratio": gather(out.log_odds_ratio),
            "log_odds_chosen": gather(out.log_odds_chosen),
        }
        return out.loss, {prefix + k: v for k, v in metrics.items()}


def completion_window(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only positions that predict a completion token, so the LM head never runs on the prompt.

    Returns tensors in the loss's unshifted convention: one dummy trailing hidden column and one
    ignored leading label column, so hidden[:, :-1] lines up with labels[:, 1:] again.
    """
    target = labels[:, 1:] != -100  # completions are contiguous: prompt, answer, padding
    counts = target.sum(1)
    width = max(int(counts.max()), 1)
    start = target.int().argmax(1)
    offsets = torch.arange(width, device=labels.device)
    idx = (start[:, None] + offsets[None]).clamp(max=labels.shape[1] - 2)
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    lab = labels[:, 1:].gather(1, idx).masked_fill(offsets[None] >= counts[:, None], -100)
    h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
    lab = torch.cat([lab.new_full((lab.shape[0], 1), -100), lab], dim=1)
    return h, lab


class _Progress(TrainerCallback):
    """Adds tokens/s and peak memory to each log and forwards it to `on_log`."""

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
        if self.forward is not None:
            self.forward(state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})


def orpo_args(settings: TrainSettings, output_dir: Path, device: str, max_length: int) -> ORPOConfig:
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
        gradient_checkpointing=settings.gradient_checkpointing,
        bf16=use_bf16(settings, device),
        fp16=False,
        use_cpu=not device.startswith("cuda"),
        optim="paged_adamw_8bit" if settings.load_in_4bit else "adamw_torch",
        logging_steps=settings.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=settings.seed,
        max_length=max_length,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        dataloader_num_workers=0,
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
) -> TrainResult:
    """Train and atomically save the adapter (+ tokenizer, metrics) into `output_dir`."""
    device = pick_device(device)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_lora_model(Path(model_dir), settings, device, adapter_init)
    lengths = [
        p + max(c, r)
        for p, c, r in zip(train_dataset["prompt_tokens"], train_dataset["chosen_tokens"], train_dataset["rejected_tokens"])
    ]
    data = train_dataset.select_columns(TOKEN_COLUMNS).add_column("length", lengths)
    progress = _Progress(device, on_log)
    with atomic_dir(Path(output_dir)) as tmp:
        trainer = PretokenizedORPOTrainer(
            model=model,
            args=orpo_args(settings, tmp / "_trainer", device, max_length),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[progress],
            loss_impl=settings.loss_impl,
        )
        progress.trainer = trainer
        start = time.perf_counter()
        out = trainer.train()
        runtime = time.perf_counter() - start
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        losses = [h["loss"] for h in progress.history if "loss" in h]
        result = TrainResult(
            adapter_dir=Path(output_dir),
            history=progress.history,
            train_runtime_s=runtime,
            tokens_per_second=trainer.non_pad_tokens / max(runtime, 1e-9),
            peak_memory_mb=peak_memory_mb(device),
            all_losses_finite=all(math.isfinite(x) for x in losses) and math.isfinite(out.training_loss),
            device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            global_steps=out.global_step,
        )
        write_json(tmp / "training_metrics.json", {k: v for k, v in result.__dict__.items() if k != "adapter_dir"})
        import shutil

        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
    return result
