"""Model configs for the GPU training-throughput benchmark (bench/train_throughput.py --device cuda).

Randomly initialised models with the shapes of real ones: no weights are fetched, so the benchmark runs on a
machine without network. Throughput, memory and FLOPs depend on the shapes only, not on the weight values.

Text is tokenized with the SmolLM2 tokenizer (vocabulary 49,152) and its chat template; its ids are valid
indices into these larger vocabularies, and the full vocabulary still costs its full price in the LM head
(logits are [tokens, vocab_size] whatever ids occur). Special-token ids are SmolLM2's, filled in at build time.
"""

from __future__ import annotations

# name -> (transformers model_type, config kwargs). Values copied from the public configs of the named models;
# rope scaling variants are left out (they do not change the cost of a step).
GPU_MODELS: dict[str, tuple[str, dict]] = {
    # Qwen2.5-0.5B-Instruct: 494M parameters, 136M of them the (tied) embedding / LM head; vocab >= 128k
    "qwen2.5-0.5b-like": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            hidden_act="silu",
        ),
    ),
    # Llama-3.2-1B: 1.24B parameters, 263M of them the (tied) embedding / LM head
    "llama3.2-1b-like": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            tie_word_embeddings=True,
            hidden_act="silu",
        ),
    ),
}

# The model whose MFU the GPU target applies to (">= 1B parameters").
MFU_TARGET_MODELS = ("llama3.2-1b-like",)


def make_config(name: str, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None):
    from transformers import AutoConfig

    model_type, kwargs = GPU_MODELS[name]
    return AutoConfig.for_model(
        model_type, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
    )


def build_random_model(name: str, tokenizer_dir, out_dir, device: str = "cpu", seed: int = 0) -> dict:
    """Initialise `name` randomly (on `device`, in bf16 on CUDA) and save it with the tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = make_config(name, tok.bos_token_id, tok.eos_token_id, pad)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"name": name, "model_type": config.model_type, "parameters": n, "config": config.to_diff_dict()}
