"""The API's memory while a big file arrives as a resumable upload: it should stay flat whatever the file's size.

    python benchmarks/upload_memory.py [--size-gb 16] [--part-mb 64] [--out benchmarks/upload_memory_<date>.json]

It starts the API under uvicorn (as the tests do) on a fresh data folder with SQLite and no rate limits, creates an
API key, and uploads a generated text dataset of `--size-gb` GB in parts of `--part-mb` MiB. The text is produced on
the fly from a seeded 1 MiB block (each block's first line numbers it), so neither side ever holds the file; the
server stores it once (then it is deleted with the data folder). A thread samples the API process's RSS from /proc
every 50 ms before, during the parts, and during completion (the server hashes the whole file and counts its lines).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BLOCK = MiB


def seeded_block(seed: int) -> bytes:
    """1 MiB of text lines from a seeded generator, every line ending in a newline."""
    rng = random.Random(seed)
    words = ["model", "prune", "quantize", "layer", "weight", "token", "sparse", "group", "scale", "error"]
    text = bytearray()
    while len(text) < BLOCK:
        text += (" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + "\n").encode()
    return bytes(text[: BLOCK - 1]) + b"\n"


def file_bytes(block: bytes, start: int, length: int) -> Iterator[bytes]:
    """Bytes `start` to `start + length` of the endless file: block after block, each with its number stamped."""
    position, end = start, start + length
    while position < end:
        index, within = divmod(position, BLOCK)
        stamped = f"{index:012d}".encode() + block[12:]
        piece = stamped[within : within + min(BLOCK - within, end - position)]
        position += len(piece)
        yield piece


class RssSampler(threading.Thread):
    """Samples a process's resident set size (bytes) from /proc until stopped; `peak(phase)` per phase."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.phase, self.samples = pid, "before", {}
        self.stopped = threading.Event()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.samples.setdefault(self.phase, []).append(self.rss())

    def peak(self, phase: str) -> int:
        return max(self.samples.get(phase, [0]))


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import free_port

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503):
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the API did not start; see {log}")


def prepare(env: dict[str, str]) -> str:
    """Migrate the fresh database and create a key; returns the key."""
    code = (
        "from modelpress.migrate import upgrade; upgrade()\n"
        "from modelpress.db import session_scope; from modelpress.keys import create_key\n"
        "with session_scope() as s: print(create_key(s, 'bench')[1])"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return run.stdout.strip().splitlines()[-1]


def upload(url: str, key: str, size: int, part_size: int, sampler: RssSampler) -> dict:
    block = seeded_block(0)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=None) as client:
        body = {"kind": "dataset", "filename": "generated.txt", "size": size, "part_size": part_size}
        created = client.post("/v1/uploads", json=body)
        created.raise_for_status()
        upload_id, parts = created.json()["id"], created.json()["parts"]
        sampler.phase = "parts"
        started = time.perf_counter()
        for number in range(1, parts + 1):
            start = (number - 1) * part_size
            length = min(part_size, size - start)
            response = client.put(
                f"/v1/uploads/{upload_id}/parts/{number}",
                content=file_bytes(block, start, length),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            )
            response.raise_for_status()
        sent = time.perf_counter() - started
        sampler.phase = "complete"
        done = client.post(f"/v1/uploads/{upload_id}/complete")
        done.raise_for_status()
        completed = time.perf_counter() - started - sent
        client.delete(f"/v1/datasets/{done.json()['id']}")
    return {"parts": parts, "parts_s": sent, "complete_s": completed, "records": done.json()["records"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=16.0, help="file size in GB (10^9 bytes)")
    parser.add_argument("--part-mb", type=int, default=64, help="part size in MiB")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the API stores the file (default: a temp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size, part_size = int(args.size_gb * 1e9), args.part_mb * MiB
    data = Path(tempfile.mkdtemp(prefix="upload-memory-", dir=args.data_dir))
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "MODELPRESS_RATE_LIMIT_PER_MINUTE": "0",
        "MODELPRESS_UPLOAD_RATE_LIMIT_PER_MINUTE": "0",
        "PYTHONPATH": str(ROOT),
    }
    for name in ("DATABASE_URL", "MODELPRESS_DATABASE_URL"):
        env.pop(name, None)
    process = None
    try:
        key = prepare(env)
        process, url = start_api(env, data / "api.log")
        sampler = RssSampler(process.pid)
        sampler.start()
        time.sleep(1.0)
        result = upload(url, key, size, part_size, sampler)
        sampler.stopped.set()
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    row = {
        "size_bytes": size,
        "part_bytes": part_size,
        "parts": result["parts"],
        "parts_s": round(result["parts_s"], 1),
        "complete_s": round(result["complete_s"], 1),
        "mb_per_s": round(size / 1e6 / result["parts_s"], 1),
        "rss_before_mb": round(sampler.peak("before") / MiB, 1),
        "peak_rss_parts_mb": round(sampler.peak("parts") / MiB, 1),
        "peak_rss_complete_mb": round(sampler.peak("complete") / MiB, 1),
        "records": result["records"],
    }
    header = "| size | parts | parts s | MB/s | complete s | RSS before | peak RSS (parts) | peak RSS (complete) |"
    print(header)
    print("|" + " --- |" * 8)
    print(
        f"| {size / 1e9:g} GB | {row['parts']} × {args.part_mb} MiB | {row['parts_s']} | {row['mb_per_s']} | "
        f"{row['complete_s']} | {row['rss_before_mb']} MiB | {row['peak_rss_parts_mb']} MiB | "
        f"{row['peak_rss_complete_mb']} MiB |"
    )
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / f"upload_memory_{today}.json"
    meta = {"date": today, "python": platform.python_version(), "cpus": os.cpu_count(), "command": sys.argv}
    out.write_text(json.dumps({**meta, "result": row}, indent=1) + "\n")


if __name__ == "__main__":
    main()
