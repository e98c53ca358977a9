"""Configuration from the environment, read once per process through `get_settings()`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class DeclaredGpu(BaseModel):
    """A GPU as `MODELPRESS_GPUS` declares it, instead of asking nvidia-smi."""

    name: str = Field(min_length=1, max_length=128)
    memory_bytes: int = Field(gt=0)


class Settings(BaseSettings):
    """Every knob of the service. Names are the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path("data"), validation_alias=AliasChoices("DATA_DIR", "MODELPRESS_DATA_DIR"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "MODELPRESS_DATABASE_URL")
    )
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "MODELPRESS_REDIS_URL"))

    # object storage: unset keeps everything in a folder under the data dir (one machine); `s3://bucket/prefix`
    # puts it in an S3-compatible store that workers on other machines reach too
    storage_url: str | None = Field(
        default=None, validation_alias=AliasChoices("STORAGE_URL", "MODELPRESS_STORAGE_URL")
    )
    aws_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    aws_access_key_id: str | None = Field(default=None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(default=None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str | None = Field(default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    s3_part_size_bytes: int = Field(default=64 * 1024**2, ge=5 * 1024**2)  # multipart part size (S3's minimum: 5 MiB)
    s3_public_endpoint_url: str | None = None  # the endpoint clients reach for presigned URLs, when it differs
    # how long one store operation keeps retrying while the store does not answer (connection refused, 5xx),
    # with backoff; past it the operation raises StorageUnavailable and a job fails with `storage_unavailable`
    storage_retry_s: float = Field(default=120.0, ge=0)
    download_redirect: bool = False  # answer artifact downloads with a presigned URL (307) instead of the bytes
    download_url_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)

    # the worker's local cache of models and datasets fetched from storage
    cache_dir: Path | None = None  # default: <data_dir>/cache
    cache_max_bytes: int = Field(default=100 * GiB, ge=1)
    # import torch and the engine once in the worker's parent, so that each job's fresh child is forked with them
    # loaded (milliseconds, not seconds of imports per job); the parent still never initialises CUDA
    preload_engine: bool = False
    # fork a job's child as soon as the last one exits (worker/pool.py) instead of at the pool's five-second tick:
    # for fleets of short jobs; off by default, since forking while the parent's webhook sender is busy has been
    # seen to leave a fresh child that never takes its job
    fork_at_once: bool = False
    # a worker that handed a job back for want of cache room leaves it to other workers this long
    release_hold_s: float = Field(default=60.0, ge=0)

    # uploads
    max_upload_bytes: int = 64 * GiB
    max_extracted_bytes: int = 128 * GiB
    max_archive_members: int = 10_000
    max_compression_ratio: float = 200.0
    # resumable uploads: the part size offered when the client names none, the largest part accepted, how long an
    # upload may sit without a new part before its parts are removed, and how often the API looks for such uploads
    upload_part_bytes: int = Field(default=64 * 1024**2, gt=0)
    upload_max_part_bytes: int = Field(default=512 * 1024**2, gt=0)
    upload_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    upload_sweep_interval_s: float = Field(default=300.0, gt=0)

    # per-key rate limits (requests per window, counted in Redis across API processes; 0 disables)
    rate_limit_per_minute: int = Field(default=600, ge=0)
    upload_rate_limit_per_minute: int = Field(default=120, ge=0)
    rate_limit_window_s: float = Field(default=60.0, gt=0)  # the window the limits count over; shorter in tests

    # jobs and the fleet: queues are `<queue>.<memory class>` (modelpress/routing.py, docs/fleet.md)
    queue: str = Field(default="modelpress", pattern=r"^[A-Za-z0-9_-]+$")
    cpu_job_max_bytes: int = Field(default=8 * GiB, ge=0)  # a job estimated above this needs a GPU worker
    worker_live_s: float = Field(default=60.0, gt=0)  # a worker whose heartbeat is older is not counted as live
    worker_name: str | None = None  # the worker's Celery hostname (`name@host`); default `celery@<host name>`
    gpus: list[DeclaredGpu] | None = None  # the worker's GPUs, as JSON, instead of those nvidia-smi lists
    admin_key: str | None = Field(default=None, min_length=32)  # the Bearer key of operator routes (/v1/workers)
    job_time_limit_s: int = 24 * 3600
    max_attempts: int = 3
    progress_interval_s: float = 1.0
    heartbeat_interval_s: float = 10.0
    lease_s: float = 120.0
    reconcile_interval_s: float = 5.0
    device: str | None = None  # None: the worker uses CUDA when it has one, else the CPU
    worker_concurrency: int = 1
    job_memory_limit_bytes: int | None = None  # host memory (RSS) a job may add; past it the job fails

    # live events (a Redis stream per job) and webhooks
    events_heartbeat_s: float = Field(default=15.0, gt=0)  # a comment this often keeps proxies from closing a stream
    events_max_len: int = Field(default=1000, ge=10)  # events kept per job, for clients that resume
    events_ttl_s: int = Field(default=24 * 3600, ge=60)  # a job's events expire this long after its last one
    webhook_allow_private: bool = False  # deliver to loopback, link-local and private addresses too
    webhook_allowed_hosts: list[str] = Field(default_factory=list)  # host names or networks allowed even if private
    webhook_timeout_s: float = Field(default=10.0, gt=0)  # per attempt
    webhook_backoff_s: float = Field(default=5.0, gt=0)  # the first retry's delay; it doubles after each failure
    webhook_max_backoff_s: float = Field(default=600.0, gt=0)
    webhook_retry_for_s: float = Field(default=24 * 3600, gt=0)  # after this long since the job ended, give up
    webhook_poll_s: float = Field(default=1.0, gt=0)  # how often a worker looks for deliveries that are due

    # operations: Prometheus metrics (a Bearer token, a port of their own, or both) and the log format
    metrics_token: str | None = Field(default=None, min_length=16)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"  # the address the metrics port binds; 0.0.0.0 inside a container
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'modelpress.db').resolve()}"
        if self.storage_url is not None:
            self.storage_url = self.storage_url.strip() or None
        if self.storage_url is not None:
            s3_location(self.storage_url)
        if self.env == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("MODELPRESS_ENV=production needs DATABASE_URL set to PostgreSQL, not SQLite")
            if not self.redis_url:
                raise ValueError("MODELPRESS_ENV=production needs REDIS_URL")
            if not self.metrics_token and self.metrics_port is None:
                raise ValueError(
                    "MODELPRESS_ENV=production needs /metrics guarded: set MODELPRESS_METRICS_TOKEN (a Bearer token "
                    "of 16+ characters) or MODELPRESS_METRICS_PORT (a port of its own, kept off the public network)"
                )
        return self

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def metrics_on_api_port(self) -> bool:
        """/metrics is served beside the API when it has a token, or, in development only, when nothing guards it."""
        if self.metrics_port is not None:
            return False
        return bool(self.metrics_token) or self.env == "development"

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("REDIS_URL is not set; `modelpress dev` starts an embedded Redis and sets it")
        return self.redis_url


def s3_location(url: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes) of an `s3://bucket/prefix` URL; ValueError saying what is wrong."""
    if not url.startswith("s3://"):
        raise ValueError(f"STORAGE_URL must look like s3://bucket/prefix (or be unset for local storage), not {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not 3 <= len(bucket) <= 63 or not bucket.replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"STORAGE_URL names an invalid bucket {bucket!r} (3-63 letters, digits, '-' or '.')")
    return bucket, prefix.strip("/")


@lru_cache
def get_settings() -> Settings:
    return Settings()
