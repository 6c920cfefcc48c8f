"""One dynamic partition per preference file, keyed by the file's content digest."""

import dagster as dg

from orpo_pipeline.data import drops

preference_files = dg.DynamicPartitionsDefinition(name="preference_files")


def registered_keys(instance: dg.DagsterInstance) -> list[str]:
    """Partition keys in the order they were added: earlier files win duplicate pairs."""
    return list(instance.get_dynamic_partitions(preference_files.name))


def register_files(instance: dg.DagsterInstance, paths, sources_path) -> tuple[list[drops.Source], list[str]]:
    """Store files by content and add partitions for the new ones; returns (sources, newly added keys)."""
    known = set(registered_keys(instance))
    sources, new = [], []
    for p in paths:
        src = drops.store_source(p, sources_path)
        sources.append(src)
        if src.key not in known and src.key not in new:
            new.append(src.key)
    if new:
        instance.add_dynamic_partitions(preference_files.name, new)
    return sources, new


def range_tags(keys: list[str]) -> dict[str, str]:
    """Tags that make one run cover a contiguous range of partitions (single-run backfill policy)."""
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
