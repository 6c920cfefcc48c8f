"""Shared helpers for the benchmarks: environment description, memory probes, worker subprocesses, results.

Each benchmark runs every measured method in a fresh worker subprocess (the same script, re-invoked with
`--worker NAME`), so each method's peak RSS is its own and one method's garbage never slows the other.
A worker prints exactly one JSON line prefixed with RESULT_TAG on stdout.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_TAG = "BENCH_RESULT "
LIBRARIES = ("polars", "polars-hash", "orjson", "ijson", "xxhash", "datasets", "transformers", "tokenizers", "trl", "torch", "pyarrow")

# Quiet, offline, reproducible: set before any library import in the workers (they inherit the environment).
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


# ---------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_device() -> dict:
    """CPU model and cores (online and usable by this process), memory, and torch/CUDA when installed."""
    info: dict = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_gb": None,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "nice": os.nice(0),
        "polars_max_threads": os.environ.get("POLARS_MAX_THREADS"),
    }
    try:
        meminfo = Path("/proc/meminfo").read_text()
        info["memory_total_gb"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # torch absent or broken: say so, do not fail the benchmark
        info["torch"] = f"unavailable ({type(e).__name__})"
    return info


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- memory

def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process, falling back to getrusage."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measure():
    """Time a block and its peak RSS. The peak is measured from the block's start where the kernel allows
    resetting VmHWM (so building the input beforehand does not count); it always includes what was already
    resident (the input table), reported separately as rss_before_mb."""
    import gc

    gc.collect()
    stats: dict = {"rss_before_mb": rss_mb(), "peak_reset": reset_peak_rss(), "loadavg_before": load_average()}
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    yield stats
    stats["seconds"] = time.perf_counter() - t0
    stats["cpu_seconds"] = cpu_seconds() - c0  # user + system, all threads of this process
    stats["peak_rss_mb"] = peak_rss_mb()
    stats["rss_after_mb"] = rss_mb()
    stats["loadavg_after"] = load_average()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: the machine is shared, so a busy neighbour shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------- workers

def emit(result: dict) -> None:
    """Called by a worker: hand its result to the parent."""
    sys.stdout.write(RESULT_TAG + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def run_worker(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run `script --worker ...` in a fresh process; return its result plus the child's own ru_maxrss."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"worker {args} timed out after {timeout} s\n{err[-3000:]}")
    # communicate() already reaped the child; its rusage is folded into RUSAGE_CHILDREN, which is a max over
    # all children, so each worker's own peak comes from the worker itself (VmHWM) and this is a cross-check.
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed with exit code {proc.returncode}\n{err[-5000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"worker {args} printed no result\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["worker_wall_seconds"] = round(wall, 2)
    result["children_max_rss_mb_so_far"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


# ---------------------------------------------------------------- results

def code_version() -> dict:
    """The commit the figures were measured on, and whether the working tree differed from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    # results files are written by the run itself: a tree dirty only there measured the committed code
    changed = [line[3:] for line in status.stdout.splitlines() if not line[3:].startswith("bench/results/")]
    return {"commit": commit.stdout.strip(), "dirty": bool(changed)}


def save_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write results JSON: to `out` if given, else bench/results/<name>.json (latest) and a timestamped copy."""
    payload = {"benchmark": name, "timestamp_utc": utc_now(), "device": describe_device(),
               "versions": library_versions(), "code": code_version(), **payload}
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = payload["timestamp_utc"].replace(":", "").replace("-", "")
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(text)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(text)
    return path


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"
