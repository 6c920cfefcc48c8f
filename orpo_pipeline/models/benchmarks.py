"""Standard benchmarks through lm-evaluation-harness: one model, a planned set of tasks, shaped scores.

lm-eval does the prompting, loglikelihood scoring or generation, metrics and stderr. Here: the model is loaded
once (`HFLM`) and each task goes through `lm_eval.simple_evaluate` on its own, so the log can say "task n of N";
the scores are then flattened into `<suite>/<task>/<metric>` and per-suite averages (and the Nous table's four
columns), the shape MLflow metrics, tags and the promotion rule use.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .lm_eval_tasks import LOCAL_PREFIX, NOUS_GROUPS, Plan, PlannedTask, plan

PREFERRED_METRICS = ("acc_norm", "acc")
ProgressFn = Callable[[str], None]


@dataclass
class RunSettings:
    """What must be equal for two models' scores to compare (also hashed into the plan's digest)."""

    limit: int | None
    num_fewshot: int | None
    apply_chat_template: bool
    max_gen_toks: int | None
    seed: int = 1234

    def as_dict(self) -> dict:
        return asdict(self)


def load_model(model_dir: Path, batch_size: str | int, device: str):
    """lm-eval's HF model over a local folder (bf16 on CUDA, fp32 on CPU)."""
    from lm_eval.models.huggingface import HFLM

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return HFLM(pretrained=str(model_dir), device=device, dtype=dtype, batch_size=batch_size,
                trust_remote_code=False)


def _metric_values(task_result: dict) -> dict[str, tuple[float, float | None]]:
    """{"acc_norm": (value, stderr)} from lm-eval's {"acc_norm,none": v, "acc_norm_stderr,none": s}."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, flt = key.split(",", 1)
        name = metric if flt == "none" else f"{metric}_{flt}"
        se = task_result.get(f"{metric}_stderr,{flt}")
        out[name] = (float(value), float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None)
    return out


def _pick(metrics: dict, wanted: tuple[str, ...]) -> list[str]:
    if wanted:
        return [m for m in wanted if m in metrics]
    first = next((m for m in PREFERRED_METRICS if m in metrics), None)
    return [first] if first else sorted(metrics)[:1]


def evaluate(lm, tasks: list[PlannedTask], include_paths: list[str], settings: RunSettings,
             progress: ProgressFn = print, label: str = "") -> tuple[list[dict], dict]:
    """Run each planned task; returns per-task rows and lm-eval's results JSON (all tasks, for the artifact)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # lm-eval's own index of thousands of YAMLs takes a minute to build on a laptop; tasks over local files
    # include lm-eval's YAMLs by path and need no index
    manager = TaskManager(include_path=include_paths or None,
                          include_defaults=any(t.source in ("hub", "lm-eval task") for t in tasks))
    gen_kwargs = {"max_gen_toks": settings.max_gen_toks} if settings.max_gen_toks else None
    rows: list[dict] = []
    full: dict = {"results": {}, "configs": {}, "versions": {}, "n-samples": {}, "errors": {}}
    for n, task in enumerate(tasks, 1):
        t0 = time.perf_counter()
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task.lm_eval_task], task_manager=manager, limit=settings.limit,
                num_fewshot=settings.num_fewshot, apply_chat_template=settings.apply_chat_template,
                fewshot_as_multiturn=settings.apply_chat_template, gen_kwargs=gen_kwargs, log_samples=False,
                bootstrap_iters=1000, random_seed=settings.seed, numpy_random_seed=settings.seed,
                torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
            )
        except Exception as e:  # a task lm-eval cannot load or run is reported, the others still count
            why = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            full["errors"][task.name] = why
            rows.append({**_row(task), "error": why, "seconds": round(time.perf_counter() - t0, 1)})
            progress(f"{label}task {n} of {len(tasks)} ({task.name}): failed: {why}")
            continue
        seconds = round(time.perf_counter() - t0, 1)
        for key in ("results", "configs", "versions", "n-samples"):
            full[key].update(res.get(key) or {})
        for result_name, result in (res.get("results") or {}).items():
            metrics = _metric_values(result)
            name = task.name if result_name == task.lm_eval_task else result_name.removeprefix(LOCAL_PREFIX)
            picked = _pick(metrics, task.metrics)
            if not picked:
                continue
            samples = (res.get("n-samples") or {}).get(result_name, {}).get("effective")
            rows.append({**_row(task), "task": name, "metrics": {m: metrics[m][0] for m in picked},
                         "stderr": {m: metrics[m][1] for m in picked}, "samples": samples, "seconds": seconds})
        shown = ", ".join(f"{r['task']} {m} {v:.3f}" for r in rows if r.get("lm_eval_task") == task.lm_eval_task
                          and "metrics" in r for m, v in r["metrics"].items())
        progress(f"{label}task {n} of {len(tasks)} ({task.name}, {task.source}): {shown or 'no metric'} in {seconds} s")
    return rows, full


def _row(task: PlannedTask) -> dict:
    return {"task": task.name, "suite": task.suite, "group": task.group, "lm_eval_task": task.lm_eval_task,
            "source": task.source}


def _mean(values: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """Unweighted mean over tasks (as the Nous table averages), stderr as for independent tasks."""
    v = sum(x for x, _ in values) / len(values)
    if any(s is None for _, s in values):
        return v, None
    return v, math.sqrt(sum(s * s for _, s in values)) / len(values)


def flatten(rows: list[dict]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Scores keyed `<suite>/<task>/<metric>`, `<suite>/average`, and for nous its four column averages."""
    scores: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    per_suite: dict[str, list] = {}
    per_group: dict[str, list] = {}
    for r in rows:
        if "metrics" not in r:
            continue
        for i, (m, v) in enumerate(r["metrics"].items()):
            key = f"{r['suite']}/{r['task']}/{m}"
            scores[key], stderr[key] = v, r["stderr"][m]
            if i == 0:  # a task's first metric is the one its suite averages
                per_suite.setdefault(r["suite"], []).append((v, r["stderr"][m]))
                if r["suite"] == "nous":
                    per_group.setdefault(r["group"], []).append((v, r["stderr"][m]))
    for g in NOUS_GROUPS:
        if g in per_group:
            scores[f"nous/{g}"], stderr[f"nous/{g}"] = _mean(per_group[g])
    for suite, values in per_suite.items():
        if suite == "nous":  # the Nous average is the mean of its four columns
            values = [(scores[f"nous/{g}"], stderr[f"nous/{g}"]) for g in NOUS_GROUPS if f"nous/{g}" in scores]
        scores[f"{suite}/average"], stderr[f"{suite}/average"] = _mean(values)
    return scores, stderr


def score_model(model_dir: Path, task_plan: Plan, settings: RunSettings, batch_size: str | int = "auto",
                device: str | None = None, progress: ProgressFn = print, label: str = "") -> dict:
    """One model over the whole plan: rows, flat scores, stderr and lm-eval's results JSON."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not task_plan.tasks:
        return {"rows": [], "scores": {}, "stderr": {}, "lm_eval": {}, "seconds": 0.0}
    t0 = time.perf_counter()
    lm = load_model(model_dir, batch_size, device)
    rows, full = evaluate(lm, task_plan.tasks, task_plan.include_paths, settings, progress, label)
    del lm
    scores, stderr = flatten(rows)
    return {"rows": rows, "scores": scores, "stderr": stderr, "lm_eval": full,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_tasks(model_dir: Path, suites: list[str], benchmark_dir: Path | str = "", limit: int | None = None,
              output_dir: Path | None = None, batch_size: str | int = 8, task_dirs: list[str] | None = None) -> dict:
    """The whole thing for scripts (bench/quality_vs_trl.py): plan, score, and per task the primary metric."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lm-eval-tasks-") as scratch:
        task_plan = plan(suites, str(benchmark_dir), task_dirs or [], Path(scratch))
        settings = RunSettings(limit=limit, num_fewshot=None, apply_chat_template=False, max_gen_toks=None)
        out = score_model(Path(model_dir), task_plan, settings, batch_size=batch_size)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "results.json").write_text(json.dumps(out["lm_eval"], indent=1, default=str))
    tasks = {}
    for r in out["rows"]:
        if "metrics" in r:
            m = next(iter(r["metrics"]))
            tasks[r["task"]] = {"metric": m, "value": r["metrics"][m], "stderr": r["stderr"][m],
                                "samples": r["samples"], "source": r["source"]}
    return {"tasks": tasks, "skipped": task_plan.skipped, "settings": settings.as_dict(),
            "digest": task_plan.digest(settings.as_dict()), "seconds": out["seconds"]}
