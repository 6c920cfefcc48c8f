"""Which lm-eval tasks a suite name means, and where their documents come from.

Three sources, in this order of preference:
- a benchmark folder in the layout of ../shared/data/benchmarks: task YAMLs are written at run time into a
  scratch folder; each `include`s lm-eval's own YAML for the task (prompt, choices, metrics) and swaps the hub
  dataset for a loader over the release files (`lm_eval_docs`);
- lm-eval's own hub tasks, when the Hugging Face hub can be reached;
- neither: the suite is skipped, with the reason.
Any other lm-eval task or group name, and tasks from a user's folder of YAMLs (lm-eval's include path), run as
lm-eval defines them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

AGIEVAL = ["aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage", "sat-math"]
GPT4ALL = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
BIGBENCH = ["causal_judgement", "date_understanding", "disambiguation_qa", "geometric_shapes",
            "logical_deduction_five_objects", "logical_deduction_seven_objects", "logical_deduction_three_objects",
            "movie_recommendation", "navigate", "reasoning_about_colored_objects", "ruin_names",
            "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
            "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
            "tracking_shuffled_objects_three_objects"]
# the Nous table's columns, in its order
NOUS_GROUPS = ["agieval", "gpt4all", "truthfulqa", "bigbench"]
NAMED_SUITES = ("nous", "ifeval")
LOCAL_PREFIX = "local_"


@dataclass(frozen=True)
class Spec:
    """A task of a named suite: its name in results, lm-eval's hub task, and how to build it over local files."""

    name: str
    group: str
    hub: str  # lm-eval's task over the hub dataset
    include: str  # lm-eval's YAML (relative to lm_eval/tasks) whose prompt and metrics the local task reuses
    loader: str  # function of orpo_pipeline.models.lm_eval_docs
    files: dict[str, tuple[str, ...]]  # loader argument -> candidate paths, relative to the benchmark folder
    metrics: tuple[str, ...] = ("acc_norm",)


def _bigbench_hub(task: str) -> str:
    # lm-eval's BIG-bench (hails/bigbench) keeps the three sizes of these two as one task, and spells judgment so
    base = task.replace("causal_judgement", "causal_judgment")
    for prefix in ("logical_deduction", "tracking_shuffled_objects"):
        if base.startswith(prefix):
            base = prefix
    return f"bigbench_{base}_multiple_choice"


def _specs() -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    for t in AGIEVAL:
        name = "agieval_" + t.replace("-", "_")
        out[name] = Spec(name, "agieval", name, f"agieval/{t}.yaml", "agieval", {"data_file": (f"agieval/{t}.jsonl",)})
    arc = {"arc_challenge": "ARC-Challenge", "arc_easy": "ARC-Easy"}
    for name, stem in arc.items():
        out[name] = Spec(name, "gpt4all", name, f"arc/{name}.yaml", "arc", {"data_file": (f"arc/{stem}-Dev.jsonl",)})
    gpt4all = {
        "boolq": ("super_glue/boolq/default.yaml", "boolq", {"data_file": ("boolq/val.jsonl",)}, ("acc",)),
        "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag",
                      {"data_file": ("hellaswag/hellaswag_val_full.txt.bz2", "hellaswag/hellaswag_val_full.txt")},
                      ("acc_norm",)),
        "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", {"data_file": ("openbookqa/test.jsonl",)},
                       ("acc_norm",)),
        "piqa": ("piqa/piqa.yaml", "piqa", {"data_file": ("piqa/valid.jsonl",),
                                            "labels_file": ("piqa/valid-labels.lst",)}, ("acc_norm",)),
        "winogrande": ("winogrande/default.yaml", "winogrande", {"data_file": ("winogrande/dev.reconstructed.jsonl",),
                                                                  "labels_file": ("winogrande/dev-labels.lst",)},
                       ("acc",)),
    }
    for name, (include, loader, files, metrics) in gpt4all.items():
        out[name] = Spec(name, "gpt4all", name, include, loader, files, metrics)
    # TruthfulQA sits beside the benchmark folder in ../shared/data, or inside it
    out["truthfulqa_mc2"] = Spec("truthfulqa_mc2", "truthfulqa", "truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml",
                                 "truthfulqa_mc", {"data_file": ("truthfulqa/mc_task.json", "../truthfulqa/mc_task.json")},
                                 ("acc",))
    for t in BIGBENCH:
        name = "bigbench_" + t
        out[name] = Spec(name, "bigbench", _bigbench_hub(t), "bigbench/multiple_choice_template_a_yaml",
                         "bbh_multiple_choice", {"data_file": (f"bbh/{t}.json",)}, ("acc",))
    out["ifeval"] = Spec("ifeval", "ifeval", "ifeval", "ifeval/ifeval.yaml", "ifeval",
                         {"data_file": ("ifeval/input_data.jsonl",)}, ("prompt_level_strict_acc", "inst_level_loose_acc"))
    return out


SPECS = _specs()
SUITE_TASKS = {"nous": [s.name for s in SPECS.values() if s.group in NOUS_GROUPS], "ifeval": ["ifeval"]}


@dataclass
class PlannedTask:
    name: str  # as reported (the hub task's name for named suites)
    suite: str
    group: str
    lm_eval_task: str  # what lm-eval is asked for
    source: str  # "local files", "hub" or "lm-eval task"
    metrics: tuple[str, ...] = ()  # empty: pick acc_norm, else acc, else lm-eval's first
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    tasks: list[PlannedTask]
    skipped: dict[str, str]  # suite or task -> why
    include_paths: list[str]

    def digest(self, settings: dict) -> str:
        """Same digest = same tasks from the same documents under the same settings: scores compare."""
        h = hashlib.sha256(repr(sorted(settings.items())).encode())
        for t in sorted(self.tasks, key=lambda t: (t.suite, t.name)):
            h.update(f"{t.suite}|{t.name}|{t.lm_eval_task}|{t.source}".encode())
            for k, p in sorted(t.files.items()):
                h.update(f"{k}={file_digest(p)}".encode())
        return h.hexdigest()[:16]


def file_digest(path: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 (a per-process cache on purpose)
    if path not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[path] = h.hexdigest()
    return _cache[path]


def hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """Whether lm-eval's hub datasets can be fetched: HF_HUB_OFFLINE unset and huggingface.co answering."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/datasets?limit=1", timeout=timeout)
        return True, ""
    except OSError as e:
        return False, f"huggingface.co cannot be reached ({e})"


def punkt_tab_missing() -> str:
    """Why IFEval cannot run here, or "" if it can: lm-eval's IFEval downloads NLTK's punkt_tab when it is
    missing, and nothing may download at run time."""
    try:
        import nltk
    except ImportError:
        return "nltk is not installed (lm-eval's ifeval extras)"
    try:
        nltk.data.find("tokenizers/punkt_tab")
        return ""
    except LookupError:
        return "NLTK data 'punkt_tab' not found in NLTK_DATA (" + os.pathsep.join(nltk.data.path) + \
            "); install it with nltk.download('punkt_tab') where downloads are allowed"


def _resolve(spec: Spec, folder: Path) -> tuple[dict[str, str], str]:
    files = {}
    for arg, candidates in spec.files.items():
        found = next((folder / c for c in candidates if (folder / c).is_file()), None)
        if found is None:
            return {}, f"{' or '.join(str(folder / c) for c in candidates)} not found"
        files[arg] = str(found.resolve())
    return files, ""


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_task_yaml(spec: Spec, files: dict[str, str], out_dir: Path) -> str:
    """A task over local files that reuses lm-eval's YAML for this task; returns its lm-eval name."""
    import yaml

    name = LOCAL_PREFIX + spec.name
    body = {
        "include": str(lm_eval_tasks_dir() / spec.include),
        "task": name,
        "tag": ["orpo_pipeline_local"],
        "dataset_path": "json",  # unused: custom_dataset loads the documents
        "dataset_name": None,
        "dataset_kwargs": files,
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }
    text = yaml.safe_dump(body, sort_keys=False) + "custom_dataset: !function utils." + spec.loader + "\n"
    (out_dir / f"{name}.yaml").write_text(text)
    return name


def user_task_names(task_dirs: list[str]) -> set[str]:
    """Task and group names defined by the YAMLs of the user's folders (read as text: they may hold !function)."""
    import re

    names: set[str] = set()
    for d in task_dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"task folder {folder} does not exist")
        for f in list(folder.rglob("*.yaml")) + list(folder.rglob("*.yml")):
            names |= set(re.findall(r"^(?:task|group):\s*['\"]?([^\s'\"#]+)", f.read_text(errors="replace"), re.M))
    return names


def plan(suites: list[str], benchmark_dir: str, task_dirs: list[str], scratch: Path) -> Plan:
    """Resolve suite names into lm-eval tasks; YAMLs for local files go into `scratch` (a run-time folder)."""
    folder = Path(benchmark_dir).expanduser() if benchmark_dir else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder {folder} does not exist")
    scratch.mkdir(parents=True, exist_ok=True)
    # the YAMLs name their loaders as utils.<fn>, looked up next to them
    (scratch / "utils.py").write_text("from orpo_pipeline.models.lm_eval_docs import *  # noqa: F401,F403\n")
    tasks: list[PlannedTask] = []
    skipped: dict[str, str] = {}
    online: tuple[bool, str] | None = None
    user_tasks = user_task_names(task_dirs)
    for suite in dict.fromkeys(suites):
        if suite not in NAMED_SUITES and suite not in SPECS:
            tasks.append(PlannedTask(suite, suite, suite, suite, "user task" if suite in user_tasks else "lm-eval task"))
            continue
        names = SUITE_TASKS.get(suite, [suite])
        if "ifeval" in names and (why := punkt_tab_missing()):
            skipped[suite] = why
            continue
        for name in names:
            spec = SPECS[name]
            files, missing = _resolve(spec, folder) if folder is not None else ({}, "no benchmark folder given")
            if files:
                tasks.append(PlannedTask(name, suite, spec.group, write_task_yaml(spec, files, scratch),
                                         "local files", spec.metrics, files))
                continue
            if online is None:
                online = hub_reachable()
            if online[0]:
                tasks.append(PlannedTask(name, suite, spec.group, spec.hub, "hub", spec.metrics))
            else:
                skipped[f"{suite}/{name}" if folder is not None else suite] = f"{missing}, and the hub cannot be " \
                    f"used: {online[1]}"
        if folder is None and suite in skipped:
            continue
        # the hub keeps some BIG-bench sizes as one task: ask for it once
        seen: set[str] = set()
        tasks = [t for t in tasks if not (t.source == "hub" and (t.lm_eval_task in seen or seen.add(t.lm_eval_task)))]
    return Plan(tasks, skipped, [str(scratch)] + [str(Path(d).expanduser().resolve()) for d in task_dirs])
