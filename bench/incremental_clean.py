"""Cleaning cost grows with the new data, not the history.

Times the cleaning of ONE new 1k-row preference file (raw_preferences + cleaned_preferences for its partition,
through Dagster, on a real instance) when 10 and when 100 files are already accepted, and reports the ratio
(target: at most 1.2). Rows are built from ../shared/data/ultrafeedback_binarized_1k, perturbed per file so each
file is new content; every file repeats a few pairs of the first one so cross-file dedup has work to do.

    .venv/bin/python bench/incremental_clean.py [--rows 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ultrafeedback_binarized_1k" / "train.jsonl"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_file(folder: Path, index: int, base: list[dict], rows: int) -> Path:
    path = folder / f"batch_{index:04d}.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            r = base[i % len(base)]
            # the first 20 rows repeat batch 0's pairs: duplicates across files must still be caught
            tag = "" if i < 20 else f" (batch {index}, item {i})"
            f.write(json.dumps({"prompt": r["prompt"] + tag, "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return path


def main() -> int:
    import dagster as dg

    from assets.partitions import register_files
    from assets.preferences import cleaned_preferences, raw_preferences
    from resources import MlflowResource, StorageResource

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    base = [json.loads(line) for line in DATA.read_text().splitlines()]

    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        tmp = Path(tmp)
        files = tmp / "files"
        files.mkdir()
        storage = StorageResource(root=str(tmp / "state"))
        resources = {"storage": storage, "mlflow_tracking": MlflowResource(state_dir=str(tmp / "state"))}

        def clean(keys: list[str]) -> float:
            tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
            start = time.perf_counter()
            result = dg.materialize([raw_preferences, cleaned_preferences], resources=resources, instance=instance,
                                    tags=tags, raise_on_error=True)
            assert result.success
            return time.perf_counter() - start

        figures = {}
        history: list[str] = []
        index = 0
        for existing in (10, 100):
            paths = [write_file(files, index + i, base, args.rows) for i in range(existing - len(history))]
            index += len(paths)
            _, keys = register_files(instance, paths, storage.sources_path)
            history += keys
            clean(keys)  # the history, cleaned once in a single run
            new_path = write_file(files, 10_000 + existing, base, args.rows)
            _, (new_key,) = register_files(instance, [new_path], storage.sources_path)
            clean([new_key])  # warm-up
            times = [clean([new_key]) for _ in range(args.repeats)]
            rejects = storage.partition_dir("cleaned_preferences", new_key) / "rejects.parquet"
            import polars as pl

            dupes = pl.read_parquet(rejects).filter(pl.col("reason") == "duplicate_pair").height
            figures[existing] = {"median_s": statistics.median(times), "times_s": times, "cross_file_duplicates": dupes}
            history.append(new_key)
            print(f"1 new file of {args.rows} rows on top of {existing:3d} files: median {statistics.median(times):.3f} s "
                  f"({dupes} duplicates of earlier files caught)")

    ratio = figures[100]["median_s"] / figures[10]["median_s"]
    verdict = "met" if ratio <= 1.2 else "MISSED"
    print(f"ratio 100 / 10 existing files: {ratio:.3f} (target <= 1.2: {verdict})")
    import dagster
    import polars

    result = {
        "benchmark": "incremental_clean",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "versions": {"python": platform.python_version(), "dagster": dagster.__version__, "polars": polars.__version__},
        "config": {"rows_per_file": args.rows, "repeats": args.repeats, "data": str(DATA)},
        "figures": {str(k): v for k, v in figures.items()},
        "ratio_100_over_10": ratio,
        "target": "ratio <= 1.2",
        "target_met": ratio <= 1.2,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"incremental_clean_{datetime.now(timezone.utc):%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
