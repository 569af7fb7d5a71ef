"""Processes: whether one is still running, and a record of this one that tells it from any other process.

A pid alone is reused once its process has ended, and means nothing in another pid namespace (a container) or on
another machine. On Linux a process is named by the kernel's boot id (random, one per machine and boot), its pid
namespace and its start time (`/proc/<pid>/stat`, in clock ticks since boot). Whether a recorded process still runs
is answered only where it can be: in the same boot and pid namespace as the caller (its pid, then its start time),
or on the same machine after a reboot (`/etc/machine-id`: it ended). Anything else (another machine with the same
hostname, another container, a system without /proc) is "cannot tell", and nothing is declared dead that might not be.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_MACHINE_ID = Path("/etc/machine-id")


def running(pid: int) -> bool:
    """Whether a process with this pid exists in this pid namespace (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def start_mark(pid: int) -> str:
    """`<boot id>:<start time in clock ticks>` of process `pid`, or "" where /proc cannot tell (not Linux, gone)."""
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
    boot = _read(_BOOT_ID)
    return f"{boot}:{started}" if boot else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""


def this_process() -> dict[str, str]:
    """This process, as `still_running` reads it back: host, pid, start mark, pid namespace and machine id."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "started": start_mark(os.getpid()),
            "namespace": _pid_namespace(), "machine": _read(_MACHINE_ID)}


def still_running(record: dict[str, str]) -> bool | None:
    """Whether the process `this_process` recorded runs yet; None where this process cannot tell (see the module)."""
    pid, started = record.get("pid", ""), record.get("started", "")
    boot, _, ticks = started.partition(":")
    here = this_process()
    here_boot = here["started"].partition(":")[0]
    if not (pid.isdigit() and boot and here_boot):
        return None
    if boot != here_boot:  # another boot: of this machine (the process ended with it), or of another machine
        same_machine = bool(record.get("machine")) and record.get("machine") == here["machine"]
        return False if same_machine else None
    if not record.get("namespace") or record["namespace"] != here["namespace"]:
        return None  # another container on this machine: its pids are not ours to look up
    if not running(int(pid)):
        return False
    now = start_mark(int(pid)).partition(":")[2]
    return now == ticks if now else None
