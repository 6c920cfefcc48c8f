"""Time lm_eval_scores' work (issue 18): a suite for two models, as the asset runs it, at the CPU default limit.

Two model folders (default: SmolLM2-135M-Instruct as base and, for lack of a tuned one, the same weights again:
the cost of loglikelihood scoring does not depend on the weights) through
`orpo_pipeline.models.benchmarks.score_model` over tasks built from ../shared/data/benchmarks, batch size 8 on
CPU, limit `CPU_DEFAULT_LIMIT` unless --limit is given. Saves per-task seconds and scores under bench/results/.

    nice -n 10 .venv/bin/python bench/lm_eval_suite.py [--suite nous] [--limit N] [--tuned DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import describe_device, load_average, utc_now  # noqa: E402


def main() -> None:
    from orpo_pipeline.config import CPU_DEFAULT_LIMIT
    from orpo_pipeline.models.base import resolve_base_model
    from orpo_pipeline.models.benchmarks import RunSettings, score_model
    from orpo_pipeline.models.lm_eval_tasks import plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="nous")
    ap.add_argument("--limit", type=int, default=CPU_DEFAULT_LIMIT)
    ap.add_argument("--benchmarks", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--tuned", default="", help="tuned model folder (default: the base again)")
    ap.add_argument("--cache", default=str(ROOT / "state" / "models"))
    a = ap.parse_args()
    base = resolve_base_model("smollm2-135m-instruct", Path(a.cache))
    models = {"base": base, "tuned": Path(a.tuned) if a.tuned else base}
    started, load_start = utc_now(), load_average()
    settings = RunSettings(limit=a.limit, num_fewshot=None, apply_chat_template=False, max_gen_toks=256)
    out: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        task_plan = plan([a.suite], a.benchmarks, [], Path(scratch))
        for name, path in models.items():
            res = score_model(path, task_plan, settings, batch_size=8, device="cpu", label=f"{name}: ")
            out[name] = {"seconds": res["seconds"], "scores": res["scores"],
                         "per_task_seconds": {r["task"]: r["seconds"] for r in res["rows"]}}
    total = round(time.perf_counter() - t0, 1)
    result = {"benchmark": "lm_eval_suite", "started_utc": started, "finished_utc": utc_now(),
              "device": describe_device(), "load_average": {"start": load_start, "end": load_average()},
              "suite": a.suite, "limit": a.limit, "tasks": len(task_plan.tasks), "skipped": task_plan.skipped,
              "models": {k: str(v) for k, v in models.items()}, "total_seconds": total, "results": out}
    path = ROOT / "bench" / "results" / f"lm_eval_suite_{a.suite}_limit{a.limit}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{a.suite}, limit {a.limit}, {len(task_plan.tasks)} tasks, base + tuned: {total} s -> {path}")


if __name__ == "__main__":
    main()
