"""The Dagster webserver loads workspace.yaml and its GraphQL API lists the nine assets with lineage."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def webserver(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env={**os.environ, "DAGSTER_HOME": str(home), "ORPO_PIPELINE_HOME": str(tmp_path / "state")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield port, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_webserver_lists_all_assets_with_lineage(webserver):
    port, proc = webserver
    deadline, nodes, last_error = time.monotonic() + 180, None, None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            data = _graphql(port, QUERY)
            nodes = data.get("data", {}).get("assetNodes")
            if nodes:
                break
        except OSError as e:
            last_error = e
        time.sleep(2)
    assert proc.poll() is None, "dagster-webserver exited"
    assert nodes, f"no asset nodes within 180 s ({last_error})"
    deps = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes}
    assert set(deps) == {"raw_preferences", "cleaned_preferences", "tokenized_dataset", "base_model", "orpo_adapter",
                         "merged_model", "benchmark_scores", "lm_eval_scores", "champion_promotion"}
    assert deps["cleaned_preferences"] == {"raw_preferences"}
    assert deps["tokenized_dataset"] == {"cleaned_preferences", "base_model"}
    assert deps["orpo_adapter"] == {"tokenized_dataset", "base_model"}
    assert deps["merged_model"] == {"orpo_adapter", "base_model"}
    assert deps["benchmark_scores"] == {"merged_model", "base_model", "tokenized_dataset"}
    assert deps["lm_eval_scores"] == {"merged_model", "base_model"}
    assert deps["champion_promotion"] == {"benchmark_scores", "lm_eval_scores"}
