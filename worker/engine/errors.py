"""The one exception the engine raises for problems a user can fix (bad input, missing tokenizer...)."""

from __future__ import annotations


class EngineError(Exception):
    """A job failure with a stable machine-readable `code` and a message a person can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}
