"""classify: which errors a retry may help with, and the words the user sees."""

from __future__ import annotations

import errno

import pytest

from daemon.stageproc import ErrorKind, Failure, Outcome, OutcomeKind, classify
from pipeline.errors import PermanentError, TransientError

T, P = ErrorKind.TRANSIENT, ErrorKind.PERMANENT
PERMS = "check the folder's permissions"
LOGS = "see `dropmesh logs` for details"


@pytest.mark.parametrize(
    ("exc", "kind", "message", "hint"),
    [
        # the pipeline's own verdict, with its message and hint as they are
        (
            PermanentError("only 2 of 30 images registered", hint="more overlap"),
            P,
            "only 2 of 30 images registered",
            "more overlap",
        ),
        (TransientError("GPU busy"), T, "GPU busy", None),
        # resources that may come back
        (MemoryError(), T, "out of memory", "close other programs or use a lower quality"),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            T,
            "disk full: [Errno 28] No space left on device",
            "free some disk space",
        ),
        # permissions do not fix themselves
        (
            PermissionError(errno.EACCES, "Permission denied"),
            P,
            "cannot write: [Errno 13] Permission denied",
            PERMS,
        ),
        (OSError(errno.EROFS, "Read-only file system"), P, "cannot write: ", PERMS),
        (OSError(errno.EPERM, "Operation not permitted"), P, "cannot write: ", PERMS),
        # libraries' errors, read from their text
        (RuntimeError("CUDA error: an illegal memory access"), T, "RuntimeError: CUDA", None),
        (RuntimeError("Cuda driver version is insufficient"), T, "RuntimeError: Cuda", None),
        (RuntimeError("std::bad_alloc"), T, "RuntimeError: std::bad_alloc", None),
        (ValueError("failed: out of memory on device 0"), T, "ValueError: failed", None),
        # everything else is a bug or bad input: retrying gives the same answer
        (
            ValueError("array must not be empty"),
            P,
            "ValueError: array must not be empty",
            LOGS,
        ),
        (OSError(errno.ENOENT, "No such file or directory"), P, "FileNotFoundError: [", LOGS),
        (KeyError("sparse"), P, "KeyError: 'sparse'", LOGS),
    ],
)
def test_classify(exc: BaseException, kind: ErrorKind, message: str, hint: str | None) -> None:
    got = classify(exc)
    assert got.kind is kind
    assert got.transient is (kind is T)
    assert got.message.startswith(message)
    assert got.hint == hint


def test_failure_becomes_an_outcome() -> None:
    outcome = Outcome.failed(Failure(T, "disk full", "free some disk space"), "cannot start: ")
    assert (outcome.kind, outcome.message, outcome.hint, outcome.transient) == (
        OutcomeKind.ERROR,
        "cannot start: disk full",
        "free some disk space",
        True,
    )
    crashed = Outcome.crashed("stage process crashed (SIGSEGV)")
    assert crashed.kind is OutcomeKind.CRASHED and crashed.transient
