"""Benchmark release files as the datasets lm-eval's own task YAMLs expect.

Each loader is an lm-eval `custom_dataset` function: it reads the files a benchmark ships (the layout of
../shared/data/benchmarks, see its README) and returns a DatasetDict whose single `test` split has the columns of
the hub dataset that lm-eval's YAML for that task reads (hails/agieval-*, allenai/ai2_arc, aps/super_glue boolq,
Rowan/hellaswag, allenai/openbookqa, baber/piqa, allenai/winogrande, truthfulqa/truthful_qa, google/IFEval,
hails/bigbench). Prompts, choices, scoring and metrics stay lm-eval's; only where the documents come from changes.
lm-eval calls these with the task's `dataset_kwargs` and `metadata` as keyword arguments, hence the `**_`.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import datasets

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkFileError(ValueError):
    pass


def _jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkFileError(f"{path}:{n}: not JSON ({e.msg})") from e
    return rows


def _labels(path: str | Path, n: int) -> list[str]:
    labels = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(labels) != n:
        raise BenchmarkFileError(f"{path}: {len(labels)} labels for {n} documents")
    return labels


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def agieval(data_file: str, **_) -> datasets.DatasetDict:
    """AGIEval v1 English: the zero-shot query of AGIEval's own dataset_loader (as in hails/agieval-*)."""
    rows = []
    for n, d in enumerate(_jsonl(data_file), 1):
        options = d["options"]
        labels = d["label"] if isinstance(d["label"], list) else [d["label"]]
        try:
            gold = [LETTERS.index(x) for x in labels]
        except (ValueError, TypeError) as e:
            raise BenchmarkFileError(f"{data_file}:{n}: field label {d['label']!r} is not a letter") from e
        query = (f"{d.get('passage') or ''}Q: {d['question']} Answer Choices: {' '.join(options)}\n"
                 f"A: Among A through {LETTERS[len(options) - 1]}, the answer is")
        rows.append({"query": query, "choices": options, "gold": gold})
    return _split(rows)


def _qa_choices(d: dict) -> dict:
    choices = d["question"]["choices"]
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def arc(data_file: str, **_) -> datasets.DatasetDict:
    """ARC in its release layout; labels stay as given (1-4 on some questions, like the answer key there)."""
    return _split([{"id": d["id"], "question": d["question"]["stem"], "choices": _qa_choices(d),
                    "answerKey": d["answerKey"]} for d in _jsonl(data_file)])


def openbookqa(data_file: str, **_) -> datasets.DatasetDict:
    return _split([{"id": d["id"], "question_stem": d["question"]["stem"], "choices": _qa_choices(d),
                    "answerKey": d["answerKey"]} for d in _jsonl(data_file)])


def boolq(data_file: str, **_) -> datasets.DatasetDict:
    """BoolQ (SuperGLUE form); the release writes the label as the string "true"/"false"."""
    rows = []
    for n, d in enumerate(_jsonl(data_file), 1):
        label = str(d["label"]).strip().lower()
        if label not in ("true", "false"):
            raise BenchmarkFileError(f"{data_file}:{n}: field label {d['label']!r} is neither true nor false")
        rows.append({"question": d["question"], "passage": d["passage"], "idx": d.get("idx", n - 1),
                     "label": int(label == "true")})
    return _split(rows)


def piqa(data_file: str, labels_file: str, **_) -> datasets.DatasetDict:
    docs = _jsonl(data_file)
    return _split([{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                   for d, y in zip(docs, _labels(labels_file, len(docs)))])


def winogrande(data_file: str, labels_file: str, **_) -> datasets.DatasetDict:
    docs = _jsonl(data_file)
    return _split([{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": y}
                   for d, y in zip(docs, _labels(labels_file, len(docs)))])


def hellaswag(data_file: str, **_) -> datasets.DatasetDict:
    """llama.cpp's plain-text HellaSwag: 6 lines a task ("activity: context", gold index, 4 endings)."""
    with bz2.open(data_file, "rt", encoding="utf-8") if str(data_file).endswith(".bz2") else open(
            data_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise BenchmarkFileError(f"{data_file}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        if label not in ("0", "1", "2", "3"):
            raise BenchmarkFileError(f"{data_file}:{i + 2}: gold index {label!r} is not 0-3")
        activity, _, ctx = head.partition(": ")
        # lm-eval's process_docs builds the query from activity_label, ctx_a and ctx_b; the file has them merged
        rows.append({"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label})
    return _split(rows)


def truthfulqa_mc(data_file: str, **_) -> datasets.DatasetDict:
    """TruthfulQA's mc_task.json ({answer: 0/1} maps) as truthful_qa/multiple_choice ({choices, labels})."""
    docs = json.loads(Path(data_file).read_text(encoding="utf-8"))

    def targets(d: dict) -> dict:
        return {"choices": list(d), "labels": [int(v) for v in d.values()]}

    return _split([{"question": d["question"], "mc1_targets": targets(d["mc1_targets"]),
                    "mc2_targets": targets(d["mc2_targets"])} for d in docs])


def ifeval(data_file: str, **_) -> datasets.DatasetDict:
    return _split([{"key": d["key"], "prompt": d["prompt"], "instruction_id_list": d["instruction_id_list"],
                    "kwargs": d["kwargs"]} for d in _jsonl(data_file)])


_LETTERED = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def bbh_choices(text: str) -> tuple[list[str], list[str]]:
    """Option letters and texts listed in a BIG-Bench-Hard input ("(A) ..." or "- Yes" lines after "Options:")."""
    _, found, tail = text.rpartition("Options:")
    if not found:
        return [], []
    letters, texts = [], []
    for line in tail.strip().splitlines():
        m = _LETTERED.match(line.strip())
        if m:
            letters.append(m.group(1))
            texts.append(m.group(2).strip())
        elif line.strip().startswith("- "):
            texts.append(line.strip()[2:].strip())
    return letters, texts


def bbh_multiple_choice(data_file: str, **_) -> datasets.DatasetDict:
    """A BIG-Bench-Hard task as BIG-bench multiple choice (hails/bigbench columns): the option texts are the
    choices (BIG-bench's multiple_choice_grade scores them), the gold one is the target. Inputs without listed
    options (sports_understanding) choose among the task's answers. A document whose target is none of its
    options (a handful in movie_recommendation and ruin_names) cannot be scored and is left out."""
    examples = json.loads(Path(data_file).read_text(encoding="utf-8"))["examples"]
    answers = sorted({e["target"] for e in examples})
    rows = []
    for e in examples:
        letters, texts = bbh_choices(e["input"])
        target = e["target"].strip()
        if not texts:
            texts, gold = answers, target
        else:
            m = re.fullmatch(r"\(([A-Z])\)", target)
            if m and m.group(1) in letters:
                gold = texts[letters.index(m.group(1))]
            else:
                gold = next((t for t in texts if t.lower() == target.lower()), None)
        if gold is None or gold not in texts:
            continue
        rows.append({"inputs": f"Q: {e['input']}\nA:", "targets": [gold], "multiple_choice_targets": texts})
    return _split(rows)
