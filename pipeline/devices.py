"""Which compute devices pycolmap can use here."""

from __future__ import annotations

import functools
import subprocess
import sys

_PROBE = (
    "import pycolmap\n"
    "n = pycolmap.get_num_cuda_devices() if getattr(pycolmap, 'has_cuda', False) else 0\n"
    "print(int(n))\n"
)


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices pycolmap can use (0 with the CPU build or without a GPU).

    Asked in a separate process: a broken driver cannot take the caller down, and the
    caller does not load pycolmap (whose fatal-signal handlers would replace its own)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
        return max(0, int(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0
