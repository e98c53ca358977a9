"""`modelpress dev`: the embedded default starts Redis, the API and a worker, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.skipif(
    not ((REPO / "app" / "main.py").exists() and (REPO / "worker" / "__main__.py").exists()),
    reason="needs the API (app/main.py) and the worker (worker/__main__.py)",
)


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command line, read from /proc."""
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                pending.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def clean_env(data_dir: Path) -> dict[str, str]:
    """This machine's environment without any service settings, as on a fresh checkout."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MODELPRESS_") and key not in {"DATABASE_URL", "REDIS_URL", "DATA_DIR"}
    }
    return {**env, "DATA_DIR": str(data_dir)}


def start_dev(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "dev.log"
    process = subprocess.Popen(
        [sys.executable, "-c", "from modelpress.cli.main import app; app()", "dev", *args],
        cwd=tmp_path,
        env=clean_env(tmp_path / "data"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log


def test_dev_starts_everything_and_sigint_stops_it_all(tmp_path: Path) -> None:
    port = free_port()
    process, log = start_dev(tmp_path, "--port", str(port), "--stop-timeout", "20")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, f"dev exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"/healthz never answered 200:\n{log.read_text()}")
        # the banner comes after health: wait for it, then for the worker's Celery pool to be up
        while "Ctrl-C stops everything" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        children = descendants(process.pid)
        commands = " | ".join(children.values())
        assert "redis-server" in commands and "uvicorn" in commands and "-m worker" in commands, commands
        assert (tmp_path / "data" / "modelpress.db").exists()  # SQLite in DATA_DIR by default
        assert f"http://127.0.0.1:{port}/docs" in log.read_text()
        assert f"dashboard http://127.0.0.1:{port}/" in log.read_text()
        assert "modelpress" in httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text  # the dashboard's page

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=45) == 0, log.read_text()
        leftovers = {pid: cmd for pid, cmd in children.items() if running(pid)}
        assert not leftovers, leftovers
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_dev_exits_nonzero_when_a_child_dies(tmp_path: Path) -> None:
    port = free_port()
    process, log = start_dev(tmp_path, "--port", str(port), "--no-worker", "--stop-timeout", "10")
    try:
        deadline = time.monotonic() + 60
        api_pid = None
        while time.monotonic() < deadline and api_pid is None:
            assert process.poll() is None, log.read_text()
            api_pid = next((pid for pid, cmd in descendants(process.pid).items() if "uvicorn" in cmd), None)
            time.sleep(0.2)
        assert api_pid, log.read_text()
        while "Ctrl-C stops everything" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        children = descendants(process.pid)
        assert not any("-m worker" in cmd for cmd in children.values())  # --no-worker
        os.kill(api_pid, signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        assert "api exited" in log.read_text()
        assert not [pid for pid in children if running(pid)]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_dev_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        process, log = start_dev(tmp_path, "--port", str(sock.getsockname()[1]))
        assert process.wait(timeout=30) == 1
    assert "already in use" in log.read_text()
