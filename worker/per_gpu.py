"""`python -m worker --per-gpu`: one worker process per GPU of the host, each pinned to its device, so a 4-GPU box
runs 4 jobs at once.

Each child is a whole `python -m worker` with `CUDA_VISIBLE_DEVICES` naming its one GPU (by UUID where nvidia-smi
gave one, else by index in PCI bus order), its own Celery hostname (`gpu<i>@<host>`, the name it registers under)
and its own cache folder. It sees one card, so it consumes the queues that card serves. The supervisor restarts a
child that dies (a non-zero exit or a signal); a child that exits 0 was drained (`modelpress workers drain`) and
stays stopped. On SIGTERM or SIGINT it forwards SIGTERM to every child (each drains: finishes its job, exits) and
exits when the last one has, as it does once every child has been drained.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from modelpress.settings import Settings
from worker.registration import Gpu, detect_gpus

log = logging.getLogger(__name__)

WORKER_COMMAND = [sys.executable, "-m", "worker"]
RESTART_DELAY_S = 5.0
POLL_S = 0.5


@dataclass
class ChildPlan:
    """How to start the worker of one GPU."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    died_at: float | None = None
    drained: bool = False


def child_plans(
    gpus: list[Gpu],
    cache_root: Path,
    extra_args: list[str],
    environ: Mapping[str, str] = os.environ,
    host: str | None = None,
    command: list[str] = WORKER_COMMAND,
) -> list[ChildPlan]:
    """One plan per GPU: the device pinned, a distinct worker name and cache folder, one job at a time."""
    host = host or socket.gethostname()
    plans = []
    for gpu in gpus:
        name = f"gpu{gpu.index}@{host}"
        env = {
            **environ,
            "CUDA_VISIBLE_DEVICES": gpu.uuid or str(gpu.index),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # indices as nvidia-smi numbers them
            "MODELPRESS_CACHE_DIR": str(cache_root / f"gpu{gpu.index}"),
            "MODELPRESS_WORKER_CONCURRENCY": "1",
        }
        plans.append(ChildPlan(name, [*command, "--hostname", name, *extra_args], env))
    return plans


@dataclass
class GpuSupervisor:
    """Keeps one child per plan running until told to stop, then drains them all."""

    plans: list[ChildPlan]
    restart_delay_s: float = RESTART_DELAY_S
    stop_signal: int | None = None
    start: Callable[..., subprocess.Popen[bytes]] = field(default=subprocess.Popen)

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        self.stop_signal = signum

    def run(self) -> int:
        for plan in self.plans:
            self._start(plan)
        while self.stop_signal is None and not all(plan.drained for plan in self.plans):
            self.tend()
            time.sleep(POLL_S)
        return self.drain()

    def tend(self) -> None:
        """Restart each child that died, `restart_delay_s` after it did; leave a drained one stopped."""
        now = time.monotonic()
        for plan in self.plans:
            if plan.process is not None and plan.process.poll() == 0:
                log.info("worker %s drained and exited; it is not restarted", plan.name)
                plan.process, plan.drained = None, True
            elif plan.process is not None and plan.process.poll() is not None:
                log.warning("worker %s exited with %s; restarting it", plan.name, plan.process.returncode)
                plan.process, plan.died_at = None, now
            if not plan.drained and plan.process is None and now - (plan.died_at or 0.0) >= self.restart_delay_s:
                plan.restarts += 1
                self._start(plan)

    def drain(self) -> int:
        """SIGTERM to every child (Celery's warm shutdown: it finishes its job), then wait for all of them."""
        live = [plan for plan in self.plans if plan.process is not None and plan.process.poll() is None]
        log.info("draining %d GPU worker(s)", len(live))
        for plan in live:
            plan.process.send_signal(signal.SIGTERM)
        for plan in live:
            plan.process.wait()
        return 0

    def _start(self, plan: ChildPlan) -> None:
        log.info("starting worker %s (CUDA_VISIBLE_DEVICES=%s)", plan.name, plan.env["CUDA_VISIBLE_DEVICES"])
        plan.process = self.start(plan.argv, env=plan.env)


def supervise(settings: Settings, extra_args: list[str]) -> int:
    """Run one pinned worker per GPU this host has; an error when it has none."""
    gpus = detect_gpus(settings)
    if not gpus:
        log.error(
            "--per-gpu found no GPU (nvidia-smi lists none, MODELPRESS_GPUS declares none, or "
            "MODELPRESS_DEVICE is the CPU); run `python -m worker` for a CPU worker"
        )
        return 2
    supervisor = GpuSupervisor(child_plans(gpus, settings.cache_root, extra_args))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()
