"""Writing a file so that a crash or a full disk never leaves a torn one where a reader looks.

Writers put the bytes in a temp file beside the target and rename it over the target
only when complete (`os.replace` is atomic on one file system). `temp_write` is the
guard around the temp write: on any failure it removes the temp file, and a full
disk or a file-size limit becomes one clear `DiskFullError` naming the file.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.errors import GraftError

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(GraftError):
    """A file could not be written because the disk (or the process's file-size limit) is full."""


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EFBIG/EDQUOT `OSError` behind `exc`, if any.

    torch's writer reports a failed write as a `RuntimeError` ("unexpected pos ...") whose
    context holds the real `OSError`, so the whole cause/context chain is searched.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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
        full = disk_full_cause(exc)
        if full is None:
            raise
        raise DiskFullError(
            f"{path}: the disk is full ({full.strerror}) while writing it; free disk space under {path.parent} "
            f"and rerun (the previous {path.name}, if there was one, is unchanged)"
        ) from exc
