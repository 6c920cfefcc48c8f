"""Preference files arriving in a drop folder, identified by content.

A file is registered once its size and mtime have stayed the same between two
scans and it is older than `settle_seconds` (a file still being written is not
picked up half-done). Registration copies it into a content-addressed store, so
its partition's data never changes under it, and a renamed or re-saved copy with
the same bytes maps to the same key (not new).

Refused, with the reason (`SourceRefused`): symlinks (unless allowed), FIFOs and other
special files (reading one could block forever), and empty files (every zero-byte
file has the same content key, so files of different types would become one
partition of no rows).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .formats import PreferenceFormatError
from .readers import SUFFIXES, check_file
from ..storage import atomic_dir, file_digest

KEY_LENGTH = 16


@dataclass(frozen=True)
class Source:
    key: str  # partition key: content digest prefix
    name: str  # file name when first seen
    path: Path  # the stored copy
    digest: str  # full sha256

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "path": str(self.path), "digest": self.digest}


def partition_key(digest: str) -> str:
    return digest[:KEY_LENGTH]


def candidate_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # links and special files too: registration refuses them with a reason instead of leaving them out unseen
    return sorted(
        p for p in folder.rglob("*")
        if not p.is_dir() and not p.name.startswith(".") and p.name.lower().endswith(SUFFIXES)
    )


def settled_files(folder: Path, previous: dict[str, list[float]], settle_seconds: float = 2.0, now: float | None = None):
    """Files whose (size, mtime) match the previous scan and are old enough; plus this scan's stats."""
    now = time.time() if now is None else now
    stats = {}
    ready = []
    for p in candidate_files(folder):
        st = p.lstat()
        stat = [st.st_size, st.st_mtime]
        stats[str(p)] = stat
        if previous.get(str(p)) == stat and now - st.st_mtime >= settle_seconds:
            ready.append(p)
    return ready, stats


class SourceRefused(ValueError):
    """A file that is not registered; the message names it and says why."""


def store_source(path: Path, store: Path, allow_symlinks: bool = False) -> Source:
    """Copy into `store/<key>/` (once) and describe it; SourceRefused for what is not read (module docstring)."""
    path = Path(path)
    try:
        st = check_file(path, allow_symlinks)
    except PreferenceFormatError as e:
        raise SourceRefused(str(e)) from None
    if st.st_size == 0:
        raise SourceRefused(f"{path}: empty file (0 bytes); nothing to register")
    digest = file_digest(path)
    key = partition_key(digest)
    target = Path(store) / key
    manifest = target / "source.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        return Source(key, data["name"], Path(data["path"]), data["digest"])
    with atomic_dir(target) as tmp:
        shutil.copy2(path, tmp / path.name)
        src = Source(key, path.name, target / path.name, digest)
        (tmp / "source.json").write_text(json.dumps(src.to_json()))
    return src


def load_source(store: Path, key: str) -> Source:
    manifest = Path(store) / key / "source.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no stored preference file for partition {key!r} under {store}")
    data = json.loads(manifest.read_text())
    return Source(data["key"], data["name"], Path(data["path"]), data["digest"])
