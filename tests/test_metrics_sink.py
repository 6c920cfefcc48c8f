"""Step metrics cannot stall training: a real `mlflow server` killed mid-training, and a receiver that hangs."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import datasets

from orpo_pipeline.config import TrainSettings
from orpo_pipeline.train.metrics_sink import MetricsSink
from orpo_pipeline.train.trainer import train_orpo_adapter

from .test_resume import data_dir  # noqa: F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    # its own session: the server and its worker processes are one process group, killed together by its id
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
                              start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def test_training_finishes_and_warns_within_seconds_when_the_mlflow_server_dies(data_dir, tiny_model_dir, tmp_path):  # noqa: F811
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    server, url = _start_mlflow_server(tmp_path)
    try:
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("sink")).info.run_id
        warnings: list[tuple[float, str]] = []
        sink = MetricsSink(lambda step, metrics: client.log_batch(run_id, metrics=metrics), maxsize=4,
                           stall_after_s=2, warn=lambda msg: warnings.append((time.monotonic(), msg)))
        killed_at, put_seconds = [], []

        def on_log(step, logs):
            t = time.monotonic()
            sink.put(step, [Metric(k, float(v), int(time.time() * 1000), step) for k, v in logs.items()])
            put_seconds.append((step, time.monotonic() - t))
            if step == 3:
                deadline = time.monotonic() + 60
                while sink.stats.sent < 3:  # the server took the first steps before it dies
                    assert time.monotonic() < deadline, "the live server took no metrics within 60 s"
                    time.sleep(0.05)
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
                killed_at.append(time.monotonic())
            elif killed_at:
                time.sleep(0.3)  # slower steps after the kill, so the warning has to come while training runs

        settings = TrainSettings(max_steps=30, logging_steps=1, per_device_train_batch_size=2, precision="fp32")
        result = train_orpo_adapter(tiny_model_dir, datasets.load_from_disk(str(data_dir)), tmp_path / "adapter",
                                    settings, 128, device="cpu", on_log=on_log)
        ended = time.monotonic()
        t = time.monotonic()
        stats = sink.close(timeout_s=2)
        close_s = time.monotonic() - t
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert result.global_steps == 30 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert stats.sent >= 3 and stats.dropped > 0 and stats.dropped + stats.undelivered + stats.sent + stats.failed >= 30
    first_warning = next(t for t, msg in warnings if "has not answered" in msg)
    assert first_warning - killed_at[0] < 10 and first_warning < ended, warnings
    assert any("dropping" in msg for _, msg in warnings) and any("not delivered" in msg for _, msg in warnings)
    assert max(s for step, s in put_seconds if step > 3) < 0.5  # put never waited for the dead server
    assert close_s < 5


def test_a_hung_receiver_never_blocks_put_and_close_gives_up_in_time():
    hang, warnings = threading.Event(), []
    sink = MetricsSink(lambda step, payload: hang.wait(), maxsize=2, stall_after_s=0.5, warn=warnings.append)
    accepted: list[bool] = []
    putter = threading.Thread(target=lambda: accepted.extend(sink.put(step, {"loss": 1.0}) for step in range(10)))
    putter.start()
    putter.join(timeout=0.5)
    assert not putter.is_alive(), "put waited for a receiver that hangs"
    assert accepted.count(True) <= 3 and sink.stats.dropped >= 7  # one in flight, two queued, the rest dropped
    time.sleep(1.0)
    assert any("has not answered" in w for w in warnings)
    t = time.monotonic()
    stats = sink.close(timeout_s=0.5)
    assert time.monotonic() - t < 1.5 and stats.undelivered >= 1 and stats.sent == 0
    hang.set()
