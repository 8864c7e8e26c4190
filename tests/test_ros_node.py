"""The flmm_grounding node over real DDS: a subprocess started with --params-file, a random-weight model bundle
(real LLaVA architecture, tiny), and a probe node in this process that publishes inputs and records every output
(flmm_ros.ros.testing). Every wait is on an event (a result, a /diagnostics value), never on a sleep.

The tests of the shared node run in file order: the first one needs a node that has not seen an image yet, and
later ones count the results and frames of the ones before. So repeat the file as a whole (a fresh node each
time: `for i in 1 2 3 4 5; do python -m pytest tests/test_ros_node.py -x || break; done`); `pytest --count`
repeats single tests on the same node, which those counts do not allow.
"""
from __future__ import annotations

import array
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from flmm_msgs.msg import GroundingResult
from sensor_msgs.msg import Image
from std_msgs.msg import String
from visualization_msgs.msg import Marker

from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.ros.image_conversions import image_to_rgb, rgb_to_image
from flmm_ros.ros.testing import (ANSWER_TIMEOUT, STARTUP_TIMEOUT, GroundingProcess, camera_info, depth_image, same_header, scene,
                                  send_goal, stamped, wait_result)

pytestmark = pytest.mark.ros

H, W = 96, 128
DEPTH_M = 0.75
FX = FY = 100.0
# 48 phrases: an instruction that runs many times longer than a DDS round trip (to cancel or preempt it).
MANY_PHRASES = 'take ' + ' and '.join(['the red ball', 'the blue bowl', 'the green mug', 'the white box'] * 12)


def publish_frame(probe, rgb, sec, nanosec=0, depth=True):
    """Image (+ depth and camera_info at DEPTH_M) with one stamp, then wait until the node has it."""
    height, width = rgb.shape[:2]
    header = probe.publish_frame(rgb, sec, nanosec, depth_image(height, width, DEPTH_M) if depth else None,
                                 camera_info(height, width, FX) if depth else None)
    probe.wait_frame(header)
    return header


@pytest.fixture(scope='module')
def bundle(tmp_path_factory) -> Path:
    return write_random_bundle(tmp_path_factory.mktemp('bundle'))


@pytest.fixture(scope='module')
def grounding(tmp_path_factory, bundle, repetition):
    # Low mask threshold: the random-weight model then always marks pixels, so 3D is always computed.
    # Fast diagnostics: tests wait on the frame the node reports as its latest.
    node = GroundingProcess(tmp_path_factory.mktemp('node'), bundle,
                            {'max_frame_age': 20.0, 'mask_threshold': 0.05, 'busy_policy': 'queue', 'max_queued': 1,
                             'input_qos': 'RELIABLE', 'diagnostics_period': 0.1})
    try:
        node.wait_ready()
        yield node
    finally:
        node.close()


# ---- the shared node (file order matters for the first test) ----------------------------------------
def test_no_frame_yet(grounding):
    result = grounding.probe.ask('pick the red mug')
    assert not result.success and result.error_code == GroundingResult.ERROR_NO_FRAME
    assert 'no image received yet on /image' in result.error
    assert grounding.alive()


def test_instruction_gets_every_output_with_the_image_header(grounding):
    probe = grounding.probe
    header = publish_frame(probe, scene(1), sec=1000, nanosec=500)
    result = probe.ask('pick the red mug')
    assert result.success, result.error
    assert same_header(result.header, header)
    assert result.answer and result.objects and result.total_seconds > 0
    assert not result.frame_cached and 'vision' in result.stage_names and 'phrase_pass' in result.stage_names
    assert len(result.stage_names) == len(result.stage_seconds) and all(s >= 0 for s in result.stage_seconds)

    probe.wait_for(lambda: any(a.data == result.answer for a in probe.outputs['answer']), 10, 'the answer')
    early = probe.output_with_header('objects', header)   # the masks, published before the answer
    assert early.success and early.answer == '' and 0 < early.mask_seconds == result.mask_seconds
    assert result.mask_seconds <= result.total_seconds and 'answer' not in early.stage_names
    assert [o.phrase for o in early.objects] == [o.phrase for o in result.objects]
    assert [bytes(o.mask.data) for o in early.objects] == [bytes(o.mask.data) for o in result.objects]
    labels_msg = probe.output_with_header('mask', header)
    overlay_msg = probe.output_with_header('overlay', header)
    markers = probe.output_with_header('markers', header).markers

    assert (labels_msg.encoding, labels_msg.height, labels_msg.width) == ('mono8', H, W)
    labels = np.frombuffer(labels_msg.data, np.uint8).reshape(H, W)
    assert (overlay_msg.encoding, overlay_msg.height, overlay_msg.width) == ('rgb8', H, W)
    assert image_to_rgb(overlay_msg).shape == (H, W, 3)

    for k, obj in enumerate(result.objects, start=1):
        assert same_header(obj.mask.header, header)
        mask = np.frombuffer(obj.mask.data, np.uint8).reshape(H, W)
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        # The label image shows object k wherever no later object covers it.
        later = np.zeros((H, W), bool)
        for other in result.objects[k:]:
            later |= np.frombuffer(other.mask.data, np.uint8).reshape(H, W) > 0
        np.testing.assert_array_equal(labels[(mask > 0) & ~later], k)
        ys, xs = np.nonzero(mask)
        assert (obj.box.x_offset, obj.box.y_offset) == (xs.min(), ys.min())
        assert (obj.box.width, obj.box.height) == (xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
        # 3D from the flat depth plane at DEPTH_M.
        assert obj.has_pose and same_header(obj.grasp_pose.header, header)
        assert obj.centroid.z == pytest.approx(DEPTH_M, abs=1e-3)
        assert obj.grasp_pose.pose.position.z == pytest.approx(DEPTH_M, abs=1e-3)
        assert obj.size.x > 0
    assert markers[0].action == Marker.DELETEALL
    assert sum(m.type == Marker.CUBE for m in markers) == len(result.objects)
    assert all(same_header(m.header, header) for m in markers)


def test_second_instruction_on_the_same_frame_reuses_its_encoding(grounding):
    result = grounding.probe.ask('where is the blue box')
    assert result.success, result.error
    assert result.frame_cached
    assert 'vision' not in result.stage_names and 'sam_encoder' not in result.stage_names
    assert result.header.stamp.sec == 1000


def test_action_goal_with_its_own_image(grounding):
    probe = grounding.probe
    image = stamped(rgb_to_image(scene(2, 64, 80)), 2000, 7, frame_id='goal_camera')
    feedback: list[str] = []
    status, result = wait_result(send_goal(probe, 'grab the blue box', image, feedback))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert same_header(result.header, image.header)
    assert result.objects and (result.objects[0].mask.height, result.objects[0].mask.width) == (64, 80)
    assert not result.objects[0].has_pose  # no depth has this stamp
    deadline = time.monotonic() + 30   # feedback and result travel on different topics: either may come first
    while 'phrase_pass' not in feedback and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feedback[0] == 'queued' and 'encode' in feedback and 'phrase_pass' in feedback
    assert feedback.index('encode') < feedback.index('phrase_pass')
    # The action's result is also the one on ~/result.
    probe.wait_for(lambda: probe.results_for('grab the blue box'), 10, '~/result of the goal')
    assert len(probe.results_for('grab the blue box')) == 1


def test_action_goal_on_the_latest_frame(grounding):
    probe = grounding.probe
    header = publish_frame(probe, scene(3), sec=3000)
    status, result = wait_result(send_goal(probe, 'pick up the red mug'))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert same_header(result.header, header)


def test_cancel_running_and_queued_goals(grounding):
    probe = grounding.probe
    publish_frame(probe, scene(4), sec=4000)
    running_stages: list[str] = []
    # MANY_PHRASES: the running goal takes many times longer than one DDS round trip, so the second
    # goal is still queued when its cancel arrives, and the first still running when its own does.
    running = send_goal(probe, MANY_PHRASES, stamped(rgb_to_image(scene(5)), 4001), running_stages)
    deadline = time.monotonic() + 60
    while 'encode' not in running_stages:
        assert time.monotonic() < deadline, 'the first goal never started'
        time.sleep(0.005)
    queued_stages: list[str] = []
    queued = send_goal(probe, 'take the bowl', feedback=queued_stages)
    while 'queued' not in queued_stages:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    queued.cancel_goal_async()
    status, result = wait_result(queued, 10)  # answered at once, though the first goal still runs
    assert status == GoalStatus.STATUS_CANCELED
    assert result.error_code == GroundingResult.ERROR_CANCELLED and 'before it started' in result.error
    running.cancel_goal_async()
    status, result = wait_result(running)
    assert status == GoalStatus.STATUS_CANCELED and result.error_code == GroundingResult.ERROR_CANCELLED
    after = probe.ask('pick the red mug')
    assert after.success, after.error


@pytest.mark.parametrize('instruction', ['', '   '])
def test_empty_instruction(grounding, instruction):
    probe = grounding.probe
    count = len(probe.results_for(instruction))
    probe.instruction_pub.publish(String(data=instruction))
    probe.wait_for(lambda: len(probe.results_for(instruction)) > count, 10, 'the empty instruction error')
    result = probe.results_for(instruction)[-1]
    assert result.error_code == GroundingResult.ERROR_EMPTY_INSTRUCTION and not result.success


BAD_KINDS = ('encoding', 'short', 'zero', 'tiny')


def bad_image(kind: str) -> Image:
    msg = rgb_to_image(scene(6))
    if kind == 'encoding':
        msg.encoding = 'yuv422'
    elif kind == 'short':
        msg.data = msg.data[: len(msg.data) // 2]
    elif kind == 'zero':
        msg.height = msg.width = msg.step = 0
        msg.data = array.array('B')
    elif kind == 'tiny':
        msg = rgb_to_image(scene(6)[:4, :4])
    return stamped(msg, 5000, nanosec=BAD_KINDS.index(kind) + 1)   # one stamp each: wait_frame tells them apart


@pytest.mark.parametrize('kind, message', [('encoding', "unsupported image encoding 'yuv422'"),
                                           ('short', 'expected step x height'), ('zero', 'zero size'),
                                           ('tiny', 'too small')])
def test_bad_images_get_explicit_errors_and_the_node_keeps_serving(grounding, kind, message):
    probe = grounding.probe
    bad = bad_image(kind)
    probe.image_pub.publish(bad)
    probe.wait_frame(bad.header)
    instruction = f'pick the mug on a {kind} image'
    result = probe.ask(instruction)
    assert result.error_code == GroundingResult.ERROR_BAD_IMAGE and message in result.error
    assert result.header.stamp.sec == 5000
    # The same bad image as an action goal (a zero-size goal image means 'latest frame', so skip that one).
    if kind != 'zero':
        status, goal_result = wait_result(send_goal(probe, instruction + ' again', bad_image(kind)))
        assert status == GoalStatus.STATUS_ABORTED and goal_result.error_code == GroundingResult.ERROR_BAD_IMAGE
    publish_frame(probe, scene(7), sec=5001)
    assert probe.ask(f'pick the red mug after {kind}').success
    assert grounding.alive()


def test_busy_queue_full_is_rejected_and_every_instruction_answered(grounding):
    probe = grounding.probe
    publish_frame(probe, scene(9), sec=7000)
    # A long instruction (48 phrases), seen running before the others are sent: four short instructions sent at
    # once raced the first one's end on a fast machine (it could finish before the third arrived).
    stages: list[str] = []
    running = send_goal(probe, MANY_PHRASES, None, stages)
    probe.wait_for(lambda: bool(stages), ANSWER_TIMEOUT, 'the long instruction to start')
    instructions = [f'pick the red mug number {i}' for i in range(3)]
    for text in instructions:
        probe.instruction_pub.publish(String(data=text))
    probe.wait_for(lambda: all(probe.results_for(t) for t in instructions), ANSWER_TIMEOUT, 'all three results')
    status, first = wait_result(running)
    assert status == GoalStatus.STATUS_SUCCEEDED and first.success           # the running one is not disturbed
    time.sleep(0.5)
    results = [probe.results_for(t) for t in instructions]
    assert all(len(r) == 1 for r in results), 'exactly one result per instruction'
    codes = [r[0].error_code for r in results]
    assert codes.count(GroundingResult.ERROR_BUSY) == 2   # one runs, one waits (max_queued 1), the rest are busy
    assert codes.count('') == 1 and results[codes.index('')][0].success
    busy = next(r[0] for r in results if r[0].error_code == GroundingResult.ERROR_BUSY)
    assert 'busy' in busy.error and 'queue' in busy.error


def run_client(grounding, *args: str, timeout: float = ANSWER_TIMEOUT + 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, ROS_DOMAIN_ID=str(grounding.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    return subprocess.run([sys.executable, '-m', 'flmm_ros.ros.client', *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_client_topic_and_action(grounding, tmp_path):
    import cv2
    picture = tmp_path / 'scene.png'
    cv2.imwrite(str(picture), scene(20)[:, :, ::-1])
    overlay = tmp_path / 'overlay.png'
    done = run_client(grounding, 'pick the red mug', '--image', str(picture), '--save-overlay', str(overlay))
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'answer: ' in done.stdout and 'objects: 1' in done.stdout and 'red mug' in done.stdout
    assert '3D centroid' not in done.stdout  # the client's image has no depth
    saved = cv2.imread(str(overlay))
    assert saved is not None and saved.shape == (H, W, 3)

    stages = run_client(grounding, 'where is the blue box', '--action')  # the latest frame: the client's image
    assert stages.returncode == 0, stages.stdout + stages.stderr
    assert 'latency:' in stages.stdout and 'stage: phrase_pass' in stages.stderr


def test_client_errors(grounding, tmp_path):
    empty = run_client(grounding, '  ', '--action')
    assert empty.returncode == 1 and 'error [empty_instruction]' in empty.stdout
    missing = run_client(grounding, 'pick the mug', '--image', str(tmp_path / 'nope.png'))
    assert missing.returncode == 2 and 'cannot read image file' in missing.stderr
    nobody = run_client(grounding, 'pick the mug', '--node', '/nobody_here', '--action', '--timeout', '2')
    assert nobody.returncode == 2 and 'no action server /nobody_here/ground' in nobody.stderr


def test_client_never_takes_an_answer_about_another_frame(grounding, tmp_path):
    """Topics keep no order between each other, so the instruction may reach the node before the client's image:
    the node then answers about the frame it has. The client asks again instead of printing that answer. Here
    the image goes where the node never reads it, so every answer is about another frame."""
    import cv2
    publish_frame(grounding.probe, scene(21), 7100)          # the frame the node has
    picture = tmp_path / 'scene.png'
    cv2.imwrite(str(picture), scene(22)[:, :, ::-1])
    elsewhere = grounding.probe.create_subscription(Image, '/not_the_camera', lambda msg: None, 10)  # a reader
    try:
        done = run_client(grounding, 'pick the red mug', '--image', str(picture), '--image-topic', 'not_the_camera',
                          '--timeout', '20')   # ends the test: every answer is about another frame
    finally:
        grounding.probe.destroy_subscription(elsewhere)
    assert done.returncode == 2, done.stdout + done.stderr
    assert 'the node answered before it had the image; asking again' in done.stderr
    assert 'answered only about other frames than the image (is it reading /not_the_camera?)' in done.stderr
    assert 'answer:' not in done.stdout


def test_30hz_stream_builds_no_backlog(grounding):
    """640x480 frames at 30 Hz while instructions are served: each result uses a frame at least as new as the
    newest one the node had reported receiving before the instruction was sent (a node that queued frames would
    serve older ones), and memory stays flat."""
    probe = grounding.probe
    frames = [rgb_to_image(scene(10 + i, 480, 640)) for i in range(3)]
    published = []
    stop = threading.Event()

    def camera():
        while not stop.is_set():
            n = len(published)
            probe.image_pub.publish(stamped(frames[n % 3], 8000, n * 1000))
            published.append(n)
            time.sleep(1 / 30)

    def frame_index(stamp_value: str) -> int:
        sec, nanosec = stamp_value.split('.')
        assert sec == '8000', stamp_value
        return int(nanosec) // 1000

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    try:
        probe.wait_diagnostic('latest_frame_stamp', lambda v: v.startswith('8000.'), 'the first stream frame')
        assert probe.ask('pick the red mug in the stream').success  # warm up: first 640x480 encode
        rss_before = grounding.rss_mb()
        for i in range(3):
            newest_known = frame_index(probe.diagnostic('latest_frame_stamp'))
            result = probe.ask(f'pick the blue box in the stream {i}')
            assert result.success, result.error
            assert result.header.stamp.sec == 8000
            used = result.header.stamp.nanosec // 1000
            assert used >= newest_known, f"grounded in frame {used}, older than frame {newest_known}: a backlog"
        rss_after = grounding.rss_mb()
        probe.wait_for(lambda: len(published) >= 90, 60, '3 s of stream')
        frames_sent = len(published)
    finally:
        stop.set()
        thread.join()
    assert rss_after - rss_before < 150, f"RSS grew {rss_after - rss_before:.0f} MB over {frames_sent} frames"
    assert grounding.alive()


# ---- a node of its own --------------------------------------------------------------------------------
def test_preempt_policy_and_stale_frame_in_a_namespace(tmp_path, bundle):
    node = GroundingProcess(tmp_path, bundle, {'busy_policy': 'preempt', 'max_frame_age': 1.0, 'use_3d': False,
                                               'publish_overlay': False, 'diagnostics_period': 0.1},
                            namespace='/robot1')
    try:
        node.wait_ready()
        probe = node.probe
        assert probe.image_pub.topic_name == '/robot1/image'
        publish_frame(probe, scene(11), sec=9000, depth=False)
        probe.wait_diagnostic('latest_frame_age_s', lambda v: float(v) > 1.2, 'the frame to go stale')
        stale = probe.ask('pick the stale mug')
        assert stale.error_code == GroundingResult.ERROR_STALE_FRAME and 'max_frame_age' in stale.error
        assert 'no image' not in stale.error and stale.header.stamp.sec == 9000

        publish_frame(probe, scene(13), sec=9002, depth=False)   # the camera's latest frame
        stages: list[str] = []
        first = send_goal(probe, MANY_PHRASES, stamped(rgb_to_image(scene(12)), 9001), stages)
        deadline = time.monotonic() + 60
        while 'encode' not in stages:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        second = probe.ask('pick the blue box')   # at once, while the first is still running
        assert second.success, second.error
        assert second.header.stamp.sec == 9002
        status, result = wait_result(first)
        assert status == GoalStatus.STATUS_ABORTED and result.error_code == GroundingResult.ERROR_PREEMPTED
        assert not probe.outputs['overlay'] and not probe.outputs['markers']  # switched off
    finally:
        node.close()


def test_bad_parameter_or_missing_model_stops_the_node_with_a_clear_message(tmp_path, bundle):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'missing').mkdir()
    bad = GroundingProcess(tmp_path / 'bad', bundle, {'busy_policy': 'sometimes'})
    missing = GroundingProcess(tmp_path / 'missing', tmp_path / 'no_such_bundle', {})  # both start at once
    try:
        assert bad.process.wait(timeout=STARTUP_TIMEOUT) == 2, bad.log()
        assert "busy_policy='sometimes' is not one of" in bad.log()
        assert missing.process.wait(timeout=STARTUP_TIMEOUT) == 1, missing.log()
        assert 'could not load model' in missing.log() and 'no_such_bundle' in missing.log()
    finally:
        bad.close()
        missing.close()
