"""One dynamic partition per preference file, keyed by the file's content digest."""

import dagster as dg

from orpo_pipeline.data import drops

preference_files = dg.DynamicPartitionsDefinition(name="preference_files")


def registered_keys(instance: dg.DagsterInstance) -> list[str]:
    """Partition keys in the order they were added: earlier files win duplicate pairs."""
    return list(instance.get_dynamic_partitions(preference_files.name))


def register_files(instance: dg.DagsterInstance, paths, sources_path, allow_symlinks: bool = False,
                   refused: list[str] | None = None) -> tuple[list[drops.Source], list[str]]:
    """Store files by content and add partitions for the new ones; returns (sources, newly added keys).

    A file that cannot be registered (drops.SourceRefused: a symlink, a FIFO, an empty file) raises, or, given a
    `refused` list, has its reason appended there and is skipped."""
    known = set(registered_keys(instance))
    sources, new = [], []
    for p in paths:
        try:
            src = drops.store_source(p, sources_path, allow_symlinks)
        except drops.SourceRefused as e:
            if refused is None:
                raise
            refused.append(str(e))
            continue
        sources.append(src)
        if src.key not in known and src.key not in new:
            new.append(src.key)
    if new:
        instance.add_dynamic_partitions(preference_files.name, new)
    return sources, new


def range_tags(keys: list[str]) -> dict[str, str]:
    """Tags that make one run cover a contiguous range of partitions (single-run backfill policy)."""
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
