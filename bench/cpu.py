"""User and system CPU time of a process tree, from /proc/<pid>/stat (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from devstack.procfs import process_tree, read_stat

__all__ = ["CpuTimes", "tree_cpu_times"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """CPU seconds split into user (utime + cutime) and system (stime + cstime) time."""

    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        """User + system seconds."""
        return self.user_s + self.system_s

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user_s - other.user_s, self.system_s - other.system_s)


def tree_cpu_times(pid: int) -> CpuTimes:
    """CPU times of `pid` and all of its live descendants, including their reaped children.

    Same accounting as `devstack.procfs.tree_cpu_seconds` (each process counted once), split in
    two; the resolution is one clock tick (usually 10 ms).
    """
    user = system = 0
    for member in process_tree(pid):
        st = read_stat(member)
        if st is not None:
            user += st.utime + st.cutime
            system += st.stime + st.cstime
    return CpuTimes(user / _CLK_TCK, system / _CLK_TCK)
