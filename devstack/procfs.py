"""Linux /proc readers: process trees, process groups, CPU time, RSS and mapped files (no dependencies)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ProcStat",
    "all_pids",
    "cpu_seconds",
    "descendants",
    "group_members",
    "mapped_files",
    "pid_alive",
    "process_tree",
    "read_stat",
    "rss_bytes",
    "tree_cpu_seconds",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that devstack and bench use; times are clock ticks."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    utime: int
    stime: int
    cutime: int
    cstime: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def all_pids() -> list[int]:
    """Every pid currently listed in /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _all_stats() -> list[ProcStat]:
    stats = (read_stat(pid) for pid in all_pids())
    return [st for st in stats if st is not None]


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (one /proc scan, breadth first)."""
    children: dict[int, list[int]] = {}
    for st in _all_stats():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt: list[int] = []
        for parent in frontier:
            nxt.extend(children.get(parent, ()))
        out.extend(nxt)
        frontier = nxt
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` followed by its descendants."""
    return [pid, *descendants(pid)]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    return [st.pid for st in _all_stats() if st.pgrp == pgid and st.state != "Z"]


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    st = read_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of `pids`, including their reaped children (cutime/cstime).

    Summing over a live tree counts every process once: a child shows up in its parent's
    cutime/cstime only after it has been reaped, i.e. once it is no longer in the tree.
    """
    ticks = 0
    for pid in pids:
        st = read_stat(pid)
        if st is not None:
            ticks += st.utime + st.stime + st.cutime + st.cstime
    return ticks / _CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and all of its descendants."""
    return cpu_seconds(process_tree(pid))


def rss_bytes(pid: int) -> int | None:
    """Resident set size from /proc/<pid>/status (VmRSS); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def mapped_files(pid: int) -> set[str]:
    """Paths of the files mapped into `pid` (shared libraries, the executable) from /proc/<pid>/maps.

    Empty if the process is gone. Deleted files keep their path with a ` (deleted)` suffix.
    """
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return set()
    out = set()
    for line in lines:
        # address perms offset dev inode [path]; the path may contain spaces.
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            out.add(fields[5])
    return out
