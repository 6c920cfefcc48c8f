"""Every preference format lands in the same cleaned shape; bad rows get reasons, not tracebacks."""

import csv
import gzip
import json
import typing

import polars as pl
import pytest

from orpo_pipeline.data.clean import REASONS, clean_preferences, reasons_by_source, rows_accounting
from orpo_pipeline.config import SAMPLE_DATA_DIR, CleanSettings, ReadSettings
from orpo_pipeline.data.ingest import FORMATS, PreferenceFormatError, iter_records, read_preference_dir, records_to_table

from .conftest import SHARED, ULTRAFEEDBACK

LLAMAFACTORY = SHARED / "llamafactory" / "dpo_en_demo.json"

QUESTION = "What is 2+2?"
HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
SINGLE = ([{"role": "user", "content": QUESTION}], "4", "5")
MULTI = (HISTORY + [{"role": "user", "content": QUESTION}], "4", "5")


def write(path, records):
    """Write records as the file type its name says."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif name.endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif name.endswith(".parquet"):
        pl.DataFrame(records).write_parquet(path)
    return path


def read(path, **kwargs):
    return records_to_table(iter_records(path), path.name, **kwargs)


def pairs(path, **kwargs):
    raw = read(path, **kwargs)
    result = clean_preferences(raw)
    assert len(result.kept) + len(result.rejects) == len(raw)
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in result.kept.iter_rows(named=True)]


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def share(role, value):
    return {"from": role, "value": value}


# format name -> records expressing SINGLE (single turn)
SINGLE_TURN = {
    "trl_standard": [{"prompt": QUESTION, "chosen": "4", "rejected": "5"}],
    "trl_conversational": [{"prompt": SINGLE[0], "chosen": [{"role": "assistant", "content": "4"}],
                            "rejected": [{"role": "assistant", "content": "5"}]}],
    "hh_rlhf": [{"chosen": hh(QUESTION, "4"), "rejected": hh(QUESTION, "5")}],
    "ultrafeedback": [{"prompt": QUESTION, "chosen": "4", "rejected": "5", "chosen-rating": 5, "rejected-rating": 2}],
    "sharegpt": [{"conversations": [share("human", QUESTION)], "chosen": share("gpt", "4"),
                  "rejected": share("gpt", "5")}],
    "pairwise": [{"instruction": QUESTION, "response_a": "5", "response_b": "4", "preference": "b"}],
}
# format name -> records expressing MULTI (a two-turn conversation before the answer)
MULTI_TURN = {
    "trl_conversational": [{"chosen": MULTI[0] + [{"role": "assistant", "content": "4"}],
                            "rejected": MULTI[0] + [{"role": "assistant", "content": "5"}]}],
    "hh_rlhf": [{"chosen": hh("Hi", "Hello! How can I help?", QUESTION, "4"),
                 "rejected": hh("Hi", "Hello! How can I help?", QUESTION, "5")}],
    "sharegpt": [{"conversations": [share("human", "Hi"), share("gpt", "Hello! How can I help?"),
                                    share("human", QUESTION)],
                  "chosen": share("gpt", "4"), "rejected": share("gpt", "5")}],
    "ultrafeedback": [{"prompt": HISTORY + [{"role": "user", "content": QUESTION}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}],
                       "metadata": {"score_chosen": 8.0, "score_rejected": 3.0}}],
}
TEXT_ONLY = {"trl_standard", "hh_rlhf", "ultrafeedback", "pairwise"}  # expressible as flat CSV cells


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [(f, s) for f in SINGLE_TURN for s in (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
     if s != ".csv" or f in TEXT_ONLY],  # message lists are not CSV cells
)
def test_single_turn_pair_is_the_same_in_every_format_and_file_type(tmp_path, fmt, suffix):
    path = write(tmp_path / f"data{suffix}", SINGLE_TURN[fmt])
    raw = read(path)
    assert raw["format"].to_list() == [fmt]
    assert pairs(path) == [SINGLE]
    assert pairs(path, fmt=fmt) == [SINGLE]  # naming the format gives the same rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", list(MULTI_TURN))
def test_multi_turn_history_stays_a_message_list_in_every_format(tmp_path, fmt, suffix):
    path = write(tmp_path / f"data{suffix}", MULTI_TURN[fmt])
    assert read(path)["format"].to_list() == [fmt]
    assert pairs(path) == [MULTI]


def test_scores_are_carried_from_every_place_they_live(tmp_path):
    variants = [
        {"score_chosen": 9, "score_rejected": 2},
        {"metadata": {"score_chosen": 9, "score_rejected": 2}},
        {"chosen_rating": 9, "rejected_rating": 2},
        {"chosen-rating": 9, "rejected-rating": 2},
        {"rating_chosen": 9, "rating_rejected": 2},
        {"chosen_score": "9", "rejected_score": "2.0"},  # CSV cells are text
    ]
    path = write(tmp_path / "s.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} | v
                                        for i, v in enumerate(variants)])
    raw = read(path)
    assert raw["score_chosen"].to_list() == [9.0] * 6 and raw["score_rejected"].to_list() == [2.0] * 6


def test_ultrafeedback_hub_layout_does_not_repeat_the_prompt(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized: text prompt, and chosen/rejected repeat it as the first user turn
    user = {"role": "user", "content": QUESTION}
    rec = {"prompt": QUESTION, "prompt_id": "x", "chosen": [user, {"role": "assistant", "content": "4"}],
           "rejected": [user, {"role": "assistant", "content": "5"}], "score_chosen": 8.0, "score_rejected": 3.0}
    assert pairs(write(tmp_path / "uf.jsonl", [rec])) == [SINGLE]


def test_system_prompt_becomes_the_first_message(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    records = [
        {"system": "Be brief.", "conversations": [share("human", QUESTION)], "chosen": share("gpt", "4"),
         "rejected": share("gpt", "5")},
        {"conversations": [share("system", "Be brief."), share("human", QUESTION)], "chosen": share("gpt", "4"),
         "rejected": share("gpt", "5")},
    ]
    for i, rec in enumerate(records):
        assert pairs(write(tmp_path / f"sys{i}.json", [rec])) == [([system] + SINGLE[0], "4", "5")]
    standard = {"system": "Be brief.", "prompt": QUESTION, "chosen": "4", "rejected": "5"}
    assert pairs(write(tmp_path / "std.jsonl", [standard])) == [([system] + SINGLE[0], "4", "5")]


def test_pairwise_labels_pick_the_majority(tmp_path):
    records = [
        {"instruction": QUESTION, "output_1": "4", "output_2": "5", "preference": 1},
        {"instruction": QUESTION, "output_1": "5", "output_2": "4", "preference": 2},
        {"prompt": QUESTION, "response_0": "5", "response_1": "4", "better_response_id": 1},
        {"instruction": QUESTION, "response_a": "4", "response_b": "5", "labels": ["a", "B", "b", "a", "A"]},
        {"instruction": QUESTION, "response_a": "5", "response_b": "4",
         "annotations": [{"annotator": "x", "preference": "b"}, {"annotator": "y", "label": "response_b"}]},
        {"question": QUESTION, "response_a": "5", "response_b": "4", "winner": "model_b"},
        {"instruction": QUESTION, "completion_a": "4", "completion_b": "5", "label": ["a", "tie"]},
    ]
    for i, rec in enumerate(records):
        path = write(tmp_path / f"p{i}.jsonl", [rec])
        assert read(path)["format"].to_list() == ["pairwise"], rec
        assert pairs(path) == [SINGLE], rec
    csv_path = write(tmp_path / "p.csv", [{"instruction": QUESTION, "output_1": "5", "output_2": "4", "preference": "2"}])
    assert pairs(csv_path) == [SINGLE]


def test_pairwise_input_is_appended_to_the_instruction(tmp_path):
    rec = {"instruction": "Add the numbers.", "input": "2+2", "output_1": "4", "output_2": "5", "preference": 1}
    [(prompt, _, _)] = pairs(write(tmp_path / "p.jsonl", [rec]))
    assert prompt == [{"role": "user", "content": "Add the numbers.\n\n2+2"}]


def test_pairwise_ties_and_bad_labels_are_rejected_with_reasons(tmp_path):
    base = {"instruction": QUESTION, "response_a": "4", "response_b": "5"}
    records = [
        base | {"labels": ["a", "b"]},
        base | {"preference": "tie"},
        base | {"labels": ["a", "tie", "b"]},
        base | {"preference": "c"},
        base | {"preference": 3},
        base | {"labels": []},
        base | {"preference": True},
        base | {"labels": [["a"]]},
        base | {"preference": "a"},
    ]
    result = clean_preferences(read(write(tmp_path / "t.jsonl", records)))
    assert len(result.kept) == 1
    by_row = dict(zip(result.rejects["source_row"], result.rejects["reason"]))
    assert by_row == {1: "annotator_tie", 2: "annotator_tie", 3: "annotator_tie", 4: "unparseable",
                      5: "unparseable", 6: "unparseable", 7: "unparseable", 8: "unparseable"}
    details = dict(zip(result.rejects["source_row"], result.rejects["detail"]))
    assert "t.jsonl:1" in details[1] and "1 vote(s) for 'response_a', 1 for 'response_b'" in details[1]
    assert "label 'c'" in details[4] and "a, b, 1, 2, tie" in details[4]


def test_hh_transcripts_that_differ_before_the_last_answer_are_rejected(tmp_path):
    records = [
        {"chosen": hh("Hi", "Hello", QUESTION, "4"), "rejected": hh("Hi", "Go away", QUESTION, "5")},
        {"chosen": hh(QUESTION, "4"), "rejected": hh(QUESTION)},  # ends on a Human turn
        {"chosen": hh(QUESTION, "4"), "rejected": "just text"},
        {"chosen": hh(QUESTION, "4"), "rejected": ["a list"]},
    ]
    result = clean_preferences(read(write(tmp_path / "hh.jsonl", records)))
    assert len(result.kept) == 0 and result.rejects["reason"].to_list() == ["unparseable"] * 4
    details = result.rejects["detail"].to_list()
    assert "differ before their final answers" in details[0]
    assert "last message must be the assistant's answer" in details[1]
    assert "field 'rejected'" in details[2] and "transcript" in details[2]
    assert "field 'rejected': expected text, got list" in details[3]


def test_column_mapping_reads_any_layout(tmp_path):
    mapping = {"question": "prompt", "good": "chosen", "bad": "rejected"}
    rec = {"question": QUESTION, "good": "4", "bad": "5"}
    for suffix in (".jsonl", ".csv", ".parquet"):
        path = write(tmp_path / f"odd{suffix}", [rec])
        with pytest.raises(PreferenceFormatError):
            read(path)
        assert pairs(path, column_mapping=mapping) == [SINGLE]
    swapped = write(tmp_path / "swapped.jsonl", [{"prompt": QUESTION, "chosen": "5", "rejected": "4"}])
    assert pairs(swapped, column_mapping={"chosen": "rejected", "rejected": "chosen"}) == [SINGLE]
    assert len(read_preference_dir(tmp_path, column_mapping=mapping).filter(pl.col("source_file") == "odd.csv")) == 1


def test_named_format_overrides_detection_and_unknown_names_fail(tmp_path):
    path = write(tmp_path / "std.jsonl", SINGLE_TURN["trl_standard"] * 2)
    result = clean_preferences(read(path, fmt="sharegpt"))
    assert len(result.kept) == 0 and set(result.rejects["reason"]) == {"unparseable"}
    assert "missing field 'conversations'" in result.rejects["detail"][0]
    with pytest.raises(PreferenceFormatError, match="known formats.*sharegpt"):
        read(path, fmt="alpaca")


def test_unknown_layout_error_lists_columns_and_every_format(tmp_path):
    path = write(tmp_path / "arena.jsonl", [{"conversation_a": [], "conversation_b": [], "winner": "model_a"}])
    with pytest.raises(PreferenceFormatError) as e:
        read(path)
    msg = str(e.value)
    assert "arena.jsonl" in msg and "'conversation_a'" in msg and "column_mapping" in msg
    assert all(name in msg for name in FORMATS)


def test_format_setting_offers_exactly_the_known_formats():
    annotation = ReadSettings.model_fields["format"].annotation
    assert list(typing.get_args(annotation)) == ["auto", *FORMATS]
    settings = ReadSettings()
    assert (settings.format, settings.column_mapping, CleanSettings().min_score_margin) == ("auto", {}, None)


def faulty(base, *overrides):
    return [base | override for override in overrides]


WRONG_TYPES = {
    "trl_standard": faulty(SINGLE_TURN["trl_standard"][0], {"prompt": 7}, {"chosen": ["4"]}, {"rejected": {"x": 1}},
                           {"prompt": [1]}),
    "trl_conversational": faulty(MULTI_TURN["trl_conversational"][0], {"chosen": {"role": "assistant"}},
                                 {"chosen": ["4"]}, {"rejected": [{"role": "assistant", "content": 4}]},
                                 {"prompt": 3.5}),
    "sharegpt": faulty(SINGLE_TURN["sharegpt"][0], {"conversations": "hi"}, {"conversations": [share("human", 1)]},
                       {"conversations": [share("alien", "x")]}, {"chosen": [share("gpt", "4")]},
                       {"chosen": share("human", "4")}, {"system": 3}),
    "ultrafeedback": faulty(SINGLE_TURN["ultrafeedback"][0], {"chosen-rating": "high"}, {"chosen-rating": [1]},
                            {"rejected-rating": True}, {"chosen": ["4"]}),
    "pairwise": faulty(SINGLE_TURN["pairwise"][0], {"instruction": 1}, {"response_a": ["4"]}, {"input": {"x": 1}},
                       {"preference": {"who": "a"}}),
    "hh_rlhf": faulty(SINGLE_TURN["hh_rlhf"][0], {"rejected": 5}, {"rejected": None}, {"chosen": [hh(QUESTION, "4")]}),
}


@pytest.mark.parametrize("fmt", list(WRONG_TYPES))
def test_wrong_types_get_a_reason_naming_the_field(tmp_path, fmt):
    path = write(tmp_path / "bad.json", WRONG_TYPES[fmt])
    for kwargs in ({}, {"fmt": fmt}):
        raw = read(path, **kwargs)
        assert set(raw["format"]) == {fmt}
        result = clean_preferences(raw)
        assert len(result.kept) == 0 and len(result.rejects) == len(raw) == len(WRONG_TYPES[fmt])
        assert set(result.rejects["reason"]) == {"unparseable"}
        for detail in result.rejects["detail"]:
            assert detail.startswith("bad.json:") and "field '" in detail, detail


def test_lone_surrogates_and_odd_numbers_are_row_errors(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(
        '{"prompt": "\\ud800", "chosen": "4", "rejected": "5"}\n'
        '{"prompt": "q", "chosen": "4", "rejected": "5", "score_chosen": 1e400, "score_rejected": 1}\n'
        '{"prompt": "q", "chosen": "4", "rejected": "5", "score_chosen": NaN, "score_rejected": 1}\n'
        + "[" * 100_000 + "\n"
        '{"prompt": "q", "chosen": "4", "rejected": "5", "score_chosen": ' + "9" * 5000 + ', "score_rejected": 1}\n'
        '{"prompt": "q", "chosen": "4", "rejected": "5"}\n'
    )
    result = clean_preferences(read(path))
    assert len(result.kept) == 1 and result.rejects["source_row"].to_list() == [1, 2, 3, 4, 5]
    details = result.rejects["detail"].to_list()
    assert "lone surrogate" in details[0] and "finite" in details[1] and "finite" in details[2]
    assert "odd.jsonl:4" in details[3] and "nested too deeply" in details[3]
    assert "odd.jsonl:5: malformed JSON" in details[4] and "digits" in details[4]
    big = [{"prompt": "q", "chosen": "4", "rejected": "5", "score_chosen": 10**5000, "score_rejected": 1}]
    assert "is not a number" in records_to_table(enumerate(big, 1), "hf")["error"][0]


def test_file_level_oddities(tmp_path):
    # a BOM, JSON Lines under a .json name, a CSV row with surplus cells, a malformed line in a .jsonl.gz
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,chosen,rejected\nq,4,5\nq2,4,5,extra\n".encode())
    (tmp_path / "lines.json").write_text('{"prompt": "q3", "chosen": "4", "rejected": "5"}\n' * 2)
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write('{"prompt": "q4", "chosen": "4", "rejected": "5"}\n{"prompt": \n{"prompt": "q5", "chosen": "4", "rejected": "5"}\n')
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q"}\n' * 50)[:40])
    with pytest.raises(PreferenceFormatError, match="broken.jsonl.gz"):
        read(tmp_path / "broken.jsonl.gz")
    (tmp_path / "broken.jsonl.gz").unlink()
    raw = read_preference_dir(tmp_path)
    result = clean_preferences(raw)
    assert dict(zip(result.rejects["source_file"], result.rejects["detail"])) == {
        "bom.csv": "bom.csv:2: 4 cells, the header has 3",
        "lines.json": "duplicate of lines.json:1",
        "z.jsonl.gz": "z.jsonl.gz:2: malformed JSON: Expecting value (column 12)",
    }
    assert len(result.kept) == 4


def test_score_margin_rejects_ties_and_small_margins_only_when_set(tmp_path):
    records = [
        {"prompt": "tie", "chosen": "4", "rejected": "5", "score_chosen": 7, "score_rejected": 7},
        {"prompt": "small", "chosen": "4", "rejected": "5", "score_chosen": 7.3, "score_rejected": 6.8},
        {"prompt": "tiny", "chosen": "4", "rejected": "5", "score_chosen": 7.0, "score_rejected": 6.75},
        {"prompt": "inverted", "chosen": "4", "rejected": "5", "score_chosen": 1, "score_rejected": 9},
        {"prompt": "none", "chosen": "4", "rejected": "5"},
        {"prompt": "half", "chosen": "4", "rejected": "5", "score_chosen": 7, "score_rejected": None},
        {"prompt": "wide", "chosen": "4", "rejected": "5", "score_chosen": 9, "score_rejected": 1},
    ]
    raw = read(write(tmp_path / "m.jsonl", records))
    assert len(clean_preferences(raw).kept) == 7
    result = clean_preferences(raw, min_score_margin=0.5)
    by_row = dict(zip(result.rejects["source_row"], result.rejects["reason"]))
    assert by_row == {1: "score_tie", 3: "score_margin_below_min", 4: "score_margin_below_min"}
    assert "m.jsonl:1: score_tie (score_chosen 7.0, score_rejected 7.0)" in result.rejects["detail"].to_list()
    assert clean_preferences(raw, min_score_margin=0.0).reason_counts()["score_tie"] == 1


def test_raw_tables_from_before_error_reason_still_clean(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"prompt": "q", "chosen": "4", "rejected": "5"}\n{"prompt": \n')
    raw = read(path).drop("error_reason", "format")  # raw.parquet written by an earlier version
    result = clean_preferences(raw)
    assert len(result.kept) == 1 and result.rejects["reason"].to_list() == ["unparseable"]


def test_rows_accounting_and_reasons_by_source():
    raw = read_preference_dir(SAMPLE_DATA_DIR)
    result = clean_preferences(raw)
    acc = rows_accounting(raw, result)
    assert acc.columns == ["source_file", "rows_in", "kept", "rejected", "balanced"]
    assert acc["balanced"].all() and acc["rows_in"].sum() == len(raw) and acc["kept"].sum() == len(result.kept)
    dirty = acc.filter(pl.col("source_file") == "dirty.jsonl").row(0, named=True)
    # its copy of a helpfulness pair is read first, so the helpfulness copy is the rejected one
    assert (dirty["rows_in"], dirty["kept"], dirty["rejected"]) == (16, 7, 9)
    reasons = reasons_by_source(result)
    assert reasons.columns == ["source_file", *REASONS]
    assert set(reasons["source_file"]) == set(raw["source_file"])
    row = reasons.filter(pl.col("source_file") == "dirty.jsonl").row(0, named=True)
    assert row["unparseable"] == 3 and row["chosen_equals_rejected"] == 2 and row["score_tie"] == 0
    # a row lost between raw and result shows up as unbalanced
    broken = rows_accounting(raw, type(result)(kept=result.kept.head(len(result.kept) - 1), rejects=result.rejects))
    assert not broken["balanced"].all()


# ---- real data


@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_ultrafeedback_ties_and_small_margins_are_rejected(margin):
    rows = [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()]
    empty = {i for i, r in enumerate(rows, 1) if not (r["prompt"].strip() and r["chosen"].strip() and r["rejected"].strip())}
    same = {i for i, r in enumerate(rows, 1) if r["chosen"].strip() == r["rejected"].strip()} - empty
    margins = {i: r["metadata"]["score_chosen"] - r["metadata"]["score_rejected"] for i, r in enumerate(rows, 1)}
    ties = {i for i, m in margins.items() if m == 0}
    small = {i for i, m in margins.items() if 0 < m < margin}
    assert (len(same), len(ties)) == (4, 111)  # the known facts of this file

    raw = records_to_table(iter_records(ULTRAFEEDBACK), "train.jsonl")
    result = clean_preferences(raw, min_score_margin=margin)
    counts = result.reason_counts()
    assert counts["chosen_equals_rejected"] == 4
    assert counts["score_tie"] == len(ties - same - empty) == 110
    assert counts["score_margin_below_min"] == len(small - same - empty) == {0.5: 0, 1.0: 192}[margin]
    rejected_rows = set(result.rejects["source_row"])
    assert ties <= rejected_rows and same <= rejected_rows
    assert rows_accounting(raw, result)["balanced"].all()
    assert (result.kept["score_chosen"] - result.kept["score_rejected"]).min() >= margin


def test_llamafactory_multi_turn_demo_keeps_whole_conversations():
    source = json.loads(LLAMAFACTORY.read_text())
    raw = records_to_table(iter_records(LLAMAFACTORY), "dpo_en_demo.json")
    assert len(raw) == 300 and raw["error"].null_count() == 300 and set(raw["format"]) == {"sharegpt"}
    result = clean_preferences(raw)
    assert len(result.kept) + len(result.rejects) == 300 and len(result.kept) > 250
    kept = {r["source_row"]: r for r in result.kept.iter_rows(named=True)}
    multi = [i for i, rec in enumerate(source, 1)
             if i in kept and sum(m["from"] == "human" for m in rec["conversations"]) > 1]
    assert multi
    for i in multi:
        conv, prompt = source[i - 1]["conversations"], kept[i]["prompt"]
        assert len(prompt) == len(conv)
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        assert [m["role"] for m in prompt] == [roles[m["from"]] for m in conv]
        assert prompt[-1]["role"] == "user"


# ---------------------------------------------------------------- judgment tables, gathered labels, bad input


def test_numbered_annotator_columns_are_pairwise_votes_and_ties_are_rejected(tmp_path):
    """Public judgment tables: response1/response2 and one column per annotator (1, 2, or 0 for a tie)."""
    def row(votes, first="4", second="5"):
        return {"prompt": QUESTION, "response1": first, "response2": second,
                **{f"annotator{i + 1}": v for i, v in enumerate(votes)}}

    records = [row([1, 1, 2]), row([2, 0, 2], "5", "4"), row([1, 2, 0]), row([0, 0, 0]), row([2, 1, 1], "4", "5")]
    for suffix in (".jsonl", ".csv"):  # CSV cells are text: "1", "2", "0"
        path = write(tmp_path / f"judged{suffix}", records)
        raw = read(path)
        assert set(raw["format"]) == {"pairwise"}
        result = clean_preferences(raw)
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in result.kept.iter_rows(named=True)] == [SINGLE]
        rejects = dict(zip(result.rejects["source_row"], result.rejects["reason"]))
        # rows 2 and 5 pick the same answer as row 1 (from either column), so they are its copies
        assert rejects == {2: "duplicate_pair", 3: "annotator_tie", 4: "annotator_tie", 5: "duplicate_pair"}
        detail = result.rejects.filter(pl.col("source_row") == 3)["detail"][0]
        assert f"{path.name}:3" in detail and "1 vote(s) for 'response1', 1 for 'response2'" in detail


def test_column_mapping_gathers_columns_into_one_list_of_labels(tmp_path):
    records = [{"instruction": QUESTION, "response_a": "4", "response_b": "5", "judge_x": "a", "judge_y": "b",
                "judge_z": "a"},
               {"instruction": QUESTION + " ", "response_a": "4", "response_b": "5", "judge_x": "a", "judge_y": "b"}]
    mapping = {"judge_x": "labels[]", "judge_y": "labels[]", "judge_z": "labels[]"}
    path = write(tmp_path / "judges.jsonl", records)
    with pytest.raises(PreferenceFormatError):
        read(path)  # no label column without the mapping
    raw = read(path, column_mapping=mapping)
    assert raw["format"].to_list() == ["pairwise"] * 2
    result = clean_preferences(raw)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in result.kept.iter_rows(named=True)] == [SINGLE]
    assert result.rejects["reason"].to_list() == ["annotator_tie"]  # judge_z is absent from row 2: one vote each


def test_a_line_over_max_record_bytes_is_a_reject_and_is_never_held_whole(tmp_path):
    """One endless line (no newline, compressed to almost nothing) costs at most the limit, not the line."""
    import tracemalloc

    from orpo_pipeline.data.readers import iter_records

    path = tmp_path / "endless.jsonl.gz"
    good = json.dumps({"prompt": "q", "chosen": "4", "rejected": "5"})
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + '{"prompt": "' + "a" * (8 * 2**20) + '"}\n' + good.replace("q", "q2") + "\n")
        f.write('{"prompt": "' + "b" * (8 * 2**20))  # the last line never ends
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    raw = records_to_table(iter_records(path, max_record_bytes=2**16), path.name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20
    assert raw["error"].to_list()[1::2] == [f"{path.name}:2: record longer than max_record_bytes (65,536 bytes)",
                                             f"{path.name}:4: record longer than max_record_bytes (65,536 bytes)"]
    assert raw["error"].to_list()[0::2] == [None, None]


def test_csv_and_json_arrays_keep_their_bad_rows_and_stop_at_an_over_long_record(tmp_path):
    from orpo_pipeline.data.readers import iter_records

    bad_bytes = tmp_path / "bytes.csv"
    bad_bytes.write_bytes(b"prompt,chosen,rejected\nq,4,5\nq2,\xff4,5\nq3,4,5\n")
    raw = read(bad_bytes)
    assert raw["error"].to_list() == [None, "bytes.csv:2: field 'chosen': not UTF-8: byte 0xff at character 1", None]
    long_row = tmp_path / "long.csv"
    long_row.write_text("prompt,chosen,rejected\nq,4,5\nq2," + "4" * 5000 + ",5\n")
    with pytest.raises(PreferenceFormatError, match=r"long.csv:3: line longer than max_record_bytes \(2,048 bytes\)"):
        records_to_table(iter_records(long_row, max_record_bytes=2048), "long.csv")
    array = write(tmp_path / "array.json", [{"prompt": "q", "chosen": "4", "rejected": "5"},
                                             {"prompt": "q" * 300_000, "chosen": "4", "rejected": "5"}])
    with pytest.raises(PreferenceFormatError, match=r"array.json: array element 2 is longer than max_record_bytes"):
        records_to_table(iter_records(array, max_record_bytes=2048), "array.json")
    assert read(array).height == 2  # the default limit (16 MiB) reads it


def test_pairs_over_max_pair_chars_are_rejected_before_anything_else(tmp_path):
    path = write(tmp_path / "long.jsonl", [{"prompt": "q", "chosen": "4" * 40, "rejected": "5"},
                                            {"prompt": "q", "chosen": "4", "rejected": "5"},
                                            {"prompt": "q", "chosen": " " * 50, "rejected": "5"}])
    result = clean_preferences(read(path), max_pair_chars=30)
    assert result.kept["chosen"].to_list() == ["4"]
    assert result.rejects["reason"].to_list() == ["pair_too_long", "pair_too_long"]  # before empty_chosen
    assert result.rejects["detail"][0] == "long.jsonl:1: pair_too_long (more than max_pair_chars = 30 characters)"
    assert result.rejects["chosen"][0] == "4" * 40  # as ingested
    assert clean_preferences(read(path)).kept.height == 2  # the default cap is far above these


def test_a_truncated_gzip_file_fails_naming_the_file_after_its_readable_rows(tmp_path):
    from orpo_pipeline.data.ingest import iter_file_tables

    packed = gzip.compress(b"".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}).encode() + b"\n"
                                    for i in range(20_000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    got = []
    with pytest.raises(PreferenceFormatError, match=r"cut\.jsonl\.gz: unreadable after line \d+"):
        for table in iter_file_tables(path, path.name, batch_rows=1_000):
            got.append(table)
    assert sum(t.height for t in got) > 0


def test_json_arrays_stream_the_records_json_loads_reads(tmp_path):
    """ijson, an element at a time: the records of json.loads, huge integers included (its C parser stops at
    64 bits; the Python one goes on from there); after a BOM too; other documents as before."""
    from orpo_pipeline.data.readers import iter_records

    rec = {"prompt": "q", "chosen": "a", "rejected": "b"}
    records = [rec, {**rec, "score_chosen": 2.5, "score_rejected": -1, "n": 10**30, "nested": [{"x": None}]}, 7]
    cases = {
        "bom.json": b"\xef\xbb\xbf" + json.dumps(records, indent=2).encode(),
        "wrapped.json": json.dumps({"data": [rec]}).encode(),
        "lines.json": (json.dumps(rec) + "\n" + json.dumps(rec) + "\n").encode(),
    }
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
    got = [r for _, r in iter_records(tmp_path / "bom.json")]
    assert got[:2] == records[:2] and str(got[2]) == "expected a JSON object, got int"
    assert [r for _, r in iter_records(tmp_path / "wrapped.json")] == [rec]
    assert [r for _, r in iter_records(tmp_path / "lines.json")] == [rec, rec]
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(PreferenceFormatError, match="scalar.json: expected a JSON array of records, got int"):
        list(iter_records(tmp_path / "scalar.json"))
    (tmp_path / "bytes.json").write_bytes(b'[{"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": "\xff"}]')
    with pytest.raises(PreferenceFormatError, match=r"bytes.json: malformed JSON after array element 1: .*UTF8"):
        list(iter_records(tmp_path / "bytes.json"))
    # a lone surrogate escape: in a key, ijson's C parser stops and its Python parser reads the key (a row that
    # matches no format, then); in a value, the C parser writes "?" (JSON Lines reject such a row instead)
    (tmp_path / "surrogate.json").write_text('[{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}, '
                                             '{"\\udc00": 1, "prompt": "q", "chosen": "a", "rejected": "b"}]')
    raw = read(tmp_path / "surrogate.json")
    assert raw["error"].to_list() == [None, None] and raw["prompt"][0].to_list() == [{"role": "user", "content": "?"}]
    (tmp_path / "cut.json").write_text(json.dumps([rec, rec])[:-20])
    with pytest.raises(PreferenceFormatError, match=r"cut.json: malformed JSON after array element 1"):
        list(iter_records(tmp_path / "cut.json"))
