import os
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ULTRAFEEDBACK = SHARED / "ultrafeedback_binarized_1k" / "train.jsonl"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    """The real embedded default, converted from GGUF (about 25 s, once per session)."""
    from orpo_pipeline.models.base import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct", model_cache)


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache, smollm2_dir) -> Path:
    from orpo_pipeline.models.base import resolve_base_model

    return resolve_base_model("tiny-random-llama", model_cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
