"""Configuration from the environment, read once per process through `get_settings()`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    """Every knob of the service. Names are the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path("data"), validation_alias=AliasChoices("DATA_DIR", "MODELPRESS_DATA_DIR"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "MODELPRESS_DATABASE_URL")
    )
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "MODELPRESS_REDIS_URL"))

    # uploads
    max_upload_bytes: int = 64 * GiB
    max_extracted_bytes: int = 128 * GiB
    max_archive_members: int = 10_000
    max_compression_ratio: float = 200.0

    # per-key rate limits (requests per window, counted in Redis across API processes; 0 disables)
    rate_limit_per_minute: int = Field(default=600, ge=0)
    upload_rate_limit_per_minute: int = Field(default=120, ge=0)
    rate_limit_window_s: float = Field(default=60.0, gt=0)  # the window the limits count over; shorter in tests

    # jobs
    queue: str = "gpu"
    job_time_limit_s: int = 24 * 3600
    max_attempts: int = 3
    progress_interval_s: float = 1.0
    heartbeat_interval_s: float = 10.0
    lease_s: float = 120.0
    reconcile_interval_s: float = 5.0
    device: str | None = None  # None: the worker uses CUDA when it has one, else the CPU
    worker_concurrency: int = 1
    job_memory_limit_bytes: int | None = None  # host memory (RSS) a job may add; past it the job fails

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'modelpress.db').resolve()}"
        if self.env == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("MODELPRESS_ENV=production needs DATABASE_URL set to PostgreSQL, not SQLite")
            if not self.redis_url:
                raise ValueError("MODELPRESS_ENV=production needs REDIS_URL")
        return self

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("REDIS_URL is not set; `modelpress dev` starts an embedded Redis and sets it")
        return self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
