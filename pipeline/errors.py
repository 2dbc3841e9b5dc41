"""Errors a stage raises; the daemon decides from the class whether to retry."""

from __future__ import annotations


class StageError(Exception):
    """Base class: a message and a hint for the user (the daemon knows which stage ran)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class PermanentError(StageError):
    """Retrying cannot help: bad images, too few registered images, empty dense cloud."""


class TransientError(StageError):
    """Retrying may help: out of memory, disk full, GPU error."""


class Cancelled(Exception):
    """The job was cancelled while the stage was running."""
