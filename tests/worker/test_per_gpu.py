"""One worker per GPU: each child pinned to its device with its own name and cache folder, restarted when it dies,
and drained on SIGTERM. Fake device lists on the CPU; real child processes (a small script, then real workers)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from modelpress.settings import DeclaredGpu, Settings
from tests.conftest import REPO
from tests.utils.stack import open_stack, wait_for
from worker.per_gpu import ChildPlan, GpuSupervisor, child_plans, supervise
from worker.registration import Gpu

GPUS = [
    Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 85_520_809_984),
    Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 85_520_809_984),
    Gpu(2, None, "NVIDIA H100 80GB HBM3", 85_520_809_984),
]
# a stand-in worker: records what it was started with, then waits for SIGTERM and records that it drained
CHILD = """
import json, os, signal, sys, time
out = os.path.join(os.environ["OUT"], sys.argv[sys.argv.index("--hostname") + 1])
keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MODELPRESS_CACHE_DIR", "MODELPRESS_WORKER_CONCURRENCY")
with open(out + ".start", "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], **{k: os.environ[k] for k in keys}}) + "\\n")
def drain(*_):
    open(out + ".drained", "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
while True:
    time.sleep(0.05)
"""


def starts(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.start"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Supervised:
    """A supervisor of stand-in children (CHILD) running in a thread; each child records itself under `out`, and
    `result` receives the supervisor's exit code."""

    out: Path
    plans: list[ChildPlan]
    supervisor: GpuSupervisor
    thread: threading.Thread
    result: list[int]


def supervise_stand_ins(tmp_path: Path, gpus: list[Gpu]) -> Supervised:
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-c", CHILD]
    plans = child_plans(gpus, tmp_path / "cache", [], environ={"OUT": str(out)}, host="box", command=command)
    supervisor = GpuSupervisor(plans, restart_delay_s=0.0)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
    thread.start()
    return Supervised(out, plans, supervisor, thread, result)


def test_each_child_is_pinned_to_its_gpu_with_its_own_name_and_cache(tmp_path: Path) -> None:
    plans = child_plans(GPUS, tmp_path / "cache", ["--loglevel", "INFO"], environ={"PATH": "/bin"}, host="box")
    assert [p.name for p in plans] == ["gpu0@box", "gpu1@box", "gpu2@box"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["GPU-aaaa", "GPU-bbbb", "2"]
    assert {p.env["CUDA_DEVICE_ORDER"] for p in plans} == {"PCI_BUS_ID"}
    assert [p.env["MODELPRESS_CACHE_DIR"] for p in plans] == [str(tmp_path / "cache" / f"gpu{i}") for i in range(3)]
    assert plans[1].argv[-4:] == ["--hostname", "gpu1@box", "--loglevel", "INFO"]
    assert all(p.env["PATH"] == "/bin" and p.env["MODELPRESS_WORKER_CONCURRENCY"] == "1" for p in plans)


def test_the_supervisor_restarts_a_dead_child_and_drains_all_on_stop(tmp_path: Path) -> None:
    running = supervise_stand_ins(tmp_path, GPUS[:2])
    out, plans = running.out, running.plans
    try:
        first = wait_for(lambda: starts(out, "gpu1@box"), 30, "gpu1's child")[0]
        assert first["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
        wait_for(lambda: starts(out, "gpu0@box"), 30, "gpu0's child")
        subprocess.run(["kill", "-9", str(first["pid"])], check=True)
        again = wait_for(lambda: starts(out, "gpu1@box")[1:], 30, "gpu1's child restarted")[0]
        assert again["pid"] != first["pid"] and again["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
        assert len(starts(out, "gpu0@box")) == 1, "the other child was left alone"
        subprocess.run(["kill", "-TERM", str(starts(out, "gpu0@box")[0]["pid"])], check=True)  # drained alone
        wait_for(lambda: plans[0].drained, 30, "gpu0's drained child noticed")
        assert len(starts(out, "gpu0@box")) == 1, "a child that exited 0 after a drain is not restarted"
    finally:
        running.supervisor.request_stop(signal.SIGTERM)
        running.thread.join(timeout=30)
    assert running.result == [0]
    assert (out / "gpu0@box.drained").exists() and (out / "gpu1@box.drained").exists()
    assert all(plan.process is None or plan.process.poll() is not None for plan in plans)


def test_the_supervisor_exits_once_every_child_was_drained(tmp_path: Path) -> None:
    running = supervise_stand_ins(tmp_path, GPUS[:1])
    pid = wait_for(lambda: starts(running.out, "gpu0@box"), 30, "gpu0's child")[0]["pid"]
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    running.thread.join(timeout=30)
    assert running.result == [0] and len(starts(running.out, "gpu0@box")) == 1


def test_per_gpu_without_a_gpu_is_an_error() -> None:
    assert supervise(Settings(device="cpu"), []) == 2


def test_per_gpu_workers_register_one_row_per_gpu_and_drain_on_sigterm(migrated, tmp_path: Path) -> None:
    from modelpress.db import get_engine
    from modelpress.models import Worker

    gpus = [DeclaredGpu(name=f"Fake GPU {i}", memory_bytes=(25 + 30 * i) * 10**9) for i in range(2)]
    host = socket.gethostname()
    with open_stack(migrated, tmp_path, MODELPRESS_HEARTBEAT_INTERVAL_S="0.5") as stack:
        env = {**stack.env, "MODELPRESS_GPUS": json.dumps([g.model_dump() for g in gpus])}
        log = (tmp_path / "per-gpu.log").open("w")
        argv = [sys.executable, "-m", "worker", "--per-gpu"]
        process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        engine = get_engine(stack.env["DATABASE_URL"])

        def rows() -> dict[str, Worker]:
            from sqlalchemy import select
            from sqlalchemy.orm import Session

            with Session(engine) as session:
                return {w.name: w for w in session.scalars(select(Worker))}

        try:
            found = wait_for(lambda: len(rows()) == 2 and rows(), 120, "two registered workers")
            assert sorted(found) == [f"gpu0@{host}", f"gpu1@{host}"]
            assert [g["name"] for g in found[f"gpu1@{host}"].gpus] == ["Fake GPU 1"]
            assert found[f"gpu0@{host}"].memory_classes == ["cpu", "gpu-24"]
            assert found[f"gpu1@{host}"].memory_classes == ["cpu", "gpu-24", "gpu-48"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0
            assert rows() == {}, "each worker drained, exited and removed its row"
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
            engine.dispose()
