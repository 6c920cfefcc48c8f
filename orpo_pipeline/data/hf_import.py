"""Hugging Face datasets as preference files: a hub id (needs internet) or a `Dataset.save_to_disk` folder, one
split written as one parquet file, which ingest then reads like any other file (in bulk for the common formats).

A file, not a direct read, so a dataset takes the same path as a dropped file: content-addressed partition, rows
numbered in the rejects, retraining when it lands.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..storage import atomic_file


class DatasetImportError(ValueError):
    """The dataset or split cannot be had; the message says what there is instead."""


def load_split(name: str, split: str = "train", config: str = ""):
    """One split of a save_to_disk folder (a Dataset, or a DatasetDict holding `split`) or of a hub dataset."""
    import datasets

    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            ds = datasets.load_from_disk(str(folder))
        except FileNotFoundError as e:
            raise DatasetImportError(f"{folder}: not a folder written by Dataset.save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetImportError(f"{folder}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if name.startswith(("/", ".", "~")):
        raise DatasetImportError(f"{folder}: no such folder (a hub id looks like org/name)")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except (ConnectionError, FileNotFoundError) as e:  # offline, or no such dataset / config on the hub
        raise DatasetImportError(f"{name}: {e}") from e


def file_name(name: str, split: str, config: str = "") -> str:
    """`org__dataset[-config]-split.parquet`: readable, and the same for the same dataset and split."""
    stem = Path(name).expanduser().name if Path(name).expanduser().is_dir() else name.replace("/", "__")
    parts = [stem, config, split] if config else [stem, split]
    return re.sub(r"[^\w.-]+", "_", "-".join(parts)) + ".parquet"


def export_parquet(name: str, split: str, config: str, folder: Path) -> tuple[Path, int]:
    """Write the split to folder/file_name(...) atomically (a watched drop folder never sees it half-written);
    returns the path and the row count."""
    ds = load_split(name, split, config)
    out = Path(folder) / file_name(name, split, config)
    with atomic_file(out) as tmp:
        ds.to_parquet(str(tmp))
    return out, ds.num_rows
