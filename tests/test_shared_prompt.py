"""The prompt computed once per pair gives TRL's loss, metrics and gradients over its two repeated-prompt rows."""

import pytest
import torch

from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.shared_prompt import IGNORE_INDEX, SEGMENTED_SDPA, allowed_mask, pack_shared_prompt
from orpo_pipeline.train.tokenize import TOKEN_COLUMNS, tokenize_pairs
from orpo_pipeline.train.trainer import PretokenizedORPOTrainer, load_lora_model, orpo_args


@pytest.fixture(scope="module")
def pairs(smollm2_tokenizer):
    """Pairs of unequal prompt and answer lengths, some answers cut, so the padding differs row by row."""
    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(5)
    return tokenize_pairs(kept, smollm2_tokenizer, max_length=96, min_completion_tokens=8).dataset.select_columns(
        TOKEN_COLUMNS)


def test_packing_puts_each_token_where_its_own_sequence_has_it(pairs):
    from trl.experimental.utils import DPODataCollatorWithPadding

    batch = DPODataCollatorWithPadding(pad_token_id=0)([pairs[i] for i in range(len(pairs))])
    packed = pack_shared_prompt(batch, pad_token_id=0)
    B = len(pairs)
    for i in range(B):
        p, c, r = pairs[i]["prompt_input_ids"], pairs[i]["chosen_input_ids"], pairs[i]["rejected_input_ids"]
        P, C, R = len(p), len(c) - len(p), len(r) - len(p)
        row = packed.input_ids[i].tolist()
        assert row[:P + C] == c and row[P + C:P + C + R] == r[P:]
        assert packed.position_ids[i, :P + C + R].tolist() == list(range(P + C)) + list(range(P, P + R))
        allowed = allowed_mask(packed)[i, 0]
        # a rejected token sees the prompt and the rejected tokens before it, never the chosen answer
        q = P + C + R - 1
        assert allowed[q, :P].all() and not allowed[q, P:P + C].any() and allowed[q, P + C:q + 1].all()
        assert not allowed[P + C - 1, P + C:].any()  # the chosen answer never sees ahead
        # the gathered targets are the completions, in order, then ignored
        assert packed.labels[i, :C].tolist() == c[P:] and (packed.labels[i, C:] == IGNORE_INDEX).all()
        assert packed.labels[B + i, :R].tolist() == r[P:] and (packed.labels[B + i, R:] == IGNORE_INDEX).all()
        assert packed.chosen_index[i, 0] == packed.rejected_index[i, 0] == P - 1  # both answers start after the prompt
    assert packed.padded_tokens < 2 * batch["chosen_input_ids"].shape[1] * B


# segmented: sdpa per row in two causal pieces (the default); sdpa_mask: sdpa with the 4D mask; eager: its float mask
@pytest.mark.parametrize("attn", ["segmented", "sdpa_mask", "eager"])
@pytest.mark.parametrize("loss_impl", ["fused", "reference"])
def test_shared_prompt_matches_repeated_prompt_rows(pairs, tiny_model_dir, tmp_path, attn, loss_impl):
    settings = TrainSettings(precision="fp32", attn_implementation="eager" if attn == "eager" else "sdpa",
                             shared_prompt=attn == "segmented")
    model, tok = load_lora_model(tiny_model_dir, settings, "cpu")
    assert (model.config._attn_implementation == SEGMENTED_SDPA) == (attn == "segmented")
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # lora_B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    trainer = PretokenizedORPOTrainer(model=model, args=orpo_args(settings, tmp_path, "cpu", 96), train_dataset=pairs,
                                      processing_class=tok, loss_impl=loss_impl, shared_prompt=True)
    batch = trainer.data_collator([pairs[i] for i in range(len(pairs))])
    results = {}
    for shared in (True, False):
        trainer.shared_prompt = shared
        model.zero_grad()
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        results[shared] = (loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (ls, ms, gs), (lc, mc, gc) = results[True], results[False]
    assert ls == pytest.approx(lc, rel=1e-5)
    for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ms[k] == pytest.approx(mc[k], rel=1e-4, abs=1e-6), k
    for n in gc:
        torch.testing.assert_close(gs[n], gc[n], rtol=1e-3, atol=1e-6)


def test_shared_prompt_off_for_attention_without_masks(tiny_model_dir, tmp_path, pairs, monkeypatch):
    settings = TrainSettings(precision="fp32")
    model, tok = load_lora_model(tiny_model_dir, settings, "cpu")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    trainer = PretokenizedORPOTrainer(model=model, args=orpo_args(settings, tmp_path, "cpu", 96), train_dataset=pairs,
                                      processing_class=tok)
    assert trainer.shared_prompt is False
