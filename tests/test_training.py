import math

import polars as pl
import pytest
import torch

from orpo_pipeline.clean import clean_preferences
from orpo_pipeline.config import TrainSettings
from orpo_pipeline.ingest import iter_records, records_to_table
from orpo_pipeline.tokenization import TOKEN_COLUMNS, tokenize_pairs
from orpo_pipeline.training import PretokenizedORPOTrainer, load_lora_model, orpo_args, train_orpo_adapter

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
