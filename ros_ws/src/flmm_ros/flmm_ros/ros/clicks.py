"""Click to ask: a 3D point clicked in RViz ("Publish Point", geometry_msgs/PointStamped on /clicked_point) as a
pixel of the camera image (no rclpy here).

RViz publishes the point in its fixed frame. TF is not used, so the fixed frame must be the camera's optical
frame (the frame_id of the images): the point is then projected with the camera's intrinsics. Anything else
is refused with the reason, never guessed.
"""
from __future__ import annotations

import math

from flmm_ros.geometry3d import CameraIntrinsics
from flmm_ros.grounding.types import GroundingError


def clicked_pixel(x: float, y: float, z: float, point_frame: str, camera_frame: str,
                  k, width: int, height: int) -> tuple[float, float]:
    """The pixel (x, y) where a point of the camera's optical frame (REP 103: z forward) appears."""
    if point_frame.lstrip('/') != camera_frame.lstrip('/'):
        raise GroundingError(f"the clicked point is in frame {point_frame!r}, not the camera's optical frame "
                             f"{camera_frame!r}: set RViz's fixed frame to {camera_frame!r} (TF is not used)")
    if not all(math.isfinite(v) for v in (x, y, z)) or z <= 0:
        raise GroundingError(f"the clicked point ({x:g}, {y:g}, {z:g}) is not in front of the camera (z > 0); "
                             "click on the point cloud or the depth image")
    intrinsics = CameraIntrinsics.from_k(k, width, height)
    u, v = intrinsics.fx * x / z + intrinsics.cx, intrinsics.fy * y / z + intrinsics.cy
    if not (0 <= u < width and 0 <= v < height):
        raise GroundingError(f"the clicked point projects to pixel ({u:.0f}, {v:.0f}), outside the "
                             f"{width}x{height} image")
    return u, v
