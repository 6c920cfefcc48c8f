"""The merged model as an MLflow pyfunc: chat messages in, assistant replies out.

MLflow's transformers flavor cannot log a local checkpoint with transformers 5
(its task lookup fails), so the weights travel as a pyfunc artifact instead.
"""

from __future__ import annotations

from pathlib import Path

import mlflow


class MergedChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])
        self.model = AutoModelForCausalLM.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from .evaluate import generate_samples

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", 64))
        return [g["completion"] for g in generate_samples(self.model, self.tokenizer, prompts, max_new)]


def signature():
    """Prompts in (a `prompt` column or a list of strings), one reply each out; max_new_tokens as a parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]))


def version_description(card: dict, dagster_run_id: str) -> str:
    return (f"ORPO-tuned `{card.get('base_model', '?')}`: a LoRA adapter merged into the base weights. Trained by "
            f"Dagster run `{dagster_run_id}` on cleaned data `{card.get('cleaned_digest', '')[:16]}` (tokenized "
            f"`{card.get('tokenized_digest', '')[:16]}`). Input: a `prompt` column (chat messages are templated by "
            "the bundled tokenizer); output: the assistant's reply. Scores: the `eval.*` tags, set by "
            "benchmark_scores; the champion decision: `champion_gate.*` tags.")


def fail_pending_models(run_id: str) -> None:
    """MLflow leaves a LoggedModel PENDING when log_model raises (a full disk while copying the weights): mark
    this run's FAILED now, rather than when the next run finds it."""
    from mlflow.entities import LoggedModelStatus

    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def log_merged_model(model_dir: Path, registered_name: str, tags: dict[str, str] | None = None,
                     description: str = "") -> str:
    """Log into the active run, register a new version, return its number."""
    import transformers
    import torch

    try:
        info = mlflow.pyfunc.log_model(
            name="merged_model",
            python_model=MergedChatModel(),
            signature=signature(),
            artifacts={"model": str(model_dir)},
            pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              "orpo_pipeline"],
            registered_model_name=registered_name,
            tags=tags,
        )
    except BaseException:
        fail_pending_models(mlflow.active_run().info.run_id)
        raise
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, k, v)
    if description:
        client.update_model_version(registered_name, version, description=description)
    return version
