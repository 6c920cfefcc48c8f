"""What the Dagster and MLflow UIs show after a small materialization, seen as a user sees it.

A real dagster-webserver and a real `mlflow server` on 127.0.0.1 over the store a tiny full job produced: GraphQL
for what the UI renders (artifact paths, staleness), headless Chromium for the pages themselves (asset graph, an
asset page, the MLflow run page). Set ORPO_SCREENSHOT_DIR to keep screenshots of the pages.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import range_tags, register_files
from orpo_pipeline.config import SAMPLE_DATA_DIR
from orpo_pipeline.definitions import all_assets, all_checks
from resources import ComputeResource, MlflowResource, StorageResource
from resources.io_manager import ArtifactHandleIOManager

from .test_webserver import ROOT, _free_port, _graphql

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
RUN_CONFIG = {"ops": {
    "base_model": {"config": {"base_model": "tiny-random-llama"}},
    "tokenized_dataset": {"config": {"max_length": 112, "max_pair_tokens": 128}},
    "orpo_adapter": {"config": {"max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4}},
    "benchmark_scores": {"config": {"max_eval_pairs": 8, "max_new_tokens": 4, "generation_prompts": ["Hi"]}},
}}
MATERIALIZATIONS = """{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId
  metadataEntries { label __typename ... on PathMetadataEntry { path } ... on UrlMetadataEntry { url }
  ... on FloatMetadataEntry { floatValue } } } } }"""
STALENESS = "{ assetNodes { assetKey { path } staleStatus staleCauses { reason category } } }"


def _wait(what, predicate, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _http_ok(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, model_cache, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ui")
    home, state = tmp / "dagster_home", tmp / "state"
    home.mkdir()
    state.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    (state / "models").symlink_to(model_cache, target_is_directory=True)
    mlflow_port, dagster_port = _free_port(), _free_port()
    storage = StorageResource(root=str(state))
    tracking = MlflowResource(state_dir=str(state), ui_url=f"http://127.0.0.1:{mlflow_port}")
    resources = {"storage": storage, "compute": ComputeResource(device="cpu"), "mlflow_tracking": tracking,
                 "io_manager": ArtifactHandleIOManager(storage=storage)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        _, keys = register_files(instance, [SAMPLE_DATA_DIR / "factual.jsonl", SAMPLE_DATA_DIR / "dirty.jsonl"],
                                 storage.sources_path)
        result = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=RUN_CONFIG,
                                instance=instance, tags=range_tags(keys))
        assert result.success
    env = {**os.environ, "DAGSTER_HOME": str(home), "ORPO_PIPELINE_HOME": str(state)}
    log = open(tmp / "processes.log", "w")
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen([str(bindir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                          "-p", str(dagster_port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True),
        subprocess.Popen([str(bindir / "mlflow"), "server", "--backend-store-uri", tracking.resolved_uri,
                          "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                         cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
    ]
    try:
        _wait("the Dagster webserver", lambda: _graphql(dagster_port, "{ assetNodes { id } }")["data"]["assetNodes"], 180)
        _wait("the MLflow server", lambda: _http_ok(f"http://127.0.0.1:{mlflow_port}/health"), 120)
        yield {"dagster": dagster_port, "mlflow": mlflow_port, "home": home, "state": state, "result": result,
               "resources": resources, "tmp": tmp}
    finally:
        for p in procs:
            _stop(p)
        log.close()


def _latest_metadata(port) -> dict:
    nodes = _graphql(port, MATERIALIZATIONS)["data"]["assetNodes"]
    out = {}
    for n in nodes:
        mats = n["assetMaterializations"]
        if mats:
            out["/".join(n["assetKey"]["path"])] = {e["label"]: e for e in mats[0]["metadataEntries"]}
    return out


def test_every_asset_path_points_at_its_artifact_not_a_pickle(deployment):
    meta, state = _latest_metadata(deployment["dagster"]), deployment["state"]
    for asset, marker in {"tokenized_dataset": "dataset", "orpo_adapter": "adapter_config.json",
                          "merged_model": "config.json"}.items():
        path = Path(meta[asset]["path"]["path"])
        assert path.is_relative_to(state / "artifacts" / asset) and (path / marker).exists(), (asset, path)
    assert (Path(meta["base_model"]["path"]["path"]) / "config.json").is_file()
    for asset in ("tokenized_dataset", "base_model", "orpo_adapter", "merged_model", "benchmark_scores"):
        handle = Path(meta[asset]["handle"]["path"])
        assert handle.is_file() and handle.parent == state / "artifacts" / asset, (asset, handle)
        assert not (deployment["home"] / "storage" / asset).exists()  # no pickle in dagster_home, as before


PARTITIONS = """{ assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode { partitionKeys
  assetMaterializations(partitions: %s) { partition metadataEntries { label __typename
    ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }"""


def test_each_partition_page_shows_its_own_files_counts(deployment):
    """What a partition's page renders: its own file's name and counts, not the run's totals (GraphQL, as the UI)."""
    import json as _json

    port = deployment["dagster"]
    with dg.DagsterInstance.from_config(str(deployment["home"])) as instance:
        keys = list(instance.get_dynamic_partitions("preference_files"))
    lines = {"factual.jsonl": 72, "dirty.jsonl": 16}
    seen = {}
    for asset in ("raw_preferences", "cleaned_preferences"):
        node = _graphql(port, PARTITIONS % (asset, _json.dumps(keys)))["data"]["assetNodeOrError"]
        assert sorted(node["partitionKeys"]) == sorted(keys)
        for m in node["assetMaterializations"]:
            entries = {e["label"]: e.get("intValue", e.get("text")) for e in m["metadataEntries"]}
            seen[(asset, m["partition"])] = entries
    for key in keys:
        raw, cleaned = seen[("raw_preferences", key)], seen[("cleaned_preferences", key)]
        name = raw["file_name"]
        assert name in lines and cleaned["file_name"] == name
        assert raw["rows"] == lines[name] and cleaned["rows_in"] == lines[name]  # this file's rows, not 88
        assert cleaned["kept"] + cleaned["rejected"] == cleaned["rows_in"]
    assert {seen[("raw_preferences", k)]["file_name"] for k in keys} == set(lines)


def test_numbers_in_metadata_are_rounded(deployment):
    """What a user reads on an asset page: 0.7213, not 0.7213114500045776."""
    long = {(asset, label): e["floatValue"] for asset, entries in _latest_metadata(deployment["dagster"]).items()
            for label, e in entries.items() if e["__typename"] == "FloatMetadataEntry"
            and e["floatValue"] is not None and round(e["floatValue"], 4) != e["floatValue"]}
    assert not long, long


def test_a_no_op_refresh_stays_in_sync_and_a_real_change_is_stale(deployment):
    from assets.model import base_model
    from assets.preferences import cleaned_preferences, raw_preferences

    port, resources = deployment["dagster"], deployment["resources"]

    def staleness():
        nodes = _graphql(port, STALENESS)["data"]["assetNodes"]
        return {"/".join(n["assetKey"]["path"]): n["staleStatus"] for n in nodes}

    downstream = ["tokenized_dataset", "orpo_adapter", "merged_model", "benchmark_scores"]
    assert {a: staleness()[a] for a in downstream} == dict.fromkeys(downstream, "FRESH")
    with dg.DagsterInstance.from_config(str(deployment["home"])) as instance:
        assert dg.materialize([base_model], resources=resources, instance=instance,
                              run_config={"ops": {"base_model": RUN_CONFIG["ops"]["base_model"]}}).success
        assert {a: staleness()[a] for a in downstream} == dict.fromkeys(downstream, "FRESH")
        # a preference file read and cleaned again with the same settings: still in sync; other cleaning settings
        # (another eval split) are a real change
        key = instance.get_dynamic_partitions("preference_files")[0]
        assert dg.materialize([raw_preferences, cleaned_preferences], resources=resources, instance=instance,
                              partition_key=key).success
        assert {a: staleness()[a] for a in downstream} == dict.fromkeys(downstream, "FRESH")
        assert dg.materialize([cleaned_preferences], resources=resources, instance=instance, partition_key=key,
                              run_config={"ops": {"cleaned_preferences": {"config": {"eval_fraction": 0.3}}}}).success
        assert staleness()["tokenized_dataset"] == "STALE"
        assert dg.materialize([cleaned_preferences], resources=resources, instance=instance, partition_key=key).success
        # other bytes: a copy of the model with one changed file
        changed = deployment["tmp"] / "changed-model"
        shutil.copytree(Path(deployment["result"].output_for_node("base_model")["path"]), changed)
        (changed / "generation_config.json").write_text('{"do_sample": false}')
        assert dg.materialize([base_model], resources=resources, instance=instance,
                              run_config={"ops": {"base_model": {"config": {"base_model": str(changed)}}}}).success
    after = staleness()
    assert after["tokenized_dataset"] == "STALE" and after["orpo_adapter"] == "STALE", after


def _chromium(url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    if BROWSER is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs it with apt-get when run as root)")
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}", "--window-size=1400,1800"]
    if screenshot is not None:
        subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    out = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    return out.stdout


def _shots() -> Path | None:
    folder = os.environ.get("ORPO_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return None


def test_the_pages_show_lineage_artifact_paths_and_the_training_run(deployment):
    port, mport, state = deployment["dagster"], deployment["mlflow"], deployment["state"]
    shots = _shots()
    graph = _chromium(f"http://127.0.0.1:{port}/locations/__repository__@orpo_pipeline/asset-groups/model/lineage",
                      shots and shots / "asset_graph.png")
    for name in ("base_model", "orpo_adapter", "merged_model", "benchmark_scores"):
        assert name in graph, name
    page = _chromium(f"http://127.0.0.1:{port}/assets/merged_model", shots and shots / "merged_model.png")
    merged = str(deployment["result"].output_for_node("merged_model")["dir"])
    assert merged in page and "mlflow_model_version" in page
    assert "dagster_home/storage" not in page

    run_id = deployment["result"].output_for_node("orpo_adapter")["mlflow_run_id"]
    tracking = deployment["resources"]["mlflow_tracking"]
    run_page = _chromium(tracking.run_url(run_id), shots and shots / "mlflow_run.png", budget_ms=30000)
    assert f"dagster-{deployment['result'].run_id[:8]}" in run_page  # the run's name
    assert "tokenized_dataset" in run_page and "factual.jsonl" in run_page  # Datasets used
    assert "Merged model: registered as" in run_page  # the run's description links the model
    charts = _chromium(tracking.run_url(run_id).replace("?", "/model-metrics?"), shots and shots / "mlflow_metrics.png",
                       budget_ms=30000)
    # scores first, then the curves; per-run counts are params, not a section of bar charts
    assert "eval/tuned" in charts and "data (" not in charts
    # the experiment (kind: custom model development) opens on its training runs
    experiment = _chromium(tracking.experiment_url(), shots and shots / "mlflow_experiment.png", budget_ms=30000)
    assert f"dagster-{deployment['result'].run_id[:8]}" in experiment
