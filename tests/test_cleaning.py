import json

import polars as pl
import pytest

from orpo_pipeline.clean import clean_preferences, table_digest
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.ingest import PreferenceFormatError, iter_records, read_preference_dir, records_to_table

from .conftest import ULTRAFEEDBACK


def test_sample_data_is_big_and_varied():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    files = set(raw["source_file"])
    assert {"helpfulness.jsonl", "factual.jsonl", "safety.json", "instructions.csv", "concision.parquet", "dirty.jsonl"} <= files
    clean = clean_preferences(raw)
    assert len(clean.kept) >= 300


def test_dirty_file_rejects_every_defect_with_source_and_reason():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    result = clean_preferences(raw)
    assert len(raw) == len(result.kept) + len(result.rejects)
    dirty = result.rejects.filter(pl.col("source_file") == "dirty.jsonl")
    by_row = dict(zip(dirty["source_row"], dirty["reason"]))
    assert by_row == {
        3: "empty_prompt",
        5: "empty_chosen",
        6: "empty_rejected",
        8: "chosen_equals_rejected",
        9: "chosen_equals_rejected",  # equal once NFC and whitespace are normalized
        10: "duplicate_pair",
        12: "unparseable",
        13: "unparseable",
        14: "unparseable",
    }
    details = dict(zip(dirty["source_row"], dirty["detail"]))
    assert "dirty.jsonl:12" in details[12] and "malformed JSON" in details[12]
    assert "field 'chosen'" in details[13] and "int" in details[13]
    assert "missing field 'rejected'" in details[14]
    assert details[10] == "duplicate of dirty.jsonl:1"
    # the copy of a helpfulness pair is caught across files, whichever came first
    cross = result.rejects.filter((pl.col("reason") == "duplicate_pair") & ~pl.col("detail").str.contains("dirty.jsonl:1$"))
    assert len(cross) == 1


def test_kept_rows_carry_source_hash_and_normalized_text(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Cafe\u0301?\r\n", "chosen": "  Yes\u00a0indeed  ", "rejected": "No"},
        {"prompt": "Café?", "chosen": "Yes indeed", "rejected": "No"},  # same pair after normalization
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = clean_preferences(records_to_table(iter_records(path), "p.jsonl"))
    assert len(result.kept) == 1 and result.rejects["reason"].to_list() == ["duplicate_pair"]
    row = result.kept.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "Café?"}]
    assert row["chosen"] == "Yes indeed"
    assert (row["source_file"], row["source_row"]) == ("p.jsonl", 1)
    assert len(row["content_hash"]) == 64


def test_split_is_by_prompt_and_stable_when_data_is_added():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    full = clean_preferences(raw, eval_fraction=0.3).kept
    half = clean_preferences(raw.head(len(raw) // 2), eval_fraction=0.3).kept
    assert set(full.filter(pl.col("split") == "train")["prompt_hash"]).isdisjoint(full.filter(pl.col("split") == "eval")["prompt_hash"])
    old = dict(zip(half["content_hash"], half["split"]))
    new = dict(zip(full["content_hash"], full["split"]))
    assert all(new[h] == s for h, s in old.items())
    assert table_digest(full) == table_digest(full.reverse())


def test_ultrafeedback_identical_pairs_go_to_rejects():
    raw = records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")
    assert len(raw) == 1000 and raw["score_chosen"].null_count() == 0
    result = clean_preferences(raw)
    counts = result.reason_counts()
    assert counts["chosen_equals_rejected"] == 4
    assert len(result.kept) + len(result.rejects) == 1000
    assert result.kept["chosen"].str.len_chars().min() > 0


def test_unknown_schema_names_columns_and_formats(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(PreferenceFormatError) as e:
        records_to_table(iter_records(path), "odd.jsonl")
    msg = str(e.value)
    assert "odd.jsonl" in msg and "'question'" in msg and "trl_standard" in msg


def test_non_utf8_line_is_reported_not_replaced(tmp_path):
    path = tmp_path / "bytes.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}\n')
    result = clean_preferences(records_to_table(iter_records(path), "bytes.jsonl"))
    assert len(result.kept) == 1
    assert "not UTF-8" in result.rejects["detail"][0] and "bytes.jsonl:2" in result.rejects["detail"][0]
