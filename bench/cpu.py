"""User and system CPU time of a process tree, from /proc/<pid>/stat, and the machine's steal time, from
/proc/stat (Linux).

Steal time is the time a virtual CPU wanted to run but the hypervisor ran something else. On a VM
whose host is busy it comes in bursts, and the per-request CPU of everything measured meanwhile was
observed to rise with it (see bench/README.md), so the kit records it with every run. A virtual CPU
that idles cannot be robbed, so the share is taken of the busy time, not of all ticks: otherwise a
target that leaves a CPU idle would look less disturbed than one that keeps it busy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from devstack.procfs import process_tree, read_stat

__all__ = ["CpuTimes", "MachineTicks", "machine_ticks", "parse_machine_ticks", "tree_cpu_times"]

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


@dataclass(frozen=True, slots=True)
class MachineTicks:
    """The `cpu` line of /proc/stat (all CPUs): the busy ticks (neither idle nor waiting for I/O, stolen
    ones included) and the stolen ones among them."""

    busy: int
    steal: int

    def steal_share(self, earlier: MachineTicks) -> float | None:
        """Stolen share of the busy time since `earlier` (0.05 = 5 %); None when no busy tick went by."""
        busy = self.busy - earlier.busy
        return None if busy <= 0 else (self.steal - earlier.steal) / busy


def parse_machine_ticks(text: str) -> MachineTicks | None:
    """The `cpu` line of a /proc/stat text; None when it is missing or too short to hold steal time.

    Its fields are user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    already counted in user (and nice) time, so the busy ticks are the first eight less idle and iowait.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            if len(fields) < 9:
                return None
            ticks = [int(f) for f in fields[1:9]]
            return MachineTicks(sum(ticks) - ticks[3] - ticks[4], ticks[7])
    return None


def machine_ticks() -> MachineTicks | None:
    """This machine's ticks now; None where /proc/stat cannot be read or has no steal field."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return parse_machine_ticks(f.read())
    except OSError:
        return None
