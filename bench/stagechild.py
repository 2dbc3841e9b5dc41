"""One pipeline stage in this process, for the benchmarks: prints one JSON line with
the import time, the stage's own time and this process's peak RSS.

    python -m bench.stagechild '{"stage": ..., "spec": {...}, "workspace": ...}'
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    from pipeline import JobSpec, StageContext
    from pipeline.stages import stage_function

    fn = stage_function(args["stage"])
    t1 = time.perf_counter()
    workspace = Path(args["workspace"])
    ctx = StageContext(
        spec=JobSpec.from_json(args["spec"]),
        workspace=workspace,
        results_dir=workspace / "results",
        device=args.get("device", "cpu"),
        threads=int(args.get("threads", 0)),
    )
    c1 = _cpu()
    result = fn(ctx)
    t2 = time.perf_counter()
    cpu = _cpu() - c1
    rss = peak_rss_mb()
    print(
        json.dumps(
            {
                "stage": args["stage"],
                "import_s": round(t1 - t0, 3),
                "seconds": round(t2 - t1, 3),
                "peak_rss_mb": round(rss, 1),
                "cpu_s": round(cpu, 3),
                "cores_used": round(cpu / max(t2 - t1, 1e-9), 2),
                "metrics": {
                    k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)
                },
            }
        )
    )


if __name__ == "__main__":
    main()
