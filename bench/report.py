"""BENCHMARKS.md and bench/results/scaling.png from the newest results file of each suite.

The targets are listed in TARGETS below, each with the issue that asked for it and the
user need behind it; the report states pass, FAIL or not measured for every one, in
BENCHMARKS.md and on standard output (`python -m bench report`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS

ROOT = RESULTS.parent.parent
DOC = ROOT / "BENCHMARKS.md"
PLOT = RESULTS / "scaling.png"
STAGES = (
    "ingest", "features", "matching", "mapping", "undistort",
    "stereo", "fusion", "meshing", "color", "texture", "export",
)  # fmt: skip


def latest(suite: str) -> dict[str, Any] | None:
    files = sorted(RESULTS.glob(f"????-??-??-{suite}.json"))
    if not files:
        return None
    data: dict[str, Any] = json.loads(files[-1].read_text())
    data["_file"] = files[-1].name
    return data


def _score(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _meta(d: dict[str, Any]) -> str:
    return (
        f"_{d['_file']}, {d['date']}, {d['machine']['cpus']} cores, load average "
        f"(1/5/15 min) before {d.get('load_before')} after {d.get('load_after')}"
        + (", quick run" if d.get("quick") else "")
        + "._"
    )


def pipeline_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    head = (
        ["stage"]
        + [f"{r['quality']} s" for r in runs]
        + [f"{r['quality']} MB" for r in runs]
        + [f"{r['quality']} cores" for r in runs]
    )
    rows = []
    for s in STAGES:
        rows.append(
            [s]
            + [r["stages"].get(s, {}).get("seconds") for r in runs]
            + [round(r["stages"][s]["peak_rss_mb"]) if s in r["stages"] else None for r in runs]
            + [r["stages"].get(s, {}).get("cores_used") for r in runs]
        )
    blank = [""] * (2 * len(runs))
    rows.append(["**total (stages)**"] + [r["total_s"] for r in runs] + blank)
    rows.append(["total with process start-ups"] + [r["total_wall_s"] for r in runs] + blank)
    rows.append(["F-score (1 % of the scene)"] + [_score(r.get("fscore")) for r in runs] + blank)
    rows.append(
        ["object F-score (1 % of the object)"]
        + [_score(r.get("object_fscore")) for r in runs]
        + blank
    )
    r0 = runs[0]
    return (
        f"## Per-stage time and peak memory\n\nDemo scene ({r0.get('variant', 'easy')} "
        f"variant), {r0['images']} images "
        f"{r0['size'][0]}x{r0['size'][1]}, each stage in its own process (peak RSS = that "
        "process's VmHWM, imports included; cores = the stage's CPU seconds over its wall "
        f"seconds, of {d['machine']['cpus']}).\n\n{_table(head, rows)}\n\n{_meta(d)}\n"
    )


def sparse_section(d: dict[str, Any]) -> str:
    """Newer results hold two comparisons: `matched` (the same settings on both sides)
    and `defaults` (each side's defaults on real photos); older ones only the first."""
    parts = []
    if "defaults" in d:
        parts.append(sparse_defaults_section(d))
    matched = _matched(d)
    if matched is not None:
        parts.append(sparse_matched_section({**d, **matched}))
    return "\n".join(parts)


def _matched(d: dict[str, Any]) -> dict[str, Any] | None:
    if "matched" in d:
        m: dict[str, Any] = d["matched"]
        return m
    return d if "runs" in d else None


def sparse_defaults_section(d: dict[str, Any]) -> str:
    r = d["defaults"]
    rows = [
        [k + 1, " then ".join(run["order"]), run["dropmesh"]["total"], run["colmap"]["total"],
         run["ratio"]["total"], run["dropmesh"]["registered"], run["colmap"]["registered"],
         " ".join(f"{x:.1f}" for x in run["load"])]
        for k, run in enumerate(r["runs"])
    ]  # fmt: skip
    lo, hi = r["ratio_spread"]["total"]
    return (
        f"## Sparse reconstruction: dropmesh's default preset against COLMAP's defaults\n\n"
        f"{r['images']} real photos ({r['photos']}). dropmesh: {r['settings']['dropmesh']}; "
        f"COLMAP (`{d['colmap_version']}`): {r['settings']['colmap']}. Features + matching + "
        "mapping, each side timed the same way, sides alternating.\n\n"
        + _table(
            [
                "run",
                "order",
                "dropmesh s",
                "COLMAP s",
                "ratio",
                "dropmesh placed",
                "COLMAP placed",
                "load",
            ],
            rows,
        )  # fmt: skip
        + f"\n\n**Median ratio {r['median_ratio']['total']:.2f}** (spread {lo:.2f}-{hi:.2f}; "
        f"target <= {r['target']['total_ratio_at_most']}, see Targets).\n\n{_meta(d)}\n"
    )


def sparse_matched_section(d: dict[str, Any]) -> str:
    steps = ["features", "matching", "mapping"]
    rows = []
    for k, r in enumerate(d["runs"]):
        dm, cm = r["dropmesh"], r["colmap"]
        for s in steps:
            rows.append([k + 1, s, dm[s], cm[s], r["ratio"][s]])
        rows.append([k + 1, "total", sum(dm[s] for s in steps), sum(cm[s] for s in steps),
                     r["ratio"]["total"]])  # fmt: skip
    med = d["median_ratio"]
    last = d["runs"][-1]
    st = d["settings"]
    return (
        f"## Sparse reconstruction against COLMAP's CLI\n\n{d['images']} images "
        f"{d['size'][0]}x{d['size'][1]}, preset {d['quality']}: max image size "
        f"{st['max_image_size']}, {st['max_num_features']} features, guided matching "
        f"{st['guided_matching']}, {st['camera']}, exhaustive pairs, num_threads -1 on both "
        f"sides; dropmesh's stages each in a fresh process (wall time, imports included), "
        f"against `{d['colmap_version']}`.\n\n"
        + _table(["run", "step", "dropmesh s", "COLMAP s", "ratio"], rows)
        + "\n\n**Median ratio dropmesh/COLMAP**: "
        + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
        + " (targets: see Targets). Registered: dropmesh "
        f"{last['dropmesh']['registered']}, COLMAP {last['colmap']['registered']} of "
        f"{d['images']}; points {last['dropmesh']['points']} vs {last['colmap']['points']}; "
        f"mean reprojection error {last['dropmesh']['reprojection_error']} vs "
        f"{last['colmap']['reprojection_error']} px.\n\n"
        "Matched explicitly: max image size, max features, one shared SIMPLE_RADIAL camera, "
        "CPU, every core, guided matching, exhaustive pairs, mapper thresholds "
        "(min_num_matches 8, abs_pose_min_num_inliers 12, abs_pose_min_inlier_ratio 0.15, "
        "min_model_size 3). Not matchable, left at each version's default: the CPU SIFT "
        "matcher (COLMAP 3.8 brute force; pycolmap 4.2 an index-based search), "
        "bundle-adjustment iteration caps (3.8: 25 local / 50 global).\n\n"
        f"{_meta(d)}\n"
    )


def stereo_section(d: dict[str, Any]) -> str:
    rows = [
        [k + 1, r["dropmesh_maps"], r["dropmesh_s"], r["dropmesh_mp_per_s"], r["sgbm_maps"],
         r["sgbm_s"], r["sgbm_mp_per_s"], r["ratio_mp_per_s"]]
        for k, r in enumerate(d["runs"])
    ]  # fmt: skip
    m = d["median"]
    w, h = d["depth_map_size"]
    return (
        f"## CPU dense stereo\n\n{d['images']} images, preset {d['quality']}, depth maps "
        f"{w}x{h}. dropmesh: the whole stereo stage (one SGBM per neighbour pair it chooses, "
        "up to 4 per image, giving both views' depths; checks, normals, consistency). Plain: "
        "one `StereoSGBM.compute` per pair on the same rectified pairs. Throughput in "
        "depth-map megapixels per second.\n\n"
        + _table(
            ["run", "dropmesh maps", "s", "MP/s", "plain SGBM maps", "s", "MP/s", "ratio"], rows
        )
        + f"\n\n**Median**: dropmesh {m['dropmesh_mp_per_s']:.2f} MP/s, plain SGBM "
        f"{m['sgbm_mp_per_s']:.2f} MP/s, ratio {m['ratio_mp_per_s']:.2f}.\n\n{_meta(d)}\n"
    )


def daemon_section(d: dict[str, Any]) -> str:
    # newer runs time a cold daemon from its start (ready when it watches the inbox)
    ready = "watching_s" if "watching_s" in d["runs"][0]["daemon"] else "pickup_s"
    rows = [
        [k + 1, r["daemon"]["seconds"], r["script_s"], r["ratio"], r["daemon"][ready]]
        for k, r in enumerate(d["runs"])
    ]
    st = d["startup_s"]
    start_rows = [[k, v] for k, v in st.items()]
    over = [[k, v] for k, v in d["per_stage_overhead_s"].items()]
    return (
        f"## Daemon overhead\n\n{d['images']} images {d['size'][0]}x{d['size'][1]}, preset "
        f"{d['quality']}: "
        + d.get(
            "timing",
            "drop into a real daemon's inbox until the GLB is published, against "
            "`pipeline.run` in a plain script (fresh process, imports included)",
        )
        + ".\n\n"
        + _table(["run", "daemon s", "script s", "ratio", ready.replace("_s", " s")], rows)
        + f"\n\n**Median ratio {d['median_ratio']:.3f}** (target <= {d['target_ratio']}, "
        "see Targets)"
        + (
            f"; overhead per job {d['median_overhead_s']:+.1f} s (spread "
            f"{d['overhead_spread_s'][0]:+.1f} to {d['overhead_spread_s'][1]:+.1f} s)"
            if "median_overhead_s" in d
            else ""
        )
        + ".\n\n"
        "Per stage in the daemon (last run): ledger wall time minus the stage's own time "
        "(spawn, imports, result hand-back):\n\n"
        + _table(["stage", "overhead s"], over)
        + "\n\nA fresh Python starting and importing (median of 3):\n\n"
        + _table(["import", "s"], start_rows)
        + f"\n\nSum over the stages' imports: {d['startup_all_stages_s']:.2f} s.\n\n{_meta(d)}\n"
    )


def scaling_section(d: dict[str, Any]) -> str:
    out = [
        f"## Scaling\n\nDemo scene ({d.get('variant', 'easy')} variant) "
        f"{d['size'][0]}x{d['size'][1]} at "
        f"{', '.join(map(str, d['counts']))} images; seconds per stage (each in its own "
        "process), peak RSS of the largest stage.\n"
    ]
    for q in ("low", "medium"):
        if q not in d:
            continue
        runs = d[q]["runs"]
        head = ["images", *STAGES, "total s", "peak MB", "F-score"]
        rows = [
            [r["images"], *[r["stages"].get(s, {}).get("seconds") for s in STAGES], r["total_s"],
             round(r["peak_rss_mb"]), r["fscore"]]
            for r in runs
        ]  # fmt: skip
        g = d[q]["matching_growth"]
        grow = _table(
            ["images", "matcher", "pairs", "matching time x", "n log n x", "n^2 x"],
            [[f"{x['from']}->{x['to']}", x["matcher"], f"{x['pairs'][0]}->{x['pairs'][1]}",
              x["time_ratio"], x["nlogn_ratio"], x["quadratic_ratio"]] for x in g],
        )  # fmt: skip
        out.append(f"### {q}\n\n{_table(head, rows)}\n\nMatching growth:\n\n{grow}\n")
    if 128 not in d["counts"]:
        out.append("128 images: not run by default (`python -m bench.scaling --max-images 128`).\n")
    out.append(f"![per-stage time vs image count](bench/results/{PLOT.name})\n\n{_meta(d)}\n")
    return "\n".join(out)


def memory_section(d: dict[str, Any]) -> str:
    r = d["run"]
    rows = [
        [s, r["stages"][s]["seconds"], round(r["stages"][s]["peak_rss_mb"])]
        for s in STAGES
        if s in r["stages"]  # results from before a stage existed
    ]
    verdict = "within" if d["within_limit"] else "OVER"
    return (
        f"## The whole job at scale: time and peak memory\n\nDemo scene "
        f"({r.get('variant', 'easy')} variant), {r['images']} images "
        f"{r['size'][0]}x{r['size'][1]}, preset {r['quality']}, each stage in its own process "
        "(peak RSS = that process's VmHWM).\n\n"
        + _table(["stage", "s", "peak MB"], rows)
        + f"\n\n**Peak {r['peak_rss_mb']:.0f} MB**, {verdict} the {d['limit_mb']} MB target; "
        f"{r['total_s']:.0f} s in stages, {r['total_wall_s']:.0f} s "
        f"({r['total_wall_s'] / 60:.1f} min) with the stages' process start-ups; "
        f"F-score {r['fscore']}.\n\n"
        + (f"{d['note']}\n\n" if d.get("note") else "")
        + f"{_meta(d)}\n"
    )


def mapper_section(d: dict[str, Any]) -> str:
    rows = []
    for size in d["sizes"]:
        for mapper, runs in size["runs"].items():
            m = size["summary"][mapper]
            rows.append(
                [size["images"], mapper, f"{m['seconds_median']:.0f}",
                 f"{m['seconds_min']:.0f}-{m['seconds_max']:.0f}", m["registered_min"],
                 f"{m['camera_rms_max']:.5f}",
                 _median([r["mean_reprojection_error"] for r in runs])]
            )  # fmt: skip
    up = d["sizes"][-1]["upstream"]
    return (
        "## Incremental or global mapping\n\nHard demo variant, 1600x1200, preset medium; "
        "features and matching once per size, then the mapping stage on that database with "
        f"each mapper, alternating, {d['rounds']} runs each, each in its own process. Camera "
        "error: RMS distance of the camera centres from the true ones after a similarity "
        "alignment (scene units; the camera ring has radius ~3.3).\n\n"
        + _table(
            [
                "photos",
                "mapper",
                "median s",
                "min-max s",
                "registered",
                "camera rms",
                "reprojection px",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nAt {d['sizes'][-1]['images']} photos: features {up['features']['seconds']:.0f} s, "
        f"matching {up['matching']['seconds']:.0f} s for {up['matching']['metrics']['pairs']} "
        f"pairs ({up['matching']['metrics'].get('guided_pairs')} guided), peak "
        f"{up['matching']['peak_rss_mb']:.0f} MB.\n\n{_meta(d)}\n"
    )


def compare_section(d: dict[str, Any]) -> str:
    rows = []
    for s in [*STAGES, "total"]:
        b = [r["before"]["stages"].get(s) if s != "total" else r["before"]["total_s"]
             for r in d["runs"]]  # fmt: skip
        a = [r["after"]["stages"].get(s) if s != "total" else r["after"]["total_s"]
             for r in d["runs"]]  # fmt: skip
        rows.append([s, _median(b), _median(a), d["median_ratio"].get(s)])
    fb = [r["before"]["fscore"] for r in d["runs"]]
    fa = [r["after"]["fscore"] for r in d["runs"]]
    return (
        f"## Before/after: one revision's pipeline against another\n\nPipeline of "
        f"`{d['baseline']}` (the baseline named with `--baseline`) against "
        f"`{d['head']}` (working tree), {d['images']} images {d['size'][0]}x{d['size'][1]}, "
        f"preset {d['quality']}, alternating, each stage in its own process; medians of "
        f"{len(d['runs'])} runs.\n\n"
        + _table(["stage", "before s", "after s", "after/before"], rows)
        + f"\n\nF-score before {fb}, after {fa}.\n\n"
        + (
            f"Files changed: {', '.join(d['changed_files'])}. The ratios of stages whose "
            "code did not change show how much this run's load moved the numbers.\n\n"
            if d.get("changed_files")
            else ""
        )
        + f"{_meta(d)}\n"
    )


def service_section(d: dict[str, Any]) -> str:
    p, c = d["pickup"]["seconds"], d["cancel"]["seconds"]
    s = d["status"]
    rows = [
        ["request pickup", p["p50"], p["p95"], f"p95 < {d['pickup']['target_p95_s']}"],
        [f"status, {s['jobs']} jobs", s["status"]["p50"], s["status"]["p95"],
         f"< {s['target_s']}"],
        ["status --json", s["status_json_all"]["p50"], s["status_json_all"]["p95"], ""],
        *(
            [["status --all", s["status_all"]["p50"], s["status_all"]["p95"], ""],
             ["start-up + imports (every command)", s["startup_floor"]["p50"],
              s["startup_floor"]["p95"], ""]]
            if "status_all" in s else []
        ),
        ["cancel", c["p50"], c["p95"], f"p95 < {d['cancel']['target_p95_s']}"],
    ]  # fmt: skip
    return (
        "## Service latencies\n\n"
        + _table(["what", "p50 s", "p95 s", "target"], rows)
        + f"\n\n_{d['_file']}, {d['date']}, {d['machine']['cpus']} cores._\n"
    )


@dataclass(frozen=True)
class Target:
    """One figure a benchmark must reach. `measure` reads the suite's newest results and
    returns (what was measured, in words; passed), or None where those results do not
    contain the figure."""

    suite: str
    what: str
    limit: str
    source: str
    measure: Callable[[dict[str, Any]], tuple[str, bool] | None]


def _below(value: float, limit: float, unit: str = " s", digits: int = 3) -> tuple[str, bool]:
    return f"{value:.{digits}f}{unit}", value < limit


def _at_most(value: float, limit: float, unit: str = "", digits: int = 2) -> tuple[str, bool]:
    return f"{value:.{digits}f}{unit}", value <= limit


def _scaling_growth(d: dict[str, Any]) -> tuple[str, bool] | None:
    """Total time from one image count to the next, past 32 images, against n log n."""
    steps = []
    for q in ("low", "medium"):
        runs = [r for r in d.get(q, {}).get("runs", []) if r["images"] >= 32]
        for a, b in zip(runs, runs[1:], strict=False):
            n0, n1 = a["images"], b["images"]
            steps.append(
                (q, n0, n1, b["total_s"] / a["total_s"], n1 * math.log(n1) / (n0 * math.log(n0)))
            )
    if not steps:
        return None
    text = "; ".join(f"{q} {n0}->{n1}: {r:.2f}x (n log n {nl:.2f}x)" for q, n0, n1, r, nl in steps)
    return text, all(r <= nl for *_, r, nl in steps)


def _matching_peak_8(d: dict[str, Any]) -> tuple[str, bool] | None:
    """The matching stage's peak memory in the scaling suite's medium run of 8 photos
    (of the hard variant, 1600 px)."""
    if d.get("variant") != "hard":
        return None
    runs = [r for r in d.get("medium", {}).get("runs", []) if r["images"] == 8]
    if not runs:
        return None
    peak = runs[0]["stages"]["matching"]["peak_rss_mb"]
    return f"{peak:.0f} MB", peak < 1024


def _hard_128(d: dict[str, Any]) -> bool:
    """A memory run on the hard variant at 128 photos of 1600 px (older runs: easy)."""
    r = d["run"]
    return bool(r.get("variant") == "hard" and r["images"] >= 128 and max(r["size"]) >= 1600)


def _mapper_auto(d: dict[str, Any]) -> tuple[str, bool] | None:
    """Per size: the mapper `auto` picks (pipeline.stages.mapping.auto_mapper), its median
    seconds against the other's, and its worst camera error against the other's."""
    from pipeline.stages.mapping import auto_mapper

    shown, ok = [], True
    for size in d["sizes"]:
        n = size["images"]
        chosen = auto_mapper(n)
        other = next(m for m in size["summary"] if m != chosen)
        a, b = size["summary"][chosen], size["summary"][other]
        faster = a["seconds_median"] <= b["seconds_median"]
        holds = a["camera_rms_max"] <= 1.1 * b["camera_rms_max"]
        placed = a["registered_min"] >= b["registered_min"]
        ok = ok and faster and holds and placed
        shown.append(
            f"{n}: {chosen} {a['seconds_median']:.0f} s vs {other} {b['seconds_median']:.0f} s, "
            f"rms {a['camera_rms_max']:.4f} vs {b['camera_rms_max']:.4f}"
        )
    return "; ".join(shown), ok


ISSUE_2 = "issue 2 (daemon core): the CLI is used from any terminal while the daemon works"
ISSUE_6 = (
    "issue 6 (benchmarks): users pick a photogrammetry tool by how long they wait, "
    "against what they would otherwise run"
)
ISSUE_12 = "issue 12 (fast on real photos)"

TARGETS: tuple[Target, ...] = (
    Target(
        "service",
        "request pickup: file closed to job in the ledger",
        "p95 < 0.3 s",
        "issue 2 (daemon core): a request dropped into the inbox is taken at once",
        lambda d: _below(d["pickup"]["seconds"]["p95"], 0.3),
    ),
    Target(
        "service",
        "`dropmesh status`, 10,000 jobs",
        "p50 < 0.5 s",
        ISSUE_2,
        lambda d: _below(d["status"]["status"]["p50"], 0.5),
    ),
    Target(
        "service",
        "`dropmesh status`, 10,000 jobs",
        "p50 < 0.3 s",
        ISSUE_12 + ": status with a big ledger",
        lambda d: _below(d["status"]["status"]["p50"], 0.3),
    ),
    Target(
        "service",
        "`dropmesh status --json`, all of 10,000 jobs",
        "p50 < 0.5 s",
        ISSUE_12 + ": --json took 3.3 s",
        lambda d: _below(d["status"]["status_json_all"]["p50"], 0.5),
    ),
    Target(
        "service",
        "`dropmesh status --all`, 10,000 jobs",
        "p50 < 0.5 s",
        ISSUE_12 + ": status with a big ledger",
        lambda d: (
            _below(d["status"]["status_all"]["p50"], 0.5) if "status_all" in d["status"] else None
        ),
    ),
    Target(
        "service",
        "cancel: command to process tree gone",
        "p95 < 2 s",
        "issue 2 (daemon core): a cancelled job stops promptly",
        lambda d: _below(d["cancel"]["seconds"]["p95"], 2.0),
    ),
    Target(
        "sparse",
        "sparse reconstruction, dropmesh / COLMAP CLI, same settings (median)",
        "<= 1.1",
        "issue 5 (pipeline): not slower than the COLMAP a user could run instead",
        lambda d: _at_most(m["median_ratio"]["total"], 1.1) if (m := _matched(d)) else None,
    ),
    Target(
        "sparse",
        "sparse reconstruction, dropmesh / COLMAP CLI, same settings (median)",
        "<= 1.0",
        ISSUE_6,
        lambda d: _at_most(m["median_ratio"]["total"], 1.0) if (m := _matched(d)) else None,
    ),
    Target(
        "sparse",
        "dropmesh's default preset / COLMAP CLI defaults, real photos, as many placed (median)",
        "<= 0.5",
        ISSUE_12 + ": a user compares with the COLMAP they could install",
        lambda d: (
            (
                f"{d['defaults']['median_ratio']['total']:.2f}",
                d["defaults"]["median_ratio"]["total"] <= 0.5
                and min(d["defaults"]["registered"]["dropmesh"])
                >= max(d["defaults"]["registered"]["colmap"]),
            )
            if "defaults" in d
            else None
        ),
    ),
    Target(
        "daemon",
        "daemon / plain script, same images and preset (median)",
        "<= 1.03",
        "issue 6 (benchmarks): the daemon adds almost nothing over calling the pipeline",
        lambda d: _at_most(d["median_ratio"], 1.03, digits=3),
    ),
    Target(
        "scaling",
        "total time growth per doubling of images, past 32",
        "<= n log n",
        "issue 6 (benchmarks): big photo sets stay practical (matching strategy)",
        _scaling_growth,
    ),
    Target(
        "memory",
        "peak memory, 128 images of 1600 px",
        "< 4 GB",
        "issue 6 (benchmarks): a big job fits on an ordinary machine",
        lambda d: (
            (f"{d['run']['peak_rss_mb']:.0f} MB", d["run"]["peak_rss_mb"] < 4096)
            if d["run"]["images"] >= 128 and max(d["run"]["size"]) >= 1600
            else None
        ),
    ),
    Target(
        "memory",
        "the whole job, 128 photos of 1600 px, hard variant, medium, 2 cores",
        "< 15 min",
        ISSUE_12 + ": a big job of real-looking photos finishes while the user waits",
        lambda d: (
            (f"{d['run']['total_wall_s'] / 60:.1f} min", d["run"]["total_wall_s"] < 900)
            if _hard_128(d)
            else None
        ),
    ),
    Target(
        "memory",
        "matching stage's peak memory, 128 photos of 1600 px, hard variant",
        "< 2 GB",
        ISSUE_12 + ": matching must not be what runs a machine out of memory",
        lambda d: (
            (f"{m:.0f} MB", m < 2048)
            if _hard_128(d) and (m := d["run"]["stages"]["matching"]["peak_rss_mb"])
            else None
        ),
    ),
    Target(
        "scaling",
        "matching stage's peak memory, 8 photos of 1600 px, hard variant, medium",
        "< 1 GB",
        ISSUE_12 + ": 2.8 GB in matching for 9 real photos",
        _matching_peak_8,
    ),
    Target(
        "memory",
        "matching time per pair, 128 photos of 1600 px, hard variant",
        "<= 0.5 s",
        ISSUE_12 + ": 4.4 s a pair on real photos",
        lambda d: (
            _at_most(m["seconds"] / m["metrics"]["pairs"], 0.5, " s", digits=2)
            if _hard_128(d) and (m := d["run"]["stages"]["matching"])
            else None
        ),
    ),
    Target(
        "mapper",
        "mapping with `mapper = auto`, against the other mapper, hard variant, each size measured",
        "no slower, camera error within 10 %",
        ISSUE_12 + ": make auto pick the faster mapper where quality holds",
        _mapper_auto,
    ),
    Target(
        "web",
        "dashboard jobs JSON, 10,000 jobs",
        "p95 < 0.2 s",
        "issue 11 (dashboard): the jobs page stays quick on a big ledger",
        lambda d: _below(d["pages"]["jobs_json"]["p95"], 0.2),
    ),
    Target(
        "texture",
        "texture stage's share of the job's time, demo scene, medium",
        "<= 20 %",
        "issue 10 (real textures): texturing must not make the wait much longer",
        lambda d: (
            _at_most(100 * d["texture_share"], 20.0, " %", digits=0)
            if d["quality"] == "medium"
            else None
        ),
    ),
    Target(
        "texture",
        "texture stage's share of the job's time, castel photos, medium",
        "<= 20 %",
        "issue 10 (real textures): texturing must not make the wait much longer",
        lambda d: (
            _at_most(100 * d["castel"]["texture_share"], 20.0, " %", digits=0)
            if d["quality"] == "medium" and "castel" in d
            else None
        ),
    ),
)


def check(target: Target, d: dict[str, Any] | None) -> tuple[str, str]:
    """(measured, verdict) for one target; verdict is pass, FAIL or not measured."""
    if d is None:
        return "", "not measured"
    try:
        got = target.measure(d)
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError):
        got = None
    if got is None:
        return "", "not measured"
    measured, ok = got
    return measured, "pass" if ok else "FAIL"


def targets_section(results: dict[str, dict[str, Any] | None]) -> tuple[str, list[str]]:
    """The targets table for BENCHMARKS.md, and one line per target for the terminal."""
    rows, lines = [], []
    for t in TARGETS:
        d = results.get(t.suite)
        measured, verdict = check(t, d)
        shown = f"**{verdict}**" if verdict == "FAIL" else verdict
        where = d["_file"] if d else f"`python -m bench {t.suite}`"
        rows.append([t.what, t.limit, measured, shown, t.source, where])
        lines.append(f"{verdict:>12}  {t.what} {t.limit}: {measured or '-'} ({t.source})")
    text = (
        "## Targets\n\nEach target with the issue that asked for it; measured in the newest "
        "results file of its suite (below).\n\n"
        + _table(["what", "target", "measured", "verdict", "asked by", "results"], rows)
        + "\n"
    )
    return text, lines


def web_section(d: dict[str, Any]) -> str:
    pages, fan = d["pages"], d["fanout"]
    rows = [[k, v["p50"], v["p95"], v["max"]] for k, v in pages.items() if isinstance(v, dict)]
    return (
        f"## Dashboard\n\nServer time with {pages['jobs']} jobs in the ledger (seconds):\n\n"
        + _table(["request", "p50", "p95", "max"], rows)
        + f"\n\nSSE fan-out: {fan['clients']} clients, {fan['clients_saw_done']} saw the job "
        f"finish, p95 {fan['delay_after_finish_s']['p95']:.2f} s after the ledger recorded it; "
        f"pickup p95 {fan['pickup_alone_s']['p95']:.3f} s alone, "
        f"{fan['pickup_with_clients_s']['p95']:.3f} s with the clients connected.\n\n{_meta(d)}\n"
    )


def texture_section(d: dict[str, Any]) -> str:
    m = d["held_out_scores"]["mean"]
    rows = [
        [kind, m[kind]["psnr_db"], m[kind]["ssim"], m[kind]["coverage"]]
        for kind in ("textured", "vertex_colour", "flat")
    ]
    t = d["texture"]
    picture = (
        "\n\n![photo | vertex colours | texture](bench/results/texture.jpg)"
        if (RESULTS / "texture.jpg").is_file()
        else ""
    )
    return (
        f"## Texture{'' if d['quality'] == 'medium' else ', quality ' + d['quality']}\n\n"
        f"Demo scene, {d['images']} images {d['size'][0]}x{d['size'][1]}, "
        f"quality {d['quality']}; {len(d['held_out'])} photos left out of the job and rendered "
        f"from their cameras (PSNR after one gain per channel, over the pixels the mesh "
        f"covers).\n\n{_table(['colours', 'PSNR dB', 'SSIM', 'coverage'], rows)}\n\n"
        f"texture stage {d['texture_wall_s']:.1f} s of a {d['job_wall_s']:.1f} s job "
        f"({100 * d['texture_share']:.0f} %), peak "
        f"{d['stages']['texture'].get('peak_rss_mb', 0):.0f} MB; {t['faces']} faces, "
        f"{t['faces_textured']} from photos, {t['charts']} charts, atlas "
        f"{t['texture_size'][0]}x{t['texture_size'][1]}.{_castel_share(d)}{picture}\n\n"
        f"{_budgets(d)}{_meta(d)}\n"
    )


def _castel_share(d: dict[str, Any]) -> str:
    c = d.get("castel")
    if not c:
        return ""
    return (
        f" On the castel photos ({c['images']} frames, the same preset): texture stage "
        f"{c['texture_wall_s']:.1f} s of a {c['job_wall_s']:.1f} s job "
        f"({100 * c['texture_share']:.0f} %)."
    )


def _budgets(d: dict[str, Any]) -> str:
    """The face-budget sweep of newer texture results (older ones have none)."""
    sweep = d.get("face_budgets")
    if not sweep:
        return ""
    rows = [
        [
            r["face_budget"],
            r["faces"],
            r["texture_s"],
            f"{r['object_fscore']:.4f}",
            r["textured_psnr_db"],
            r["vertex_colour_psnr_db"],
        ]
        for r in sweep
    ]
    head = [
        "face budget",
        "faces",
        "texture s",
        "object F-score (1 %)",
        "held-out PSNR textured dB",
        "vertex colours dB",
    ]
    return (
        f"The same job meshed again at other face budgets (quality {d['quality']}'s own "
        f"is one row):\n\n{_table(head, rows)}\n\n"
    )


def _median(values: list[Any]) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2.0


def plot(d: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    qualities = [q for q in ("low", "medium") if q in d]
    fig, axes = plt.subplots(1, len(qualities), figsize=(6 * len(qualities), 4.5), squeeze=False)
    for ax, q in zip(axes[0], qualities, strict=True):
        runs = d[q]["runs"]
        n = [r["images"] for r in runs]
        for s in (s for s in STAGES if all(s in r["stages"] for r in runs)):
            ax.plot(n, [max(r["stages"][s]["seconds"], 1e-3) for r in runs], marker="o", label=s)
        ax.plot(n, [r["total_s"] for r in runs], "k--", marker="s", label="total")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("images")
        ax.set_ylabel("seconds")
        ax.set_title(f"per-stage time, preset {q}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)
    return PLOT


def write_report() -> list[Path]:
    sections = [
        "# Benchmarks\n\nGenerated by `make bench` (`python -m bench`) from the newest "
        "`bench/results/<date>-<suite>.json` of each suite; regenerate with "
        "`python -m bench report`. The machine is shared (2 cores, other work running): "
        "compare ratios of runs made side by side in one run, not absolute seconds across "
        "sections; each section states the load it ran under.\n"
    ]
    written = []
    builders = (
        ("pipeline", pipeline_section),
        ("compare", compare_section),
        ("sparse", sparse_section),
        ("stereo", stereo_section),
        ("daemon", daemon_section),
        ("scaling", scaling_section),
        ("memory", memory_section),
        ("mapper", mapper_section),
        ("service", service_section),
        ("texture", texture_section),
        ("texture-high", texture_section),
        ("web", web_section),
    )
    # how to run the suites that are not `python -m bench SUITE`
    commands = {"texture-high": "python -m bench texture --quality high"}
    results = {suite: latest(suite) for suite, _ in builders}
    table, lines = targets_section(results)
    sections.append(table)
    for line in lines:
        print(line)
    for suite, build in builders:
        d = results[suite]
        if d is None:
            command = commands.get(suite, f"python -m bench {suite}")
            sections.append(f"## {suite}\n\nNot run yet: `{command}`.\n")
            continue
        try:
            sections.append(build(d))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            sections.append(f"## {suite}\n\nResults file {d['_file']} unreadable: {exc!r}\n")
        if suite == "scaling":
            p = plot(d)
            if p is not None:
                written.append(p)
    DOC.write_text("\n".join(sections))
    written.insert(0, DOC)
    return written
