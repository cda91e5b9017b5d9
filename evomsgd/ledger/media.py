"""Media files beside the ledger: content-addressed (`media/ab/cdef...`, the SHA-256 of the bytes),
written durably (file fsync, then directory fsync) before the message row that names them.

Blocking calls: run them in a thread, never on the event loop. Identical bytes are one file.
A file no message row names any more is an orphan; `orphans` lists those old enough to delete
(a new upload of the same bytes refreshes the file's time before its row is written, so a purge
running meanwhile leaves it alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MEDIA_DIR = "media"
_TMP = "tmp"
_HASH = re.compile(r"^[0-9a-f]{64}$")
# An unreferenced file younger than this may belong to a message being accepted right now.
ORPHAN_GRACE = 3600.0


@dataclass(frozen=True, slots=True)
class Stored:
    """One file in the store."""

    sha256: str
    size: int
    created: bool  # False when the same bytes were already there


class MediaFiles:
    """The content-addressed files under `data_dir/media`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / MEDIA_DIR

    def path(self, sha256: str) -> Path:
        """Where the file with this hash lives (whether or not it exists)."""
        if not _HASH.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> Stored:
        """Store `data` durably and return its hash; the same bytes stored twice are one file."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.exists() and target.stat().st_size == len(data):
            os.utime(target)  # in use again: not an orphan for another ORPHAN_GRACE
            return Stored(sha256, len(data), False)
        tmp_dir = self.root / _TMP
        new_dirs = _make_dirs(tmp_dir) | _make_dirs(target.parent)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        # The rename and any new directories are durable only once their parents are synced.
        for directory in {target.parent, *new_dirs, *(d.parent for d in new_dirs)}:
            _fsync_dir(directory)
        return Stored(sha256, len(data), True)

    def read(self, sha256: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is gone."""
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> int:
        """Remove one file; the bytes freed (0 when it was not there)."""
        target = self.path(sha256)
        try:
            size = target.stat().st_size
            target.unlink()
        except FileNotFoundError:
            return 0
        return size

    def hashes(self) -> Iterator[tuple[str, int, float]]:
        """Every stored file: (hash, size, modification time)."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                sha256 = shard.name + entry.name
                if _HASH.match(sha256):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        yield sha256, stat.st_size, stat.st_mtime

    def orphans(self, referenced: set[str], now: float | None = None) -> list[tuple[str, int]]:
        """Files no message names that are older than ORPHAN_GRACE: (hash, size)."""
        cutoff = (time.time() if now is None else now) - ORPHAN_GRACE
        return [
            (sha256, size)
            for sha256, size, mtime in self.hashes()
            if sha256 not in referenced and mtime < cutoff
        ]


def _make_dirs(directory: Path) -> set[Path]:
    """Create `directory` and its missing parents; the ones created."""
    created: set[Path] = set()
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
            created.add(path)
        except FileExistsError:
            pass
    return created


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
