"""Files: atomic writes (JSON, figures), and file digests (md5 as DVC records it, sha256).

Writers put the bytes in a temp file beside the target and rename it over the target
only when complete (`os.replace` is atomic on one file system). `temp_write` is the
guard around the temp write: on any failure it removes the temp file, and a full
disk or a file-size limit becomes one clear `DiskFullError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.core.errors import DiskFullError
from components.core.processes import running

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what caused it or was being handled when it was raised, and so on (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EFBIG/EDQUOT `OSError` behind `exc`, if any.

    torch's writer reports a failed write as a `RuntimeError` ("unexpected pos ...") whose
    context holds the real `OSError`, so the whole cause/context chain is searched.
    """
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _DISK_FULL), None)


def interrupt_cause(exc: BaseException | None) -> BaseException | None:
    """The interrupt (KeyboardInterrupt, SystemExit, an orchestrator's termination signal: a BaseException that
    is not an Exception) in `exc`'s chain of causes and contexts, if any."""
    return next((e for e in _chain(exc) if not isinstance(e, Exception)), None)


@contextmanager
def temp_write(path: Path, tmp: Path) -> Iterator[None]:
    """Guard the write of `tmp` (renamed onto `path` afterwards by the caller).

    Raises:
        DiskFullError: the disk or file-size limit ran out; `tmp` is removed and `path`, if it
            existed, is untouched.
    """
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        interrupt = interrupt_cause(exc)
        if interrupt is not None and interrupt is not exc:
            # a Ctrl-C or SIGTERM landed mid-write and the writer's own clean-up raised over it (torch.save's zip
            # writer: "unexpected pos ..."): the stop is what happened, so it is what propagates
            raise interrupt.with_traceback(interrupt.__traceback__) from None
        full = disk_full_cause(exc)
        if full is None:
            raise
        raise DiskFullError(
            f"{path}: the disk is full ({full.strerror}) while writing it; free disk space under {path.parent} "
            f"and rerun (the previous {path.name}, if there was one, is unchanged)"
        ) from exc


def temp_path(path: Path, suffix: str = "") -> Path:
    """A temporary name beside `path` that no other process or thread writes: `.<name>.<pid>-<thread>.tmp<suffix>`
    (`suffix` for writers that go by the extension, such as `.npy` or `.onnx`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{suffix}")


@contextmanager
def atomic_write(path: Path, suffix: str = "") -> Iterator[Path]:
    """Write `path` whole or not at all: the block writes the temporary file it is given (`temp_path`), which
    replaces `path` in one rename when the block ends without an error.

    Raises:
        DiskFullError: the disk or a file-size limit ran out (`temp_write`).
        Whatever the block raised: either way the temporary file is gone and `path`, if it existed, is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    with temp_write(path, tmp):
        yield tmp
        tmp.replace(path)


def remove_orphan_temps(path: Path) -> None:
    """Delete the temporary files of `path` (`temp_path`) that processes no longer running left: one killed
    (SIGKILL, a lost machine) mid-write leaves its own, which no later write of another process replaces."""
    for tmp in path.parent.glob(f".{path.name}.*-*.tmp*"):
        pid = tmp.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not running(int(pid)):
            tmp.unlink(missing_ok=True)


def write_json(path: Path, content: object) -> Path:
    """Write JSON atomically (a reader never sees half a file; a full disk is a `DiskFullError`, leaving no temporary file)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path


def user_cache_dir() -> Path:
    """Graft's folder in the user's cache: `$XDG_CACHE_HOME/graft` (`~/.cache/graft` by default). What it holds
    is the same for every project on this machine (Prefect's empty database, the exporter's graph templates),
    and safe to delete."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graft"


def copy_file(source: Path, target: Path) -> Path:
    """Copy `source` to `target` atomically (a reader never sees half a file); returns `target`."""
    import shutil

    with atomic_write(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes, as DVC records it."""
    return file_digest(path, "md5")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256")


_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def cached_sha256(path: Path) -> str:
    """`sha256` of a file, computed once per process for each (path, size, modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is None:
        known = sha256(path)
        with _DIGESTS_LOCK:
            _DIGESTS[key] = known
    return known


def save_figure(fig, path: Path, dpi: int = 100, layout: bool = True) -> Path:  # noqa: ANN001 - matplotlib Figure
    """Lay out (`tight_layout`, unless `layout` is false: the figure placed its parts itself), save (atomically)
    and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    try:
        with atomic_write(path, path.suffix) as tmp:  # matplotlib picks the format by the extension
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
