"""The flmm_grounding node over real DDS: a subprocess started with --params-file, a random-weight model bundle
(real LLaVA architecture, tiny), and a probe node in this process that publishes inputs and records every output.

Isolated with a random ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST. The tests of the shared node
run in file order: the first one needs a node that has not seen an image yet.
"""
from __future__ import annotations

import array
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from action_msgs.msg import GoalStatus
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import Marker, MarkerArray

from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.ros.image_conversions import image_to_rgb, rgb_to_image

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'ros_ws' / 'src' / 'flmm_ros' / 'config' / 'grounding.yaml'
H, W = 96, 128
DEPTH_M = 0.75
FX = FY = 100.0
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STARTUP_TIMEOUT = 90.0
ANSWER_TIMEOUT = 60.0


# ---- harness ----------------------------------------------------------------------------------------
def scene(seed: int, height: int = H, width: int = W) -> np.ndarray:
    """A table-like image: grey background with two coloured blocks."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 200, np.uint8)
    img[height // 4: height // 2, width // 8: width // 3] = (220, 30, 30)
    img[height // 2: 3 * height // 4, width // 2: 3 * width // 4] = (30, 30, 220)
    return np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def stamped(msg, sec: int, nanosec: int = 0, frame_id: str = 'camera_color_optical_frame'):
    msg.header = Header(frame_id=frame_id)
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    return msg


def depth_image(sec: int, nanosec: int = 0) -> Image:
    mm = np.full((H, W), int(DEPTH_M * 1000), np.uint16)
    msg = Image(height=H, width=W, encoding='16UC1', is_bigendian=0, step=2 * W)
    msg.data = array.array('B', mm.tobytes())
    return stamped(msg, sec, nanosec)


def camera_info(sec: int, nanosec: int = 0) -> CameraInfo:
    info = CameraInfo(height=H, width=W, distortion_model='plumb_bob')
    info.k = [FX, 0.0, W / 2, 0.0, FY, H / 2, 0.0, 0.0, 1.0]
    return stamped(info, sec, nanosec)


def same_header(a: Header, b: Header) -> bool:
    return (a.stamp.sec, a.stamp.nanosec, a.frame_id) == (b.stamp.sec, b.stamp.nanosec, b.frame_id)


class Probe(Node):
    """Publishes the node's inputs and records its outputs (spun in a background thread)."""

    def __init__(self, context: Context, namespace: str = ''):
        super().__init__(f'flmm_test_probe_{os.getpid()}_{id(context)}', namespace=namespace or '/', context=context)
        node_path = f'{namespace}/flmm_grounding'
        self.outputs: dict[str, list] = {name: [] for name in ('result', 'answer', 'mask', 'overlay', 'markers',
                                                                'status')}
        self._condition = threading.Condition()
        for name, kind, qos in (('result', GroundingResult, RELIABLE), ('answer', String, RELIABLE),
                                ('mask', Image, RELIABLE), ('overlay', Image, RELIABLE),
                                ('markers', MarkerArray, RELIABLE), ('status', String, LATCHED)):
            self.create_subscription(kind, f'{node_path}/{name}', self._recorder(name), qos)
        self.image_pub = self.create_publisher(Image, 'image', RELIABLE)
        self.depth_pub = self.create_publisher(Image, 'depth', RELIABLE)
        self.info_pub = self.create_publisher(CameraInfo, 'camera_info', RELIABLE)
        self.instruction_pub = self.create_publisher(String, 'instruction', RELIABLE)
        self.action = ActionClient(self, Ground, f'{node_path}/ground')

    def _recorder(self, name):
        def record(msg):
            with self._condition:
                self.outputs[name].append(msg)
                self._condition.notify_all()
        return record

    def wait_for(self, predicate, timeout: float = ANSWER_TIMEOUT, what: str = ''):
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"status: {[s.data for s in self.outputs['status'][-5:]]}")

    def results_for(self, instruction: str) -> list[GroundingResult]:
        with self._condition:
            return [r for r in self.outputs['result'] if r.instruction == instruction]

    def ask(self, instruction: str, timeout: float = ANSWER_TIMEOUT) -> GroundingResult:
        """Publish the instruction and return its result (the first one after publishing)."""
        before = len(self.results_for(instruction))
        self.instruction_pub.publish(String(data=instruction))
        self.wait_for(lambda: len(self.results_for(instruction)) > before, timeout, f"the result of {instruction!r}")
        return self.results_for(instruction)[before]

    def output_with_header(self, name: str, header: Header, timeout: float = 10.0):
        def find():
            return next((m for m in self.outputs[name] if same_header(
                m.markers[0].header if name == 'markers' else m.header, header)), None)
        self.wait_for(lambda: find() is not None, timeout, f"{name} with the image's header")
        return find()

    def publish_frame(self, rgb: np.ndarray, sec: int, nanosec: int = 0, depth: bool = True) -> Header:
        if depth:
            self.depth_pub.publish(depth_image(sec, nanosec))
            self.info_pub.publish(camera_info(sec, nanosec))
        image = stamped(rgb_to_image(rgb), sec, nanosec)
        self.image_pub.publish(image)
        return image.header


class GroundingProcess:
    """The node as a subprocess plus a probe node talking to it in an isolated DDS domain."""

    def __init__(self, tmp: Path, bundle: Path, overrides: dict, namespace: str = ''):
        self.domain_id = random.randint(1, 100)
        params = yaml.safe_load(CONFIG.read_text())
        node_key = next(iter(params))
        params[node_key]['ros__parameters'].update(model=str(bundle), **overrides)
        params_file = tmp / 'params.yaml'
        params_file.write_text(yaml.safe_dump(params))
        env = dict(os.environ, ROS_DOMAIN_ID=str(self.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                   PYTHONUNBUFFERED='1')
        ros_args = ['--ros-args', '--params-file', str(params_file)]
        if namespace:
            ros_args += ['-r', f'__ns:={namespace}']
        self.log_path = tmp / 'node.log'
        self._log = self.log_path.open('w')
        self.process = subprocess.Popen([sys.executable, '-m', 'flmm_ros.ros.node', *ros_args], env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.probe = Probe(self.context, namespace)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.probe)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def wait_ready(self):
        try:
            self.probe.wait_for(lambda: any(s.data == 'ready' for s in self.probe.outputs['status']),
                                STARTUP_TIMEOUT, "status 'ready'")
        except AssertionError:
            raise AssertionError(f"node not ready; its log:\n{self.log()}") from None
        # The probe's publishers must be matched before anything is sent (DDS discovery).
        for pub in (self.probe.image_pub, self.probe.instruction_pub):
            deadline = time.monotonic() + 10
            while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert self.probe.action.wait_for_server(timeout_sec=10)

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        for line in Path(f'/proc/{self.process.pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
        raise AssertionError('no VmRSS')

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def close(self):
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.executor.shutdown()
        self.probe.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory) -> Path:
    return write_random_bundle(tmp_path_factory.mktemp('bundle'))


@pytest.fixture(scope='module')
def grounding(tmp_path_factory, bundle):
    # Low mask threshold: the random-weight model then always marks pixels, so 3D is always computed.
    # RELIABLE input: the probe publishes reliably, and best-effort 640x480 frames (30 Hz test) are mostly
    # dropped by Fast DDS's default UDP settings. The namespaced node below keeps the SENSOR_DATA default.
    node = GroundingProcess(tmp_path_factory.mktemp('node'), bundle,
                            {'max_frame_age': 20.0, 'mask_threshold': 0.05, 'busy_policy': 'queue', 'max_queued': 1,
                             'input_qos': 'RELIABLE'})
    try:
        node.wait_ready()
        yield node
    finally:
        node.close()


def send_goal(probe: Probe, instruction: str, image: Image | None = None, feedback: list | None = None):
    goal = Ground.Goal(instruction=instruction, image=image if image is not None else Image())
    future = probe.action.send_goal_async(goal, feedback_callback=(
        (lambda fb: feedback.append(fb.feedback.stage)) if feedback is not None else None))
    deadline = time.monotonic() + 10
    while not future.done():
        assert time.monotonic() < deadline, 'goal not accepted'
        time.sleep(0.01)
    handle = future.result()
    assert handle.accepted
    return handle


def wait_result(handle, timeout: float = ANSWER_TIMEOUT):
    future = handle.get_result_async()
    deadline = time.monotonic() + timeout
    while not future.done():
        assert time.monotonic() < deadline, 'no action result'
        time.sleep(0.01)
    response = future.result()
    return response.status, response.result.result


# ---- the shared node (file order matters for the first test) ----------------------------------------
def test_no_frame_yet(grounding):
    result = grounding.probe.ask('pick the red mug')
    assert not result.success and result.error_code == GroundingResult.ERROR_NO_FRAME
    assert 'no image received yet on /image' in result.error
    assert grounding.alive()


def test_instruction_gets_every_output_with_the_image_header(grounding):
    probe = grounding.probe
    header = probe.publish_frame(scene(1), sec=1000, nanosec=500)
    time.sleep(0.3)
    result = probe.ask('pick the red mug')
    assert result.success, result.error
    assert same_header(result.header, header)
    assert result.answer and result.objects and result.total_seconds > 0
    assert not result.frame_cached and 'vision' in result.stage_names and 'phrase_pass' in result.stage_names
    assert len(result.stage_names) == len(result.stage_seconds) and all(s >= 0 for s in result.stage_seconds)

    probe.wait_for(lambda: any(a.data == result.answer for a in probe.outputs['answer']), 10, 'the answer')
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
    deadline = time.monotonic() + 5   # feedback and result travel on different topics: either may come first
    while 'phrase_pass' not in feedback and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feedback[0] == 'queued' and 'encode' in feedback and 'phrase_pass' in feedback
    assert feedback.index('encode') < feedback.index('phrase_pass')
    # The action's result is also the one on ~/result.
    probe.wait_for(lambda: probe.results_for('grab the blue box'), 10, '~/result of the goal')
    assert len(probe.results_for('grab the blue box')) == 1


def test_action_goal_on_the_latest_frame(grounding):
    probe = grounding.probe
    header = probe.publish_frame(scene(3), sec=3000)
    time.sleep(0.3)
    status, result = wait_result(send_goal(probe, 'pick up the red mug'))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert same_header(result.header, header)


def test_cancel_running_and_queued_goals(grounding):
    probe = grounding.probe
    probe.publish_frame(scene(4), sec=4000)
    time.sleep(0.3)
    running_stages: list[str] = []
    # 48 phrases: the running goal takes several times longer than one DDS round trip, so the second
    # goal is still queued when its cancel arrives, and the first still running when its own does.
    many = 'take ' + ' and '.join(['the red ball', 'the blue bowl', 'the green mug', 'the white box'] * 12)
    running = send_goal(probe, many, stamped(rgb_to_image(scene(5)), 4001), running_stages)
    deadline = time.monotonic() + 20
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
    return stamped(msg, 5000)


@pytest.mark.parametrize('kind, message', [('encoding', "unsupported image encoding 'yuv422'"),
                                           ('short', 'expected step x height'), ('zero', 'zero size'),
                                           ('tiny', 'too small')])
def test_bad_images_get_explicit_errors_and_the_node_keeps_serving(grounding, kind, message):
    probe = grounding.probe
    probe.image_pub.publish(bad_image(kind))
    time.sleep(0.3)
    instruction = f'pick the mug on a {kind} image'
    result = probe.ask(instruction)
    assert result.error_code == GroundingResult.ERROR_BAD_IMAGE and message in result.error
    assert result.header.stamp.sec == 5000
    # The same bad image as an action goal (a zero-size goal image means 'latest frame', so skip that one).
    if kind != 'zero':
        status, goal_result = wait_result(send_goal(probe, instruction + ' again', bad_image(kind)))
        assert status == GoalStatus.STATUS_ABORTED and goal_result.error_code == GroundingResult.ERROR_BAD_IMAGE
    probe.publish_frame(scene(7), sec=5001)
    time.sleep(0.3)
    assert probe.ask(f'pick the red mug after {kind}').success
    assert grounding.alive()


def test_busy_queue_full_is_rejected_and_every_instruction_answered(grounding):
    probe = grounding.probe
    probe.publish_frame(scene(9), sec=7000)
    time.sleep(0.3)
    instructions = [f'pick the red mug number {i}' for i in range(4)]
    for text in instructions:
        probe.instruction_pub.publish(String(data=text))
    probe.wait_for(lambda: all(probe.results_for(t) for t in instructions), ANSWER_TIMEOUT, 'all four results')
    time.sleep(0.5)
    results = [probe.results_for(t) for t in instructions]
    assert all(len(r) == 1 for r in results), 'exactly one result per instruction'
    codes = [r[0].error_code for r in results]
    assert results[0][0].success                       # the first runs
    assert codes.count(GroundingResult.ERROR_BUSY) >= 2  # one runs, at most one waits (max_queued 1)
    assert all(code in ('', GroundingResult.ERROR_BUSY) for code in codes)
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


def test_30hz_stream_builds_no_backlog(grounding):
    """640x480 frames at 30 Hz while instructions are served: each result uses a frame published shortly before
    its instruction (not an old queued one), latency does not grow, and memory stays flat."""
    probe = grounding.probe
    frames = [rgb_to_image(scene(10 + i, 480, 640)) for i in range(3)]
    published: list[tuple[float, int]] = []   # (monotonic time, stamp nanosec)
    stop = threading.Event()

    def camera():
        n = 0
        while not stop.is_set():
            msg = stamped(frames[n % 3], 8000, n * 1000)
            published.append((time.monotonic(), n * 1000))
            probe.image_pub.publish(msg)
            n += 1
            time.sleep(1 / 30)

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        probe.ask('pick the red mug in the stream')  # warm up: first 640x480 encode
        rss_before = grounding.rss_mb()
        latencies, lags = [], []
        for i in range(3):
            sent = time.monotonic()
            result = probe.ask(f'pick the blue box in the stream {i}')
            assert result.success, result.error
            assert result.header.stamp.sec == 8000
            used_at = next(t for t, stamp in published if stamp == result.header.stamp.nanosec)
            lags.append(sent - used_at)  # how old the frame the node grounded in was when we asked
            latencies.append(result.total_seconds)
        rss_after = grounding.rss_mb()
        while len(published) < 90:                 # at least 3 s of stream, however fast the answers
            time.sleep(0.05)
        frames_sent = len(published)
    finally:
        stop.set()
        thread.join()
    assert frames_sent > 60
    # A node that queued frames would fall further behind with every frame it is sent (each instruction takes
    # far longer than 1/30 s); one that keeps only the latest stays within the transport's delay.
    assert max(lags) < 1.5, f"grounded in frames {lags} s old: a backlog"
    assert max(latencies) < 10 * min(latencies) + 1.0, latencies
    assert rss_after - rss_before < 150, f"RSS grew {rss_after - rss_before:.0f} MB over {frames_sent} frames"
    assert grounding.alive()


# ---- a node of its own --------------------------------------------------------------------------------
def test_preempt_policy_and_stale_frame_in_a_namespace(tmp_path, bundle):
    node = GroundingProcess(tmp_path, bundle, {'busy_policy': 'preempt', 'max_frame_age': 1.0, 'use_3d': False,
                                               'publish_overlay': False}, namespace='/robot1')
    try:
        node.wait_ready()
        probe = node.probe
        assert probe.image_pub.topic_name == '/robot1/image'
        probe.publish_frame(scene(11), sec=9000, depth=False)
        time.sleep(1.3)
        stale = probe.ask('pick the stale mug')
        assert stale.error_code == GroundingResult.ERROR_STALE_FRAME and 'max_frame_age' in stale.error
        assert 'no image' not in stale.error and stale.header.stamp.sec == 9000

        probe.publish_frame(scene(13), sec=9002, depth=False)   # the camera's latest frame
        time.sleep(0.2)
        stages: list[str] = []
        first = send_goal(probe, 'pick the red mug', stamped(rgb_to_image(scene(12)), 9001), stages)
        deadline = time.monotonic() + 20
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
        assert bad.process.wait(timeout=STARTUP_TIMEOUT) == 2
        assert "busy_policy='sometimes' is not one of" in bad.log()
        assert missing.process.wait(timeout=STARTUP_TIMEOUT) == 1
        assert 'could not load model' in missing.log() and 'no_such_bundle' in missing.log()
    finally:
        bad.close()
        missing.close()
