"""The flmm_grounding node: a thin ROS 2 adapter over flmm_ros.grounding.pipeline.GroundingPipeline.

Subscriptions collect the latest frame (plus depth / camera_info for 3D) and instructions; a worker thread
serves instructions one at a time (busy_policy decides what a new one does meanwhile). Every instruction,
from the `instruction` topic or the `~/ground` action, gets exactly one GroundingResult on `~/result`
(and as the action result): success, or an explicit error. Outputs carry the header of the image used.

    ros2 run flmm_ros flmm_grounding --ros-args --params-file config/grounding.yaml
    python -m flmm_ros.ros.node --ros-args -p model:=/path/to/bundle -r image:=/camera/color/image_raw
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_with_reason
from flmm_ros.grounding.pipeline import FrameEncoding, GroundingPipeline
from flmm_ros.grounding.types import GroundingCancelled, GroundingError
from flmm_ros.overlay import draw_overlay, label_image
from flmm_ros.ros import parameters
from flmm_ros.ros.image_conversions import image_to_depth, image_to_rgb, is_empty_image, mono_to_image, rgb_to_image
from flmm_ros.ros.messages import marker_array, result_message
from flmm_ros.ros.qos import INSTRUCTION_QOS, STATUS_QOS, qos_profile
from flmm_ros.ros.requests import CANCELLED, Request, RequestQueue
from flmm_ros.ros.stamp_sync import StampMatcher, stamp_ns
from flmm_ros.speech import Speaker

NODE_NAME = 'flmm_grounding'
E = GroundingResultMsg  # error code constants (E.ERROR_NO_FRAME, ...)


class RequestFailed(Exception):
    """A request ends with an explicit error code (one of GroundingResult's ERROR_* constants)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Frame:
    seq: int
    image: Image
    received: float  # time.monotonic() at arrival


@dataclass
class EncodedFrame:
    seq: int
    rgb: np.ndarray
    encoding: FrameEncoding


class GroundingNode(Node):
    def __init__(self):
        super().__init__(NODE_NAME)
        self.params = self._declare_parameters()
        parameters.validate(self.params)
        self.pipeline_config = parameters.pipeline_config(self.params)
        self.pipeline: GroundingPipeline | None = None
        self.failure: str | None = None  # set when the model could not be loaded; main() then exits

        p = self.params
        self.queue = RequestQueue(p['busy_policy'], p['max_queued'])
        self._frame_lock = threading.Lock()
        self._latest: Frame | None = None
        self._frame_seq = 0
        self._encoded: EncodedFrame | None = None  # the worker's per-frame cache (only the worker touches it)
        self._depths = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._infos = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._goal_requests: dict[bytes, Request] = {}
        self._speaker = Speaker() if p['speak'] else None

        out_qos = qos_profile(p['output_qos'], 5)
        self.status_pub = self.create_publisher(String, '~/status', STATUS_QOS)
        self.answer_pub = self.create_publisher(String, '~/answer', out_qos)
        self.result_pub = self.create_publisher(GroundingResultMsg, '~/result', out_qos)
        self.mask_pub = self.create_publisher(Image, '~/mask', out_qos)
        self.overlay_pub = self.create_publisher(Image, '~/overlay', out_qos)
        self.markers_pub = self.create_publisher(MarkerArray, '~/markers', out_qos)

        sensors = MutuallyExclusiveCallbackGroup()
        requests = ReentrantCallbackGroup()
        self.create_subscription(Image, 'image', self._on_image, qos_profile(p['input_qos'], 1),
                                 callback_group=sensors)
        if p['use_3d']:
            self.create_subscription(Image, 'depth', self._on_depth, qos_profile(p['input_qos'], 5),
                                     callback_group=sensors)
            self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info,
                                     qos_profile(p['input_qos'], 5), callback_group=sensors)
        self.create_subscription(String, 'instruction', self._on_instruction, INSTRUCTION_QOS,
                                 callback_group=requests)
        self.action_server = ActionServer(self, Ground, '~/ground', execute_callback=self._execute_goal,
                                          goal_callback=lambda goal: GoalResponse.ACCEPT,
                                          cancel_callback=self._cancel_goal, callback_group=requests)
        self.image_topic = self.resolve_topic_name('image')

        self._worker = threading.Thread(target=self._work, name='flmm-grounding-worker', daemon=True)
        self._worker.start()

    # ---- parameters ---------------------------------------------------------------------------
    def _declare_parameters(self) -> dict[str, Any]:
        values = {}
        for spec in parameters.all_parameters():
            description = spec.description
            if spec.choices:
                description += f" Choices: {', '.join(spec.choices)}."
            values[spec.name] = self.declare_parameter(
                spec.name, spec.default, ParameterDescriptor(description=description, read_only=True)).value
        return values

    # ---- inputs (cheap: they only store) --------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        with self._frame_lock:
            self._frame_seq += 1
            self._latest = Frame(self._frame_seq, msg, time.monotonic())

    def _on_depth(self, msg: Image) -> None:
        self._depths.add(stamp_ns(msg.header.stamp), msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._infos.add(stamp_ns(msg.header.stamp), msg)

    def _on_instruction(self, msg: String) -> None:
        self._submit(Request(msg.data, source='topic'))

    def _submit(self, request: Request) -> None:
        if not request.instruction.strip():
            self._fail(request, E.ERROR_EMPTY_INSTRUCTION, 'the instruction is empty')
            return
        for refused, code in self.queue.submit(request):
            reason = {E.ERROR_BUSY: f"busy with another instruction (busy_policy {self.queue.policy})",
                      E.ERROR_PREEMPTED: 'preempted by a newer instruction (busy_policy preempt)'}
            self._fail(refused, code, reason.get(code, 'the node is shutting down'))

    # ---- the action -------------------------------------------------------------------------------
    def _execute_goal(self, goal_handle) -> Ground.Result:
        goal = goal_handle.request
        image = None if is_empty_image(goal.image) else goal.image
        request = Request(goal.instruction, image=image, source='action',
                          on_stage=lambda stage: goal_handle.publish_feedback(Ground.Feedback(stage=stage)))
        key = bytes(goal_handle.goal_id.uuid)
        self._goal_requests[key] = request
        if goal_handle.is_cancel_requested:  # cancelled before it was registered above
            request.stop(CANCELLED)
        try:
            request.on_stage('queued')
            self._submit(request)
            request.wait()
        finally:
            self._goal_requests.pop(key, None)
        result: GroundingResultMsg = request.result
        if result.success:
            goal_handle.succeed()
        elif result.error_code == E.ERROR_CANCELLED and goal_handle.status == GoalStatus.STATUS_CANCELING:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return Ground.Result(result=result)

    def _cancel_goal(self, goal_handle) -> CancelResponse:
        request = self._goal_requests.get(bytes(goal_handle.goal_id.uuid))
        if request is not None:
            request.stop(CANCELLED)
            if self.queue.remove(request):  # still waiting: answer now; a running one stops at its next stage
                self._fail(request, E.ERROR_CANCELLED, 'cancelled before it started')
        return CancelResponse.ACCEPT

    # ---- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        model = self.pipeline_config.model
        self._status(f"loading model {model}")
        try:
            self.pipeline = GroundingPipeline.from_config(self.pipeline_config)
        except Exception as error:  # noqa: BLE001 - any load failure ends the node with its message
            self.failure = f"could not load model {model}: {error}"
            self.get_logger().fatal(self.failure)
            self._status(f"error: {self.failure}")
            for request in self.queue.close():
                self._fail(request, E.ERROR_INTERNAL, self.failure)
            return
        self.get_logger().info(f"model loaded ({model}); waiting for images on {self.image_topic}")
        self._status('ready')
        while (request := self.queue.take()) is not None:
            try:
                self._serve(request)
            finally:
                self.queue.finish(request)
                if not self.queue.busy:
                    self._status('ready')

    def _serve(self, request: Request) -> None:
        header = Header(stamp=self.get_clock().now().to_msg())  # until an image is chosen
        self._status(f"busy: {request.instruction!r}")

        def progress(stage: str) -> None:
            request.check()
            if request.on_stage is not None:
                request.on_stage(stage)

        try:
            request.check()
            frame = self._frame_for(request)
            header = frame.image.header
            self._check_fresh(frame, request)
            progress('encode')
            encoded = self._encode(frame)
            result = self.pipeline.run(encoded.encoding, request.instruction, progress=progress)
            progress('publish')
            timings = dict(result.timings)
            poses = [None] * len(result.objects)
            if self.params['use_3d']:
                start = time.perf_counter()
                poses = self._poses(frame, result.objects)
                if any(pose is not None for pose in poses):
                    timings['depth_3d'] = time.perf_counter() - start
            msg = result_message(request.instruction, header, answer=result.answer, objects=result.objects,
                                 poses=poses, timings=timings, total_seconds=request.age(),
                                 frame_cached=result.frame_cached)
            self._publish_outputs(encoded.rgb, result, poses, header)
            self._answer(request, msg)
        except RequestFailed as error:
            self._fail(request, error.code, str(error), header, show=True)
        except GroundingCancelled:
            reason = request.stop_reason or CANCELLED
            self._fail(request, reason, f"{reason} while running", header)
        except GroundingError as error:
            self._fail(request, E.ERROR_BAD_INPUT, str(error), header, show=True)
        except Exception as error:  # noqa: BLE001 - the node must outlive any one request
            self.get_logger().error(f"internal error on {request.instruction!r}:\n{traceback.format_exc()}")
            self._fail(request, E.ERROR_INTERNAL, f"internal error: {type(error).__name__}: {error}", header,
                       show=True)

    def _frame_for(self, request: Request) -> Frame:
        if request.image is not None:
            with self._frame_lock:
                self._frame_seq += 1
                return Frame(self._frame_seq, request.image, time.monotonic())
        with self._frame_lock:
            frame = self._latest
        if frame is None:
            raise RequestFailed(E.ERROR_NO_FRAME, f"no image received yet on {self.image_topic}")
        return frame

    def _check_fresh(self, frame: Frame, request: Request) -> None:
        # Age when the instruction arrived: time spent waiting behind other instructions does not count.
        age, limit = request.received - frame.received, self.params['max_frame_age']
        if limit > 0 and age > limit:
            raise RequestFailed(E.ERROR_STALE_FRAME, f"the latest image on {self.image_topic} was {age:.1f} s old "
                                                     f"when the instruction came (max_frame_age {limit:g} s); "
                                                     "is the camera running?")

    def _encode(self, frame: Frame) -> EncodedFrame:
        """The frame's encoding, computed once per frame and reused by later instructions on it."""
        if self._encoded is not None and self._encoded.seq == frame.seq:
            return self._encoded
        try:
            rgb = image_to_rgb(frame.image)
            encoding = self.pipeline.encode(rgb)  # also refuses images too small to ground in
        except GroundingError as error:
            raise RequestFailed(E.ERROR_BAD_IMAGE, f"bad image: {error}") from error
        self._encoded = EncodedFrame(frame.seq, rgb, encoding)
        return self._encoded

    def _poses(self, frame: Frame, objects) -> list:
        """3D per object from the depth + camera_info matching the frame's stamp (None where impossible)."""
        stamp = stamp_ns(frame.image.header.stamp)
        depth_msg, info = self._depths.match(stamp), self._infos.match(stamp)
        if depth_msg is None or info is None or not objects:
            return [None] * len(objects)
        try:
            depth = image_to_depth(depth_msg)
            intrinsics = CameraIntrinsics.from_k(info.k, info.width, info.height)
            poses = []
            for obj in objects:
                pose, reason = object_pose_with_reason(obj.mask, depth, intrinsics)
                if pose is None:
                    self.get_logger().info(f"no 3D for '{obj.phrase}': {reason}")
                poses.append(pose)
            return poses
        except GroundingError as error:  # 3D is extra: the 2D result still stands
            self.get_logger().warning(f"3D skipped: {error}", throttle_duration_sec=5.0)
            return [None] * len(objects)

    # ---- outputs --------------------------------------------------------------------------------
    def _publish_outputs(self, rgb: np.ndarray, result, poses, header: Header) -> None:
        if result.answer:
            self.answer_pub.publish(String(data=result.answer))
            if self._speaker is not None:
                self._speaker.speak(result.answer)
        self.mask_pub.publish(mono_to_image(label_image(result.objects, rgb.shape), header))
        if self.params['publish_overlay']:
            self.overlay_pub.publish(rgb_to_image(draw_overlay(rgb, result.objects), header))
        if self.params['use_3d']:
            self.markers_pub.publish(marker_array(result.objects, poses, header))

    def _answer(self, request: Request, msg: GroundingResultMsg) -> None:
        """The request's one result: on ~/result and, for an action goal, as the goal's result."""
        if request.complete(msg):
            self.result_pub.publish(msg)

    def _fail(self, request: Request, code: str, message: str, header: Header | None = None,
              show: bool = False) -> None:
        """Answer the request with an error; `show` also puts it on ~/status (errors of the served request)."""
        if header is None:
            header = Header(stamp=self.get_clock().now().to_msg())
        self.get_logger().warning(f"{request.source} instruction {request.instruction!r}: {code}: {message}")
        if show:
            self._status(f"error: {message}")
        self._answer(request, result_message(request.instruction, header, total_seconds=request.age(),
                                             error_code=code, error=message))

    def _status(self, text: str) -> None:
        self.status_pub.publish(String(data=text))

    def close(self) -> None:
        for request in self.queue.close():
            self._fail(request, E.ERROR_SHUTDOWN, 'the node is shutting down')
        self._worker.join(timeout=5.0)
        if self._speaker is not None:
            self._speaker.close()


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = GroundingNode()
    except GroundingError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        rclpy.try_shutdown()
        return 2
    # Action goals wait in an executor thread while queued / running: room for all of them plus the inputs.
    executor = MultiThreadedExecutor(num_threads=node.params['max_queued'] + 4)
    executor.add_node(node)
    try:
        while rclpy.ok() and node.failure is None:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if node.failure else 0


if __name__ == '__main__':
    sys.exit(main())
