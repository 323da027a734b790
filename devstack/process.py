"""A child process in its own process group, logging to a file, stopped by PID.

Theory of operation: every component is started with `start_new_session=True`, so its pid is
also its process-group id and everything it forks stays in that group. The leader is never reaped
until `stop()`: exit checks use `waitid(WNOWAIT)`, which leaves the zombie in place, so the pid
(and the group id) cannot be reused while we still send signals to them. `stop()` signals, waits,
escalates to SIGKILL on the whole group at the timeout, kills whatever is left in the group once
the leader has exited (recording those pids in `leftover_pids`), waits until the group is empty,
and only then reaps the leader.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from devstack.procfs import descendants, group_members

__all__ = ["KillMode", "Process"]

KillMode = Literal["group", "mixed"]
"""`group`: SIGTERM goes to the whole process group. `mixed`: SIGTERM to the leader only (it
stops its own children, like the proxy supervisor); SIGKILL to the whole group on timeout.
The same meaning as systemd's KillMode=control-group / KillMode=mixed."""

_PR_SET_PDEATHSIG = 1


def _make_preexec(cpus: Sequence[int] | None, parent_death_signal: bool) -> Callable[[], None] | None:
    """Child-side setup run between fork and exec: CPU affinity and PR_SET_PDEATHSIG."""
    prctl: Callable[..., int] | None = None
    if parent_death_signal and sys.platform == "linux":
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    if prctl is None and not cpus:
        return None
    cpu_set = set(cpus) if cpus else None

    def preexec() -> None:
        if cpu_set is not None:
            os.sched_setaffinity(0, cpu_set)
        if prctl is not None:
            # The child gets SIGKILL if the thread that started it dies (e.g. pytest killed hard).
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


class Process:
    """A started child process; see the module docstring for the stop protocol."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        kill_mode: KillMode = "group",
        cpus: Sequence[int] | None = None,
        parent_death_signal: bool = True,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        self.kill_mode: KillMode = kill_mode
        self.leftover_pids: tuple[int, ...] = ()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_make_preexec(cpus, parent_death_signal),
            )
        self.pid = self._popen.pid
        self._status: int | None = None

    def __repr__(self) -> str:
        state = "running" if self.exit_status() is None else f"exited {self._status}"
        return f"<Process {self.name} pid={self.pid} {state}>"

    # ------------------------------------------------------------------ state

    def exit_status(self) -> int | None:
        """Exit code (negative signal number if killed), or None while running. Never reaps."""
        if self._status is not None:
            return self._status
        if self._popen.returncode is not None:
            self._status = self._popen.returncode
            return self._status
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Reaped behind our back (someone called os.wait()): Popen records it as 0.
            self._popen.poll()
            self._status = self._popen.returncode if self._popen.returncode is not None else -1
            return self._status
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            self._status = info.si_status
        else:
            self._status = -info.si_status
        return self._status

    @property
    def running(self) -> bool:
        """True until the main process has exited."""
        return self.exit_status() is None

    def wait(self, timeout: float) -> int:
        """Wait for the main process to exit and return its status; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while (status := self.exit_status()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return status

    def children(self) -> list[int]:
        """All live descendants of the main process (e.g. proxy workers)."""
        return descendants(self.pid)

    def group_pids(self) -> list[int]:
        """Live processes in this process group, the leader included while it runs."""
        if self._popen.returncode is not None:
            return []  # leader reaped: the group id may belong to someone else now
        return group_members(self.pid)

    # ------------------------------------------------------------------ signals

    def send_signal(self, sig: int) -> None:
        """Signal the main process only (e.g. SIGHUP to the proxy supervisor)."""
        if self._popen.returncode is None:
            os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal every process in the group; a no-op once the group is empty or reaped."""
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def _others(self) -> list[int]:
        return [pid for pid in group_members(self.pid) if pid != self.pid]

    def _wait_group_empty(self, deadline: float) -> list[int]:
        while (others := self._others()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return others

    def stop(self, timeout: float = 10.0) -> int:
        """Stop gracefully, SIGKILL the group after `timeout`; return the exit status. Idempotent.

        Returns only when the whole group is gone. Group members that had to be SIGKILLed after the
        leader exited (mixed mode: any still running; group mode: any still running at the
        timeout) are recorded in `leftover_pids`.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        deadline = time.monotonic() + timeout
        if self.exit_status() is None:
            if self.kill_mode == "group":
                self.signal_group(signal.SIGTERM)
            else:
                self.send_signal(signal.SIGTERM)
            try:
                self.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
                self.wait(10.0)
        # The leader is a zombie now, so the group id is still ours: deal with what is left.
        others = self._others()
        if others and self.kill_mode == "group":
            others = self._wait_group_empty(deadline)
        if others:
            self.leftover_pids = tuple(others)
            self.signal_group(signal.SIGKILL)
            self._wait_group_empty(time.monotonic() + 10.0)
        self._popen.wait()
        status = self.exit_status()
        assert status is not None
        return status

    # ------------------------------------------------------------------ logs

    def read_log(self) -> str:
        """The whole log (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log, for error messages."""
        return "\n".join(self.read_log().splitlines()[-lines:])
