"""Accuracy, completeness and F-score of a reconstruction against a ground-truth mesh.

The reconstruction lives in COLMAP's arbitrary frame; it is first mapped onto the ground
truth by the similarity transform (scale, rotation, translation) that best fits the
reconstructed camera centres to the true ones (Umeyama's least squares). Both surfaces
are then sampled uniformly by area; with tau = `threshold_ratio` x the ground truth's
bounding-box diagonal:

- precision (accuracy): the share of reconstructed samples within tau of the truth;
- recall (completeness): the share of ground-truth samples within tau of the
  reconstruction, counting only the ground truth some camera sees (what cannot be
  photographed cannot be reconstructed);
- F-score: their harmonic mean.

`evaluate` scores against the whole scene (object and ground plate, tau = 1 % of the scene's
diagonal). The ground is most of that area, so `evaluate_object` also scores the object
alone, at 1 % of the object's own box diagonal: its precision counts the reconstructed
samples nearer the object than the ground (floaters around the object included), its recall
the object's visible samples.

    python -m pipeline.evaluate MESH --truth SCENE/ground_truth --sparse WS/undistort/sparse
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

__all__ = [
    "Alignment",
    "Score",
    "align_to_truth",
    "evaluate",
    "evaluate_object",
    "sample_surface",
    "score_points",
    "umeyama",
]


@dataclass(frozen=True)
class Alignment:
    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)
    rms: float  # residual of the camera centres after alignment
    cameras: int

    def apply(self, points: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.scale * points @ self.rotation.T + self.translation
        return out


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fscore: float
    threshold: float
    diagonal: float
    accuracy_mean: float  # mean distance reconstruction -> truth
    completeness_mean: float  # mean distance visible truth -> reconstruction
    samples_reconstruction: int
    samples_truth: int
    alignment_rms: float | None = None
    alignment_cameras: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """s, R, t minimising sum |dst - (s R src + t)|^2 (Umeyama 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if len(src) < 3:
        raise ValueError("a similarity transform needs at least 3 point pairs")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / var_s)
    trans = mu_d - scale * rot @ mu_s
    return scale, rot, trans


def _truth_cameras(cameras_json: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(Path(cameras_json).read_text())
    images = data.get("images", data)
    if isinstance(images, list):
        return {c["name"]: c for c in images}
    return dict(images)


def align_to_truth(sparse_dir: Path, cameras_json: Path) -> Alignment:
    """Similarity from the sparse model's frame to the ground truth's, from the camera
    centres of the images both know (matched by file name)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(sparse_dir))
    truth = _truth_cameras(cameras_json)
    src, dst = [], []
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        cam = truth.get(image.name) or truth.get(Path(image.name).name)
        if cam is None:
            continue
        centre = cam.get("centre") or cam.get("center")
        if centre is None:
            r = np.asarray(cam["R"], np.float64)
            centre = -r.T @ np.asarray(cam["t"], np.float64)
        src.append(np.asarray(image.projection_center(), np.float64))
        dst.append(np.asarray(centre, np.float64))
    if len(src) < 3:
        raise ValueError(f"only {len(src)} cameras match the ground truth; need 3")
    s, r, t = umeyama(np.array(src), np.array(dst))
    aligned = s * np.array(src) @ r.T + t
    rms = float(np.sqrt(((aligned - np.array(dst)) ** 2).sum(axis=1).mean()))
    return Alignment(scale=s, rotation=r, translation=t, rms=rms, cameras=len(src))


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """n points uniformly by area on a triangle mesh, and the face each lies on."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = area.sum()
    if len(f) == 0 or total <= 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), size=n, p=area / total)
    r1, r2 = rng.random(n), rng.random(n)
    s1 = np.sqrt(r1)
    w0, w1, w2 = 1.0 - s1, s1 * (1.0 - r2), s1 * r2
    pts = w0[:, None] * a[face] + w1[:, None] * b[face] + w2[:, None] * c[face]
    return pts, face


def visible_from(
    points: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    cameras: dict[str, dict[str, Any]],
    K: np.ndarray,
    width: int,
    height: int,
) -> np.ndarray:
    """Which points (lying on the mesh) some camera sees: inside its image and not
    hidden by the mesh itself."""
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(np.asarray(vertices, np.float32)),
        o3d.core.Tensor.from_numpy(np.asarray(faces, np.uint32)),
    )
    seen = np.zeros(len(points), bool)
    for cam in cameras.values():
        rot = np.asarray(cam["R"], np.float64)
        t = np.asarray(cam["t"], np.float64)
        todo = np.nonzero(~seen)[0]
        if len(todo) == 0:
            break
        pc = points[todo] @ rot.T + t
        z = pc[:, 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            u = K[0, 0] * pc[:, 0] / z + K[0, 2]
            v = K[1, 1] * pc[:, 1] / z + K[1, 2]
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        cand = todo[inside]
        if len(cand) == 0:
            continue
        centre = -rot.T @ t
        d = points[cand] - centre
        dist = np.linalg.norm(d, axis=1)
        rays = np.concatenate([np.broadcast_to(centre, d.shape), d / dist[:, None]], axis=1)
        hit = scene.cast_rays(o3d.core.Tensor.from_numpy(rays.astype(np.float32)))["t_hit"].numpy()
        tol = 1e-3 * dist + 1e-4
        seen[cand[hit >= dist - tol]] = True
    return seen


def score_points(
    recon: np.ndarray,
    truth: np.ndarray,
    diagonal: float,
    threshold_ratio: float = 0.01,
) -> Score:
    tau = threshold_ratio * diagonal
    if len(recon) == 0 or len(truth) == 0:
        return Score(
            0.0, 0.0, 0.0, tau, diagonal, float("inf"), float("inf"), len(recon), len(truth)
        )
    d_rt, _ = cKDTree(truth).query(recon, k=1, workers=-1)
    d_tr, _ = cKDTree(recon).query(truth, k=1, workers=-1)
    precision = float((d_rt < tau).mean())
    recall = float((d_tr < tau).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Score(
        precision=precision,
        recall=recall,
        fscore=f,
        threshold=tau,
        diagonal=diagonal,
        accuracy_mean=float(d_rt.mean()),
        completeness_mean=float(d_tr.mean()),
        samples_reconstruction=len(recon),
        samples_truth=len(truth),
    )


def _has_faces(path: Path) -> bool:
    """Whether a PLY file declares faces (any other format: assume it does)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head.startswith(b"ply"):
        return True
    header = head.split(b"end_header")[0]
    for line in header.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == b"element" and parts[1] == b"face":
            return int(parts[2]) > 0
    return False


def _load_geometry(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if _has_faces(path):
        mesh = o3d.io.read_triangle_mesh(path)
        if len(mesh.triangles) > 0:
            return np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    cloud = o3d.io.read_point_cloud(path)
    return np.asarray(cloud.points), None


def evaluate(
    reconstruction: Path,
    truth_dir: Path,
    sparse_dir: Path,
    *,
    truth_mesh: str = "mesh.ply",
    threshold_ratio: float = 0.01,
    samples: int = 200_000,
    seed: int = 0,
) -> Score:
    """Score a reconstructed mesh (or point cloud) against `truth_dir/truth_mesh`, with
    cameras from `truth_dir/cameras.json` and the reconstruction's sparse model."""
    truth_dir = Path(truth_dir)
    cameras_json = truth_dir / "cameras.json"
    info = json.loads(cameras_json.read_text())
    alignment = align_to_truth(sparse_dir, cameras_json)

    verts, faces = _load_geometry(Path(reconstruction))
    verts = alignment.apply(verts)
    if faces is not None:
        recon_pts, _ = sample_surface(verts, faces, samples, seed)
    else:
        recon_pts = verts

    gt = o3d.io.read_triangle_mesh(truth_dir / truth_mesh)
    gv, gf = np.asarray(gt.vertices), np.asarray(gt.triangles)
    diagonal = float(np.linalg.norm(gv.max(axis=0) - gv.min(axis=0)))
    gt_pts, _ = sample_surface(gv, gf, samples, seed + 1)
    cams = _truth_cameras(cameras_json)
    if "K" in info:
        # visibility against the whole scene (an object hides the ground behind it)
        full = o3d.io.read_triangle_mesh(truth_dir / "mesh.ply")
        seen = visible_from(
            gt_pts,
            np.asarray(full.vertices),
            np.asarray(full.triangles),
            cams,
            np.asarray(info["K"], np.float64),
            int(info["width"]),
            int(info["height"]),
        )
        gt_pts = gt_pts[seen]
    score = score_points(recon_pts, gt_pts, diagonal, threshold_ratio)
    return Score(
        **{
            **asdict(score),
            "alignment_rms": alignment.rms,
            "alignment_cameras": alignment.cameras,
        }
    )


def evaluate_object(
    reconstruction: Path,
    truth_dir: Path,
    sparse_dir: Path,
    *,
    threshold_ratio: float = 0.01,
    samples: int = 200_000,
    seed: int = 0,
) -> Score:
    """Score the reconstruction's object against `truth_dir/object.ply` at
    `threshold_ratio` x the object's bounding-box diagonal.

    Reconstructed samples are split by the nearest true surface: those nearer the object
    than the ground count for precision. Recall is over the object's visible samples."""
    truth_dir = Path(truth_dir)
    cameras_json = truth_dir / "cameras.json"
    info = json.loads(cameras_json.read_text())
    alignment = align_to_truth(sparse_dir, cameras_json)
    verts, faces = _load_geometry(Path(reconstruction))
    verts = alignment.apply(verts)
    recon_pts = sample_surface(verts, faces, samples, seed)[0] if faces is not None else verts

    obj = o3d.io.read_triangle_mesh(truth_dir / "object.ply")
    ov, of = np.asarray(obj.vertices), np.asarray(obj.triangles)
    full = o3d.io.read_triangle_mesh(truth_dir / "mesh.ply")
    fv, ff = np.asarray(full.vertices), np.asarray(full.triangles)
    if len(ov) == 0 or len(fv) <= len(ov):
        raise ValueError(f"{truth_dir}: object.ply must be a part of mesh.ply")
    diagonal = float(np.linalg.norm(ov.max(axis=0) - ov.min(axis=0)))
    obj_pts, _ = sample_surface(ov, of, samples, seed + 1)
    # the rest of the scene: mesh.ply's faces that are not the object's (object.ply is
    # mesh.ply's tail, after the ground)
    rest_faces = ff[: len(ff) - len(of)]
    rest_pts, _ = sample_surface(fv, rest_faces, samples, seed + 2)
    if len(recon_pts):
        d_obj, _ = cKDTree(obj_pts).query(recon_pts, k=1, workers=-1)
        d_rest, _ = cKDTree(rest_pts).query(recon_pts, k=1, workers=-1)
        recon_pts = recon_pts[d_obj <= d_rest]
    if "K" in info:
        seen = visible_from(
            obj_pts,
            fv,
            ff,
            _truth_cameras(cameras_json),
            np.asarray(info["K"], np.float64),
            int(info["width"]),
            int(info["height"]),
        )
        obj_pts = obj_pts[seen]
    score = score_points(recon_pts, obj_pts, diagonal, threshold_ratio)
    return Score(
        **{
            **asdict(score),
            "alignment_rms": alignment.rms,
            "alignment_cameras": alignment.cameras,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Precision, recall and F-score of a mesh against the demo ground truth.",
    )
    parser.add_argument("mesh", type=Path, help="reconstructed mesh or point cloud (PLY)")
    parser.add_argument("--truth", type=Path, required=True, help="ground_truth folder")
    parser.add_argument("--sparse", type=Path, required=True, help="sparse model folder")
    parser.add_argument("--truth-mesh", default="mesh.ply", help="mesh.ply or object.ply")
    parser.add_argument("--threshold", type=float, default=0.01, help="x bbox diagonal")
    args = parser.parse_args(argv)
    score = evaluate(
        args.mesh,
        args.truth,
        args.sparse,
        truth_mesh=args.truth_mesh,
        threshold_ratio=args.threshold,
    )
    result = {"scene": score.to_json()}
    if (args.truth / "object.ply").is_file():
        obj = evaluate_object(args.mesh, args.truth, args.sparse, threshold_ratio=args.threshold)
        result["object"] = obj.to_json()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
