"""Merge a LoRA adapter into full-precision base weights and save a standalone model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..storage import atomic_dir, atomic_file


def merge_adapter(base_dir: Path, adapter_dir: Path, output_dir: Path, dtype: str = "auto", card: dict | None = None) -> Path:
    """Load the base in bf16/fp32 (never 4-bit), merge_and_unload, save safetensors + tokenizer + card."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                   "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the chat template added tokens
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    # training may have chosen another pad token than the base config names; keep all three in agreement
    merged.config.pad_token_id = tokenizer.pad_token_id
    if merged.generation_config is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(Path(output_dir)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(card or {}))
    return Path(output_dir)


def model_card(card: dict) -> str:
    scores = card.get("scores") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [orpo, lora, trl, peft, orpo_pipeline]",
        f"base_model: {card.get('base_model', 'unknown')}",
        "---",
        "",
        f"# {card.get('name', 'ORPO-tuned model')}",
        "",
        "Trained with ORPO (odds ratio preference optimization, arXiv 2403.07691) as a LoRA adapter, "
        "then merged into the base weights by orpo_pipeline.",
        "",
        f"- Base model: `{card.get('base_model', 'unknown')}`",
        f"- Cleaned data digest: `{card.get('cleaned_digest', '')}`",
        f"- Tokenized data digest: `{card.get('tokenized_digest', '')}`",
        f"- Adapter digest: `{card.get('adapter_digest', '')}`",
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(card.get("training_config", {}), indent=2, sort_keys=True),
        "```",
        "",
        "## Scores",
        "",
    ]
    if scores:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(scores.items())]
    else:
        lines.append("Scored by the `benchmark_scores` asset after merging; see MLflow for the figures.")
    return "\n".join(lines) + "\n"


def adapter_card(base_model: str, training_config: dict, data: dict, steps: int, mlflow_run_id: str) -> str:
    """The adapter's README.md, in place of PEFT's empty template (whose base_model is a local temp path)."""
    files = "\n".join(f"- `{s['name']}` (partition `{s['partition_key']}`, sha256 `{s['digest'][:16]}…`)"
                       for s in data.get("sources", []))
    lines = [
        "---",
        "library_name: peft",
        "tags: [orpo, lora, trl, peft, orpo_pipeline]",
        f"base_model: {base_model}",
        "---",
        "",
        f"# ORPO LoRA adapter for `{base_model}`",
        "",
        "A LoRA adapter trained with ORPO (odds ratio preference optimization, arXiv 2403.07691) by orpo_pipeline, "
        f"{steps} optimizer steps. Load it with `PeftModel.from_pretrained(<base model>, <this folder>)`; the merged "
        "full-weight model is the `merged_model` asset, registered in MLflow (the training run's description links it).",
        "",
        f"- Base model: `{base_model}`",
        f"- LoRA rank / alpha / dropout: {training_config.get('lora_r')} / {training_config.get('lora_alpha')} / "
        f"{training_config.get('lora_dropout')}; target modules: {', '.join(training_config.get('lora_target_modules', []))}",
        f"- Cleaned data digest: `{data.get('cleaned_digest', '')}`",
        f"- Tokenized data digest: `{data.get('digest', '')}` (max_length {data.get('max_length')})",
        f"- MLflow run: `{mlflow_run_id}`",
        "",
        "## Trained on",
        "",
        files or "(no file list)",
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps({k: v for k, v in training_config.items() if k != "chat_template"}, indent=2, sort_keys=True),
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_adapter_card(adapter_dir: Path, **card) -> Path:
    path = Path(adapter_dir) / "README.md"
    with atomic_file(path) as tmp:
        tmp.write_text(adapter_card(**card))
    return path
