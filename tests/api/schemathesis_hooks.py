"""Schemathesis hooks for the CLI run in test_schemathesis.py (loaded through `SCHEMATHESIS_HOOKS`).

Every request carries a key of the `fuzz` tenant, a fresh one every `PER_KEY` requests, so the run stays under
the default per-key rate limit (600 a minute) and its uploads and jobs stay out of the other tests' listings.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from tests.conftest import make_key

PER_KEY = 400


@schemathesis.auth(refresh_interval=None)
class FuzzKeys:
    def __init__(self) -> None:
        self.sent = 0
        self.key = ""

    def get(self, case: Any, ctx: Any) -> str:
        if self.sent % PER_KEY == 0:
            self.key = make_key("fuzz")
        self.sent += 1
        return self.key

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
