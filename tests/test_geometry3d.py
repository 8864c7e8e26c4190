"""3D centroid, box and orientation from synthetic depth images of known geometry."""
import cv2
import numpy as np
import pytest

from flmm_ros.geometry3d import (
    CameraIntrinsics, depth_to_metres, object_pose_from_depth, object_pose_with_reason, quaternion_from_matrix,
)
from flmm_ros.grounding.types import GroundingError

CAMERA = CameraIntrinsics(fx=300.0, fy=300.0, cx=159.5, cy=119.5, width=320, height=240)


def pixel_rays():
    """Per-pixel ray directions scaled so their z component is 1 (ray point at t = depth)."""
    rows, cols = np.mgrid[0:CAMERA.height, 0:CAMERA.width].astype(np.float64)
    return np.stack([(cols - CAMERA.cx) / CAMERA.fx, (rows - CAMERA.cy) / CAMERA.fy, np.ones_like(rows)], -1)


def render_rectangle(center, half_x, half_y, normal_tilt_deg=0.0):
    """Depth of a flat rectangle at `center`, rotated about the camera y axis by `normal_tilt_deg`.
    Returns (depth, mask, rotation of the rectangle: columns = its x, y, normal)."""
    angle = np.deg2rad(normal_tilt_deg)
    axis_x = np.array([np.cos(angle), 0.0, -np.sin(angle)])
    axis_y = np.array([0.0, 1.0, 0.0])
    normal = np.cross(axis_x, axis_y)
    rays = pixel_rays()
    t = (np.asarray(center) @ normal) / (rays @ normal)   # ray-plane intersection
    offset = rays * t[..., None] - np.asarray(center)
    mask = (np.abs(offset @ axis_x) <= half_x) & (np.abs(offset @ axis_y) <= half_y)
    return np.where(mask, t, 0.0).astype(np.float32), mask, np.stack([axis_x, axis_y, normal], 1)


def render_sphere(center, radius):
    rays = pixel_rays()
    center = np.asarray(center, dtype=np.float64)
    a = np.einsum("hwc,hwc->hw", rays, rays)
    b = rays @ center
    disc = b * b - a * (center @ center - radius * radius)
    mask = disc > 0
    t = (b - np.sqrt(np.where(mask, disc, 0.0))) / a   # nearest intersection
    return np.where(mask, t, 0.0).astype(np.float32), mask


def with_noisy_background(depth, mask, distance, rng):
    background = rng.normal(distance, 0.005, depth.shape).astype(np.float32)
    return np.where(mask, depth, background)


def test_rectangle_facing_the_camera():
    center = np.array([0.05, -0.03, 0.8])
    depth, mask, _ = render_rectangle(center, half_x=0.06, half_y=0.04)
    obj = object_pose_from_depth(mask, depth, CAMERA)
    assert obj is not None
    np.testing.assert_allclose(obj.centroid, center, atol=0.005)
    np.testing.assert_allclose(obj.box_center, center, atol=0.005)
    # Major axis along camera x (12 cm), then y (8 cm), and no thickness along the approach axis.
    assert obj.size[0] == pytest.approx(0.12, rel=0.06) and obj.size[1] == pytest.approx(0.08, rel=0.08)
    assert obj.size[2] < 0.002
    np.testing.assert_allclose(obj.rotation, np.eye(3), atol=0.02)
    np.testing.assert_allclose(obj.quaternion, [0, 0, 0, 1], atol=0.01)
    assert obj.num_points > 0.8 * mask.sum()


def test_tilted_rectangle_orientation_follows_its_normal():
    center = np.array([0.0, 0.02, 0.9])
    depth, mask, truth = render_rectangle(center, half_x=0.08, half_y=0.05, normal_tilt_deg=35.0)
    obj = object_pose_from_depth(mask, depth, CAMERA)
    np.testing.assert_allclose(obj.centroid, center, atol=0.01)
    np.testing.assert_allclose(np.abs(obj.rotation.T @ truth), np.eye(3), atol=0.02)
    assert obj.rotation[2, 2] > 0  # approach axis points away from the camera
    assert obj.rotation[0, 0] > 0  # major axis has a positive camera-x component
    assert np.linalg.det(obj.rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation_from_quaternion(obj.quaternion), obj.rotation, atol=1e-9)
    assert obj.size[0] == pytest.approx(0.16, rel=0.06)


def test_sphere_gives_its_visible_surface_centroid_and_extent():
    center, radius = np.array([-0.1, 0.05, 0.7]), 0.05
    depth, mask = render_sphere(center, radius)
    obj = object_pose_from_depth(mask, depth, CAMERA)
    # Mean of a hemisphere's surface seen head-on lies 2r/3 in front of the centre, on the camera ray.
    direction = center / np.linalg.norm(center)
    expected = direction * (np.linalg.norm(center) - 2 * radius / 3)
    np.testing.assert_allclose(obj.centroid, expected, atol=0.01)
    # Across the view about the diameter, along it about the visible depth of the cap (r).
    assert obj.size[0] == pytest.approx(2 * radius, rel=0.12) and obj.size[1] == pytest.approx(2 * radius, rel=0.12)
    assert obj.size[2] == pytest.approx(radius, rel=0.3)
    assert np.abs(obj.rotation[:, 2] @ direction) > 0.97  # approach along the line of sight


def test_edge_bleed_onto_a_noisy_background_is_rejected():
    rng = np.random.default_rng(1)
    center = np.array([0.02, 0.0, 0.6])
    depth, mask, _ = render_rectangle(center, half_x=0.05, half_y=0.05)
    depth = with_noisy_background(depth + rng.normal(0, 0.002, depth.shape).astype(np.float32), mask, 1.4, rng)
    too_large = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8))  # 4 px of background around it
    obj = object_pose_from_depth(too_large, depth, CAMERA)
    np.testing.assert_allclose(obj.centroid, center, atol=0.01)
    assert obj.size[2] < 0.03
    # Without the outlier filter the background drags the centroid far back: the filter is what helps.
    unfiltered = object_pose_from_depth(too_large, depth, CAMERA, mad_k=1e6, min_depth_tolerance=10.0)
    assert unfiltered.centroid[2] > center[2] + 0.05


def test_sphere_with_edge_bleed_and_background():
    rng = np.random.default_rng(2)
    center, radius = np.array([0.0, 0.0, 0.5]), 0.04
    depth, mask = render_sphere(center, radius)
    depth = with_noisy_background(depth, mask, 0.9, rng)
    too_large = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8))
    obj = object_pose_from_depth(too_large, depth, CAMERA)
    np.testing.assert_allclose(obj.centroid, [0.0, 0.0, 0.5 - 2 * radius / 3], atol=0.01)


def test_16uc1_millimetres_nan_and_zero_readings():
    center = np.array([0.0, 0.05, 1.2])
    depth_m, mask, _ = render_rectangle(center, half_x=0.1, half_y=0.06)
    millimetres = np.round(depth_m * 1000).astype(np.uint16)
    depth = depth_to_metres(millimetres, "16UC1")
    assert depth.dtype == np.float32
    full = object_pose_from_depth(mask, depth, CAMERA)
    np.testing.assert_allclose(full.centroid, center, atol=0.005)

    rng = np.random.default_rng(3)
    holes = rng.random(depth.shape) < 0.3
    depth[holes & (rng.random(depth.shape) < 0.5)] = np.nan
    depth[holes & ~np.isnan(depth)] = 0.0
    holed = object_pose_from_depth(mask, depth, CAMERA)
    assert np.all(np.isfinite(holed.centroid)) and np.all(np.isfinite(holed.quaternion))
    np.testing.assert_allclose(holed.centroid, center, atol=0.01)
    assert 0.6 * full.num_points < holed.num_points < 0.8 * full.num_points


def test_depth_conversion():
    np.testing.assert_allclose(depth_to_metres(np.array([[0, 1500]], np.uint16), "16UC1"), [[0.0, 1.5]])
    metres = np.array([[0.5, np.nan]], np.float32)
    converted = depth_to_metres(metres, "32FC1")
    np.testing.assert_array_equal(converted, metres)
    assert converted is not metres
    with pytest.raises(GroundingError, match="unsupported depth encoding 'rgb8'"):
        depth_to_metres(metres, "rgb8")
    with pytest.raises(GroundingError, match="uint16"):
        depth_to_metres(metres, "16UC1")


def test_too_few_points_returns_none_with_a_reason():
    depth = np.full((CAMERA.height, CAMERA.width), 0.7, np.float32)
    mask = np.zeros(depth.shape, np.uint8)
    mask[100:102, 100:105] = 1  # 10 pixels
    obj, reason = object_pose_with_reason(mask, depth, CAMERA)
    assert obj is None and "10 valid depth pixels" in reason
    assert object_pose_from_depth(mask, depth, CAMERA) is None
    mask[:] = 1
    depth[:] = np.nan
    obj, reason = object_pose_with_reason(mask, depth, CAMERA)
    assert obj is None and "0 valid depth pixels" in reason


def test_thin_mask_survives_erosion():
    depth = np.full((CAMERA.height, CAMERA.width), 0.7, np.float32)
    mask = np.zeros(depth.shape, bool)
    mask[118:121, 60:260] = True  # 3 px wide: erosion by 2 px would remove it
    obj = object_pose_from_depth(mask, depth, CAMERA)
    assert obj is not None and obj.num_points == mask.sum()
    np.testing.assert_allclose(obj.centroid, [0.0, 0.0, 0.7], atol=0.002)


def test_shape_and_intrinsics_errors():
    depth = np.ones((CAMERA.height, CAMERA.width), np.float32)
    with pytest.raises(GroundingError, match=r"mask shape \(120, 160\) differs from depth shape \(240, 320\)"):
        object_pose_from_depth(np.ones((120, 160), np.uint8), depth, CAMERA)
    small = CameraIntrinsics(300, 300, 80, 60, 160, 120)
    with pytest.raises(GroundingError, match="160x120"):
        object_pose_from_depth(np.ones(depth.shape, np.uint8), depth, small)
    with pytest.raises(GroundingError, match="focal"):
        CameraIntrinsics.from_k([0] * 9, 320, 240)
    with pytest.raises(GroundingError, match="9 entries"):
        CameraIntrinsics.from_k([1, 2, 3], 320, 240)


@pytest.mark.parametrize("fx, cx, message", [
    (1e-300, 160.0, "focal lengths fx=1e-300"),          # would put points at 1e300 m
    (300.0, float("nan"), "non-finite"),
    (float("inf"), 160.0, "non-finite"),
    (300.0, 1e9, "principal point"),
])
def test_unusable_intrinsics_are_refused_with_the_reason(fx, cx, message):
    with pytest.raises(GroundingError, match=message):
        CameraIntrinsics.from_k([fx, 0, cx, 0, 300.0, 120.0, 0, 0, 1], 320, 240)
    depth = np.ones((240, 320), np.float32)
    with pytest.raises(GroundingError, match=message):   # K given directly: same check, never LinAlgError
        object_pose_from_depth(np.ones(depth.shape, np.uint8), depth, [fx, 0, cx, 0, 300.0, 120.0, 0, 0, 1])


def test_intrinsics_from_k_matrix_or_list_and_as_argument():
    k = [[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]]
    assert CameraIntrinsics.from_k(k, 320, 240) == CAMERA
    assert CameraIntrinsics.from_k(np.ravel(k).tolist(), 320, 240) == CAMERA
    depth, mask, _ = render_rectangle([0.0, 0.0, 0.5], 0.05, 0.05)
    np.testing.assert_allclose(object_pose_from_depth(mask, depth, k).centroid,
                               object_pose_from_depth(mask, depth, CAMERA).centroid)


def rotation_from_quaternion(q):
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def test_quaternion_round_trip_on_random_rotations():
    rng = np.random.default_rng(4)
    for _ in range(200):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation = q * np.sign(np.linalg.det(q))
        quaternion = quaternion_from_matrix(rotation)
        assert quaternion[3] >= 0 and np.linalg.norm(quaternion) == pytest.approx(1.0)
        np.testing.assert_allclose(rotation_from_quaternion(quaternion), rotation, atol=1e-9)
    # 180 degree turns exercise the branches where w is ~0.
    for rotation in (np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])):
        np.testing.assert_allclose(rotation_from_quaternion(quaternion_from_matrix(rotation)), rotation, atol=1e-12)


def test_large_masks_are_subsampled_without_losing_accuracy():
    center = np.array([0.03, 0.01, 0.5])
    depth, mask, _ = render_rectangle(center, half_x=0.15, half_y=0.1)
    full = object_pose_from_depth(mask, depth, CAMERA)
    sampled = object_pose_from_depth(mask, depth, CAMERA, max_points=500)
    assert mask.sum() > 20000 and full.num_points == 20000 and sampled.num_points <= 500  # default cap 20000
    np.testing.assert_allclose(sampled.centroid, center, atol=0.005)
    np.testing.assert_allclose(sampled.size[:2], full.size[:2], rtol=0.05)


@pytest.mark.parametrize("center", [(0.0, 0.0, 1.0), (-0.5, -0.37, 1.0)])   # in the middle; cut by the corner
def test_the_pose_does_not_depend_on_where_the_image_ends(center):
    """The same mask and depth inside a larger image (the principal point moved with them) give the same pose: the
    computation reads the mask's neighbourhood only, and maps it back to the right pixels."""
    rng = np.random.default_rng(3)
    depth, mask = render_sphere(center, 0.12)
    depth = with_noisy_background(depth, mask, 1.4, rng)
    depth[rng.random(depth.shape) < 0.05] = 0.0
    assert mask.any()
    pad = ((17, 9), (23, 5))
    big = CameraIntrinsics(fx=CAMERA.fx, fy=CAMERA.fy, cx=CAMERA.cx + 23, cy=CAMERA.cy + 17,
                           width=CAMERA.width + 28, height=CAMERA.height + 26)
    a = object_pose_from_depth(mask, depth, CAMERA)
    b = object_pose_from_depth(np.pad(mask, pad), np.pad(depth, pad, constant_values=1.4), big)
    assert a is not None and b is not None and a.num_points == b.num_points
    for field in ("centroid", "box_center", "size", "rotation"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-9)
