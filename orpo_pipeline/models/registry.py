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


def log_merged_model(model_dir: Path, registered_name: str, tags: dict[str, str] | None = None) -> str:
    """Log into the active run, register a new version, return its number."""
    import transformers
    import torch

    info = mlflow.pyfunc.log_model(
        name="merged_model",
        python_model=MergedChatModel(),
        artifacts={"model": str(model_dir)},
        pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                          "orpo_pipeline"],
        registered_model_name=registered_name,
        tags=tags,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, k, v)
    return version
