"""What an asset hands to the next: a small JSON handle (paths, digests, ids), stored next to the artifacts.

Assets return plain dicts naming their artifacts, never models. Dagster's default IO manager pickles them under
dagster_home/storage/<asset> and reports that pickle as the materialization's `path`, which hides the `path` the
asset reported (where the artifact is). This one writes the dict as JSON to
<storage root>/artifacts/<asset>/<dagster run id>.json, reports it as `handle` and leaves `path` alone.
"""

import json
from pathlib import Path

import dagster as dg

from orpo_pipeline.storage import write_json

from .storage import StorageResource

HANDLE = "handle"


class ArtifactHandleIOManager(dg.ConfigurableIOManager):
    """Stores each asset's returned dict as JSON beside its artifacts; downstream assets read the latest one."""

    storage: StorageResource

    def _handle_path(self, asset_key: dg.AssetKey, run_id: str, partition) -> Path:
        name = run_id if partition is None else f"{run_id}.{partition}"
        return self.storage.root_path / "artifacts" / "/".join(asset_key.path) / f"{name}.json"

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        # an op's output (import_hf_dataset's file path) feeds no asset and is in its own metadata already
        if obj is None or not context.has_asset_key:
            return
        partition = context.asset_partition_key if context.has_asset_partitions else None
        path = self._handle_path(context.asset_key, context.run_id, partition)
        write_json(path, obj)
        context.add_output_metadata({HANDLE: dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext):
        key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        # the handle written by this run, or by the run it re-executes: with several runs at once, the latest
        # materialization may be another run's (two runs' merges, each reading the other's adapter)
        run = context.instance.get_run_by_id(context.step_context.run_id)
        while run is not None:
            own = self._handle_path(key, run.run_id, partition)
            if own.is_file():
                return json.loads(own.read_text())
            run = context.instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
        return latest_handle(context.instance, key, partition)


def latest_handle(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    """The handle of an asset's (or one partition's) latest materialization."""
    event = instance.get_latest_materialization_event(key) if partition is None else next(
        iter(instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records), None)
    materialization = event.asset_materialization if event is not None else None
    entry = materialization.metadata.get(HANDLE) if materialization is not None else None
    if entry is None:
        raise dg.Failure(f"{key.to_user_string()} has no stored handle: materialize it first")
    path = Path(entry.value)
    if not path.is_file():
        raise dg.Failure(f"{key.to_user_string()}'s handle {path} is gone: materialize it again")
    return json.loads(path.read_text())
