"""What compute devices this machine offers to the pipeline."""

from __future__ import annotations

import subprocess
import sys


def cuda_device_count() -> int:
    """CUDA devices pycolmap can use (0 with the CPU wheel or without a GPU).

    Asked in a separate process: importing pycolmap installs its own fatal-signal
    handlers, which must not replace the daemon's SIGTERM handling."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from daemon.devices import _count; print(_count())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def _count() -> int:
    try:
        import pycolmap
    except ImportError:
        return 0
    if not getattr(pycolmap, "has_cuda", False):
        return 0
    counter = getattr(pycolmap, "get_num_cuda_devices", None)
    if counter is not None:
        try:
            return int(counter())
        except Exception:
            return 0
    try:
        import ctypes

        cudart = ctypes.CDLL("libcudart.so.12")
        count = ctypes.c_int(0)
        return count.value if cudart.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    except OSError:
        return 0
