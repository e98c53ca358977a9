"""The client must start without torch (and without the database layer, so it starts fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "module", ["modelpress.cli.main", "modelpress.cli.client", "modelpress.cli.dev", "modelpress.cli.render"]
)
def test_cli_modules_do_not_import_torch(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "transformers", "worker", "app"}, sorted(loaded & {"torch", "transformers"})
    if module == "modelpress.cli.main":
        assert "sqlalchemy" not in loaded  # imported only by the database commands
