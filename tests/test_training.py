import importlib.util
import logging
import math

import polars as pl
import pytest
import torch

from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.tokenize import TOKEN_COLUMNS, tokenize_pairs
from orpo_pipeline.train.trainer import (
    PretokenizedORPOTrainer,
    check_tokenized_with,
    load_lora_model,
    orpo_args,
    set_chat_template,
    set_pad_token,
    train_orpo_adapter,
)

from .conftest import ULTRAFEEDBACK


@pytest.fixture(scope="module")
def long_pairs(smollm2_tokenizer):
    """The UltraFeedback pairs that stock TRL truncates to empty completions at max_length 512."""
    kept = clean_preferences(records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")).kept
    longest = kept.with_columns(n=pl.col("prompt").list.first().struct.field("content").str.len_chars()).sort(
        "n", descending=True).head(8).drop("n")
    return tokenize_pairs(longest, smollm2_tokenizer, max_length=512).dataset


def test_loss_stays_finite_on_ultrafeedback_long_prompts(long_pairs, tiny_model_dir, tmp_path):
    assert min(long_pairs["chosen_tokens"]) >= 1 and min(long_pairs["rejected_tokens"]) >= 1
    settings = TrainSettings(max_steps=2, logging_steps=1, per_device_train_batch_size=4, precision="fp32")
    logged = []
    result = train_orpo_adapter(tiny_model_dir, long_pairs, tmp_path / "adapter", settings, 512, device="cpu",
                                on_log=lambda step, logs: logged.append(logs))
    losses = [l["loss"] for l in logged if "loss" in l]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert result.all_losses_finite and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(l["log_odds_ratio"]) and math.isfinite(l["nll_loss"]) for l in logged if "loss" in l)


def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_lora_model(tiny_model_dir, TrainSettings(load_in_4bit=True), "cpu")


def test_fused_loss_matches_reference_inside_the_trainer(long_pairs, tiny_model_dir, tmp_path):
    settings = TrainSettings(precision="fp32")
    model, tok = load_lora_model(tiny_model_dir, settings, "cpu")
    for p in model.parameters():
        if p.requires_grad:  # lora_B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    trainer = PretokenizedORPOTrainer(model=model, args=orpo_args(settings, tmp_path, "cpu", 512),
                                      train_dataset=long_pairs.select_columns(TOKEN_COLUMNS), processing_class=tok)
    batch = trainer.data_collator([long_pairs.select_columns(TOKEN_COLUMNS)[i] for i in range(3)])
    results = {}
    for impl in ("fused", "reference"):
        trainer.loss_impl = impl
        model.zero_grad()
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[impl] = (loss.item(), metrics, grads)
    (lf, mf, gf), (lr, mr, gr) = results["fused"], results["reference"]
    assert lf == pytest.approx(lr, rel=1e-4)
    for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"):
        assert mf[k] == pytest.approx(mr[k], rel=1e-4, abs=1e-6), k
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-3, atol=1e-6)


# ChatML-like, with a turn marker SmolLM2's vocab lacks
TURNS_TEMPLATE = (
    "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sample_pairs():
    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    return clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(4)


def test_pad_token_policy(tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh = lambda: AutoTokenizer.from_pretrained(tiny_model_dir)  # noqa: E731
    agree = lambda tok: (tok.pad_token_id, model.config.pad_token_id, model.generation_config.pad_token_id)  # noqa: E731

    tok = fresh()  # the tokenizer's own pad wins, and model and generation config follow it
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    assert set_pad_token(tok, model) == tok.convert_tokens_to_ids("<|im_end|>") and len(set(agree(tok))) == 1

    tok = fresh()  # else the model's
    tok.pad_token, model.config.pad_token_id = None, 0
    assert set_pad_token(tok, model) == 0 and tok.pad_token == "<|endoftext|>" and agree(tok) == (0, 0, 0)

    tok = fresh()  # else eos, with a warning (SmolLM2 has none of <pad>, <|pad|>, <unk>)
    tok.pad_token, model.config.pad_token_id = None, None
    with caplog.at_level(logging.WARNING, logger="orpo_pipeline"):
        assert set_pad_token(tok, model) == tok.eos_token_id and len(set(agree(tok))) == 1
    assert "padding with eos" in caplog.text

    for present, expected in ((["<unk>"], "<unk>"), (["<unk>", "<|pad|>"], "<|pad|>"), (["<|pad|>", "<pad>"], "<pad>")):
        tok = fresh()  # else the first candidate in the vocab
        tok.pad_token, model.config.pad_token_id = None, None
        tok.add_tokens(present, special_tokens=True)
        set_pad_token(tok, model)
        assert tok.pad_token == expected and len(set(agree(tok))) == 1


def test_chat_template_override_adds_tokens_trains_them_and_is_saved(tiny_model_dir, sample_pairs, tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = tmp_path / "turns.jinja"
    template.write_text(TURNS_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_data = tokenize_pairs(sample_pairs, tok, max_length=128, min_completion_tokens=16).dataset
    added = set_chat_template(tok, str(template))  # what the tokenize step has to do as well
    assert tok.convert_ids_to_tokens(added) == ["<|turn|>"]
    data = tokenize_pairs(sample_pairs, tok, max_length=128, min_completion_tokens=16).dataset
    settings = TrainSettings(max_steps=1, per_device_train_batch_size=2, precision="fp32", chat_template=str(template))
    with caplog.at_level(logging.INFO, logger="orpo_pipeline"):
        result = train_orpo_adapter(tiny_model_dir, data, tmp_path / "adapter", settings, 128, device="cpu")
    assert result.all_losses_finite and "added 1 tokens" in caplog.text and "do not end with" not in caplog.text
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert saved.chat_template == TURNS_TEMPLATE and len(saved) == len(tok)
    assert saved.pad_token_id == tok.pad_token_id

    # the adapter carries the new token's rows; a base grown to the saved tokenizer loads and merges it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(saved))
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    assert merged.get_input_embeddings().weight.shape[0] == len(saved)

    caplog.clear()  # data tokenized with the base template is caught
    with caplog.at_level(logging.WARNING, logger="orpo_pipeline"):
        check_tokenized_with(tok, base_data)
    assert "do not end with" in caplog.text
    with pytest.raises(FileNotFoundError, match="neither a Jinja template"):
        set_chat_template(tok, str(tmp_path / "missing.jinja"))


def test_train_embeddings_and_norms_get_gradients(tiny_model_dir, sample_pairs, tmp_path):
    plain, _ = load_lora_model(tiny_model_dir, TrainSettings(precision="fp32"), "cpu")
    assert all("lora_" in n for n, p in plain.named_parameters() if p.requires_grad)

    settings = TrainSettings(precision="fp32", train_embeddings=True, train_norms=True)
    model, tok = load_lora_model(tiny_model_dir, settings, "cpu")
    extra = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in extra} == {
        "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    base = model.get_base_model()  # tied: the head trains with the input embeddings
    assert base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()

    data = tokenize_pairs(sample_pairs, tok, max_length=128, min_completion_tokens=16).dataset.select_columns(TOKEN_COLUMNS)
    trainer = PretokenizedORPOTrainer(model=model, args=orpo_args(settings, tmp_path, "cpu", 128),
                                      train_dataset=data, processing_class=tok)
    loss, _ = trainer.get_batch_loss_metrics(model, trainer.data_collator([data[i] for i in range(2)]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra.values())


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_a_clear_error(tiny_model_dir):
    with pytest.raises(RuntimeError, match="needs the flash-attn package"):
        load_lora_model(tiny_model_dir, TrainSettings(attn_implementation="flash_attention_2"), "cpu")


def test_length_buckets_pad_less_than_transformers_grouping_and_still_shuffle():
    import random

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from orpo_pipeline.train.trainer import LengthBucketSampler

    rng = random.Random(0)
    lengths = [rng.randint(20, 512) for _ in range(203)]  # not a multiple of the batch size
    bs = 4

    def padding(order):
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        return sum(len(b) * max(lengths[k] for k in b) - sum(lengths[k] for k in b) for b in batches)

    ours = LengthBucketSampler(lengths, bs, seed=1)
    first, second = list(ours), list(ours)
    assert sorted(first) == sorted(second) == list(range(len(lengths)))  # every row once per epoch
    assert first != second  # a new order each epoch
    assert max(lengths[k] for k in first[:bs]) == max(lengths)  # the longest batch first
    theirs = list(LengthGroupedSampler(bs, lengths=lengths))
    assert padding(first) < 0.5 * padding(theirs)
    assert padding(first) < 0.1 * sum(lengths)


def test_bf16_lora_input_cast_skipped_without_changing_the_loss(long_pairs, tiny_model_dir, tmp_path):
    """Under bf16 autocast peft's fp32 cast of each LoRA input is undone by autocast: skipping it changes nothing."""
    settings = TrainSettings(precision="bf16")
    model, tok = load_lora_model(tiny_model_dir, settings, "cpu")
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # trained weights stay fp32
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    args = orpo_args(settings, tmp_path, "cpu", 512)
    args.bf16 = True  # autocast even where this CPU has no native bf16: the equality holds either way
    trainer = PretokenizedORPOTrainer(model=model, args=args, train_dataset=long_pairs.select_columns(TOKEN_COLUMNS),
                                      processing_class=tok)
    batch = trainer.data_collator([long_pairs.select_columns(TOKEN_COLUMNS)[i] for i in range(2)])
    losses = []
    for cast in (False, True):
        for m in lora_layers:
            m.cast_input_dtype_enabled = cast
        with torch.no_grad():
            losses.append(trainer.get_batch_loss_metrics(model, batch)[0].item())
    assert losses[0] == losses[1]
