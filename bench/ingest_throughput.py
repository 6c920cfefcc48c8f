"""Ingest: one TRL-standard JSONL (or parquet, JSON array, CSV) file parsed into raw-table batches, ours vs the
way before.

The input is pipeline_scale.py's (bench/clean_throughput.py's pairs, real ones replicated and perturbed, written
as one JSONL file of N lines, 0.5% of them malformed). With `--file-format parquet` the same pairs are written
as a parquet file of prompt/chosen/rejected text columns, the malformed rows as rows with a null prompt. With
`--shape conversational` the answers are [user, assistant] message lists, as in HF's ultrafeedback_binarized
(malformed rows: null answers). With `--file-format json` or `csv` the pairs are one JSON array of objects or a
CSV file (malformed rows: a null or empty prompt). Writing it is not timed. Each method runs in its own fresh
process and reads the whole file a batch at a time (`batch_rows`, default 50,000), as `raw_preferences` does,
without writing anything:

- "reader" (ours): `ingest.iter_file_tables`, the one reader of each file type (`orpo_pipeline/data/readers.py`:
  orjson a line at a time, ijson an array element at a time, the csv module a row at a time, parquet batches);
- "whole" (the baseline, the plain way): the whole file parsed first with the standard library (`json.loads` of
  each line or of the whole array, `list(csv.DictReader(...))`, `pl.read_parquet(...).iter_rows`), then the same
  records into `ingest.iter_tables`.

Both must give the same rows: each batch's rows are hashed and the sums compared. Figures: wall and CPU seconds,
pairs/s, peak RSS, the ratios ours / baseline.

    nice -n 19 .venv/bin/python bench/ingest_throughput.py                          # 2M pairs, fields cut to 256
    nice -n 19 .venv/bin/python bench/ingest_throughput.py --pairs 500000 --max-field-chars 0
    nice -n 19 .venv/bin/python bench/ingest_throughput.py --file-format parquet
    nice -n 19 .venv/bin/python bench/ingest_throughput.py --shape conversational [--file-format parquet]
    nice -n 19 .venv/bin/python bench/ingest_throughput.py --file-format json    # or csv
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, fmt_rate, measure, run_worker, save_result  # noqa: E402


def write_input(path: Path, pairs: int, max_field_chars: int, seed: int, file_format: str, shape: str) -> dict:
    """The pairs as parquet, or as conversational JSONL (TRL-standard JSONL is pipeline_scale.py's writer)."""
    import polars as pl

    from bench.clean_throughput import build_raw

    raw = build_raw(pairs, seed=seed, max_field_chars=max_field_chars)
    ok = pl.col("error").is_null()
    prompt = pl.col("prompt").list.first().struct.field("content").fill_null("")
    if shape == "standard":
        table = raw.select(prompt=pl.when(ok).then(prompt), chosen="chosen", rejected="rejected")
    else:  # as HF's ultrafeedback_binarized: the prompt, then [user, assistant] turns as the answers
        def turns(answer: str) -> pl.Expr:
            return pl.when(ok).then(pl.concat_list(pl.struct(role=pl.lit("user"), content=prompt),
                                                   pl.struct(role=pl.lit("assistant"), content=answer)))
        table = raw.select(prompt=prompt, chosen=turns("chosen"), rejected=turns("rejected"))
    if file_format == "parquet":
        table.write_parquet(path)
    elif file_format == "json":
        table.write_json(path)  # an array of row objects
    elif file_format == "csv":
        table.write_csv(path)
    else:
        table.write_ndjson(path)
    return {"pairs": pairs, "file_mb": round(path.stat().st_size / 2**20, 1),
            "unparseable_lines": int(raw["error"].is_not_null().sum())}


def read_whole(path: Path):
    """A file's records parsed whole with the standard library first."""
    import csv
    import io
    import json

    import polars as pl

    if path.suffix == ".parquet":
        return enumerate(list(pl.read_parquet(path).iter_rows(named=True)), start=1)
    text = path.read_bytes().decode("utf-8-sig")  # read_text would turn \r\n in cells into \n
    if path.suffix == ".json":
        return enumerate(json.loads(text), start=1)
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            try:
                records.append((i, json.loads(line)))
            except ValueError as e:
                records.append((i, ingest.RowError(f"malformed JSON: {e}")))
        return iter(records)
    csv.field_size_limit(2**31 - 1)
    return enumerate(list(csv.DictReader(io.StringIO(text, newline=""))), start=1)


from orpo_pipeline.data import ingest  # noqa: E402

# ours, and the baseline, per file format
METHODS = {fmt: ("reader", "whole") for fmt in ("jsonl", "parquet", "json", "csv")}


def worker(args) -> None:
    import polars as pl

    path = Path(args.input_path)
    with measure() as m:
        if args.worker == "reader":
            tables = ingest.iter_file_tables(path, path.name, batch_rows=args.batch_rows)
        else:
            tables = ingest.iter_tables(read_whole(path), path.name, batch_rows=args.batch_rows)
        rows = errors = 0
        digest = 0
        for t in tables:
            rows += t.height
            errors += int(t["error"].is_not_null().sum())
            digest = (digest + int(t.drop("error").hash_rows(seed=0).sum())) % 2**64
    emit({"method": args.worker, "rows": rows, "errors": errors, "digest": digest,
          "seconds": round(m["seconds"], 2), "cpu_seconds": round(m["cpu_seconds"], 2),
          "pairs_per_s": round(rows / m["seconds"]), "peak_rss_mb": round(m["peak_rss_mb"]),
          "loadavg_before": m["loadavg_before"], "loadavg_after": m["loadavg_after"],
          "polars": pl.__version__})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2_000_000)
    ap.add_argument("--max-field-chars", type=int, default=256, help="cut every real text first (0: real lengths)")
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--file-format", choices=list(METHODS), default="jsonl")
    ap.add_argument("--shape", choices=["standard", "conversational"], default="standard",
                    help="answers as text, or as [user, assistant] message lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method; the fastest is reported")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/ingest_throughput.json)")
    ap.add_argument("--input-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.file_format == "csv" and args.shape != "standard":
        ap.error("message lists cannot be CSV cells: --file-format csv takes --shape standard")
    ours, baseline = METHODS[args.file_format]
    if args.worker == "write-input":
        emit(write_input(Path(args.input_path), args.pairs, args.max_field_chars, args.seed, args.file_format,
                         args.shape))
        return 0
    if args.worker:
        worker(args)
        return 0

    pipeline_scale = Path(__file__).resolve().parent / "pipeline_scale.py"
    script = Path(__file__).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="ingest-input-"))
    try:
        path = tmp / f"preferences.{args.file_format}"
        print(f"writing {args.pairs:,} pairs as {args.file_format} (not timed) ...", flush=True)
        common = ["--pairs", str(args.pairs), "--input-path", str(path), "--max-field-chars",
                  str(args.max_field_chars), "--seed", str(args.seed)]
        if args.file_format == "jsonl" and args.shape == "standard":
            written = run_worker(pipeline_scale, ["--worker", "write", *common])
        else:
            written = run_worker(script, ["--worker", "write-input", "--file-format", args.file_format,
                                          "--shape", args.shape, *common])
        print(f"  {written['file_mb']:,} MB, {written['unparseable_lines']:,} malformed rows", flush=True)
        runs: dict[str, list[dict]] = {ours: [], baseline: []}
        for _ in range(args.repeats):
            for method in runs:
                r = run_worker(script, ["--worker", method, "--batch-rows", str(args.batch_rows),
                                        "--input-path", str(path)])
                runs[method].append(r)
                print(f"[{method}] {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s), "
                      f"{fmt_rate(r['pairs_per_s'])} pairs/s, peak RSS {r['peak_rss_mb']:,} MB, "
                      f"{r['errors']:,} rows with an error", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(v, key=lambda r: r["pairs_per_s"]) for k, v in runs.items()}
    same = len({(r["rows"], r["errors"], r["digest"]) for v in runs.values() for r in v}) == 1
    ratio = best[ours]["pairs_per_s"] / best[baseline]["pairs_per_s"]
    rss_ratio = best[ours]["peak_rss_mb"] / best[baseline]["peak_rss_mb"]
    print(f"\nsame rows (count, errors, row hashes): {same}")
    print(f"{ours} / {baseline}: {ratio:.2f}x pairs/s ({fmt_rate(best[ours]['pairs_per_s'])} against "
          f"{fmt_rate(best[baseline]['pairs_per_s'])}); peak RSS {best[ours]['peak_rss_mb']:,} against "
          f"{best[baseline]['peak_rss_mb']:,} MB ({rss_ratio:.2f}x)")
    saved = save_result("ingest_throughput", {
        "config": {"pairs": args.pairs, "max_field_chars": args.max_field_chars, "batch_rows": args.batch_rows,
                   "seed": args.seed, "repeats": args.repeats, "file_format": args.file_format, "shape": args.shape,
                   "input": f"bench/clean_throughput.py build_raw, written as {args.shape} {args.file_format}"},
        "input": written, "ours": ours, "baseline": baseline, ours: best[ours], baseline: best[baseline],
        "runs": runs, "same_rows": same, "ratio_pairs_per_s": ratio, "ratio_peak_rss": rss_ratio,
    }, args.out)
    print(f"saved {saved}")
    return 0 if same else 2


if __name__ == "__main__":
    sys.exit(main())
