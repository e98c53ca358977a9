"""The whole stack for end-to-end tests: a real uvicorn API and a real Celery worker, on a database of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.utils.stack import Stack, running_stack


@pytest.fixture(scope="module")
def e2e_stack(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(migrated, tmp_path_factory.mktemp("e2e")) as stack:
        yield stack
