"""Quality (issue 18): our ORPO trainer against stock TRL 1.16 `trl.experimental.orpo.ORPOTrainer`.

SmolLM2-135M-Instruct trained on the first --pairs pairs of a seeded shuffle of
ultrafeedback_binarized_1k/train.jsonl, one epoch, max_length 512, the same hyperparameters on both sides
(TrainSettings defaults: lr 5e-4, beta 0.1, cosine with 5% warmup, LoRA r16/alpha32 on all projections,
precision auto), effective batch 8 (2 x 4 accumulation, so both fit in memory on a laptop CPU).

- ours  = `orpo_pipeline.train.trainer.train_orpo_adapter` over `orpo_pipeline.train.tokenize.tokenize_pairs`
- stock = `ORPOTrainer` given the raw conversational pairs, `ORPOConfig(max_length=512, ...)` and the same
          `peft.LoraConfig`

Both adapters are merged with `orpo_pipeline.models.merge.merge_adapter`. The base and both tuned models are then
scored on the 200 held-out pairs of eval.jsonl (`orpo_pipeline.models.evaluate.score_preferences`, our tokenization,
binomial stderr) and through lm-eval (`orpo_pipeline.models.benchmarks`) on TruthfulQA MC2 and ARC-Challenge built
from ../shared/data (same --limit for all three models, zero-shot, no chat template: lm-eval's defaults).

Each side trains in a fresh subprocess; finished stages are kept in --work, so a re-run resumes.

    nohup nice -n 10 .venv/bin/python bench/quality_vs_trl.py > /tmp/quality.log 2>&1 &
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import describe_device, utc_now  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TRAIN = SHARED / "ultrafeedback_binarized_1k" / "train.jsonl"
EVAL = SHARED / "ultrafeedback_binarized_1k" / "eval.jsonl"
RESULTS = ROOT / "bench" / "results"
MAX_LENGTH = 512  # the issue's; --max-length overrides it where the machine is too slow
SETTINGS = dict(num_train_epochs=1.0, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                logging_steps=4, seed=42)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # chosen == rejected teaches nothing and both trainers would see it; drop it on both sides alike
    return [r for r in rows if r["chosen"] != r["rejected"]]


def train_pairs(n: int) -> list[dict]:
    rows = read_pairs(TRAIN)
    random.Random(0).shuffle(rows)
    return rows[:n]


def as_table(rows: list[dict], name: str):
    import polars as pl

    return pl.DataFrame({
        "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
        "chosen": [r["chosen"] for r in rows],
        "rejected": [r["rejected"] for r in rows],
        "content_hash": [hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in rows],
        "source_file": [name] * len(rows),
        "source_row": list(range(1, len(rows) + 1)),
    })


def settings():
    from orpo_pipeline.config import TrainSettings

    return TrainSettings(**SETTINGS)


def worker_ours(model_dir: Path, n: int, out: Path) -> dict:
    from transformers import AutoTokenizer

    from orpo_pipeline.train.tokenize import tokenize_pairs
    from orpo_pipeline.train.trainer import train_orpo_adapter

    tok = AutoTokenizer.from_pretrained(model_dir)
    split = tokenize_pairs(as_table(train_pairs(n), TRAIN.name), tok, max_length=MAX_LENGTH)
    result = train_orpo_adapter(model_dir, split.dataset, out, settings(), MAX_LENGTH, device="cpu")
    return {"pairs_trained": len(split.dataset), "dropped": len(split.dropped), "steps": result.global_steps,
            "train_runtime_s": result.train_runtime_s, "all_logged_losses_finite": result.all_losses_finite,
            "history": result.history}


def worker_stock(model_dir: Path, n: int, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from orpo_pipeline.train.trainer import use_bf16

    s = settings()
    rows = train_pairs(n)
    ds = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    torch.manual_seed(s.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bf16 = use_bf16(s, "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # as a user runs it on CPU
    model.config.pad_token_id = tok.pad_token_id
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.lora_target_modules, task_type="CAUSAL_LM")
    args = ORPOConfig(
        output_dir=str(out.parent / "stock-trainer"), beta=s.beta, max_length=MAX_LENGTH,
        learning_rate=s.learning_rate, num_train_epochs=s.num_train_epochs,
        per_device_train_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, warmup_steps=s.warmup_ratio,
        lr_scheduler_type=s.lr_scheduler_type, weight_decay=s.weight_decay, bf16=bf16, fp16=False, use_cpu=True,
        optim="adamw_torch", logging_steps=s.logging_steps, save_strategy="no", eval_strategy="no",
        report_to="none", seed=s.seed, dataloader_num_workers=0,
    )
    history: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            history.append({"step": state.global_step, **{k: float(v) for k, v in (logs or {}).items()
                                                          if isinstance(v, (int, float))}})

    trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                          callbacks=[Keep()])
    t0 = time.perf_counter()
    res = trainer.train()
    runtime = time.perf_counter() - t0
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    losses = [h["loss"] for h in history if "loss" in h]
    empty = sum(all(x == -100 for x in c) or all(x == -100 for x in r) for c, r in
                zip(trainer.train_dataset["chosen_labels"], trainer.train_dataset["rejected_labels"]))
    return {"pairs_trained": len(ds), "steps": res.global_step, "train_runtime_s": runtime,
            "all_logged_losses_finite": all(math.isfinite(x) for x in losses) if losses else None,
            "pairs_with_an_empty_completion": empty, "history": history}


def train_both(model_dir: Path, n: int, work: Path, parallel: bool = False) -> dict:
    """Each side in its own subprocess: one after the other (two at once on 2 cores oversubscribe the CPU, each
    step ~10x slower), or both at once with --parallel (on a machine with cores to spare)."""
    procs = {}
    for side in ("ours", "stock"):
        if (work / f"{side}.json").is_file() and (work / f"{side}-merged" / "config.json").is_file():
            log(f"{side}: already trained in {work}")
            continue
        log(f"{side}: training on {n} pairs")
        procs[side] = subprocess.Popen([sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir),
                                        "--pairs", str(n), "--work", str(work), "--max-length", str(MAX_LENGTH)],
                                       cwd=ROOT, stdout=open(work / f"{side}.log", "w"), stderr=subprocess.STDOUT)
        if not parallel and procs[side].wait() != 0:
            raise SystemExit(f"{side} worker failed with exit code {procs[side].returncode}; see {work / (side + '.log')}")
    for side, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{side} worker failed with exit code {proc.returncode}; see {work / (side + '.log')}")
    return {side: json.loads((work / f"{side}.json").read_text()) for side in ("ours", "stock")}


def worker(side: str, model_dir: Path, n: int, work: Path) -> None:
    from orpo_pipeline.models.merge import merge_adapter

    adapter = work / f"{side}-adapter"
    info = (worker_ours if side == "ours" else worker_stock)(model_dir, n, adapter)
    merge_adapter(model_dir, adapter, work / f"{side}-merged", dtype="fp32")
    info["merged_weights_finite"] = weights_finite(work / f"{side}-merged")
    (work / f"{side}.json").write_text(json.dumps(info, indent=1))
    log(f"{side}: {info['steps']} steps in {info['train_runtime_s']:.0f} s")


def weights_finite(model_dir: Path) -> bool:
    """A NaN loss can leave NaN weights while the Trainer's logged loss hides it (logging_nan_inf_filter)."""
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for f in sorted(model_dir.glob("*.safetensors"))
               for t in load_file(str(f)).values() if t.is_floating_point())


def preference_accuracy(model_dir: Path, tokenizer_dir: Path, max_pairs: int) -> dict:
    from transformers import AutoTokenizer

    from orpo_pipeline.models.evaluate import load_for_eval, score_preferences
    from orpo_pipeline.train.tokenize import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tokenize_pairs(as_table(read_pairs(EVAL), EVAL.name), tok, max_length=MAX_LENGTH).dataset
    model, tok = load_for_eval(model_dir, tokenizer_dir)
    s = score_preferences(model, tok, data, batch_size=4, max_pairs=max_pairs)
    p, n = s["preference_accuracy"], s["pairs"]
    return {"preference_accuracy": p, "preference_accuracy_stderr": math.sqrt(p * (1 - p) / n), "pairs": n,
            "mean_log_odds_margin": s["mean_log_odds_margin"], "chosen_nll": s["chosen_nll"]}


def lm_eval_scores(model_dir: Path, limit: int, out: Path) -> dict:
    from orpo_pipeline.models.benchmarks import run_tasks

    return run_tasks(model_dir, ["truthfulqa_mc2", "arc_challenge"], benchmark_dir=SHARED / "benchmarks",
                     limit=limit, output_dir=out)


def main() -> None:
    global MAX_LENGTH
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--limit", type=int, default=100, help="lm-eval questions per task, the same for all models")
    ap.add_argument("--work", default="/tmp/quality_vs_trl", help="models and per-stage results (resumable)")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH)
    ap.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs of eval.jsonl scored per model")
    ap.add_argument("--worker", choices=["ours", "stock"])
    ap.add_argument("--stage", choices=["all", "train"], default="all")
    ap.add_argument("--parallel", action="store_true", help="train both sides at once (default: one after the other)")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="base model name for resolve_base_model (tiny-random-llama: a smoke run of this script)")
    a = ap.parse_args()
    MAX_LENGTH = a.max_length
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker, Path(a.model_dir), a.pairs, work)
        return
    from orpo_pipeline.models.base import resolve_base_model

    base = resolve_base_model(a.model, work / "models")
    started = utc_now()
    train = train_both(base, a.pairs, work, a.parallel)
    if a.stage == "train":
        return
    models = {"base": base, "ours": work / "ours-merged", "stock": work / "stock-merged"}
    scores: dict = {}
    for name, path in models.items():
        cached = work / f"scores-{name}-{a.limit}.json"
        if cached.is_file():
            scores[name] = json.loads(cached.read_text())
            continue
        log(f"scoring {name}: preference accuracy on {EVAL.name}")
        t0 = time.perf_counter()
        s = {"eval_jsonl": preference_accuracy(path, path, a.eval_pairs)}
        log(f"scoring {name}: lm-eval truthfulqa_mc2 + arc_challenge, limit {a.limit}")
        s["lm_eval"] = lm_eval_scores(path, a.limit, work / f"lm_eval-{name}")
        s["seconds"] = round(time.perf_counter() - t0, 1)
        cached.write_text(json.dumps(s, indent=1))
        scores[name] = s
    result = {
        "benchmark": "quality_vs_trl", "started_utc": started, "finished_utc": utc_now(), "device": describe_device(),
        "config": {"model": a.model, "pairs": a.pairs, "max_length": MAX_LENGTH, "lm_eval_limit": a.limit, "eval_pairs": a.eval_pairs, "train_settings":
                   settings().model_dump(), "train_data": str(TRAIN), "eval_data": str(EVAL)},
        "training": {k: {kk: vv for kk, vv in v.items() if kk != "history"} | {"final_logs": v["history"][-2:]}
                     for k, v in train.items()},
        "scores": scores,
        "verdict": verdict(scores),
    }
    RESULTS.mkdir(exist_ok=True)
    smoke = "" if a.model == "smollm2-135m-instruct" else f"_{a.model}"
    path = RESULTS / f"quality_vs_trl{smoke}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    print(json.dumps(result["verdict"], indent=1))


def _metrics(s: dict) -> dict[str, tuple[float, float]]:
    out = {"preference_accuracy": (s["eval_jsonl"]["preference_accuracy"], s["eval_jsonl"]["preference_accuracy_stderr"])}
    for task, m in s["lm_eval"]["tasks"].items():
        out[f"{task}/{m['metric']}"] = (m["value"], m["stderr"] or 0.0)
    return out


def verdict(scores: dict) -> dict:
    ours, stock, base = (_metrics(scores[k]) for k in ("ours", "stock", "base"))
    rows = {}
    for m in ours:
        (o, oe), (s, se), (b, _) = ours[m], stock[m], base[m]
        # a NaN score (NaN weights) loses every comparison
        rows[m] = {"base": b, "ours": o, "stock": s, "ours_minus_stock": o - s,
                   "combined_stderr": math.hypot(oe, se),
                   "ours_at_least_stock_within_stderr": math.isnan(s) or o >= s - math.hypot(oe, se)}
    return {"per_metric": rows,
            "ours_at_least_stock_on_every_metric": all(r["ours_at_least_stock_within_stderr"] for r in rows.values()),
            "ours_ahead_of_base_on_preference_accuracy": ours["preference_accuracy"][0] > base["preference_accuracy"][0]}


if __name__ == "__main__":
    main()
