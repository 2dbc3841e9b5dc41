"""How dropmesh writes a length of time for people: `clock` in tables, `words` in prose."""

from __future__ import annotations


def clock(seconds: float | None) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on; `-` for unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def words(seconds: float) -> str:
    """`42 s`, `3 min 5 s` or `2 h 10 min`, for notifications and log lines."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
