"""Crash-safe training: a real training process killed with SIGKILL resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orpo_pipeline.config import SAMPLE_DATA_DIR, TrainSettings
from orpo_pipeline.data.clean import clean_preferences
from orpo_pipeline.data.ingest import iter_records, records_to_table
from orpo_pipeline.train.checkpoints import COMPLETE, checkpoint_key, last_complete_checkpoint
from orpo_pipeline.train.tokenize import tokenize_pairs
from orpo_pipeline.train.trainer import train_orpo_adapter

ROOT = Path(__file__).resolve().parents[1]
# 8 pairs, batch 2: 4 steps an epoch, so step 6 is inside the second epoch (the sampler's epoch-1 order and the
# skipped batches of a resumed epoch are both exercised)
SETTINGS = TrainSettings(max_steps=10, save_steps=2, save_minutes=0, logging_steps=1, per_device_train_batch_size=2,
                         precision="fp32", learning_rate=1e-3, warmup_ratio=0.1)


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    path = SAMPLE_DATA_DIR / "helpfulness.jsonl"
    kept = clean_preferences(records_to_table(iter_records(path), path.name)).kept.head(8)
    out = tmp_path_factory.mktemp("resume") / "train"
    tokenize_pairs(kept, AutoTokenizer.from_pretrained(tiny_model_dir), max_length=128,
                   min_completion_tokens=16).dataset.save_to_disk(str(out))
    return out


def _steps(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r for r in rows if "loss" in r}


def _start(spec: dict, tmp_path: Path, name: str) -> subprocess.Popen:
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.resume_worker", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_training_then_rerun_resumes_and_continues_the_loss_curve(data_dir, tiny_model_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints" / "run"
    spec = {"model_dir": str(tiny_model_dir), "data_dir": str(data_dir), "output_dir": str(tmp_path / "adapter"),
            "checkpoint_dir": str(checkpoints), "settings": SETTINGS.model_dump(),
            "steps_log": str(tmp_path / "first.jsonl"), "step_sleep_s": 0.5}
    first = _start(spec, tmp_path, "first")
    deadline = time.monotonic() + 240
    try:
        while not (checkpoints / "checkpoint-6" / COMPLETE).is_file():
            assert first.poll() is None, f"training ended before it could be killed: {first.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-6 within 240 s"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    killed_at = max(_steps(tmp_path / "first.jsonl"))
    assert 6 <= killed_at < SETTINGS.max_steps and not (tmp_path / "adapter").exists()
    assert last_complete_checkpoint(checkpoints) is not None

    second = _start({**spec, "steps_log": str(tmp_path / "second.jsonl"), "step_sleep_s": 0}, tmp_path, "second")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    resumed = _steps(tmp_path / "second.jsonl")
    assert summary["resumed_from_step"] >= 6 and summary["global_steps"] == SETTINGS.max_steps
    assert min(resumed) == summary["resumed_from_step"] + 1 and max(resumed) == SETTINGS.max_steps
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not checkpoints.exists()  # deleted once the adapter was saved

    # the same steps of one uninterrupted run (in this process): optimizer, schedule, RNG and data order were
    # restored, so the resumed losses are the uninterrupted ones up to float reduction order (fp32, rel 1e-4)
    reference = []
    train_orpo_adapter(tiny_model_dir, __import__("datasets").load_from_disk(str(data_dir)), tmp_path / "ref",
                       SETTINGS, 128, device="cpu", on_log=lambda step, logs: reference.append((step, logs)))
    ref = {step: logs for step, logs in reference if "loss" in logs}
    before = _steps(tmp_path / "first.jsonl")
    for step in before:
        assert before[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
    for step in resumed:
        for key in ("loss", "nll_loss", "log_odds_ratio", "learning_rate"):
            assert resumed[step][key] == pytest.approx(ref[step][key], rel=1e-4), (step, key)


def test_checkpoint_key_changes_with_data_model_or_training_settings_but_not_with_save_cadence():
    base = dict(dataset_digest="d1", base_model="m", settings=SETTINGS, max_length=128)
    key = checkpoint_key(**base)
    assert checkpoint_key(**{**base, "dataset_digest": "d2"}) != key
    assert checkpoint_key(**{**base, "base_model": "m2"}) != key
    assert checkpoint_key(**{**base, "settings": SETTINGS.model_copy(update={"learning_rate": 2e-3})}) != key
    assert checkpoint_key(**{**base, "num_processes": 2}) != key
    assert checkpoint_key(**{**base, "settings": SETTINGS.model_copy(update={"save_steps": 5, "save_minutes": 3})}) == key


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    from orpo_pipeline.train.checkpoints import discard_incomplete

    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in discard_incomplete(tmp_path)] == ["checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
