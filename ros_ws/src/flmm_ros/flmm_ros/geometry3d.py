"""Grasp-ready 3D from a mask and an aligned depth image (pinhole camera, no ROS).

Everything is in the camera optical frame (REP 103): x right, y down, z forward, metres.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from flmm_ros.grounding.types import GroundingError

MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation for Gaussian noise
MIN_FOCAL_PX = 1.0


@dataclass(frozen=True)
class CameraIntrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_k(cls, k: Sequence[float] | np.ndarray, width: int, height: int) -> "CameraIntrinsics":
        """From a 3x3 camera matrix or its 9 row-major entries (sensor_msgs/CameraInfo.k)."""
        matrix = np.asarray(k, dtype=np.float64).reshape(-1)
        if matrix.size != 9:
            raise GroundingError(f"camera matrix K needs 9 entries (3x3), got {matrix.size}")
        fx, fy, cx, cy = matrix[0], matrix[4], matrix[2], matrix[5]
        if not np.all(np.isfinite([fx, fy, cx, cy])):
            raise GroundingError(f"camera matrix K has non-finite entries fx={fx}, fy={fy}, cx={cx}, cy={cy} "
                                 "(is the camera calibrated?)")
        # A focal length below MIN_FOCAL_PX (or a principal point far outside the image) is no real camera, and
        # dividing by it overflows: refuse it instead of publishing points at 1e300 m.
        if not (fx >= MIN_FOCAL_PX and fy >= MIN_FOCAL_PX):
            raise GroundingError(f"camera matrix K has focal lengths fx={fx:g}, fy={fy:g}; need at least "
                                 f"{MIN_FOCAL_PX:g} px (is the camera calibrated?)")
        if int(width) <= 0 or int(height) <= 0:
            raise GroundingError(f"camera info has zero image size ({width}x{height})")
        if not (-width <= cx <= 2 * width and -height <= cy <= 2 * height):
            raise GroundingError(f"camera matrix K puts the principal point ({cx:g}, {cy:g}) far outside the "
                                 f"{width}x{height} image (is camera_info for this camera?)")
        return cls(float(fx), float(fy), float(cx), float(cy), int(width), int(height))


@dataclass
class Object3D:
    """An object's visible surface, measured from depth.

    centroid: mean of the kept surface points (3,) -- the grasp point.
    box_center: centre of the oriented box (3,) -- where to draw a cube marker.
    size: box extent (3,) along the object's local x, y, z axes (robust percentiles of the points).
    rotation: (3, 3) columns = local x, y, z axes in the camera frame (right-handed).
    quaternion: the same rotation as (x, y, z, w), w >= 0.
    num_points: depth pixels used (at most max_points).
    """
    centroid: np.ndarray
    box_center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    quaternion: np.ndarray
    num_points: int


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """Depth image in metres (float32; 0 or NaN = no reading) from a '16UC1' (mm) or '32FC1' (m) array."""
    if encoding == "16UC1":
        if depth.dtype != np.uint16:
            raise GroundingError(f"depth encoding 16UC1 needs uint16 data, got {depth.dtype}")
        return depth.astype(np.float32) * np.float32(0.001)
    if encoding == "32FC1":
        if depth.dtype != np.float32:
            raise GroundingError(f"depth encoding 32FC1 needs float32 data, got {depth.dtype}")
        return depth.astype(np.float32, copy=True)
    raise GroundingError(f"unsupported depth encoding '{encoding}': use 16UC1 (millimetres) or 32FC1 (metres)")


def object_pose_from_depth(mask, depth, intrinsics, **options) -> Object3D | None:
    """The object's 3D centroid, box and orientation, or None when the depth is too sparse.
    Same arguments as `object_pose_with_reason`, which also says why it returned None."""
    return object_pose_with_reason(mask, depth, intrinsics, **options)[0]


def object_pose_with_reason(
    mask: np.ndarray,
    depth: np.ndarray,
    intrinsics: CameraIntrinsics | Sequence[float] | np.ndarray,
    *,
    erode_px: int = 2,
    min_points: int = 20,
    mad_k: float = 4.0,
    min_depth_tolerance: float = 0.01,
    extent_percentiles: tuple[float, float] = (1.0, 99.0),
    max_points: int = 20000,
) -> tuple[Object3D | None, str]:
    """Back-project the masked depth and describe the points; returns (object or None, reason).

    mask: (H, W) bool/uint8, non-zero = object. depth: (H, W) float32 metres aligned to the mask.
    intrinsics: CameraIntrinsics, or K (3x3 / 9 entries) for an image of the depth's size.
    1. Readings that are 0 or not finite are ignored.
    2. The object's distance (median) and spread (MAD) come from the mask eroded by `erode_px`, away from
       the outline where depth often belongs to the background (a mask too thin to survive erosion is used
       as is). Mask pixels farther than max(mad_k * sigma_MAD, min_depth_tolerance) from that median are
       outliers (background, flying pixels); all other mask pixels are the object's points.
    3. PCA of the points gives the axes. Local z = the principal axis closest to the camera's z (the
       approach direction), pointing away from the camera; local x = the larger-variance remaining axis,
       with a non-negative camera-x component (camera-y if it has none); local y = z cross x.
    4. size = the `extent_percentiles` range of the points along each local axis (visible surface only:
       the far side is not seen).
    Large masks are subsampled to `max_points` evenly spaced pixels (statistics need no more; bounds the cost).
    """
    mask = np.asarray(mask)
    depth = np.asarray(depth)
    if mask.ndim != 2 or depth.ndim != 2:
        raise GroundingError(f"mask and depth must be 2D images, got shapes {mask.shape} and {depth.shape}")
    if mask.shape != depth.shape:
        raise GroundingError(f"mask shape {mask.shape} differs from depth shape {depth.shape}: "
                             "the depth image must be aligned to (and the size of) the colour image")
    height, width = depth.shape
    if not isinstance(intrinsics, CameraIntrinsics):
        intrinsics = CameraIntrinsics.from_k(intrinsics, width, height)
    if (intrinsics.width, intrinsics.height) != (width, height):
        raise GroundingError(f"camera info is for {intrinsics.width}x{intrinsics.height} images, "
                             f"depth is {width}x{height}")

    # Everything below reads only the mask's bounding box (plus the erosion's reach): the same points in the same
    # order as on the whole image, at a fraction of the cost.
    on = mask > 0
    rows_any, cols_any = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows_any.size:
        y0, y1 = max(0, rows_any[0] - erode_px - 1), min(height, rows_any[-1] + erode_px + 2)
        x0, x1 = max(0, cols_any[0] - erode_px - 1), min(width, cols_any[-1] + erode_px + 2)
        mask, depth = mask[y0:y1, x0:x1], depth[y0:y1, x0:x1]
    else:
        y0 = x0 = 0
    region = (mask > 0) & np.isfinite(depth) & (depth > 0)
    core = region
    if erode_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1))
        eroded = region & cv2.erode((mask > 0).astype(np.uint8), kernel).astype(bool)
        if np.count_nonzero(eroded) >= min_points:
            core = eroded
    core_depth = _evenly_spaced(depth[core], max_points).astype(np.float64)
    if core_depth.size < min_points:
        return None, f"only {core_depth.size} valid depth pixels inside the mask (need {min_points})"
    median = np.median(core_depth)
    tolerance = max(mad_k * MAD_TO_SIGMA * np.median(np.abs(core_depth - median)), min_depth_tolerance)

    rows, cols = (_evenly_spaced(index, max_points) for index in np.nonzero(region))
    z = depth[rows, cols].astype(np.float64)
    keep = np.abs(z - median) <= tolerance
    if np.count_nonzero(keep) < min_points:
        return None, f"only {np.count_nonzero(keep)} depth pixels agree on the object's distance (need {min_points})"
    z, rows, cols = z[keep], rows[keep] + y0, cols[keep] + x0
    points = np.stack([(cols - intrinsics.cx) * z / intrinsics.fx,
                       (rows - intrinsics.cy) * z / intrinsics.fy,
                       z], axis=1)

    centroid = points.mean(axis=0)
    rotation = _principal_axes(points - centroid)
    local = (points - centroid) @ rotation
    low, high = np.percentile(local, extent_percentiles, axis=0)
    return Object3D(
        centroid=centroid,
        box_center=centroid + rotation @ ((low + high) / 2.0),
        size=high - low,
        rotation=rotation,
        quaternion=quaternion_from_matrix(rotation),
        num_points=int(z.size),
    ), ""


def _evenly_spaced(values: np.ndarray, limit: int) -> np.ndarray:
    if values.size <= limit:
        return values
    return values[np.linspace(0, values.size - 1, limit).astype(np.int64)]


def _principal_axes(centred: np.ndarray) -> np.ndarray:
    """Rotation whose columns are the PCA axes, ordered and signed as object_pose_with_reason documents."""
    _, vectors = np.linalg.eigh(centred.T @ centred)  # columns, ascending variance
    approach_index = int(np.argmax(np.abs(vectors[2, :])))
    approach = vectors[:, approach_index] * np.sign(vectors[2, approach_index])
    others = [i for i in (2, 1, 0) if i != approach_index]  # descending variance
    major = vectors[:, others[0]]
    reference = major[0] if abs(major[0]) > 1e-9 else major[1]
    if reference < 0:
        major = -major
    return np.stack([major, np.cross(approach, major), approach], axis=1)


def quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion of a 3x3 rotation matrix, with w >= 0."""
    m = rotation
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    # Shepperd's method: divide by the largest of the four candidates for numerical stability.
    if trace > max(m[0, 0], m[1, 1], m[2, 2]):
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4.0]
    elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4.0, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] >= m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4.0, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4.0, (m[1, 0] - m[0, 1]) / s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q
