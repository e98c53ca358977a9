"""The layers import in one direction only: each is imported in a clean interpreter and sys.modules checked.

The engine's rooms (worker/engine/<room>/) reach each other through their packages, never through another
room's inner module; `calibrate`, `load` and `steps` are shared by all of them. That is read from the source.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

S3 = {"boto3", "botocore"}  # object storage only: a service on local storage runs without them
CASES = {
    # module: top-level packages it must never pull in
    "app.main": {"torch", "transformers", "worker", "compressed_tensors", *S3},
    "modelpress.specs": {"torch", "fastapi", "celery", "sqlalchemy", "app", "worker"},
    "modelpress.cli.main": {"torch", "transformers", "worker", *S3},
    "worker.celery_app": {"torch", "transformers", "fastapi", "app", *S3},
    "worker.tasks": {"torch", "transformers", "fastapi", "app", *S3},
    "worker.engine": {"fastapi", "celery", "sqlalchemy", "app", "redis"},
}
MODELPRESS_ALLOWED = {
    # module: the only modelpress modules it may load (all of them when absent)
    "worker.engine": {"modelpress", "modelpress.specs"},
}
SHARED_ROOMS = {"calibrate", "load", "steps"}


@pytest.mark.parametrize("module", sorted(CASES))
def test_layer_imports(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    loaded = {m.split(".")[0] for m in modules}
    assert module.split(".")[0] in loaded
    assert not (CASES[module] & loaded), f"{module} imports {sorted(CASES[module] & loaded)}"
    if module in MODELPRESS_ALLOWED:
        ours = {m for m in modules if m.split(".")[0] == "modelpress"}
        extra = sorted(ours - MODELPRESS_ALLOWED[module])
        assert not extra, f"{module} imports {extra}; only {sorted(MODELPRESS_ALLOWED[module])} are allowed"


def _imported_modules(path: Path, root: Path) -> list[str]:
    """Every module an engine source file imports: `import a.b` gives a.b, `from a.b import c` gives a.b and
    a.b.c (c may be a module), relative imports resolved against the file's package."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def cross_room_imports(root: Path) -> list[str]:
    """`file: module` for each import, in a room of root/worker/engine, of another room's inner module."""
    engine = root / "worker" / "engine"
    rooms = {p.name for p in engine.iterdir() if (p / "__init__.py").is_file()}
    found = []
    for room in sorted(rooms):
        for path in sorted((engine / room).rglob("*.py")):
            for name in _imported_modules(path, root):
                parts = name.split(".")
                if parts[:2] != ["worker", "engine"] or len(parts) < 4:
                    continue
                other = parts[2]
                if other == room or other in SHARED_ROOMS or other not in rooms:
                    continue
                inner = engine / other / f"{parts[3]}.py"
                line = f"{path.relative_to(root).as_posix()}: {'.'.join(parts[:4])}"
                if (inner.is_file() or (engine / other / parts[3] / "__init__.py").is_file()) and line not in found:
                    found.append(line)
    return found


def test_rooms_import_other_rooms_through_their_package() -> None:
    found = cross_room_imports(REPO)
    assert not found, "import these through the room's package (worker.engine.<room>):\n" + "\n".join(found)


def test_cross_room_check_finds_an_inner_import(tmp_path: Path) -> None:
    """The check above sees `from worker.engine.speed.harness import x` in another room, and allows the package,
    the shared rooms and the room's own modules."""
    engine = tmp_path / "worker" / "engine"
    for room in ("prune", "speed", "calibrate"):
        (engine / room).mkdir(parents=True)
        (engine / room / "__init__.py").write_text("")
    (engine / "speed" / "harness.py").write_text("")
    (engine / "calibrate" / "targets.py").write_text("")
    (engine / "prune" / "ok.py").write_text(
        "from worker.engine.speed import measure_speed\nfrom worker.engine.calibrate.targets import select\n"
        "from worker.engine.prune import ok\n"
    )
    (engine / "prune" / "bad.py").write_text("from worker.engine.speed.harness import measure\n")
    (engine / "prune" / "also_bad.py").write_text("from worker.engine.speed import harness\n")
    assert cross_room_imports(tmp_path) == [
        "worker/engine/prune/also_bad.py: worker.engine.speed.harness",
        "worker/engine/prune/bad.py: worker.engine.speed.harness",
    ]
