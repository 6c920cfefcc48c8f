"""A real Ray head on 127.0.0.1 for the tests, started with `ray start --head --block` and stopped by its own pids."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from resources.compute import free_port

# a driver in this process (Ray Data in the tests) would otherwise poll for usage metrics on localhost:9090
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# a loopback-only test cluster; Ray would otherwise turn token auth on whenever ~/.ray/auth_token exists
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray turns 127.0.0.1 into the machine's routable address (its multi-node default); this switch, named for
# Windows/macOS but read on every platform, keeps the head, its workers and drivers on loopback only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    process: subprocess.Popen


def _wait_http(url: str, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not answer {url} within {timeout:.0f}s")


def _wait_job_agent(url: str, timeout: float) -> None:
    """Run one trivial job: the dashboard answers before its job agent can take submissions."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(url), time.monotonic() + timeout
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while not client.get_job_status(job).is_terminal():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm-up job did not end within {timeout:.0f}s")
        time.sleep(0.5)


def _stop(process: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM `ray start --block` and everything it started (by pid), then SIGKILL what is left."""
    try:
        family = [process.pid] + [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [process.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, alive = psutil.wait_procs([p for p in map(_proc, family) if p is not None], timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=timeout)


def _proc(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 240):
    """A one-node cluster: GCS, raylet, dashboard (the job server dagster-ray submits to)."""
    # Ray's socket paths must stay short; a pytest tmp_path is too long for them
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port, dash = free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        # the job's entrypoint `python` and Ray's workers must be this venv's interpreter
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--object-store-memory", str(200 * 2**20),
           "--temp-dir", temp, "--disable-usage-stats",
           # the agents' default fixed ports would collide with any other Ray head on this machine
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    out = open(Path(temp) / "ray-start.log", "w")
    process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        try:
            _wait_http(f"{url}/api/version", timeout, process)
        except (TimeoutError, RuntimeError) as e:
            logs = [Path(temp) / "ray-start.log", *Path(temp).glob("session_latest/logs/dashboard.*")]
            raise type(e)(f"{e}\n" + "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for p in logs)) from None
        _wait_job_agent(url, timeout)
        yield RayHead(gcs_address=f"127.0.0.1:{port}", dashboard_url=url, process=process)
    finally:
        _stop(process)
        out.close()
        shutil.rmtree(temp, ignore_errors=True)
