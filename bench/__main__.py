"""Run the benchmarks, write bench/results/<date>-<suite>.json, regenerate BENCHMARKS.md
and bench/results/scaling.png.

    python -m bench                  # every suite
    python -m bench pipeline sparse  # some suites
    python -m bench --quick          # smaller scenes, fewer repetitions
    python -m bench compare --baseline REF   # options after the suite go to the suite
    python -m bench report           # only regenerate BENCHMARKS.md and the plot
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

# suite name -> module (each has main(argv) -> dict)
SUITES = {
    "pipeline": "bench.stages",
    "sparse": "bench.sparse",
    "stereo": "bench.stereo",
    "daemon": "bench.daemon_overhead",
    "scaling": "bench.scaling",
    "memory": "bench.memory",
    "compare": "bench.compare",
    "service": "bench.service",
    "web": "bench.web",
    "texture": "bench.texture",
    "mapper": "bench.mapper",
}
# `python -m bench` with no suite named: all but compare (it needs a baseline commit)
DEFAULT = (
    "pipeline", "sparse", "stereo", "daemon", "scaling", "memory", "service", "web", "texture",
    "mapper",
)  # fmt: skip
QUICK_SERVICE = ["--drops", "30", "--jobs", "2000", "--cancels", "5"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)}, or report")
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    # anything else goes to each suite named, e.g. `compare --baseline REF`
    args, extra = ap.parse_known_args(argv)
    names = args.suites or list(DEFAULT)
    unknown = [n for n in names if n not in SUITES and n != "report"]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; suites: {', '.join(SUITES)}")
    failed = []
    for name in names:
        if name == "report":
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(SUITES[name])
        if name == "service":
            suite_args = QUICK_SERVICE if args.quick else []
        else:
            suite_args = ["--quick"] if args.quick else []
        try:
            module.main(suite_args + extra)
        except Exception as exc:  # one failed suite does not stop the others
            print(f"suite {name} failed: {exc!r}", file=sys.stderr)
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    from bench.report import write_report

    for path in write_report():
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
