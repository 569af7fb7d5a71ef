"""Built artifacts kept by what they were built from, so that building them again from the same inputs is a copy.

A rerun on unchanged data trains the same weights (the same seed and data give the same model on the
CPU), and its exported model is the same file byte for byte. What is built from those bytes alone (the
PyTorch model's `pt2` export, the deploy variants) is then built again to the same bytes. `BuildCache`
keeps each such build under a key that names everything it was built from (`build_key`: the input's
digest, the settings, the library versions, this machine's CPU where the build depends on it, and
`code_digest`, so that a change to Graft's own code builds afresh) and hands back a copy instead.

Every entry is a folder written beside the cache under a temporary name and renamed into place when
complete, with a manifest of its files' sha256; a copy is handed out only after each file matches its
digest, and an entry that does not match is deleted and built again. The cache keeps the `keep` entries
used last and deletes the rest. It is a cache: a failure to keep an entry (a full disk, a read-only
folder) is logged and the run goes on, and deleting the folder loses nothing but time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from components.core.files import copy_file, sha256

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"
STALE_TEMP_SECONDS = 3600
"""A temporary entry older than this was left by a process that stopped mid-copy; the next pruning deletes it."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source of every module in `components/`: a build made by other code is not reused."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_key(*parts: object) -> str:
    """A cache key from everything a build depends on (each part's `str`), plus `code_digest`."""
    text = "\x1f".join([code_digest(), *(str(part) for part in parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class BuildCache:
    """Files or folders kept under `root/<key>/`, the `keep` used last (see the module docstring)."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep_entries = Path(root), keep
        self._lock = threading.Lock()

    def fetch(self, key: str, target: Path) -> bool:
        """Copy the entry `key` to `target` (a file, or a folder for a folder entry); False when there is none."""
        entry = self.root / key
        if not entry.is_dir():
            return False
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            files, kind = dict(manifest["files"]), manifest["kind"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("build cache: %s has no readable manifest (%s); deleted, building again", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return False
        existed = target.exists()
        try:
            bad = [name for name, digest in files.items() if not (entry / name).is_file() or sha256(entry / name) != digest]
            if bad:
                log.warning("build cache: %s in %s does not match its recorded sha256; deleted, building again", bad[0], entry)
                shutil.rmtree(entry, ignore_errors=True)
                return False
            if kind == "file":
                (name,) = files
                copy_file(entry / name, target)
            else:
                _copy_folder(entry, target, files)
            os.utime(entry / MANIFEST)  # used now: the last to be pruned
        except FileNotFoundError:  # another process pruned the entry while it was read: build instead
            if kind == "folder" and not existed:
                shutil.rmtree(target, ignore_errors=True)
            return False
        return True

    def discard(self, key: str) -> None:
        """Delete the entry `key` (one found unfit for its use), so that the next build keeps a new one."""
        shutil.rmtree(self.root / key, ignore_errors=True)

    def keep(self, key: str, source: Path) -> None:
        """Keep a copy of `source` (a file or a folder) as the entry `key`; failures are logged, not raised."""
        temp = self.root / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        try:
            temp.mkdir(parents=True)
            if source.is_dir():
                files = {path.relative_to(source).as_posix(): path for path in sorted(source.rglob("*")) if path.is_file()}
                kind = "folder"
            else:
                files, kind = {source.name: source}, "file"
            for name, path in files.items():
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, temp / name)
            digests = {name: sha256(temp / name) for name in files}
            (temp / MANIFEST).write_text(json.dumps({"kind": kind, "files": digests}, indent=1))
            try:
                temp.rename(self.root / key)
            except OSError:  # another process kept the same build first: theirs is as good
                shutil.rmtree(temp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            log.warning("build cache: could not keep %s in %s (%s); the next run builds it again", source.name, self.root, exc)
            return
        self._prune()

    def _prune(self) -> None:
        with self._lock:
            entries, now = [], time.time()
            for path in self.root.iterdir():
                if path.name.startswith(".tmp-"):
                    if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                        shutil.rmtree(path, ignore_errors=True)
                elif (path / MANIFEST).is_file():
                    entries.append(((path / MANIFEST).stat().st_mtime, path))
            for _, path in sorted(entries, reverse=True)[self.keep_entries :]:
                shutil.rmtree(path, ignore_errors=True)


def _copy_folder(entry: Path, target: Path, files: dict[str, str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry / name, target / name)
