"""The real-DDS test harness: the node as a subprocess on an isolated domain, and a probe node that publishes its
inputs and records every output. Used by tests/ and bench/ (not by the node).

Isolation: a random ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST. Waits are on events (a
message arriving, a diagnostics value changing), never on sleeps, so a slow machine makes tests slower, not red.
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
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult, TrackedObjects
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from flmm_ros.ros.image_conversions import rgb_to_image

PACKAGE = Path(__file__).resolve().parents[2]
CONFIG = PACKAGE / 'config' / 'grounding.yaml'
DEEP = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STATUS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STARTUP_TIMEOUT = 120.0
ANSWER_TIMEOUT = 90.0
OUTPUTS = ('result', 'objects', 'tracks', 'answer', 'mask', 'overlay', 'markers', 'status')


def scene(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
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


def depth_image(height: int, width: int, metres: float, encoding: str = '16UC1', bigendian: bool = False) -> Image:
    """A flat depth plane at `metres` (16UC1 millimetres or 32FC1 metres)."""
    if encoding == '16UC1':
        pixels = np.full((height, width), int(round(metres * 1000)), np.dtype('>u2' if bigendian else '<u2'))
    else:
        pixels = np.full((height, width), metres, np.dtype('>f4' if bigendian else '<f4'))
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                step=width * pixels.itemsize)
    msg.data = array.array('B', pixels.tobytes())
    return msg


def camera_info(height: int, width: int, focal: float = 100.0, cx: float | None = None) -> CameraInfo:
    info = CameraInfo(height=height, width=width, distortion_model='plumb_bob')
    info.k = [focal, 0.0, width / 2 if cx is None else cx, 0.0, focal, height / 2, 0.0, 0.0, 1.0]
    return info


def same_header(a: Header, b: Header) -> bool:
    return (a.stamp.sec, a.stamp.nanosec, a.frame_id) == (b.stamp.sec, b.stamp.nanosec, b.frame_id)


def stamp_text(header: Header) -> str:
    """How /diagnostics writes a stamp (latest_frame_stamp)."""
    return f"{header.stamp.sec}.{header.stamp.nanosec:09d}"


class Probe(Node):
    """Publishes the node's inputs and records its outputs (spun in a background thread).

    Deep reliable queues on both sides, so that bursts of hundreds of instructions and results are counted
    exactly. `camera_qos` is the image/depth/camera_info publishers' QoS (a camera driver's choice)."""

    def __init__(self, context: Context, namespace: str = '', camera_qos: QoSProfile = RELIABLE):
        super().__init__(f'flmm_test_probe_{os.getpid()}_{id(context)}', namespace=namespace or '/', context=context)
        node_path = self.node_path = f'{namespace}/flmm_grounding'
        self.outputs: dict[str, list] = {name: [] for name in (*OUTPUTS, 'diagnostics')}
        self._condition = threading.Condition()
        for name, kind, qos in (('result', GroundingResult, DEEP), ('objects', GroundingResult, DEEP),
                                ('tracks', TrackedObjects, DEEP),
                                ('answer', String, DEEP),
                                ('mask', Image, RELIABLE), ('overlay', Image, RELIABLE),
                                ('markers', MarkerArray, RELIABLE), ('status', String, STATUS)):
            self.create_subscription(kind, f'{node_path}/{name}', self._recorder(name), qos)
        self.create_subscription(DiagnosticArray, '/diagnostics', self._recorder('diagnostics'), RELIABLE)
        self.image_pub = self.create_publisher(Image, 'image', camera_qos)
        self.depth_pub = self.create_publisher(Image, 'depth', camera_qos)
        self.info_pub = self.create_publisher(CameraInfo, 'camera_info', camera_qos)
        self.instruction_pub = self.create_publisher(String, 'instruction', DEEP)
        self.action = ActionClient(self, Ground, f'{node_path}/ground', goal_service_qos_profile=DEEP,
                                   result_service_qos_profile=DEEP, cancel_service_qos_profile=DEEP)

    def _recorder(self, name):
        def record(msg):
            with self._condition:
                self.outputs[name].append(msg)
                self._condition.notify_all()
        return record

    def wait_for(self, predicate, timeout: float = ANSWER_TIMEOUT, what: str = ''):
        """Wait until `predicate()` holds: re-checked on every message and every 50 ms (for outside state)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while not predicate():
                if time.monotonic() > deadline:
                    break
                self._condition.wait(timeout=0.05)
            else:
                return
            if not predicate():
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

    def output_with_header(self, name: str, header: Header, timeout: float = 20.0):
        def find():
            return next((m for m in self.outputs[name] if same_header(
                m.markers[0].header if name == 'markers' else m.header, header)), None)
        self.wait_for(lambda: find() is not None, timeout, f"{name} with the image's header")
        return find()

    def diagnostic(self, key: str, index: int = -1) -> str | None:
        with self._condition:
            if not self.outputs['diagnostics']:
                return None
            values = self.outputs['diagnostics'][index].status[0].values
        return next((kv.value for kv in values if kv.key == key), None)

    def wait_diagnostic(self, key: str, accept, what: str, timeout: float = 30.0) -> str:
        """Wait for a /diagnostics message whose `key` satisfies `accept(value)`; returns the value."""
        def newest_matches():
            value = self.diagnostic(key)
            return value is not None and accept(value)
        try:
            self.wait_for(newest_matches, timeout, what)
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; newest {key}: {self.diagnostic(key)!r} "
                                 f"({len(self.outputs['diagnostics'])} diagnostics messages)") from None
        return self.diagnostic(key)

    def wait_frame(self, header: Header, timeout: float = 30.0) -> None:
        """Wait until the node reports this frame as its latest (so an instruction now is grounded in it)."""
        self.wait_diagnostic('latest_frame_stamp', lambda v: v == stamp_text(header),
                             f"the node to receive the frame stamped {stamp_text(header)}", timeout)

    def publish_frame(self, rgb: np.ndarray, sec: int, nanosec: int = 0, depth: Image | None = None,
                      info: CameraInfo | None = None) -> Header:
        """Depth and camera_info (if given) with the image's stamp, then the image; returns its header."""
        for extra, pub in ((depth, self.depth_pub), (info, self.info_pub)):
            if extra is not None:
                pub.publish(stamped(extra, sec, nanosec))
        image = stamped(rgb_to_image(rgb), sec, nanosec)
        self.image_pub.publish(image)
        return image.header

    def send_goal(self, instruction: str, image: Image | None = None, feedback: list | None = None,
                  track: bool = False, point: tuple[float, float] | None = None):
        """Send a goal; returns the rclpy future of its goal handle."""
        goal = Ground.Goal(instruction=instruction, image=image if image is not None else Image(), track=track,
                           point=list(point or ()))
        return self.action.send_goal_async(goal, feedback_callback=(
            (lambda fb: feedback.append(fb.feedback.stage)) if feedback is not None else None))


def wait_future(future, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not future.done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return future.result()


def send_goal(probe: Probe, instruction: str, image: Image | None = None, feedback: list | None = None,
              track: bool = False, point: tuple[float, float] | None = None):
    handle = wait_future(probe.send_goal(instruction, image, feedback, track, point), 30,
                         f"acceptance of goal {instruction!r}")
    assert handle.accepted
    return handle


def wait_result(handle, timeout: float = ANSWER_TIMEOUT):
    response = wait_future(handle.get_result_async(), timeout, 'an action result')
    return response.status, response.result.result


_DOMAINS_IN_USE: set[int] = set()
MAX_DOMAIN_ID = 232      # Fast DDS's ports leave room for domains 0..232


def _free_domain_id() -> int:
    """A DDS domain no other GroundingProcess of this test run uses (several are alive at once: a module's node
    and a test's own). Random among the rest, so that separate runs on one machine rarely meet either."""
    free = sorted(set(range(1, MAX_DOMAIN_ID + 1)) - _DOMAINS_IN_USE)
    domain = random.choice(free)
    _DOMAINS_IN_USE.add(domain)
    return domain


class GroundingProcess:
    """The node as a subprocess (`--params-file` with `overrides`) plus a probe talking to it in an isolated
    DDS domain. `env` adds environment variables for the node. Other nodes (e.g. a benchmark's camera) can join
    the probe's `context` and `executor`."""

    def __init__(self, tmp: Path, bundle: Path | str | None, overrides: dict, namespace: str = '',
                 camera_qos: QoSProfile = RELIABLE, env: dict | None = None):
        self.domain_id = _free_domain_id()
        params = yaml.safe_load(CONFIG.read_text())
        node_key = next(iter(params))
        if bundle:   # else the params file's model (empty: the embedded one)
            overrides = {'model': str(bundle), **overrides}
        params[node_key]['ros__parameters'].update(overrides)
        params_file = tmp / 'params.yaml'
        params_file.write_text(yaml.safe_dump(params))
        env = dict(os.environ, ROS_DOMAIN_ID=str(self.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                   PYTHONUNBUFFERED='1', **(env or {}))
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
        self.probe = Probe(self.context, namespace, camera_qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.probe)
        self._spinning = threading.Event()
        self._spinning.set()
        self._spinner = threading.Thread(target=self._spin, daemon=True)
        self._spinner.start()

    def _spin(self):
        while self._spinning.is_set():
            self.executor.spin_once(timeout_sec=0.05)

    def stop_spinning(self):
        """End the spin thread and wait for it, so that no callback runs while nodes are destroyed (destroying a
        node or the context under a running wait set aborted the process at exit now and then)."""
        self._spinning.clear()
        self._spinner.join(timeout=30)

    def wait_ready(self):
        try:
            self.probe.wait_for(lambda: any(s.data == 'ready' for s in self.probe.outputs['status']),
                                STARTUP_TIMEOUT, "status 'ready'")
        except AssertionError:
            raise AssertionError(f"node not ready; its log:\n{self.log()}") from None
        self.wait_ready_io()
        self.probe.wait_diagnostic('state', lambda v: v == 'ready', 'diagnostics')

    def wait_ready_io(self):
        """Wait until DDS discovery has matched the probe with the node's topics and action (after configure)."""
        for pub in (self.probe.image_pub, self.probe.instruction_pub):
            deadline = time.monotonic() + 30
            while pub.get_subscription_count() == 0:
                assert time.monotonic() < deadline, f"{pub.topic_name} never matched"
                time.sleep(0.02)
        assert self.probe.action.wait_for_server(timeout_sec=30)
        self.probe.wait_for(lambda: self.probe.count_publishers(f'{self.probe.node_path}/result') > 0, 30,
                            'the result subscription to match')

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        for line in Path(f'/proc/{self.process.pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
        raise AssertionError('no VmRSS')

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-8000:]

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send `signum` and return the exit code (killing the process if it does not end in `timeout`)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the node did not exit within {timeout} s of signal {signum}; "
                                 f"log:\n{self.log()}") from None

    def close(self):
        if self.alive():
            try:
                self.stop()
            except AssertionError:
                pass
        self._log.close()
        self.stop_spinning()
        self.executor.shutdown()
        self.probe.destroy_node()
        rclpy.try_shutdown(context=self.context)
        _DOMAINS_IN_USE.discard(self.domain_id)


SENSOR_DATA = qos_profile_sensor_data
