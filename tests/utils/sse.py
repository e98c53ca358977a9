"""Server-sent events read the way a browser's EventSource does, for tests (independent of the CLI's reader)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    id: str | None
    event: str
    data: dict[str, Any]


def parse(lines: Iterable[str], comments: list[str] | None = None) -> Iterator[Event]:
    """Each complete event in `lines`; comment lines (`: heartbeat`) go to `comments` when given."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield Event(fields.get("id", [None])[-1], fields.get("event", ["message"])[-1], _data(fields))
            fields = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def _data(fields: dict[str, list[str]]) -> dict[str, Any]:
    return json.loads("\n".join(fields["data"]))
