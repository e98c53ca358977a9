"""The API layer stays light: importing and building it pulls in neither torch, transformers nor the worker."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_app_imports_no_torch_or_worker() -> None:
    code = (
        "import sys, app.main; app.main.create_app(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'worker')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
