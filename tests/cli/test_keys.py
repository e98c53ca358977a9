"""`modelpress keys create` and `migrate` as a user runs them: a subprocess against the test PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import select

from modelpress.keys import hash_key
from tests.conftest import REPO

CLI = [sys.executable, "-c", "from modelpress.cli.main import app; app()"]


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(migrated: dict[str, str]) -> None:
    from modelpress.db import session_scope
    from modelpress.models import ApiKey

    result = run_cli(migrated, "keys", "create", "--tenant", "cli-tenant")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    secret = lines[-1]
    assert secret.startswith("mp_") and " " not in secret
    assert len(lines) > 1  # an explanation comes first
    with session_scope() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.tenant == "cli-tenant")).all()
    assert len(rows) == 1
    assert rows[0].key_hash == hash_key(secret)
    assert secret not in {rows[0].key_hash, rows[0].prefix}
    assert secret.startswith(rows[0].prefix)


def test_keys_create_refuses_an_empty_tenant(migrated: dict[str, str]) -> None:
    result = run_cli(migrated, "keys", "create", "--tenant", "  ")
    assert result.returncode == 1
    assert "--tenant" in result.stderr and "Traceback" not in result.stderr


def test_migrate_on_a_fresh_sqlite_file(tmp_path) -> None:
    env = {"DATA_DIR": str(tmp_path), "MODELPRESS_ENV": "development"}
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MODELPRESS_DATABASE_URL"}}
    result = subprocess.run(
        [*CLI, "migrate"], env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "modelpress.db").exists()


def test_a_database_that_is_down_is_a_message_not_a_traceback(tmp_path) -> None:
    from tests.conftest import free_port

    env = {"DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none", "DATA_DIR": str(tmp_path)}
    result = run_cli(env, "keys", "create", "--tenant", "acme")
    assert result.returncode == 1
    assert "could not store the key" in result.stderr and "Traceback" not in result.stderr
