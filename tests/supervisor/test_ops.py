"""Operations: SIGUSR1 reopens the access log (logrotate), and systemd's ExecReload checks the config first."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from devstack import ProxyFactory, Service
from devstack.stack import PROJECT_ROOT
from tests.supervisor.helpers import admin, config, echoed_via, get, wait_for_log, wait_until, write_config

UNIT = PROJECT_ROOT / "systemd" / "uvgate.service"


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def test_sigusr1_reopens_the_access_log_after_rotation(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    proxy = proxy_factory(config(access_log=True, access_log_path=str(log_path)), workers=2)
    for _ in range(6):
        status, _, _ = get(proxy)
        assert status == 200
    wait_until(lambda: len(_lines(log_path)) == 6, 10.0, "6 lines in the access log", proxy)

    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)  # what logrotate does before postrotate
    proxy.send_signal(signal.SIGUSR1)
    wait_for_log(proxy, r"SIGUSR1: workers reopen their access log")
    wait_for_log(proxy, rf"access log {log_path} reopened", count=2)  # each worker
    assert log_path.exists(), "reopening creates the file again"

    for index in range(10):
        status, _, _ = get(proxy, f"/api/resource?after={index}")
        assert status == 200
    wait_until(lambda: len(_lines(log_path)) == 10, 10.0, "10 lines in the new access log", proxy)
    assert len(_lines(rotated)) == 6, "nothing more goes to the rotated file"
    assert all(line["path"] == "/api/resource" for line in _lines(log_path))
    assert proxy.exit_status() is None


def _exec_reload(config_path: Path, mainpid: int) -> list[list[str]]:
    """The unit's ExecReload command lines, for this checkout's uvgate, config and supervisor."""
    uvgate = str(Path(sys.executable).parent / "uvgate")
    commands: list[list[str]] = []
    for line in UNIT.read_text().splitlines():
        if not line.startswith("ExecReload="):
            continue
        argv = shlex.split(line.removeprefix("ExecReload="))
        argv = [
            uvgate
            if arg == "/opt/uvgate/.venv/bin/uvgate"
            else str(config_path)
            if arg == "/etc/uvgate/uvgate.toml"
            else arg
            for arg in argv
        ]
        commands.append([arg.replace("$MAINPID", str(mainpid)) for arg in argv])
    return commands


def _systemctl_reload(commands: list[list[str]]) -> tuple[int, str]:
    """Run ExecReload lines as systemd does: in order, stopping at the first that fails."""
    output = ""
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        output += done.stdout + done.stderr
        if done.returncode != 0:
            return done.returncode, output
    return 0, output


def test_reload_command_line_refuses_a_bad_config_and_the_proxy_keeps_serving(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    proxy = proxy_factory(config(), workers=2)
    commands = _exec_reload(proxy.config_path, proxy.pid)
    assert commands[0][1:3] == ["--check", "--config"], "the config is checked before any signal"
    assert commands[-1][0] == "/bin/kill" and commands[-1][1] == "-HUP"

    good = proxy.config_path.read_text()
    write_config(proxy, good.replace('via = "1.1 gen1"', 'via = "1.1 gen1"\nworkers_typo = 3'))
    code, output = _systemctl_reload(commands)
    assert code != 0, output
    assert "server.workers_typo" in output and "unknown key" in output, output
    assert "SIGHUP" not in proxy.read_log(), "a bad config is never signalled"
    status, body = admin(proxy, "/readyz")
    assert status == 200 and body["generation"] == 1, body
    assert echoed_via(proxy) == "1.1 gen1"

    write_config(proxy, good.replace('via = "1.1 gen1"', 'via = "1.1 gen2"'))
    code, output = _systemctl_reload(commands)
    assert code == 0, output
    wait_for_log(proxy, r"generation 2 serving")
    wait_until(lambda: echoed_via(proxy) == "1.1 gen2", 10.0, "the reloaded config serving", proxy)
    assert proxy.exit_status() is None
