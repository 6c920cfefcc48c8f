"""Command line: register preference files as partitions and run the pipeline on this machine's Dagster instance.

    python -m orpo_pipeline.cli run [--data-dir DIR | --hf-dataset ID [--hf-split S] [--hf-config C]] [-c run.yaml]
    python -m orpo_pipeline.cli register FILE_OR_DIR...

Uses the instance in $DAGSTER_HOME, so runs show up in `dagster dev` afterwards. A run executes in this process;
if the last one with the same config and data failed (a step raised, or its process was killed), `run`
re-executes it from the failed step, as the UI's "Re-execute from failure" does (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

from .config import SAMPLE_DATA_DIR


def _files(targets: list[str]) -> list[Path]:
    from .data.ingest import preference_files

    out: list[Path] = []
    for t in targets:
        p = Path(t).expanduser()
        out.extend(preference_files(p) if p.is_dir() else [p])
    return out


# a CLI run executes in this process: no daemon watches it, so the next CLI run is what finds it dead
PID_TAG, PID_START_TAG, HOST_TAG = "orpo/cli_pid", "orpo/cli_pid_started", "orpo/cli_host"


def _own_tags() -> dict[str, str]:
    import psutil

    return {PID_TAG: str(os.getpid()), PID_START_TAG: f"{psutil.Process().create_time():.2f}",
            HOST_TAG: socket.gethostname()}


def _alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    return abs(started - float(tags.get(PID_START_TAG, "0"))) < 1.0  # else the pid was reused


def release_dead_runs(instance) -> list[str]:
    """Mark FAILURE the CLI runs of this host whose process is gone (kill -9, OOM), and free the pool slots of
    every finished run that still holds one, so this run is not "blocked by limit for pool gpu" forever."""
    from dagster import DagsterRunStatus, RunsFilter

    done = []
    unfinished = [DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(RunsFilter(statuses=unfinished, tags={HOST_TAG: socket.gethostname()})):
        if PID_TAG in run.tags and not _alive(run.tags):
            instance.report_run_failed(run, f"its process (pid {run.tags[PID_TAG]}) died; found by the next CLI run")
            done.append(f"run {run.run_id}: process {run.tags[PID_TAG]} is gone, marked FAILURE")
    holding = instance.event_log_storage.get_concurrency_run_ids()
    for run_id in holding:
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            freed = instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            done.append(f"run {run_id}: freed {freed or 0} pool slot(s) it still held")
    return done


def failed_run_to_resume(instance, run_config: dict, tags: dict[str, str]):
    """The newest run of the training job, if it failed and had this run config and these partitions."""
    from dagster import DagsterRunStatus, RunsFilter

    runs = instance.get_runs(RunsFilter(job_name="orpo_training_job"), limit=1)
    if not runs or runs[0].status != DagsterRunStatus.FAILURE:
        return None
    last = runs[0]
    same = (last.run_config or {}) == (run_config or {}) and all(last.tags.get(k) == v for k, v in tags.items())
    return last if same else None


def main(argv: list[str] | None = None) -> int:
    import dagster as dg
    import yaml

    from assets.partitions import range_tags, register_files, registered_keys
    from resources import StorageResource

    from .definitions import orpo_training_job
    from .data.drops import SourceRefused
    from .data.hf_import import DatasetImportError, export_parquet

    parser = argparse.ArgumentParser(prog="orpo_pipeline")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="register data, then clean every registered file, train, merge, benchmark")
    run.add_argument("--data-dir", default=str(SAMPLE_DATA_DIR), help="folder of preference files (default: samples)")
    run.add_argument("--hf-dataset", default="", help="hub id or save_to_disk folder instead of --data-dir")
    run.add_argument("--hf-split", default="train")
    run.add_argument("--hf-config", default="")
    run.add_argument("-c", "--config", help="run config YAML (ops: / resources:), as in the launchpad")
    run.add_argument("--eval-data", default="", help="benchmark folder (layout of ../shared/data/benchmarks) for "
                     "lm_eval_scores: the Nous suite and IFEval run offline over its files")
    run.add_argument("--fresh", action="store_true", help="start a new run even if the last one with this config "
                     "and data failed (default: re-execute that one from the failed step)")
    reg = sub.add_parser("register", help="add preference files as partitions without running")
    reg.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if getattr(args, "eval_data", "") and not Path(args.eval_data).expanduser().is_dir():
        print(f"error: --eval-data {args.eval_data} is not a folder", file=sys.stderr)
        return 2

    instance = dg.DagsterInstance.get()
    storage = StorageResource()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cmd == "register":
            paths = _files(args.paths)
        elif args.hf_dataset:
            try:
                paths = [export_parquet(args.hf_dataset, args.hf_split, args.hf_config, Path(tmp))[0]]
            except DatasetImportError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        else:
            paths = _files([args.data_dir])
        try:
            sources, new = register_files(instance, paths, storage.sources_path, storage.allow_symlinks)
        except SourceRefused as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for s in sources:
        print(f"{'new ' if s.key in new else 'seen'} {s.key}  {s.name}")
    if args.cmd == "register":
        return 0
    keys = registered_keys(instance)
    run_config = (yaml.safe_load(Path(args.config).read_text()) if args.config else None) or {}
    if args.eval_data:
        lm = run_config.setdefault("ops", {}).setdefault("lm_eval_scores", {}).setdefault("config", {})
        lm["benchmark_dir"] = str(Path(args.eval_data).expanduser().resolve())
    for line in release_dead_runs(instance):
        print(f"cleanup: {line}")
    tags = range_tags(keys)
    parent = None if args.fresh else failed_run_to_resume(instance, run_config, tags)
    options = None
    if parent is not None:
        print(f"re-executing run {parent.run_id} from the failed step (it failed with the same config and data; "
              "--fresh starts over)")
        options = dg.ReexecutionOptions.from_failure(parent.run_id, instance)
    job = dg.reconstructable(orpo_training_job)
    with dg.execute_job(job, instance, run_config=run_config, tags={**tags, **_own_tags()},
                        reexecution_options=options) as result:
        return _report(instance, result)


def _output(instance, node: str) -> dict:
    """An asset's latest output, from the handle its IO manager stored (also for steps a re-execution skipped)."""
    import dagster as dg

    from resources.io_manager import latest_handle

    return latest_handle(instance, dg.AssetKey(node))


def _report(instance, result) -> int:
    if not result.success:
        print(f"\nrun {result.run_id} failed; run the same command again to re-execute it from the failed step",
              file=sys.stderr)
        return 1
    scores = _output(instance, "benchmark_scores")
    print("\nheld-out preference accuracy: " + ", ".join(
        f"{n} {scores[n]['preference_accuracy']:.3f}" for n in ("base", "tuned", "champion") if n in scores))
    lm = _output(instance, "lm_eval_scores")
    for key in ("nous/average", "ifeval/average"):
        if key in lm["scores"]["tuned"]:
            print(f"lm-eval {key}: base {lm['scores']['base'][key]:.4f}, tuned {lm['scores']['tuned'][key]:.4f}")
    for suite, why in lm["skipped"].items():
        print(f"lm-eval {suite} skipped: {why}")
    promotion = _output(instance, "champion_promotion")
    print(f"champion: {promotion['reason']} (alias on v{promotion['champion_now']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
