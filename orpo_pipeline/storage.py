"""Atomic artifact writes and content digests.

A downstream step only ever sees a complete artifact: everything is written
into a temporary sibling and renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# .<name>.tmp-<writer pid>-<random>: the pid tells a sweep whether the writer is still alive
TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")


def _temp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def sweep_dead_temp(root: Path, max_depth: int = 4) -> list[Path]:
    """Remove temp files and folders of atomic writes whose writer process is gone (a crash mid-write).

    Temp entries are siblings of their target, so only the first `max_depth` levels below `root` are looked at,
    and nothing inside a temp entry. Returns what was removed."""
    removed = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for e in entries:
            m = TEMP_NAME.match(e.name)
            if m:
                if not _pid_alive(int(m.group(1))):
                    path = Path(e.path)
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
            elif depth < max_depth and e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                walk(Path(e.path), depth + 1)

    walk(Path(root), 1)
    return removed


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `final` by rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / _temp_name(final.name, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        # rename() cannot replace a non-empty folder, so move the old one aside first
        old = final.parent / _temp_name(final.name, "old")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp file path; on success it replaces `final` by rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / _temp_name(final.name, "tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """Digest over relative names and contents of every file below `path`."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


class ParquetAppender:
    """One parquet file written a table at a time, so a large table never has to be held whole. Every table
    must have the same schema; the first one (even empty) fixes it. Write into an atomic_dir's temp folder.

    `background=True` encodes and writes each table on a thread of its own while the caller makes the next one
    (parquet encoding releases the GIL); at most one table waits, and a write's error is raised by the next
    write or by close."""

    def __init__(self, path: Path, background: bool = False):
        self.path, self._writer, self._pending = Path(path), None, None
        self._thread = None
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._thread = ThreadPoolExecutor(max_workers=1)

    def _write(self, df) -> None:
        import pyarrow.parquet as pq

        table = df.to_arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def write(self, df) -> None:
        if self._thread is None:
            self._write(df)
            return
        self._wait()
        self._pending = self._thread.submit(self._write, df)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._thread is not None:
                self._thread.shutdown()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> "ParquetAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cached_dir_digest(path: Path, cache_dir: Path) -> str:
    """dir_digest of a folder that rarely changes (a base model), computed again only when a file's name, size or
    mtime changed since the digest was stored under `cache_dir`."""
    path = Path(path).resolve()
    signature = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(q for q in path.rglob("*") if q.is_file())]
    entry = Path(cache_dir) / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    if entry.is_file():
        cached = json.loads(entry.read_text())
        if cached.get("path") == str(path) and cached.get("signature") == signature:
            return cached["digest"]
    digest = dir_digest(path)
    write_json(entry, {"path": str(path), "signature": signature, "digest": digest})
    return digest
