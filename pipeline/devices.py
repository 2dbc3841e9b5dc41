"""Which compute devices pycolmap can use here.

The one place that asks: stages, the daemon and the CLI all go through `cuda_support()`.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass

_PROBE = (
    "import pycolmap\n"
    "built = bool(getattr(pycolmap, 'has_cuda', False))\n"
    "n = pycolmap.get_num_cuda_devices() if built else 0\n"
    "print(int(built), int(n))\n"
)


@dataclass(frozen=True)
class CudaSupport:
    built: bool  # this pycolmap build has CUDA support
    devices: int  # CUDA devices it can use

    @property
    def why_not(self) -> str:
        """Why there is no GPU, in words ('' if there is one)."""
        if self.devices > 0:
            return ""
        if not self.built:
            return "this pycolmap build has no CUDA support"
        return "no CUDA device is visible"


@functools.cache
def cuda_support() -> CudaSupport:
    """What pycolmap's CUDA support looks like here (no devices with the CPU build, or
    without a GPU, or if the probe fails).

    Asked in a separate process: a broken driver cannot take the caller down, and the
    caller does not load pycolmap (whose fatal-signal handlers would replace its own)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            return CudaSupport(built=False, devices=0)
        built, devices = (int(x) for x in out.stdout.strip().splitlines()[-1].split())
        return CudaSupport(built=bool(built), devices=max(0, devices))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return CudaSupport(built=False, devices=0)


def cuda_device_count() -> int:
    """CUDA devices pycolmap can use (0 with the CPU build or without a GPU)."""
    return cuda_support().devices


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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or
    `taskset` may narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
