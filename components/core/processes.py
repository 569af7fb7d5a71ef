"""Processes: whether one is still running, and a name for this one that a later process with the same pid does not share.

A pid alone is reused once its process has ended; on Linux the kernel's boot id and the process's start time
(`/proc/<pid>/stat`, in clock ticks since boot) tell the process that wrote a record from a later one with the same
pid. Elsewhere only the pid is known, and a live pid counts as the same process (the safe side: nothing is
declared dead that might not be).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def start_mark(pid: int) -> str:
    """`<boot id>:<start time in clock ticks>` of process `pid`, or "" where /proc cannot tell (not Linux, gone)."""
    try:
        boot = _BOOT_ID.read_text().strip()
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{boot}:{started}"


def this_process() -> dict[str, str]:
    """This process, as `still_running` reads it back: its host, pid and start mark."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "started": start_mark(os.getpid())}


def still_running(host: str, pid: str, started: str) -> bool | None:
    """Whether the process recorded by `this_process` runs yet: None where this machine cannot tell (another
    host, or a record without a pid); a live pid whose start mark differs is a later process, so the recorded
    one has ended."""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if not running(int(pid)):
        return False
    now = start_mark(int(pid))
    return not (started and now and now != started)
