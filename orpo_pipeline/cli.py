"""Command line: register preference files as partitions and run the pipeline on this machine's Dagster instance.

    python -m orpo_pipeline.cli run [--data-dir DIR | --hf-dataset ID [--hf-split S] [--hf-config C]] [-c run.yaml]
    python -m orpo_pipeline.cli register FILE_OR_DIR...

Uses the instance in $DAGSTER_HOME, so runs show up in `dagster dev` afterwards.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    import dagster as dg
    import yaml

    from assets.partitions import range_tags, register_files, registered_keys
    from resources import StorageResource

    from .definitions import defs
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
    job = defs.resolve_job_def("orpo_training_job")
    result = job.execute_in_process(instance=instance, run_config=run_config, tags=range_tags(keys))
    scores = result.output_for_node("benchmark_scores")
    print("\nheld-out preference accuracy: " + ", ".join(
        f"{n} {scores[n]['preference_accuracy']:.3f}" for n in ("base", "tuned", "champion") if n in scores))
    lm = result.output_for_node("lm_eval_scores")
    for key in ("nous/average", "ifeval/average"):
        if key in lm["scores"]["tuned"]:
            print(f"lm-eval {key}: base {lm['scores']['base'][key]:.4f}, tuned {lm['scores']['tuned'][key]:.4f}")
    for suite, why in lm["skipped"].items():
        print(f"lm-eval {suite} skipped: {why}")
    promotion = result.output_for_node("champion_promotion")
    print(f"champion: {promotion['reason']} (alias on v{promotion['champion_now']})")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
