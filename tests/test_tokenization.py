from types import SimpleNamespace

import polars as pl
import pytest

from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.data.ingest import iter_records, read_preference_dir, records_to_table
from orpo_pipeline.train.tokenize import TOKEN_COLUMNS, template_texts, tokenize_pairs

from .conftest import ULTRAFEEDBACK


@pytest.fixture(scope="module")
def ultrafeedback():
    return clean_preferences(records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")).kept


def test_no_completion_is_empty_on_ultrafeedback_at_512(ultrafeedback, smollm2_tokenizer):
    out = tokenize_pairs(ultrafeedback, smollm2_tokenizer, max_length=512, min_completion_tokens=32)
    ds = out.dataset
    assert len(ds) + len(out.dropped) == len(ultrafeedback)
    assert out.truncated_prompt > 0 and out.truncated_completion > 0
    for row in ds:
        for side in ("chosen", "rejected"):
            n_labels = sum(1 for t in row[f"{side}_labels"] if t != -100)
            assert n_labels >= 1, "a completion lost all its tokens"
            assert len(row[f"{side}_input_ids"]) <= 512
            assert n_labels == row[f"{side}_tokens"]
            # a truncated completion (no EOS left at its end) keeps at least min_completion_tokens
            if row[f"{side}_input_ids"][-1] != smollm2_tokenizer.eos_token_id:
                assert n_labels >= 32


def test_prompt_truncation_keeps_its_end(ultrafeedback, smollm2_tokenizer):
    long = ultrafeedback.filter(pl.col("prompt").list.first().struct.field("content").str.len_chars() > 3000).head(3)
    assert len(long) > 0
    out = tokenize_pairs(long, smollm2_tokenizer, max_length=256, min_completion_tokens=32)
    header = smollm2_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in out.dataset:
        assert row["prompt_input_ids"][-len(header):] == header
        assert row["prompt_tokens"] + max(row["chosen_tokens"], row["rejected_tokens"]) <= 256
        assert row["prompt_tokens"] < 3000 // 8  # the prompt was cut, not the whole budget given to it


def test_pairs_that_cannot_fit_are_dropped_with_reason(ultrafeedback, smollm2_tokenizer):
    long = ultrafeedback.filter(pl.col("prompt").list.first().struct.field("content").str.len_chars() > 3000).head(3)
    out = tokenize_pairs(long, smollm2_tokenizer, max_length=256, max_prompt_length=250, min_completion_tokens=32)
    assert len(out.dropped) == len(long) and len(out.dataset) == 0
    assert all(d["reason"] == "does_not_fit" and "train.jsonl:" in d["detail"] for d in out.dropped)


def test_token_ids_match_stock_trl_where_nothing_is_truncated(smollm2_tokenizer):
    """Our single pass must produce what TRL's ORPO tokenize_row would, so the trainer sees the same data."""
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.orpo import ORPOTrainer

    kept = clean_preferences(read_preference_dir(SAMPLE_DATA_DIR)).kept.head(40)
    ours = tokenize_pairs(kept, smollm2_tokenizer, max_length=2048).dataset
    fake = SimpleNamespace(processing_class=smollm2_tokenizer, is_encoder_decoder=False, max_length=2048)
    fake.build_tokenized_answer = lambda p, a: ORPOTrainer.build_tokenized_answer(fake, p, a)
    for i, row in enumerate(kept.iter_rows(named=True)):
        example = {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        templated = maybe_apply_chat_template(example, smollm2_tokenizer)
        theirs = ORPOTrainer.tokenize_row(fake, templated)
        for col in TOKEN_COLUMNS:
            assert ours[i][col] == theirs[col], (i, col)


def test_chat_template_renders_multi_turn_history(smollm2_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    p, s = template_texts(smollm2_tokenizer, [prompt], ["4"])
    assert p[0].count("<|im_start|>") == 5 and "Hello!" in p[0] and p[0].endswith("<|im_start|>assistant\n")
    assert s[0].startswith("4<|im_end|>")


def test_length_bounds_drop_pairs_by_their_untruncated_token_counts(ultrafeedback, smollm2_tokenizer):
    full = tokenize_pairs(ultrafeedback, smollm2_tokenizer, max_length=100_000).dataset.to_polars()
    assert len(full) == len(ultrafeedback)  # nothing truncated or dropped: these are the counts the bounds see
    pair, shorter = full.select(pl.col("prompt_tokens") + pl.max_horizontal("chosen_tokens", "rejected_tokens"),
                                pl.min_horizontal("chosen_tokens", "rejected_tokens")).get_columns()
    max_pair, min_answer = int(pair.quantile(0.8)), int(shorter.quantile(0.1))
    out = tokenize_pairs(ultrafeedback, smollm2_tokenizer, max_length=100_000, max_pair_tokens=max_pair,
                         min_answer_tokens=min_answer)
    counts = dict(pl.Series([d["reason"] for d in out.dropped], dtype=pl.String).value_counts().iter_rows())
    too_long = int((pair > max_pair).sum())
    too_short = int(((pair <= max_pair) & (shorter < min_answer)).sum())  # too_long is checked first
    assert too_long > 0 and too_short > 0
    assert counts == {"too_long": too_long, "too_short": too_short}
    assert set(out.dataset["content_hash"]) == set(full.filter((pair <= max_pair) & (shorter >= min_answer))["content_hash"])
    detail = next(d["detail"] for d in out.dropped if d["reason"] == "too_long")
    assert detail.startswith("train.jsonl:") and f"> max_pair_tokens {max_pair}" in detail
