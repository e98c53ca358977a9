"""The layers import in one direction only: each is imported in a clean interpreter and sys.modules checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

CASES = {
    # module: top-level packages it must never pull in
    "app.main": {"torch", "transformers", "worker", "compressed_tensors"},
    "modelpress.specs": {"torch", "fastapi", "celery", "sqlalchemy", "app", "worker"},
    "modelpress.cli.main": {"torch", "transformers", "worker"},
    "worker.celery_app": {"torch", "transformers", "fastapi", "app"},
    "worker.tasks": {"torch", "transformers", "fastapi", "app"},
    "worker.engine": {"fastapi", "celery", "sqlalchemy", "pydantic", "modelpress", "app", "redis"},
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_layer_imports(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert module.split(".")[0] in loaded
    assert not (CASES[module] & loaded), f"{module} imports {sorted(CASES[module] & loaded)}"
