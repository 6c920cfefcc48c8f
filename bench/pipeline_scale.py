"""Preference data at scale through the real assets: raw_preferences + cleaned_preferences on one big JSONL file.

The input is the cleaning benchmark's (bench/clean_throughput.py: the real pairs replicated and perturbed), written
as one TRL-standard JSONL file of N lines, unparseable rows as malformed lines. Writing it is not timed. Each method
materializes both assets for that one partition on a fresh Dagster instance and storage root, in its own process,
so its peak RSS is its own:

- "batched": the default ReadSettings.batch_rows (50,000): a file is parsed, written and cleaned a batch at a time;
- "whole file" (the baseline, what the assets did before batch_rows): batch_rows >= N, one table for the file.

Both must write the same partition (same kept and rejected rows, same digest). Figures: wall and CPU seconds of
each asset, pairs/s, peak RSS; the ratios batched / whole file.

    nice -n 19 .venv/bin/python bench/pipeline_scale.py                        # 2M pairs, fields cut to 256 chars
    nice -n 19 .venv/bin/python bench/pipeline_scale.py --pairs 200000 --max-field-chars 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, fmt_rate, measure, run_worker, save_result  # noqa: E402


def write_jsonl(path: Path, pairs: int, max_field_chars: int, seed: int) -> dict:
    import polars as pl

    from bench.clean_throughput import build_raw

    raw = build_raw(pairs, seed=seed, max_field_chars=max_field_chars)
    record = pl.struct(
        prompt=pl.col("prompt").list.first().struct.field("content").fill_null(""),
        chosen=pl.col("chosen"), rejected=pl.col("rejected"),
    ).struct.json_encode()
    lines = raw.select(pl.when(pl.col("error").is_null()).then(record).otherwise(pl.lit('{"prompt": "cut off'))
                       .alias("line"))
    with open(path, "w", encoding="utf-8") as f:
        for offset in range(0, lines.height, 100_000):
            f.write("\n".join(lines["line"].slice(offset, 100_000).to_list()) + "\n")
    return {"pairs": pairs, "file_mb": round(path.stat().st_size / 2**20, 1),
            "unparseable_lines": int(raw["error"].is_not_null().sum())}


def worker_pipeline(args) -> None:
    import dagster as dg
    import polars as pl

    from assets.partitions import range_tags, register_files
    from assets.preferences import cleaned_preferences, raw_preferences
    from resources import MlflowResource, StorageResource

    state = Path(tempfile.mkdtemp(prefix="pipeline-scale-"))
    result: dict = {"method": args.worker, "batch_rows": args.batch_rows}
    try:
        storage = StorageResource(root=str(state))
        resources = {"storage": storage, "mlflow_tracking": MlflowResource(state_dir=str(state))}
        config = {"config": {"batch_rows": args.batch_rows}}
        with dg.instance_for_test() as instance:
            _, keys = register_files(instance, [Path(args.input_path)], storage.sources_path)
            with measure() as total:
                for asset in (raw_preferences, cleaned_preferences):
                    name = asset.key.to_user_string()
                    with measure() as m:
                        run = dg.materialize([asset], resources=resources, instance=instance, tags=range_tags(keys),
                                             run_config={"ops": {name: config}}, selection=[asset])
                    assert run.success
                    result[name] = {"seconds": round(m["seconds"], 2), "cpu_seconds": round(m["cpu_seconds"], 2),
                                    "pairs_per_s": round(args.pairs / m["seconds"])}
        folder = storage.partition_dir("cleaned_preferences", keys[0])
        summary = json.loads((folder / "summary.json").read_text())
        result.update(seconds=round(total["seconds"], 2), cpu_seconds=round(total["cpu_seconds"], 2),
                      pairs_per_s=round(args.pairs / total["seconds"]), peak_rss_mb=round(total["peak_rss_mb"]),
                      rss_before_mb=round(total["rss_before_mb"] or 0), loadavg_before=total["loadavg_before"],
                      loadavg_after=total["loadavg_after"], digest=summary["digest"], kept=summary["kept"],
                      reasons=summary["reasons"],
                      rejected=pl.scan_parquet(folder / "rejects.parquet").select(pl.len()).collect().item())
    finally:
        shutil.rmtree(state, ignore_errors=True)
    emit(result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2_000_000)
    ap.add_argument("--max-field-chars", type=int, default=256, help="cut every real text first (0: real lengths)")
    ap.add_argument("--batch-rows", type=int, default=50_000, help="batch_rows of the batched method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/pipeline_scale.json)")
    ap.add_argument("--input-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "write":
        emit(write_jsonl(Path(args.input_path), args.pairs, args.max_field_chars, args.seed))
        return 0
    if args.worker:
        worker_pipeline(args)
        return 0

    script = Path(__file__).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-scale-input-"))
    try:
        path = tmp / "preferences.jsonl"
        common = ["--pairs", str(args.pairs), "--input-path", str(path)]
        print(f"writing {args.pairs:,} pairs as JSONL (not timed) ...", flush=True)
        written = run_worker(script, ["--worker", "write", "--max-field-chars", str(args.max_field_chars),
                                      "--seed", str(args.seed), *common])
        print(f"  {written['file_mb']:,} MB, {written['unparseable_lines']:,} malformed lines", flush=True)
        runs = {}
        for method, batch_rows in (("batched", args.batch_rows), ("whole_file", args.pairs + 1)):
            print(f"[{method}] raw_preferences + cleaned_preferences, batch_rows {batch_rows:,} ...", flush=True)
            t0 = time.perf_counter()
            runs[method] = r = run_worker(script, ["--worker", method, "--batch-rows", str(batch_rows), *common])
            print(f"  {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s), {fmt_rate(r['pairs_per_s'])} pairs/s: "
                  f"raw {r['raw_preferences']['seconds']:.1f} s, cleaned {r['cleaned_preferences']['seconds']:.1f} s; "
                  f"peak RSS {r['peak_rss_mb']:,} MB; worker {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    batched, whole = runs["batched"], runs["whole_file"]
    same = (batched["digest"], batched["kept"], batched["rejected"], batched["reasons"]) == (
        whole["digest"], whole["kept"], whole["rejected"], whole["reasons"])
    ratios = {"pairs_per_s": batched["pairs_per_s"] / whole["pairs_per_s"],
              "peak_rss": batched["peak_rss_mb"] / whole["peak_rss_mb"]}
    print(f"\nsame partition (digest, kept, rejects, reasons): {same}")
    print(f"batched / whole file: speed {ratios['pairs_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x "
          f"({batched['peak_rss_mb']:,} against {whole['peak_rss_mb']:,} MB)")
    saved = save_result("pipeline_scale", {
        "config": {"pairs": args.pairs, "max_field_chars": args.max_field_chars, "batch_rows": args.batch_rows,
                   "seed": args.seed, "input": "bench/clean_throughput.py build_raw, written as TRL-standard JSONL"},
        "input": written, "batched": batched, "whole_file": whole, "same_partition": same, "ratios": ratios,
    }, args.out)
    print(f"saved {saved}")
    return 0 if same else 2


if __name__ == "__main__":
    sys.exit(main())
