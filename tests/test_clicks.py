"""A point clicked in RViz as a pixel of the camera image (flmm_ros/ros/clicks.py, no DDS)."""
import pytest

from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros.clicks import clicked_pixel

K = [200.0, 0.0, 160.0, 0.0, 200.0, 120.0, 0.0, 0.0, 1.0]


def test_a_point_in_the_optical_frame_projects_with_the_intrinsics():
    assert clicked_pixel(0.1, -0.05, 0.5, 'camera', '/camera', K, 320, 240) == pytest.approx((200.0, 100.0))


@pytest.mark.parametrize('xyz, frame, message', [
    ((0.1, 0.0, 0.5), 'map', "set RViz's fixed frame to 'camera'"),
    ((0.0, 0.0, -1.0), 'camera', 'not in front of the camera'),
    ((0.0, 0.0, float('nan')), 'camera', 'not in front of the camera'),
    ((5.0, 0.0, 0.5), 'camera', 'outside the 320x240 image'),
])
def test_points_that_cannot_be_asked_about_are_refused_with_the_reason(xyz, frame, message):
    with pytest.raises(GroundingError, match=message.replace('(', r'\(')):
        clicked_pixel(*xyz, frame, 'camera', K, 320, 240)
