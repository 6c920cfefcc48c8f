"""The Ray path against the local one (issue 20): 2 CPU workers, the same training, per-step overhead as a ratio.

Both sides run the same Dagster asset calling ComputeResource.train on the same tokenized pairs, settings and
steps, each from its own fresh subprocess:

- local = ComputeResource(device="cpu", num_processes=2): `accelerate launch`, 2 processes (gloo), Dagster Pipes
          subprocess (the baseline: today's multi-process path);
- ray   = ComputeResource(device="cpu", ray_address=..., ray_workers=2): a Ray job (dagster-ray's Pipes client)
          whose driver runs a Ray Train TorchTrainer of 2 gloo workers, on a one-node Ray head on 127.0.0.1 with
          2 CPUs that this script starts (and stops by pid) before the workers run.

Measured per side: seconds per optimizer step inside the Trainer (TrainResult.train_runtime_s / steps: the
core's own clock around trainer.train(), the same on both sides), and the wall time of the whole
materialization (process start, imports, model load, Ray job submission and worker start included). The
ratio ray/local of each is the overhead. Checkpoints: none inside the measured steps (ray_checkpoint_steps
> steps), so both sides do the same work; a checkpoint's cost is not measured here.

    nice -n 10 .venv/bin/python bench/ray_overhead.py                        # SmolLM2-135M, 12 steps, 2 repeats
    nice -n 10 .venv/bin/python bench/ray_overhead.py --model tiny-random-llama --steps 8
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS_DIR, ROOT, SHARED_DATA, code_version, describe_device, emit, library_versions, load_average, run_worker,
    utc_now,
)

SCRIPT = Path(__file__).resolve()


def prepare(args) -> Path:
    """Tokenize the first --pairs UltraFeedback pairs once, for both sides; return the dataset folder."""
    from transformers import AutoTokenizer

    from orpo_pipeline.data.clean import clean_preferences
    from orpo_pipeline.data.ingest import iter_records, records_to_table
    from orpo_pipeline.models.base import resolve_base_model
    from orpo_pipeline.train.tokenize import tokenize_pairs

    model_dir = resolve_base_model(args.model, Path(args.model_cache))
    path = SHARED_DATA / "ultrafeedback_binarized_1k" / "train.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(args.pairs)
    out = Path(args.work) / "train"
    tokenize_pairs(kept, AutoTokenizer.from_pretrained(model_dir), max_length=args.max_length,
                   min_completion_tokens=32).dataset.save_to_disk(str(out))
    return model_dir


def worker(args) -> None:
    import dagster as dg

    from orpo_pipeline.config import TrainSettings
    from resources import ComputeResource

    settings = TrainSettings(max_steps=args.steps, logging_steps=1, per_device_train_batch_size=args.batch,
                             precision="fp32")
    results = []
    out = Path(args.work) / f"adapter-{args.worker}-{time.time_ns()}"

    @dg.asset
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.Output[dict]:
        results.append(compute.train(context, model_dir=Path(args.model_dir), train_dataset_dir=Path(args.work) / "train",
                                     output_dir=out, settings=settings, max_length=args.max_length))
        return dg.Output({"dir": str(out)})

    if args.worker == "ray":
        compute = ComputeResource(device="cpu", ray_address=args.address, ray_workers=2,
                                  ray_checkpoint_steps=args.steps + 1)
    else:
        compute = ComputeResource(device="cpu", num_processes=2)
    t0 = time.perf_counter()
    with dg.instance_for_test() as instance:
        ok = dg.materialize([adapter], resources={"compute": compute}, instance=instance).success
    wall = time.perf_counter() - t0
    (r,) = results
    emit({"side": args.worker, "success": ok, "wall_seconds": wall, "train_runtime_s": r.train_runtime_s,
          "steps": r.global_steps, "seconds_per_step": r.train_runtime_s / max(r.global_steps, 1),
          "tokens_per_second": r.tokens_per_second, "device": r.device, "num_processes": r.num_processes,
          "all_losses_finite": r.all_losses_finite})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--model-cache", default=str(ROOT / "state" / "models"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=2, help="per worker")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="each side this many times, order alternating")
    p.add_argument("--worker", choices=["local", "ray"])
    p.add_argument("--work")
    p.add_argument("--model-dir")
    p.add_argument("--address")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from tests.ray_cluster import ray_head

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as work:
        args.work = work
        model_dir = prepare(args)
        base = ["--work", work, "--model-dir", str(model_dir), "--steps", str(args.steps), "--batch", str(args.batch),
                "--max-length", str(args.max_length)]
        runs = []
        with ray_head(num_cpus=2) as head:
            order = [s for i in range(args.repeats) for s in (("local", "ray") if i % 2 == 0 else ("ray", "local"))]
            for side in order:
                load = load_average()
                r = run_worker(SCRIPT, base + ["--worker", side, "--address", head.dashboard_url], timeout=1800)
                r["loadavg_before"] = load
                r["loadavg_after"] = load_average()
                print(json.dumps(r))
                runs.append(r)
    by = {s: [r for r in runs if r["side"] == s] for s in ("local", "ray")}
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("seconds_per_step", "wall_seconds")}
           for s, rs in by.items()}
    summary = {
        "baseline": "local: ComputeResource(num_processes=2), accelerate launch, 2 gloo processes",
        "ratio_seconds_per_step_ray_over_local": med["ray"]["seconds_per_step"] / med["local"]["seconds_per_step"],
        "ratio_wall_ray_over_local": med["ray"]["wall_seconds"] / med["local"]["wall_seconds"],
        "extra_wall_seconds_ray": med["ray"]["wall_seconds"] - med["local"]["wall_seconds"],
        "median": med,
    }
    print(json.dumps(summary, indent=1))
    out = Path(args.out) if args.out else RESULTS_DIR / f"ray_overhead_{args.model}_cpu_{utc_now().replace(':', '')}.json"
    out.write_text(json.dumps({"benchmark": "ray_overhead", "utc": utc_now(), "code": code_version(),
                               "device": describe_device(), "libraries": library_versions() | _ray_versions(),
                               "config": {k: v for k, v in vars(args).items() if k not in ("worker", "address")},
                               "summary": summary, "runs": runs}, indent=1, default=str))
    print(f"saved {out}")


def _ray_versions() -> dict:
    from importlib import metadata

    return {n: metadata.version(n) for n in ("ray", "dagster", "dagster-ray", "accelerate")}


if __name__ == "__main__":
    main()
