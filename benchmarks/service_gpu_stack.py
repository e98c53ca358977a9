"""The running service for the service benchmark: `modelpress dev` in a data folder, its command line, and a
sampler of the GPU and host memory it uses.

The service is started exactly as a user starts it (`python -m modelpress dev`: embedded Redis, SQLite, the API
on loopback, one worker), under the same supervisor `modelpress dev` uses for its own children, and stopped with
SIGTERM (it then stops worker, API and Redis in order), then SIGKILL for anything of its tree still alive.
Every command-line call is `python -m modelpress ...` with the API key in the environment, bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.cli.client import ApiError, Client
from modelpress.cli.dev import Supervisor, free_port

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20


def say(message: str) -> None:
    """A progress line on stdout, flushed, stamped with the wall-clock time (a remote log shows where time goes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_environment(data_dir: Path, device: str | None) -> dict[str, str]:
    """The service's environment: this source tree first on PYTHONPATH, a data folder of its own, no outside Redis
    or database, no rate limits (hundreds of upload parts and event reads), progress written every 0.2 s (the
    timeline's resolution)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODELPRESS_REDIS_URL", "DATABASE_URL")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
        DATA_DIR=str(data_dir),
        MODELPRESS_STATE_DIR=str(data_dir.parent / "cli-state"),
        MODELPRESS_RATE_LIMIT_PER_MINUTE="0",
        MODELPRESS_UPLOAD_RATE_LIMIT_PER_MINUTE="0",
        MODELPRESS_PROGRESS_INTERVAL_S="0.2",
        COLUMNS="200",
        NO_COLOR="1",
    )
    if device:
        env["MODELPRESS_DEVICE"] = device
    return env


class CommandFailed(RuntimeError):
    """A command-line call exited non-zero or ran past its time; the message has the end of its output."""


@dataclass
class Service:
    """`modelpress dev` running in `work/data`, its log in `work/logs`."""

    work: Path
    device: str | None
    port: int = field(default_factory=free_port)
    key: str | None = None
    supervisor: Supervisor = field(default_factory=lambda: Supervisor(stop_timeout=60.0))
    root_pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = child_environment(self.work / "data", self.device)
        env["MODELPRESS_URL"] = self.url
        if self.key:
            env["MODELPRESS_API_KEY"] = self.key
        return env

    def start(self, timeout: float = 180.0) -> None:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        log = (self.work / "logs" / "service.log").open("ab")
        argv = [sys.executable, "-m", "modelpress", "dev", "--port", str(self.port), "--stop-timeout", "20"]
        child = self.supervisor.start("modelpress dev", argv, self.env, stdout=log, stderr=subprocess.STDOUT)
        self.root_pid = child.process.pid
        deadline = time.monotonic() + timeout
        with Client(self.url) as client:
            while time.monotonic() < deadline:
                if not child.alive():
                    raise CommandFailed(f"modelpress dev exited with {child.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.health().status_code == 200:
                        return
                except ApiError:
                    pass
                time.sleep(0.5)
        raise CommandFailed(f"the API did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        path = self.work / "logs" / "service.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `modelpress dev` (it stops its children in order), then SIGKILL whatever of its tree lives."""
        tree = descendants(self.root_pid) if self.root_pid else set()
        self.supervisor.stop_all()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def cli(self, *args: str, timeout: float) -> str:
        """Run `python -m modelpress ARGS`; its output (also appended to logs/cli.log), or CommandFailed."""
        argv = [sys.executable, "-m", "modelpress", *args]
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(f"`modelpress {' '.join(args)}` ran past {timeout:.0f} s") from exc
        output = done.stdout + done.stderr
        with (self.work / "logs" / "cli.log").open("a") as log:
            log.write(f"$ modelpress {' '.join(args)}\n{output}\n")
        if done.returncode != 0:
            raise CommandFailed(f"`modelpress {' '.join(args)}` exited {done.returncode}:\n{output[-3000:]}")
        return output

    def create_key(self, tenant: str) -> str:
        self.key = self.cli("keys", "create", "--tenant", tenant, timeout=120).strip().splitlines()[-1]
        return self.key

    def client(self) -> Client:
        return Client(self.url, self.key, timeout=60.0)


def printed_id(output: str, noun: str) -> str:
    """The id the command line printed as `<noun> id: <id>` (uploads) or `job <id> <status>` (submit)."""
    pattern = rf"{noun} id: (\S+)" if noun != "job" else r"^job (\S+) \w+"
    found = re.search(pattern, output, re.MULTILINE)
    if not found:
        raise CommandFailed(f"no {noun} id in the command's output:\n{output[-2000:]}")
    return found.group(1)


# --- processes and memory ---------------------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def descendants(root: int) -> set[int]:
    """Every live process under `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in bytes; empty when it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        return {}
    return values


def _role(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "-m worker" in command:
        return "worker"
    if "uvicorn" in command:
        return "api"
    if "redis-server" in command:
        return "redis"
    return "other"


def gpu_used_mib() -> int | None:
    """Memory in use on GPU 0 as nvidia-smi reports it (all processes, CUDA contexts included), or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return int(done.stdout.strip().splitlines()[0])
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError):
        return None


def gpu_description() -> dict[str, Any] | None:
    """GPU 0's name, memory and driver from nvidia-smi, or None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,memory.total,driver_version"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "--id=0"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    name, total, driver = (part.strip() for part in done.stdout.strip().split(","))
    return {"name": name, "memory_mib": int(total), "driver": driver}


class Sampler(threading.Thread):
    """Samples every `interval_s`: GPU 0's used memory (nvidia-smi), the resident memory of the service's
    processes by role (api, worker, redis), the largest peak resident size (VmHWM) of any worker process, and the
    free disk of the work folder. `peaks(start, end)` summarizes a time window."""

    def __init__(self, service: Service, interval_s: float = 0.5) -> None:
        super().__init__(name="sampler", daemon=True)
        self.service = service
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.has_gpu = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        rss: dict[str, int] = {"api": 0, "worker": 0, "redis": 0, "other": 0}
        worker_hwm = 0
        for pid in descendants(self.service.root_pid) if self.service.root_pid else ():
            status, role = _status(pid), _role(pid)
            if not status or role == "gone":
                continue
            rss[role] += status.get("VmRSS", 0)
            if role == "worker":
                worker_hwm = max(worker_hwm, status.get("VmHWM", 0))
        return {
            "t": time.time(),
            "gpu_mib": gpu_used_mib() if self.has_gpu else None,
            "rss": rss,
            "worker_hwm": worker_hwm,
            "disk_free": shutil.disk_usage(self.service.work).free,
        }

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=15)

    def peaks(self, start: float, end: float) -> dict[str, Any]:
        window = [s for s in self.samples if start <= s["t"] <= end]
        if not window:
            return {"samples": 0}
        gpu = [s["gpu_mib"] for s in window if s["gpu_mib"] is not None]
        return {
            "samples": len(window),
            "interval_s": self.interval_s,
            "gpu_used_mib": max(gpu) if gpu else None,
            "gpu_method": "nvidia-smi memory.used of GPU 0 (every process, CUDA contexts and allocator caches)"
            if gpu
            else "no nvidia-smi",
            "worker_peak_rss_mib": max(s["worker_hwm"] for s in window) / MiB,
            "worker_rss_method": "largest VmHWM (peak resident set) of the worker's processes; the job runs in a "
            "pool child started for it",
            "service_rss_mib": max(sum(s["rss"].values()) for s in window) / MiB,
            "api_rss_mib": max(s["rss"]["api"] for s in window) / MiB,
            "disk_free_min_gb": min(s["disk_free"] for s in window) / 1e9,
        }
