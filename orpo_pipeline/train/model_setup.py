"""The model side of training: device and precision, tokenizer (chat template, pad token), LoRA-wrapped base model."""

from __future__ import annotations

import logging
import os
import re
import resource
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import TrainSettings
from .shared_prompt import register_segmented_sdpa

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("<pad>", "<|pad|>", "<unk>")
# special-token markers written literally in a chat template: <|im_start|>, <|eot_id|>, <start_of_turn>
TEMPLATE_MARKER = re.compile(r"<\|[^|\s]+\|>|<[a-z]+(?:_[a-z]+)+>")


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
