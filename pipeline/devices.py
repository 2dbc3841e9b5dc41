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


_BUILDS = {"pycolmap": "CPU", "pycolmap-cuda12": "CUDA 12", "pycolmap-cuda": "CUDA"}


def pycolmap_build() -> str:
    """Which pycolmap distribution is installed, e.g. "pycolmap-cuda12 4.2.1 (CUDA 12
    build)". Several at once is named as the problem it is: they all provide the module
    `pycolmap` and the last one installed has overwritten the others' files."""
    from importlib import metadata

    found = []
    for dist, kind in _BUILDS.items():
        try:
            found.append(f"{dist} {metadata.version(dist)} ({kind} build)")
        except metadata.PackageNotFoundError:
            continue
    if not found:
        return "pycolmap is not installed"
    if len(found) > 1:
        return (
            f"{' and '.join(found)} are both installed and overwrite each other's files: "
            "pip uninstall -y " + " ".join(d.split()[0] for d in found) + ", then install one"
        )
    return found[0]
