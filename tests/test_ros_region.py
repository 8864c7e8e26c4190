"""Click to ask and grounded conversation through the node over real DDS (issue #21), on the embedded model and a
generated scene with exact masks: a goal's pixel, RViz's /clicked_point (projected with camera_info), and
`phrase_mode: conversation`, whose objects carry their characters in the answer.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from flmm_msgs.msg import GroundingResult
from geometry_msgs.msg import PointStamped
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from std_msgs.msg import Header

from flmm_ros.ros.testing import RELIABLE, GroundingProcess, camera_info, depth_image, send_goal, wait_future, wait_result
from flmm_ros.tabletop.scenes import generate_scene

pytestmark = pytest.mark.ros

SCENE = generate_scene(2000001)          # a white mug, a red can and a purple can (256 x 256)
RED_CAN = next(o for o in SCENE.objects if (o.colour, o.kind) == ('red', 'can'))
FOCAL, DEPTH_M = 200.0, 0.6


def interior_pixel(mask: np.ndarray) -> tuple[int, int]:
    """Where a person clicks: the pixel farthest from the object's outline."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(distance.argmax(), distance.shape)
    return int(x), int(y)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def mask_of(obj) -> np.ndarray:
    return np.frombuffer(obj.mask.data, np.uint8).reshape(obj.mask.height, obj.mask.width) > 0


@pytest.fixture(scope='module')
def node(tmp_path_factory, repetition):
    process = GroundingProcess(tmp_path_factory.mktemp('region'), None,
                               {'input_qos': 'RELIABLE', 'diagnostics_period': 0.1, 'max_frame_age': 0.0,
                                'max_new_tokens': 48})
    try:
        process.wait_ready()
        h, w = SCENE.image.shape[:2]
        header = process.probe.publish_frame(SCENE.image, 100, depth=depth_image(h, w, DEPTH_M),
                                             info=camera_info(h, w, FOCAL))
        process.probe.wait_frame(header)
        yield process
    finally:
        process.close()


def check_red_can(result: GroundingResult) -> None:
    assert result.success, result.error
    (obj,) = result.objects
    assert obj.phrase.endswith('red can') and obj.found
    assert result.answer[obj.answer_start:obj.answer_end] == obj.phrase        # its words in the answer
    assert iou(mask_of(obj), RED_CAN.mask) > 0.5
    assert obj.has_pose and obj.centroid.z == pytest.approx(DEPTH_M, abs=1e-3)


def test_a_goal_asks_about_the_pixel_it_points_at(node):
    x, y = interior_pixel(RED_CAN.mask)
    status, result = wait_result(send_goal(node.probe, '', point=(x, y)))
    check_red_can(result)
    assert mask_of(result.objects[0])[y, x]
    # What a person hears: the name of what they pointed at, not the LMM's whole description.
    node.probe.wait_for(lambda: any(a.data == f"{result.objects[0].phrase}." for a in node.probe.outputs['answer']),
                        30, 'the spoken name of the clicked object')


def test_a_point_clicked_in_rviz_is_projected_and_asked_about(node):
    probe = node.probe
    clicks = probe.create_publisher(PointStamped, '/clicked_point', RELIABLE)
    probe.wait_for(lambda: clicks.get_subscription_count() > 0, 30, 'the node to subscribe to /clicked_point')
    x, y = interior_pixel(RED_CAN.mask)
    h, w = SCENE.image.shape[:2]
    click = PointStamped(header=Header(frame_id='camera_color_optical_frame'))   # RViz's fixed frame: the camera
    click.point.x, click.point.y, click.point.z = (x - w / 2) * DEPTH_M / FOCAL, (y - h / 2) * DEPTH_M / FOCAL, DEPTH_M
    before = len(probe.outputs['result'])
    clicks.publish(click)
    probe.wait_for(lambda: len(probe.outputs['result']) > before, 90, 'the result of the click')
    check_red_can(probe.outputs['result'][before])

    click.header.frame_id = 'map'            # another fixed frame: refused with the reason, TF is not used
    before = len(probe.outputs['result'])
    clicks.publish(click)
    probe.wait_for(lambda: len(probe.outputs['result']) > before, 90, 'the refusal of the click')
    refusal = probe.outputs['result'][before]
    assert refusal.error_code == GroundingResult.ERROR_BAD_INPUT and "fixed frame" in refusal.error


def test_grounded_conversation_links_each_phrase_of_the_answer_to_its_mask(node):
    probe = node.probe
    client = probe.create_client(SetParameters, '/flmm_grounding/set_parameters')
    assert client.wait_for_service(timeout_sec=30)
    set_mode = SetParameters.Request(parameters=[Parameter('phrase_mode', value='conversation').to_parameter_msg()])
    assert wait_future(client.call_async(set_mode), 30, 'phrase_mode').results[0].successful
    try:
        result = probe.ask('Please give me a description of the image.')
    finally:
        set_mode.parameters[0] = Parameter('phrase_mode', value='instruction').to_parameter_msg()
        wait_future(client.call_async(set_mode), 30, 'phrase_mode back')
    assert result.success and result.answer and result.objects, result
    truths = [o.mask for o in SCENE.objects]
    for obj in result.objects:
        assert result.answer[obj.answer_start:obj.answer_end] == obj.phrase
        assert max(iou(mask_of(obj), truth) for truth in truths) > 0.5, obj.phrase
