"""Core results -> ROS messages (flmm_ros.ros.messages): GroundingResult, GroundedObject, MarkerArray."""
import numpy as np
import pytest
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_from_depth
from flmm_ros.grounding.types import GroundedObject
from flmm_ros.overlay import object_colour
from flmm_ros.ros.image_conversions import image_to_rgb
from flmm_ros.ros.messages import box_message, marker_array, result_message

H, W = 40, 60


def header():
    h = Header(frame_id='camera_color_optical_frame')
    h.stamp.sec, h.stamp.nanosec = 100, 5
    return h


def mug(x0=10, y0=8, x1=30, y1=20, phrase='red mug', score=0.8):
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return GroundedObject(phrase, mask, (x0, y0, x1, y1), score)


def flat_pose(obj, z=1.5):
    depth = np.full((H, W), z, np.float32)
    return object_pose_from_depth(obj.mask, depth, CameraIntrinsics(50.0, 50.0, W / 2, H / 2, W, H))


def test_box_message_exclusive_corners():
    roi = box_message((10, 8, 30, 20))
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (10, 8, 20, 12)
    empty = box_message((0, 0, 0, 0))
    assert (empty.width, empty.height) == (0, 0)


def test_success_result_with_and_without_pose():
    first, second = mug(), mug(40, 25, 55, 38, 'blue bowl', 0.6)
    pose = flat_pose(first)
    msg = result_message('pick the red mug and the blue bowl', header(), answer='It is on the left.',
                         objects=[first, second], poses=[pose, None],
                         timings={'vision': 0.01, 'phrase_pass': 0.02}, total_seconds=0.2, frame_cached=True)
    assert isinstance(msg, GroundingResultMsg)
    assert msg.success and msg.error_code == '' and msg.error == ''
    assert msg.header.stamp.sec == 100 and msg.header.frame_id == 'camera_color_optical_frame'
    assert (msg.answer, msg.frame_cached, msg.total_seconds) == ('It is on the left.', True, 0.2)
    assert list(msg.stage_names) == ['vision', 'phrase_pass']
    assert list(msg.stage_seconds) == pytest.approx([0.01, 0.02])

    obj = msg.objects[0]
    assert obj.phrase == 'red mug' and obj.score == pytest.approx(0.8)
    assert (obj.box.x_offset, obj.box.width) == (10, 20)
    assert obj.mask.encoding == 'mono8' and obj.mask.header.stamp.nanosec == 5
    mask = np.frombuffer(obj.mask.data, np.uint8).reshape(H, W)
    np.testing.assert_array_equal(mask, first.mask)
    assert obj.has_pose and obj.grasp_pose.header.frame_id == 'camera_color_optical_frame'
    assert obj.grasp_pose.pose.position.z == pytest.approx(1.5)
    assert obj.centroid.z == pytest.approx(1.5)
    # mask centre (19.5, 13.5) px -> x = (19.5 - 30) * 1.5 / 50, y = (13.5 - 20) * 1.5 / 50
    assert obj.centroid.x == pytest.approx(-0.315, abs=1e-6) and obj.centroid.y == pytest.approx(-0.195, abs=1e-6)
    q = obj.grasp_pose.pose.orientation
    assert q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2 == pytest.approx(1.0)
    assert obj.size.x > 0.0 and obj.size.y > 0.0

    assert not msg.objects[1].has_pose and msg.objects[1].centroid.z == 0.0


def test_error_result():
    msg = result_message('pick the mug', header(), total_seconds=0.001, error_code=GroundingResultMsg.ERROR_NO_FRAME,
                         error='no image received yet on /image')
    assert not msg.success and msg.error_code == 'no_frame' and 'no image' in msg.error
    assert list(msg.objects) == [] and msg.answer == ''


def test_poses_must_match_objects():
    with pytest.raises(ValueError):
        result_message('x', header(), objects=[mug()], poses=[None, None])


def test_markers_per_object_with_pose():
    first, second = mug(), mug(40, 25, 55, 38, 'blue bowl')
    markers = marker_array([first, second], [None, flat_pose(second, 0.8)], header()).markers
    assert markers[0].action == Marker.DELETEALL
    drawn = markers[1:]
    assert [m.type for m in drawn] == [Marker.CUBE, Marker.SPHERE, Marker.ARROW, Marker.TEXT_VIEW_FACING]
    assert [m.id for m in drawn] == [4, 5, 6, 7]  # object index 1
    assert all(m.header.frame_id == 'camera_color_optical_frame' for m in markers)
    cube, sphere, arrow, text = drawn
    assert cube.pose.position.z == pytest.approx(0.8) and min(cube.scale.x, cube.scale.y, cube.scale.z) > 0
    assert (round(cube.color.r * 255), round(cube.color.g * 255), round(cube.color.b * 255)) == object_colour(1)
    assert sphere.pose.position.z == pytest.approx(0.8)
    assert arrow.points[1].z == pytest.approx(0.8) and arrow.points[0].z < arrow.points[1].z  # towards the object
    assert text.text.startswith('blue bowl')


def test_markers_clear_when_nothing_has_3d():
    markers = marker_array([mug()], [None], header()).markers
    assert len(markers) == 1 and markers[0].action == Marker.DELETEALL


def test_mask_image_round_trips_through_conversions():
    msg = result_message('x', header(), objects=[mug()])
    grey = image_to_rgb(msg.objects[0].mask)[:, :, 0]
    np.testing.assert_array_equal(grey, mug().mask)


def test_client_summary_of_success_and_error():
    from flmm_ros.ros.client import format_result
    first = mug()
    text = format_result(result_message('pick the red mug', header(), answer='On the left.', objects=[first],
                                        poses=[flat_pose(first)], timings={'phrase_pass': 0.012},
                                        total_seconds=0.25, frame_cached=True))
    assert 'answer: On the left.' in text and "1. 'red mug' score 0.80 box x=10 y=8 w=20 h=12" in text
    assert '3D centroid (-0.315, -0.195, 1.500) m' in text
    assert 'latency: 250 ms (frame cached) [phrase_pass 12 ms]' in text
    error = result_message('x', header(), error_code='busy', error='busy with another instruction')
    assert format_result(error) == 'error [busy]: busy with another instruction'


def test_presence_instances_and_answer_spans_reach_the_message():
    from flmm_ros.grounding.types import GroundedObject
    mask = np.zeros((4, 6), np.uint8)
    absent = GroundedObject('the green bottle', mask, (0, 0, 0, 0), 0.0, found=False, presence=0.03)
    second = GroundedObject('all the mugs', mask, (1, 1, 3, 3), 0.9, instance=2, answer_span=(4, 16))
    msg = result_message('pick all the mugs', Header(), answer='see all the mugs', objects=[absent, second],
                         not_found=['the green bottle'])
    assert msg.not_found == ['the green bottle'] and msg.success
    assert (msg.objects[0].found, round(msg.objects[0].presence, 2), msg.objects[0].answer_start) == (False, 0.03, -1)
    assert (msg.objects[1].instance, msg.objects[1].answer_start, msg.objects[1].answer_end) == (2, 4, 16)
