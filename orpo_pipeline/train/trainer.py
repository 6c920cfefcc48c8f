"""Train a LoRA adapter with ORPO on a dataset tokenized by `tokenization`.

`PretokenizedORPOTrainer` is TRL's ORPOTrainer (its loss, metrics and logging)
minus its constructor's dataset pass: ours is already tokenized, truncated
safely and in TRL's column layout, so it is used as it is.

The same `train_orpo_adapter` runs in one process, or in each of N processes
under `accelerate launch` (see launch.py); rank 0 logs and saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from trl.experimental.utils import DPODataCollatorWithPadding
from trl.trainer.utils import disable_dropout_in_model

from ..config import TrainSettings
from .loss import causal_lm_hidden_and_head, orpo_loss_fused, orpo_loss_from_logits
from .shared_prompt import (
    MASKABLE_ATTENTION,
    SharedPromptBatch,
    completion_hidden,
    decoder_inputs,
    pack_shared_prompt,
    register_segmented_sdpa,
)
from ..storage import atomic_dir, write_json
from .tokenize import TOKEN_COLUMNS

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]

PAD_CANDIDATES = ("<pad>", "<|pad|>", "<unk>")
# special-token markers written literally in a chat template: <|im_start|>, <|eot_id|>, <start_of_turn>
TEMPLATE_MARKER = re.compile(r"<\|[^|\s]+\|>|<[a-z]+(?:_[a-z]+)+>")
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


def load_train_result(output_dir: Path) -> TrainResult:
    """The TrainResult rank 0 wrote next to the adapter (how a launched run hands it back)."""
    return TrainResult(adapter_dir=Path(output_dir), **json.loads((Path(output_dir) / METRICS_FILE).read_text()))


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


def read_chat_template(value: str) -> str:
    """A Jinja string as it is, else the contents of the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat_template {value!r} is neither a Jinja template (no '{{{{' or '{{%') nor a file")
    return path.read_text()


def set_chat_template(tokenizer, chat_template: str) -> list[int]:
    """Apply a chat-template override; add the special tokens it writes literally but the vocab lacks.

    Returns the ids of the added tokens (their embeddings must be resized and trained). The tokenize
    step has to call this too, with the same template, or its token ids will not match.
    """
    if not chat_template:
        return []
    tokenizer.chat_template = read_chat_template(chat_template)
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(TEMPLATE_MARKER.findall(tokenizer.chat_template)) if t not in vocab]
    before = len(tokenizer)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a broken template should fail here, not halfway through a run
        raise ValueError(f"chat_template does not render a one-message conversation: {e}") from e
    return list(range(before, len(tokenizer)))


def check_tokenized_with(tokenizer, dataset: datasets.Dataset) -> None:
    """Warn when prompts do not end with the template's generation prompt: the tokenize step used another template."""
    marker = "\x00"
    probe = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                          tokenize=False)
    suffix = tokenizer(probe.split(marker)[-1], add_special_tokens=False)["input_ids"]
    prompts = dataset.select(range(min(16, len(dataset))))["prompt_input_ids"]
    if suffix and any(p[-len(suffix):] != suffix for p in prompts):
        log.warning("the training prompts do not end with the chat_template's generation prompt %r: tokenize the data "
                    "with the same chat_template, or the adapter learns one format and is served with another",
                    probe.split(marker)[-1])


def set_pad_token(tokenizer, model=None) -> int:
    """Pad with the tokenizer's or model's pad token, else the first of PAD_CANDIDATES in the vocab, else eos.

    Tokenizer, model config and generation config all end up with the same pad id.
    """
    cfg_pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None:
        if isinstance(cfg_pad, int) and 0 <= cfg_pad < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(cfg_pad)
        elif found := next((t for t in PAD_CANDIDATES if t in vocab), None):
            tokenizer.pad_token = found
        else:
            # padding is masked out of attention and loss, so eos as pad is safe here; generation may stop early
            log.warning("tokenizer has no pad token and none of %s; padding with eos %r", PAD_CANDIDATES,
                        tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


def attention_implementation(settings: TrainSettings, device: str) -> str:
    impl = settings.attn_implementation
    if impl == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "attn_implementation 'flash_attention_2' needs the flash-attn package, which cannot be imported "
                f"here ({e}). Install it (pip install flash-attn --no-build-isolation) or use 'sdpa'."
            ) from e
        if not device.startswith("cuda"):
            raise RuntimeError("attn_implementation 'flash_attention_2' needs a CUDA GPU; use 'sdpa' on CPU")
    return impl


def _short_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def extra_trainables(model, settings: TrainSettings, added_ids: list[int]) -> dict:
    """LoraConfig kwargs that train embeddings (all rows, or only added tokens' rows) and norms."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    names = [_short_name(model, emb)] + ([] if tied else [_short_name(model, head)])
    kw: dict = {"modules_to_save": []}
    if settings.train_embeddings:
        kw["modules_to_save"] += names
        kw["ensure_weight_tying"] = tied  # else the tied head keeps the frozen original
    elif added_ids:
        # new rows start as a mean of the others; frozen, the model could not learn to read or emit them
        log.info("chat_template added %d tokens (ids %s) to the tokenizer: training their embedding rows",
                 len(added_ids), added_ids)
        kw["trainable_token_indices"] = {n: added_ids for n in names}
    if settings.train_norms:
        kw["modules_to_save"] += sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()}
        )
    kw["modules_to_save"] = kw["modules_to_save"] or None
    return kw


def load_lora_model(model_dir: Path, settings: TrainSettings, device: str, adapter_init: Path | None = None):
    """Base model (4-bit when asked, on CUDA only) wrapped with a trainable LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    added = set_chat_template(tokenizer, settings.chat_template)
    # the frozen base weights are stored in bf16 (under autocast fp32 ones would be cast on every use: an eighth
    # of a CPU step); peft keeps the trained LoRA weights in fp32
    dtype = torch.bfloat16 if use_bf16(settings, device) else torch.float32
    kwargs: dict = {"dtype": dtype, "attn_implementation": attention_implementation(settings, device)}
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
        # under accelerate launch each process owns the GPU of its local rank
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if settings.shared_prompt and kwargs["attn_implementation"] == "sdpa":
        model.set_attn_implementation(register_segmented_sdpa())  # sdpa, plus packed rows as causal pieces
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # many vocabularies have spare rows already
        model.resize_token_embeddings(len(tokenizer))
    set_pad_token(tokenizer, model)
    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif settings.gradient_checkpointing:
        model.enable_input_require_grads()
    if adapter_init is not None:
        model = PeftModel.from_pretrained(model, adapter_init, is_trainable=True)
    else:
        targets = settings.lora_target_modules
        lora = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
            **extra_trainables(model, settings, added),
        )
        model = get_peft_model(model, lora)
    if use_bf16(settings, device):
        # peft casts each LoRA input up to its fp32 weights, and autocast casts it straight back to bf16 for the
        # matmul: the same values, two copies of every activation per adapted layer
        for module in model.modules():
            if hasattr(module, "lora_A"):
                module.cast_input_dtype_enabled = False
    return model, tokenizer


def call_as_forward(model, fn):
    """Return fn(inner) computed as the forward of `model`, the inner module possibly wrapped by DDP / FSDP.

    The fused loss calls the decoder and reads the LM head weight directly instead of model(...).
    Outside a wrapper's forward, DDP would not arm its gradient all-reduce (each rank would silently
    train its own adapter) and FSDP would not gather sharded weights.
    """
    inner = getattr(model, "module", model)
    saved = inner.__dict__.get("forward")  # accelerate may have put an autocast wrapper here
    inner.forward = lambda *args, **kwargs: fn(inner)
    try:
        return model()
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def hidden_and_head(model, ids, mask, **decoder_kwargs):
    """causal_lm_hidden_and_head, also when peft's trainable tokens wrap the head (no .bias of its own)."""
    from peft.utils import TrainableTokensWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        return causal_lm_hidden_and_head(model, ids, mask, **decoder_kwargs)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False, **decoder_kwargs).last_hidden_state
    return hidden, head.weight, head.original_module.bias  # .weight has the trained rows merged in


def fused_orpo_loss(model, ids, mask, labels, beta: float):
    hidden, weight, bias = hidden_and_head(model, ids, mask)
    hidden, labels = completion_window(hidden, labels)
    return orpo_loss_fused(hidden, weight, labels, beta, lm_head_bias=bias)


def shared_prompt_orpo_loss(model, packed: SharedPromptBatch, beta: float, fused: bool = True):
    """The ORPO loss over packed rows (prompt computed once); same value as over TRL's concatenated rows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = decoder_inputs(packed, base.config._attn_implementation, base.dtype)
    hidden, weight, bias = hidden_and_head(model, kw.pop("input_ids"), kw.pop("attention_mask"), **kw)
    h, labels = loss_layout(completion_hidden(hidden, packed), packed.labels)
    if fused:
        return orpo_loss_fused(h, weight, labels, beta, lm_head_bias=bias)
    return orpo_loss_from_logits(F.linear(h, weight, bias), labels, beta)


class PretokenizedORPOTrainer(ORPOTrainer):
    """TRL's ORPO loss and metrics over an already tokenized dataset."""

    def __init__(
        self, model, args: ORPOConfig, train_dataset, processing_class, eval_dataset=None, callbacks=None, loss_impl="fused",
        shared_prompt: bool = True,
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
        self.shared_prompt = shared_prompt_applies(model, shared_prompt)
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

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        lengths = ds[column] if column in ds.column_names else [
            max(len(c), len(r)) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])]
        return LengthBucketSampler(lengths, self.args.per_device_train_batch_size, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            n = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            self.non_pad_tokens += int(self.accelerator.gather(n.reshape(1)).sum())  # all ranks: global throughput
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """Our ORPO loss (completion-token NLL), fused unless `loss_impl` says otherwise; TRL's metric names."""
        fused = self.loss_impl == "fused"
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            if self.shared_prompt:
                packed = pack_shared_prompt(batch, self.padding_value)
                out = call_as_forward(model, lambda m: shared_prompt_orpo_loss(m, packed, self.beta, fused))
            else:
                cat = self.concatenated_inputs(batch, padding_value=self.padding_value, device=self.accelerator.device)
                ids, mask, labels = cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]
                if fused:
                    out = call_as_forward(model, lambda m: fused_orpo_loss(m, ids, mask, labels, self.beta))
                else:
                    logits = model(ids, attention_mask=mask, use_cache=False).logits
                    out = orpo_loss_from_logits(logits, labels, self.beta)
        chosen_r, rejected_r = self.beta * out.chosen_logps.detach(), self.beta * out.rejected_logps.detach()
        # every rank computes the same mean over all ranks' pairs, so rank 0's log speaks for the whole batch
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


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar lengths, in random order, so a batch pads only to its own longest row.

    Shuffle, sort within mega-batches of up to `mega` batches (transformers' LengthGroupedSampler uses only
    len/4 batch-sizes on small sets, which leaves most of the padding), cut into batches, shuffle the batches;
    the longest goes first so an out-of-memory shows at step one. The one short batch stays last so the
    DataLoader's own batching lines up with ours. Same seed and epoch on every rank: the same order everywhere.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 64):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = list(lengths), batch_size, seed, mega, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order, bs = torch.randperm(len(self.lengths), generator=g).tolist(), self.batch_size
        batches = []
        for i in range(0, len(order), bs * self.mega):
            group = sorted(order[i:i + bs * self.mega], key=self.lengths.__getitem__, reverse=True)
            batches += [group[j:j + bs] for j in range(0, len(group), bs)]
        short = [batches.pop()] if batches and len(batches[-1]) < bs else []
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        if batches:
            first = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[first] = batches[first], batches[0]
        return iter([k for b in batches + short for k in b])


def shared_prompt_applies(model, wanted: bool) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if wanted and impl not in MASKABLE_ATTENTION:
        log.info("shared_prompt is off: attention '%s' takes no custom mask (only %s do)", impl, MASKABLE_ATTENTION)
    return wanted and impl in MASKABLE_ATTENTION


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
    return loss_layout(h, lab)


def loss_layout(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h[:, k] predicts targets[:, k] -> the losses' unshifted convention (h[:, :-1] vs labels[:, 1:])."""
    h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
    lab = torch.cat([targets.new_full((targets.shape[0], 1), -100), targets], dim=1)
    return h, lab


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
        activation_checkpointing=settings.gradient_checkpointing,
        # reentrant checkpointing fires DDP's gradient hooks twice per step
        activation_checkpointing_kwargs={"use_reentrant": False},
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
    callbacks: list[TrainerCallback] | None = None,
    resume_from_checkpoint: Path | None = None,
) -> TrainResult:
    """Train and atomically save the adapter (+ tokenizer, metrics) into `output_dir` (rank 0 writes).

    `callbacks` join the Trainer's (a launcher's checkpoint reporting); `resume_from_checkpoint` is a
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
    with tempfile.TemporaryDirectory(prefix="orpo-trainer-") as scratch:
        trainer = PretokenizedORPOTrainer(
            model=model,
            args=orpo_args(settings, Path(scratch), device, max_length),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[progress, *(callbacks or [])],
            loss_impl=settings.loss_impl,
            shared_prompt=settings.shared_prompt,
        )
        progress.trainer = trainer
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
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
        )
        main = trainer.is_world_process_zero()
        # every rank enters save_model (FSDP gathers the weights collectively); only rank 0 writes
        with atomic_dir(Path(output_dir)) if main else nullcontext(Path(scratch) / "unused") as tmp:
            trainer.save_model(str(tmp))
            if main:
                (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the settings are in MLflow
                write_json(tmp / METRICS_FILE, {k: v for k, v in result.__dict__.items() if k != "adapter_dir"})
        trainer.accelerator.wait_for_everyone()
    return result
