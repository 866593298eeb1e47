"""The sha256 of source weight files, remembered between exports.

A nightly pipeline merges the same base checkpoint every night: its digest for the manifest
need not be computed again while the file is unchanged. An entry is one small JSON file in
the cache folder (``Settings().cache_dir / "sha256"``), named after the file's device and
inode, and holds the file's identity when it was hashed: device, inode, size, modification
and change times (``st_ctime_ns`` moves on every write and cannot be set back from user
space, so a file rewritten in place and given its old mtime back is still a miss). A digest
is used only when all five are equal now; anything else is a miss and the file is hashed
while it is read, as without the cache.

Entries are written only for files of at least :data:`MIN_BYTES` (smaller ones cost little
to hash), only when the file did not change while it was read, and only when its times are
at least :data:`SETTLE_NS` old (a file still being written could change again within one
timestamp tick without its times moving: git's "racy clean" problem). Entries unused for
:data:`KEEP_DAYS` are removed. A writer that can write the cache folder can make a digest
lie, as it could any other cached figure: the folder is the user's own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 20  # smaller files are hashed every time (64 MiB: about 40 ms)
SETTLE_NS = 2_000_000_000
KEEP_DAYS = 30
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class FileId:
    """What must not change for a remembered digest to stay valid."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, file: str | Path) -> FileId:
        st = os.stat(file)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_ids(files: Iterable[Path]) -> dict[Path, FileId]:
    return {f: FileId.of(f) for f in files}


def changed(ids: Mapping[Path, FileId]) -> list[Path]:
    """The files whose identity differs from ``ids`` now (rewritten, touched, removed)."""
    out = []
    for f, ident in ids.items():
        try:
            if FileId.of(f) != ident:
                out.append(f)
        except OSError:
            out.append(f)
    return out


class HashCache:
    """Digests by file identity, in ``folder`` (created on the first store)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _entry(self, ident: FileId) -> Path:
        return self.folder / f"{ident.dev:x}-{ident.ino:x}.json"

    def get(self, file: Path, ident: FileId) -> str | None:
        """The remembered sha256 of ``file`` if its identity is still ``ident``, else None."""
        if ident.size < MIN_BYTES:
            return None
        entry = self._entry(ident)
        try:
            data = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        digest = data.get("sha256") if isinstance(data, dict) else None
        if (not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX
                or {k: data.get(k) for k in asdict(ident)} != asdict(ident)):
            return None
        try:
            os.utime(entry)  # used: kept from pruning
        except OSError:
            pass
        return digest

    def lookup(self, ids: Mapping[Path, FileId]) -> dict[Path, str]:
        """The remembered digests among ``ids`` (the misses are left out)."""
        return {f: d for f, ident in ids.items() if (d := self.get(f, ident)) is not None}

    def put(self, file: Path, ident: FileId, digest: str, *, now_ns: int | None = None) -> bool:
        """Remember ``digest`` for ``file`` hashed as ``ident``; False when not stored (too
        small, too recently changed, or the folder not writable)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        if ident.size < MIN_BYTES or max(ident.mtime_ns, ident.ctime_ns) > now_ns - SETTLE_NS:
            return False
        entry = self._entry(ident)
        tmp = entry.with_name(f".{entry.name}.{secrets.token_hex(4)}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"path": str(Path(file).absolute()), **asdict(ident),
                                       "sha256": digest}) + "\n")
            os.replace(tmp, entry)  # atomic: a reader sees the old entry or the new one
        except OSError as exc:
            log.debug("sha256 cache: cannot store %s: %s", entry, exc)
            tmp.unlink(missing_ok=True)
            return False
        return True

    def store(self, ids: Mapping[Path, FileId], digests: Mapping[Path, str]) -> int:
        """:meth:`put` every file of ``digests`` (with its identity in ``ids``); then prune.
        Returns how many entries were written."""
        now = time.time_ns()
        stored = sum(self.put(f, ids[f], d, now_ns=now) for f, d in digests.items() if f in ids)
        if stored:
            self.prune()
        return stored

    def prune(self, keep_days: float = KEEP_DAYS) -> None:
        """Remove entries not used (read or written) for ``keep_days``."""
        cutoff = time.time() - keep_days * 86400
        try:
            entries = list(self.folder.glob("*.json"))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
            except OSError:
                pass

