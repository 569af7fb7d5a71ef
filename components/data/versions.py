"""Data versions: the DVC md5 of the image folder, pulling the demo data when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from components.core.errors import DataError, RemoteError
from components.core.files import file_md5

log = logging.getLogger(__name__)


def dvc_file_for(data_dir: Path) -> Path:
    """The `.dvc` file that tracks `data_dir` (`data/` -> `data.dvc` beside it)."""
    return data_dir.parent / f"{data_dir.name}.dvc"


def recorded_md5(dvc_file: Path) -> str:
    """The folder md5 a `.dvc` file records."""
    try:
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise DataError(f"{dvc_file} is not a readable DVC file ({exc}); restore it with git checkout {dvc_file.name}") from exc


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


PULL_TIMEOUT_S = 600
"""How long `dvc pull` may take before the pull counts as failed (and is retried)."""


def pull(dvc_file: Path) -> None:
    """`dvc pull` the files a `.dvc` file names from the configured remote."""
    log.info("pulling %s from the DVC remote", dvc_file.name)
    try:
        result = subprocess.run(
            [_dvc(), "pull", dvc_file.name], cwd=dvc_file.parent, capture_output=True, text=True, timeout=PULL_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise DataError(
            f"{dvc_file.name} is tracked by DVC, but there is no `dvc` command to pull it ({exc.filename}); install the "
            "project's environment (`make run` or `make test` set up .venv), or put the data folder in place by hand"
        ) from exc
    except subprocess.TimeoutExpired as exc:  # a remote that hangs: retried like one that fails (`is_transient`)
        raise RemoteError(
            f"dvc pull {dvc_file.name} did not finish in {PULL_TIMEOUT_S} s; check the remote with `dvc remote list` "
            "and run `dvc pull` by hand"
        ) from exc
    if result.returncode != 0:
        raise RemoteError(
            f"dvc pull {dvc_file.name} failed: {(result.stderr or result.stdout).strip()[-500:]}; "
            "check the remote with `dvc remote list` and run `dvc pull` by hand"
        )


def data_version(data_dir: Path) -> str:
    """The folder's DVC md5; a DVC-tracked folder is pulled first when missing or stale.

    Raises:
        DataError: a tracked folder still differs from its `.dvc` file after pulling.
    """
    dvc_file = dvc_file_for(data_dir)
    if not dvc_file.is_file():
        return dir_md5(data_dir)
    expected = recorded_md5(dvc_file)
    if data_dir.is_dir() and any(data_dir.iterdir()):
        current = dir_md5(data_dir)
        if current == expected:
            return expected
        if not _dvc_has(dvc_file.parent, current):  # not a version DVC checked out before: pulling would undo edits
            raise DataError(
                f"{data_dir} differs from what {dvc_file.name} records, and DVC has no record of it as it is now (md5 "
                f"{current}; edited, or a pull cut short): `dvc checkout {dvc_file.name}` (or `dvc pull "
                f"{dvc_file.name}`) restores what it records; if you edited it on purpose, `dvc add {data_dir.name}` "
                f"records your changes (then commit {dvc_file.name})"
            )
    pull(dvc_file)
    actual = dir_md5(data_dir)
    if actual != expected:
        raise DataError(
            f"{data_dir} (md5 {actual}) differs from what {dvc_file.name} records ({expected}): "
            f"run `dvc checkout {dvc_file.name}` to restore it, or `dvc add {data_dir.name}` to record your changes"
        )
    return expected


def _dvc_has(start: Path, md5: str) -> bool:
    """Whether the DVC cache of the project holding `start` has the folder version `md5` (`<hex>.dir`): one that DVC
    itself checked out or added, so replacing the folder with another version loses nothing DVC cannot restore."""
    cache = _dvc_cache(start)
    return cache is not None and any((root / md5[:2] / md5[2:]).is_file() for root in (cache / "files" / "md5", cache))


def _dvc_cache(start: Path) -> Path | None:
    """The DVC cache of the project holding `start`, as DVC's own settings place it (`dvc cache dir`: `cache.dir` may
    point at a team's shared cache); `.dvc/cache` when DVC cannot be asked; None outside a DVC project."""
    project = next((folder for folder in (start, *start.parents) if (folder / ".dvc").is_dir()), None)
    if project is None:
        return None
    try:
        asked = subprocess.run([_dvc(), "cache", "dir"], cwd=project, capture_output=True, text=True, timeout=60)
        if asked.returncode == 0 and asked.stdout.strip():
            return project / asked.stdout.strip().splitlines()[-1]  # absolute, or relative to the project
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("`dvc cache dir` failed (%s); looking in .dvc/cache", exc)
    return project / ".dvc" / "cache"


def dir_md5(root: Path) -> str:
    """The `md5` DVC writes into a `.dvc` file for a tracked folder (`<hex>.dir`).

    DVC hashes the JSON list of `{"md5", "relpath"}` entries of every file,
    sorted by relative path; computing the same here lets any folder a user
    passes be versioned and compared like the DVC-tracked demo data.
    """
    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {".dvc", ".git"})
        for name in filenames:
            if name in {".gitignore", ".dvcignore"}:
                continue
            path = Path(dirpath) / name
            entries.append({"md5": file_md5(path), "relpath": path.relative_to(root).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    payload = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(payload).hexdigest() + ".dir"


def current_data_md5(data_dir: Path) -> str:
    """The md5 the data's `.dvc` file records (no pull needed), else the folder's own DVC md5.

    Raises:
        DataError: neither a `.dvc` file nor the folder exists.
    """
    dvc_file = dvc_file_for(data_dir)
    if dvc_file.is_file():
        return recorded_md5(dvc_file)
    if data_dir.is_dir():
        return dir_md5(data_dir)
    raise DataError(
        f"data folder '{data_dir}' does not exist and no {dvc_file.name} names it: "
        "pass --set data.dir=DIR with <class>/<image> folders"
    )
