"""Suites resolved into lm-eval tasks over the shared benchmark files, as lm-eval itself loads them (no model)."""

import json

import pytest

from orpo_pipeline.models import lm_eval_docs as docs
from orpo_pipeline.models.lm_eval_tasks import BIGBENCH, SPECS, plan
from tests.conftest import SHARED

BENCHMARKS = SHARED / "benchmarks"


def test_offline_without_folder_skips_every_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = plan(["nous", "ifeval"], "", [], tmp_path)
    assert p.tasks == [] and set(p.skipped) == {"nous", "ifeval"}
    assert p.skipped["nous"] == "no benchmark folder given, and the hub cannot be used: HF_HUB_OFFLINE is set"


def test_missing_file_skips_that_task_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "bench"
    (folder / "arc").mkdir(parents=True)
    (folder / "arc" / "ARC-Easy-Dev.jsonl").write_text((BENCHMARKS / "arc" / "ARC-Easy-Dev.jsonl").read_text())
    p = plan(["arc_easy", "arc_challenge"], str(folder), [], tmp_path / "tasks")
    assert [t.name for t in p.tasks] == ["arc_easy"] and p.tasks[0].source == "local files"
    assert "ARC-Challenge-Dev.jsonl not found" in p.skipped["arc_challenge/arc_challenge"]


def test_ifeval_needs_punkt_tab(tmp_path, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no_nltk_data"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    p = plan(["ifeval"], str(BENCHMARKS), [], tmp_path / "tasks")
    assert p.tasks == [] and "punkt_tab" in p.skipped["ifeval"]


def test_nous_suite_loads_in_lm_eval_with_docs_from_the_files(tmp_path):
    """All 34 tasks of the suite, built over the files, load through lm-eval's TaskManager; every first document
    renders a prompt, its choices and a gold index within them."""
    from lm_eval.tasks import TaskManager, get_task_dict

    p = plan(["nous"], str(BENCHMARKS), [], tmp_path)
    assert len(p.tasks) == 8 + 7 + 1 + 18 and not p.skipped
    assert {t.group for t in p.tasks} == {"agieval", "gpt4all", "truthfulqa", "bigbench"}
    tasks = get_task_dict([t.lm_eval_task for t in p.tasks], TaskManager(include_path=p.include_paths,
                                                                        include_defaults=False))
    sizes = {}
    for name, task in tasks.items():
        test = list(task.test_docs())
        doc = test[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert isinstance(task.doc_to_text(doc), (str, int)) and len(choices) >= 2, name
        if isinstance(target, int):
            assert 0 <= target < len(choices), name
        sizes[name] = len(test)
    assert sizes["local_hellaswag"] == 10042 and sizes["local_piqa"] == 1838 and sizes["local_winogrande"] == 1267
    assert sizes["local_truthfulqa_mc2"] == 790 and sizes["local_arc_challenge"] == 299
    assert sizes["local_agieval_lsat_ar"] == 230 and sizes["local_boolq"] == 3270
    assert sizes["local_bigbench_causal_judgement"] == 187


@pytest.mark.parametrize("task", BIGBENCH)
def test_bbh_documents_keep_their_gold_answer(task):
    raw = json.loads((BENCHMARKS / "bbh" / f"{task}.json").read_text())["examples"]
    rows = docs.bbh_multiple_choice(str(BENCHMARKS / "bbh" / f"{task}.json"))["test"]
    # only documents whose target is none of their options are left out (a handful in two tasks)
    assert len(raw) - len(rows) <= 3
    for r in rows:
        assert r["targets"][0] in r["multiple_choice_targets"] and r["inputs"].endswith("\nA:")


def test_loaders_read_the_release_quirks():
    arc = docs.arc(str(BENCHMARKS / "arc" / "ARC-Challenge-Dev.jsonl"))["test"]
    assert all(r["answerKey"] in r["choices"]["label"] for r in arc)  # numeric labels stay numeric on both sides
    boolq = docs.boolq(str(BENCHMARKS / "boolq" / "val.jsonl"))["test"]
    assert set(boolq["label"]) == {0, 1}
    ag = docs.agieval(str(BENCHMARKS / "agieval" / "sat-math.jsonl"))["test"][0]
    assert ag["query"].endswith("A: Among A through D, the answer is") and len(ag["gold"]) == 1
    tqa = docs.truthfulqa_mc(str(SHARED / "truthfulqa" / "mc_task.json"))["test"][0]
    assert tqa["mc2_targets"]["labels"][0] == 1 and len(tqa["mc2_targets"]["choices"]) == len(tqa["mc2_targets"]["labels"])
    with pytest.raises(docs.BenchmarkFileError, match="labels for"):
        docs.piqa(str(BENCHMARKS / "piqa" / "valid.jsonl"), str(BENCHMARKS / "winogrande" / "dev-labels.lst"))
