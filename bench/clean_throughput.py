"""Cleaning throughput: orpo_pipeline.data.clean.clean_preferences (polars) vs the same rules written with
Hugging Face `datasets` map/filter, the way a TRL user cleans preference data today.

Input: N synthetic pairs built by replicating and perturbing the real files in ../shared/data
(UltraFeedback 1k train + eval, LLaMA-Factory dpo_en_demo flattened to prompt/chosen/rejected strings),
built directly in polars in the schema of orpo_pipeline.data.ingest.RAW_SCHEMA by a separate process, which writes it
as an Arrow IPC file (and as parquet for "ours, in batches"). "ours" reads the IPC file before timing, so the
process it measures holds the input and the libraries, not what building the input freed (150-225 MiB of
polars' allocator pages when it was built in the same process). Neither building nor reading is timed.
Perturbations give every rule work: a variant tag appended to prompts (new pairs), every (pair, variant)
appearing twice (exact duplicates, or duplicates only after normalization: NFD, CRLF, trailing blanks,
BOM / zero-width / no-break spaces), chosen == rejected, empty or whitespace-only fields, unparseable rows.

Each method runs in its own fresh subprocess (peak RSS is its own). Before timing, both methods are run on
a small sample and must keep the same rows (same set of content hashes and the same split). The headline
figures of the result file a run replaces are kept in its "previous" field.

(The normalization prototype this file used to carry is now orpo_pipeline.data.clean itself: "ours".)

"ours, in batches" is orpo_pipeline.data.clean.clean_parquet_file: the same input written to a parquet file first (in
another process, not timed), then read, cleaned and written back (train, eval, rejects) batch by batch: what the
cleaned_preferences asset does. Its time includes reading the
input and writing kept + rejects to parquet; its peak RSS is that of a process that never holds the whole table.

    nice -n 19 .venv/bin/python bench/clean_throughput.py                      # 2M pairs, baseline 200k
    nice -n 19 .venv/bin/python bench/clean_throughput.py --pairs 100000 --baseline-pairs 20000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    SHARED_DATA,
    emit,
    fmt_rate,
    measure,
    rss_mb,
    run_worker,
    save_result,
    verdict,
)

TARGET_PAIRS_PER_S = 500_000
TARGET_RATIO = 10.0
# "3 GB" read as 3 GiB: RSS figures here are MiB (2**20 bytes), printed as MB. The decimal reading (3e9 bytes,
# 2,861 MiB) is checked and printed too.
TARGET_PEAK_RSS_MB = 3 * 1024
DECIMAL_3GB_MB = 3e9 / 2**20
EVAL_FRACTION = 0.2

# ---------------------------------------------------------------- input


def base_table():
    """The real pairs (1,500 rows), one row each, prompt as a plain string (all are single-turn once flattened)."""
    import polars as pl

    rows = []
    for name in ("train", "eval"):
        path = SHARED_DATA / "ultrafeedback_binarized_1k" / f"{name}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                o = json.loads(line)
                m = o.get("metadata") or {}
                rows.append((f"ultrafeedback/{name}.jsonl", o["prompt"], o["chosen"], o["rejected"],
                             m.get("score_chosen"), m.get("score_rejected")))
    for o in json.loads((SHARED_DATA / "llamafactory" / "dpo_en_demo.json").read_text(encoding="utf-8")):
        # flattened to TRL standard strings: the whole conversation becomes the prompt text
        prompt = "\n\n".join(m["value"] for m in o["conversations"])
        rows.append(("llamafactory/dpo_en_demo.json", prompt, o["chosen"]["value"], o["rejected"]["value"], None, None))
    return pl.DataFrame(rows, schema={"file": pl.String, "p": pl.String, "c": pl.String, "r": pl.String,
                                      "score_chosen": pl.Float64, "score_rejected": pl.Float64}, orient="row")


def build_raw(n: int, seed: int = 0, max_field_chars: int = 0):
    """N raw rows in RAW_SCHEMA. Row i is base pair i % B in replica i // B; replicas 2v and 2v+1 share
    variant v, so every (pair, variant) appears twice, in independently chosen surface forms.
    `max_field_chars` > 0 cuts every real text to that many characters first (shorter pairs; 0: real lengths)."""
    import polars as pl

    from orpo_pipeline.data.ingest import MESSAGE, RAW_SCHEMA

    base = base_table()
    if max_field_chars > 0:
        base = base.with_columns(pl.col("p", "c", "r").str.slice(0, max_field_chars))
    nb = len(base)
    # one lazy plan, collected once: the input is the only full-size table held in memory
    df = (
        pl.LazyFrame({"i": pl.int_range(0, n, dtype=pl.Int64, eager=True)})
        .with_columns(b=pl.col("i") % nb)
        .join(base.lazy().with_row_index("b").with_columns(pl.col("b").cast(pl.Int64)), on="b", how="left",
              maintain_order="left")
        .with_columns(v=(pl.col("i") // nb) // 2)
    )

    def u(k: int) -> pl.Expr:  # deterministic per-row uniform draw in [0, 1000)
        return (pl.col("i").hash(seed=seed * 7919 + k) % 1000).cast(pl.Int64)

    df = df.with_columns(form=u(1), special=u(2))
    # a new pair per variant (v = 0 is the original): the tag has accents so NFD/NFC has work on every row
    tag = pl.format("\n\n(variante n° {} — café, déjà vu)", pl.col("v"))
    df = df.with_columns(p=pl.when(pl.col("v") > 0).then(pl.col("p") + tag).otherwise(pl.col("p")))

    def surface(e: pl.Expr) -> pl.Expr:
        """The same text in another surface form; normalization maps it back."""
        f = pl.col("form")
        return (
            pl.when(f < 200).then(e.str.normalize("NFD"))  # 20% decomposed
            .when(f < 350).then(e.str.replace_all("\n", "  \r\n", literal=True) + "   ")  # 15% CRLF + trailing blanks
            .when(f < 450).then("\ufeff" + e.str.replace(" ", "\u00a0", literal=True) + "\u200b\n\n\n")  # 10% odd chars
            .when(f < 500).then(" \t" + e.str.replace_all("\n\n", "\n\n\n\n", literal=True) + "\t")  # 5% blank runs
            .otherwise(e)  # 50% as is
        )

    df = df.with_columns(p=surface(pl.col("p")), c=surface(pl.col("c")), r=surface(pl.col("r")))
    s = pl.col("special")
    df = df.with_columns(
        # 2%: rejected == chosen (half of them only equal after normalization)
        r=pl.when(s < 10).then(pl.col("c")).when(s < 20).then(pl.col("c") + " \u200b").otherwise(pl.col("r")),
        # 1%: chosen whitespace only; 0.5%: rejected empty
        c=pl.when((s >= 20) & (s < 30)).then(pl.lit(" \u00a0\n ")).otherwise(pl.col("c")),
    ).with_columns(
        r=pl.when((s >= 30) & (s < 35)).then(pl.lit("")).otherwise(pl.col("r")),
        p=pl.when((s >= 35) & (s < 45)).then(pl.lit(" \u200b ")).otherwise(pl.col("p")),  # 1% empty prompt content
    )
    error = (s >= 50) & (s < 55)  # 0.5% unparseable
    empty_list = (s >= 45) & (s < 50)  # 0.5% prompt without messages
    msg = pl.struct(role=pl.lit("user"), content=pl.col("p")).cast(MESSAGE)
    raw = df.select(
        source_file=pl.col("file"),
        source_row=pl.col("i") + 1,
        prompt=pl.when(error).then(None).when(empty_list).then(pl.lit([], dtype=pl.List(MESSAGE)))
        .otherwise(pl.concat_list(msg)),
        chosen=pl.when(error).then(None).otherwise(pl.col("c")),
        rejected=pl.when(error).then(None).otherwise(pl.col("r")),
        score_chosen=pl.col("score_chosen"),
        score_rejected=pl.col("score_rejected"),
        error=pl.when(error).then(pl.format("{}:{}: malformed JSON: Expecting value (column 1)",
                                            pl.col("file"), pl.col("i") + 1)).otherwise(None),
        error_reason=pl.when(error).then(pl.lit("unparseable")).otherwise(None),
        format=pl.lit("trl_standard"),
    )
    # follow RAW_SCHEMA as ingest defines it now: its columns, its order; a column we do not know is null
    names = raw.collect_schema().names()
    return raw.select(
        [(pl.col(k) if k in names else pl.lit(None)).cast(t).alias(k) for k, t in RAW_SCHEMA.items()]
    ).collect().rechunk()


def input_stats(raw) -> dict:
    import polars as pl

    text = raw.select(
        p=pl.col("prompt").list.eval(pl.element().struct.field("content").str.len_bytes()).list.sum().fill_null(0),
        c=pl.col("chosen").str.len_bytes().fill_null(0), r=pl.col("rejected").str.len_bytes().fill_null(0),
    ).sum_horizontal().sum()
    return {"rows": raw.height, "text_bytes": int(text), "mean_text_bytes_per_pair": round(text / max(raw.height, 1), 1),
            "estimated_size_mb": round(raw.estimated_size("mb"), 1)}


# Measured on this benchmark's input (polars 2.1, clean.py of session 9, input read from the IPC file): the
# worker's peak RSS was about 1.9 x the input's text bytes at 2M pairs cut to 256 characters and 1.5 x at 500k
# pairs at real lengths (input included), plus ~0.3 GB of interpreter and libraries (2.7 x before session 9).
PEAK_RSS_PER_TEXT_BYTE = 2.0
BASE_RSS_MB = 300


def projected_peak_mb(pairs: int, max_field_chars: int) -> float:
    import polars as pl

    base = base_table()
    if max_field_chars > 0:
        base = base.with_columns(pl.col("p", "c", "r").str.slice(0, max_field_chars))
    mean_bytes = base.select(pl.col("p", "c", "r").str.len_bytes().mean()).sum_horizontal().item()
    return BASE_RSS_MB + PEAK_RSS_PER_TEXT_BYTE * pairs * mean_bytes / 2**20


def available_mb() -> float:
    import re

    try:
        return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return 0.0


# ---------------------------------------------------------------- ours


def run_ours(raw):
    from orpo_pipeline.data.clean import clean_preferences

    return clean_preferences(raw, eval_fraction=EVAL_FRACTION)


# ---------------------------------------------------------------- baseline: datasets map/filter

def baseline_functions():
    """The same rules as orpo_pipeline.data.clean, written as a TRL user writes them for `datasets`."""
    import re
    import unicodedata

    import xxhash

    crlf = re.compile(r"\r\n?")
    zero_width = re.compile("[\u200b\u200c\u200d\ufeff]")
    odd_space = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
    trailing = re.compile(r"[ \t]+\n")
    blank_runs = re.compile(r"\n{3,}")
    # polars' strip_chars() trims Unicode White_Space (Rust str::trim); Python's str.strip() would also trim
    # \x1c-\x1f, so name the set explicitly to be rule-for-rule identical
    white_space = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009" \
                  "\u200a\u2028\u2029\u202f\u205f\u3000"

    def norm(s):
        if s is None:
            return None
        s = unicodedata.normalize("NFC", s)
        s = crlf.sub("\n", s)
        s = zero_width.sub("", s)
        s = odd_space.sub(" ", s)
        s = trailing.sub("\n", s)
        s = blank_runs.sub("\n\n", s)
        return s.strip(white_space)

    def normalize(ex):
        prompt = ex["prompt"]
        return {
            "prompt": None if prompt is None else [{"role": m["role"], "content": norm(m["content"])} for m in prompt],
            "chosen": norm(ex["chosen"]),
            "rejected": norm(ex["rejected"]),
        }

    def parseable(ex):
        return ex["error"] is None

    def not_empty(ex):
        p = ex["prompt"]
        return bool(p) and all(m["content"] for m in p) and bool(ex["chosen"]) and bool(ex["rejected"])

    def differ(ex):
        return ex["chosen"] != ex["rejected"]

    def add_hashes(ex):
        key = "\x1e".join(m["role"] + "\x1f" + m["content"] for m in ex["prompt"])
        content = key + "\x1d" + ex["chosen"] + "\x1d" + ex["rejected"]
        return {"prompt_hash": xxhash.xxh3_128_hexdigest(key.encode()),
                "content_hash": xxhash.xxh3_128_hexdigest(content.encode())}

    def make_first_seen():
        seen = set()

        def first_seen(ex):
            h = ex["content_hash"]
            if h in seen:
                return False
            seen.add(h)
            return True

        return first_seen

    cut = int(round(EVAL_FRACTION * 10_000))

    def add_split(ex):
        return {"split": "eval" if int(ex["prompt_hash"][:8], 16) % 10_000 < cut else "train"}

    return normalize, parseable, not_empty, differ, add_hashes, make_first_seen, add_split


def to_dataset(raw):
    import datasets

    return datasets.Dataset.from_polars(raw)


def run_baseline(ds, num_proc: int | None = None):
    """map/filter pipeline; stateless steps may use num_proc, first-seen dedup is sequential (a Python set)."""
    normalize, parseable, not_empty, differ, add_hashes, make_first_seen, add_split = baseline_functions()
    ds = ds.filter(parseable, num_proc=num_proc)
    ds = ds.map(normalize, num_proc=num_proc)
    ds = ds.filter(not_empty, num_proc=num_proc)
    ds = ds.filter(differ, num_proc=num_proc)
    ds = ds.map(add_hashes, num_proc=num_proc)
    ds = ds.filter(make_first_seen())  # must see rows in order, in one process
    ds = ds.map(add_split, num_proc=num_proc)
    return ds


# ---------------------------------------------------------------- workers


def worker_batched(args) -> None:
    """Clean the parquet file written by the write_input worker, batch by batch; nothing else in memory."""
    from orpo_pipeline.data.clean import clean_parquet_file

    out = Path(tempfile.mkdtemp(prefix="clean-batched-"))
    result: dict = {"method": "ours_batched", "pairs": args.pairs, "batch_rows": args.batch_rows}
    try:
        with measure() as m:
            totals = clean_parquet_file(Path(args.input_path), out, batch_rows=args.batch_rows,
                                        eval_fraction=EVAL_FRACTION)
        result.update(kept=totals["kept"], rejected=totals["rejected"], reasons=totals["reasons"],
                      batches=totals["batches"], output_mb=sum(f.stat().st_size for f in out.iterdir()) / 2**20)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result.update(seconds=m["seconds"], cpu_seconds=m["cpu_seconds"], pairs_per_s=args.pairs / m["seconds"],
                  pairs_per_cpu_s=args.pairs / max(m["cpu_seconds"], 1e-9), peak_rss_mb=m["peak_rss_mb"],
                  rss_before_mb=m["rss_before_mb"], peak_reset_at_start=m["peak_reset"],
                  loadavg_before=m["loadavg_before"], loadavg_after=m["loadavg_after"])
    emit(result)


def read_input(path: str):
    """The input table written by the write_input worker, read from its Arrow IPC file (no copy into polars)."""
    import polars as pl
    import pyarrow as pa

    with pa.OSFile(path, "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    return pl.from_arrow(table)


def write_input(raw, ipc_path: str, parquet_path: str | None) -> dict:
    import polars as pl
    import pyarrow as pa

    table = raw.to_arrow(compat_level=pl.CompatLevel.newest())
    with pa.OSFile(ipc_path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    out = {"ipc_mb": Path(ipc_path).stat().st_size / 2**20}
    if parquet_path:
        raw.write_parquet(parquet_path)
        out["file_mb"] = Path(parquet_path).stat().st_size / 2**20
    return out


def worker(args) -> None:
    import polars as pl

    if args.worker == "ours_batched":
        worker_batched(args)
        return
    t0 = time.perf_counter()
    if args.worker == "ours":
        raw = read_input(args.input_path)
    else:
        raw = build_raw(args.pairs, seed=args.seed, max_field_chars=args.max_field_chars)
    build_s = time.perf_counter() - t0
    # ours measures its input after the run: its list.eval would leave freed memory in the process it measures
    stats = input_stats(raw) if args.worker != "ours" else {}
    result: dict = {"method": args.worker, "pairs": args.pairs, "build_seconds": round(build_s, 2), "input": stats,
                    "input_from": "Arrow IPC file" if args.worker == "ours" else "built here",
                    "rss_after_build_mb": rss_mb(), "polars_threads": pl.thread_pool_size()}
    if args.worker == "ours":
        # Once per process, whatever the input size: the code point tables (~0.5 s) and loading the compiled
        # kernels (~0.6 s). Timed apart, on 100 rows; pairs_per_s_with_setup counts it in.
        t1 = time.perf_counter()
        run_ours(raw.head(100))
        result["setup_seconds"] = round(time.perf_counter() - t1, 2)
        with measure() as m:
            res = run_ours(raw)
        result.update(kept=res.kept.height, rejected=res.rejects.height, reasons=res.reason_counts(),
                      pairs_per_s_with_setup=round(args.pairs / (m["seconds"] + result["setup_seconds"])))
        stats = result["input"] = input_stats(raw)
    elif args.worker == "baseline":
        t1 = time.perf_counter()
        ds = to_dataset(raw)
        result["from_polars_seconds"] = round(time.perf_counter() - t1, 2)  # not timed: the user already has a Dataset
        del raw
        with measure() as m:
            out = run_baseline(ds, num_proc=args.baseline_num_proc)
        result.update(kept=len(out), rejected=args.pairs - len(out), num_proc=args.baseline_num_proc)
    elif args.worker == "write_input":
        result.update(write_input(raw, args.input_path, args.parquet_path))
        emit(result)
        return
    elif args.worker == "check":
        res = run_ours(raw)
        ours = set(res.kept.select(pl.format("{}:{}", "split", "content_hash")).to_series().to_list())
        out = run_baseline(to_dataset(raw), num_proc=args.baseline_num_proc)
        theirs = {f"{s}:{h}" for s, h in zip(out["split"], out["content_hash"])}
        result.update(kept_ours=res.kept.height, kept_baseline=len(out), reasons=res.reason_counts(),
                      same_keys=ours == theirs, only_ours=len(ours - theirs), only_baseline=len(theirs - ours))
        emit(result)
        return
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    result.update(seconds=m["seconds"], cpu_seconds=m["cpu_seconds"], pairs_per_s=args.pairs / m["seconds"],
                  pairs_per_cpu_s=args.pairs / max(m["cpu_seconds"], 1e-9),
                  mb_per_s=stats["text_bytes"] / 2**20 / m["seconds"], peak_rss_mb=m["peak_rss_mb"],
                  rss_before_mb=m["rss_before_mb"], peak_reset_at_start=m["peak_reset"],
                  peak_rss_increase_mb=m["peak_rss_mb"] - (m["rss_before_mb"] or 0),
                  loadavg_before=m["loadavg_before"], loadavg_after=m["loadavg_after"])
    emit(result)


# ---------------------------------------------------------------- main


def previous_result(out: str | None) -> dict | None:
    """The headline figures of the result file this run will replace (same --out), to keep before/after."""
    path = Path(out) if out else RESULTS_DIR / "clean_throughput.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours, base = old.get("ours") or {}, old.get("baseline") or {}
    return {"file": path.name, "timestamp_utc": old.get("timestamp_utc"), "ours_pairs_per_s": ours.get("pairs_per_s"),
            "ours_cpu_seconds": ours.get("cpu_seconds"), "ours_peak_rss_mb": ours.get("peak_rss_mb"),
            "ours_loadavg_before": ours.get("loadavg_before"), "baseline_pairs_per_s": base.get("pairs_per_s"),
            "ratio": old.get("ratio"), "prototype_pairs_per_s": (old.get("prototype") or {}).get("pairs_per_s")}


def _show(label: str, r: dict) -> None:
    print(f"  {label}: {r['seconds']:.2f} s wall ({r['cpu_seconds']:.2f} s CPU), {fmt_rate(r['pairs_per_s'])} pairs/s, "
          f"{r['mb_per_s']:.1f} MB/s of text, peak RSS {r['peak_rss_mb']:,.0f} MB (input resident before: "
          f"{r['rss_before_mb']:,.0f} MB), load {r['loadavg_before']} -> {r['loadavg_after']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2_000_000, help="pairs cleaned by ours (default 2,000,000)")
    ap.add_argument("--baseline-pairs", type=int, default=200_000,
                    help="pairs cleaned by the datasets baseline (default 200,000: it is slow; pairs/s are compared)")
    ap.add_argument("--check-pairs", type=int, default=30_000, help="sample on which both must keep the same rows")
    ap.add_argument("--baseline-num-proc", type=int, default=None,
                    help="num_proc for the baseline's stateless map/filter steps (default: none, one process)")
    ap.add_argument("--max-field-chars", type=int, default=0,
                    help="cut every real text to this many characters before replicating (default 0: real lengths)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of ours (fresh process each); the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="run even if the projected peak RSS exceeds 80%% of "
                    "the memory available")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/clean_throughput.json)")
    ap.add_argument("--batch-rows", type=int, default=50_000, help="rows per batch for 'ours, in batches'")
    ap.add_argument("--no-batched", action="store_true", help="skip 'ours, in batches'")
    ap.add_argument("--input-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parquet-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    script = Path(__file__).resolve()
    previous = previous_result(args.out)
    need_mb, avail_mb = projected_peak_mb(args.pairs, args.max_field_chars), available_mb()
    print(f"projected peak RSS of ours: ~{need_mb:,.0f} MB; memory available now: {avail_mb:,.0f} MB", flush=True)
    if avail_mb and need_mb > 0.8 * avail_mb and not args.force:
        print("refusing to start: this machine is shared and the run would take most of its memory. Use fewer "
              "--pairs, a --max-field-chars cap, or --force.")
        return 3
    common = ["--seed", str(args.seed), "--max-field-chars", str(args.max_field_chars)]
    if args.baseline_num_proc:
        common += ["--baseline-num-proc", str(args.baseline_num_proc)]
    print(f"[check] ours and baseline on {args.check_pairs:,} pairs ...", flush=True)
    check = run_worker(script, ["--worker", "check", "--pairs", str(args.check_pairs), *common])
    print(f"  kept: ours {check['kept_ours']:,}, baseline {check['kept_baseline']:,}; same content keys and split: "
          f"{check['same_keys']} (only ours {check['only_ours']}, only baseline {check['only_baseline']})")
    print(f"  reject reasons (ours): {check['reasons']}")
    if check["kept_ours"] != check["kept_baseline"] or not check["same_keys"]:
        print("ERROR: the baseline does not implement the same rules; figures would not be comparable")
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="clean-input-"))
    try:
        ipc_path, parquet_path = str(tmp / "raw.arrow"), str(tmp / "raw.parquet")
        print(f"[input] building {args.pairs:,} pairs in another process, written as Arrow IPC"
              f"{'' if args.no_batched else ' and parquet'} (not timed) ...", flush=True)
        written = run_worker(script, ["--worker", "write_input", "--pairs", str(args.pairs), "--input-path", ipc_path,
                                      *([] if args.no_batched else ["--parquet-path", parquet_path]), *common])
        runs = []
        for k in range(args.repeats):
            print(f"[ours] orpo_pipeline.data.clean.clean_preferences on {args.pairs:,} pairs (run {k + 1}/{args.repeats}) ...",
                  flush=True)
            runs.append(run_worker(script, ["--worker", "ours", "--pairs", str(args.pairs), "--input-path", ipc_path,
                                            *common]))
            _show("ours", runs[-1])
        ours = min(runs, key=lambda r: r["seconds"])

        batched = None
        if not args.no_batched:
            print(f"[ours, in batches] clean_parquet_file, {args.batch_rows:,} rows per batch ...", flush=True)
            batched = run_worker(script, ["--worker", "ours_batched", "--pairs", str(args.pairs), "--input-path",
                                          parquet_path, "--batch-rows", str(args.batch_rows), *common])
            batched.update(input_file_mb=written["file_mb"], input=written["input"],
                           mb_per_s=written["input"]["text_bytes"] / 2**20 / batched["seconds"])
            _show("ours, in batches", batched)
            if (batched["kept"], batched["reasons"]) != (ours["kept"], ours["reasons"]):
                print("ERROR: cleaning in batches kept or rejected differently from cleaning the whole table")
                return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"[baseline] datasets map/filter on {args.baseline_pairs:,} pairs ...", flush=True)
    base = run_worker(script, ["--worker", "baseline", "--pairs", str(args.baseline_pairs), *common])
    _show("baseline", base)

    ratio = ours["pairs_per_s"] / base["pairs_per_s"]
    targets = {
        "ours_pairs_per_s>=500k": ours["pairs_per_s"] >= TARGET_PAIRS_PER_S,
        "ratio>=10x": ratio >= TARGET_RATIO,
        "ours_peak_rss<3GB": ours["peak_rss_mb"] < TARGET_PEAK_RSS_MB,
        "ours_peak_rss<3e9_bytes": ours["peak_rss_mb"] < DECIMAL_3GB_MB,
    }
    print("\nsummary")
    print(f"  input     {ours['input']['mean_text_bytes_per_pair']:,.0f} bytes of text per pair on average")
    print(f"  ours      {fmt_rate(ours['pairs_per_s']):>10} pairs/s  ({args.pairs:,} pairs)  "
          f"peak RSS {ours['peak_rss_mb']:,.0f} MB")
    if "setup_seconds" in ours:
        print(f"            {fmt_rate(ours['pairs_per_s_with_setup']):>10} pairs/s counting the once-per-process setup "
              f"({ours['setup_seconds']:.2f} s: code point tables, compiled kernels)")
    print(f"  baseline  {fmt_rate(base['pairs_per_s']):>10} pairs/s  ({args.baseline_pairs:,} pairs)  "
          f"peak RSS {base['peak_rss_mb']:,.0f} MB")
    print(f"  ratio     {ratio:.1f}x   (CPU-time ratio {ours['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:.1f}x)")
    if args.baseline_pairs != args.pairs:
        print(f"  note: the baseline ran on {args.baseline_pairs:,} pairs, ours on {args.pairs:,}; pairs/s are compared")
    print(f"  target ours >= {TARGET_PAIRS_PER_S:,} pairs/s: {verdict(targets['ours_pairs_per_s>=500k'])}")
    print(f"  target ratio >= {TARGET_RATIO:.0f}x: {verdict(targets['ratio>=10x'])}")
    print(f"  target ours peak RSS < 3 GiB (3,072 MiB): {verdict(targets['ours_peak_rss<3GB'])}; "
          f"< 3e9 bytes (2,861 MiB): {verdict(targets['ours_peak_rss<3e9_bytes'])}")
    if batched:
        targets["ours_batched_peak_rss<3GB"] = batched["peak_rss_mb"] < TARGET_PEAK_RSS_MB
        print(f"  ours, in batches: {fmt_rate(batched['pairs_per_s'])} pairs/s (parquet in and out included), "
              f"peak RSS {batched['peak_rss_mb']:,.0f} MB: peak RSS < 3 GiB {verdict(targets['ours_batched_peak_rss<3GB'])}")

    path = save_result("clean_throughput", {
        "config": {"pairs": args.pairs, "baseline_pairs": args.baseline_pairs, "check_pairs": args.check_pairs,
                   "baseline_num_proc": args.baseline_num_proc, "max_field_chars": args.max_field_chars,
                   "repeats": args.repeats, "seed": args.seed, "eval_fraction": EVAL_FRACTION,
                   "input": "replicated + perturbed ultrafeedback_binarized_1k train+eval and llamafactory "
                            "dpo_en_demo (flattened), built in polars in RAW_SCHEMA by another process; ours reads "
                            "it from an Arrow IPC file, in batches from parquet; neither build nor read timed",
                   "ours": "orpo_pipeline.data.clean.clean_preferences(raw) (kept + rejects tables)",
                   "baseline": "datasets.Dataset.from_polars (not timed) then filter/map/filter/filter/map/"
                               "filter(xxh3-128 + Python set)/map, same rules"},
        "check": check,
        "ours": ours,
        "ours_runs": runs,
        "ours_batched": batched,
        "baseline": base,
        "ratio": ratio,
        "previous": previous,
        "targets": {"pairs_per_s": TARGET_PAIRS_PER_S, "ratio": TARGET_RATIO, "peak_rss_mb": TARGET_PEAK_RSS_MB,
                    "met": targets},
    }, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
