"""GroundingNode: the ROS 2 adapter over flmm_ros.grounding.pipeline.GroundingPipeline.

Subscriptions only store (the latest frame, depth / camera_info for 3D) or submit; one worker thread serves
instructions one at a time (busy_policy decides what a new one does meanwhile). Every instruction, from the
`instruction` topic or the `~/ground` action, gets exactly one GroundingResult on `~/result` (and as the
action result): success, or an explicit error. Outputs carry the header of the image used.
Action goals are coroutines that wait without holding an executor thread, so any number of them can wait.
"""
from __future__ import annotations

import threading
import time
import traceback
from typing import Any

import numpy as np
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_with_reason
from flmm_ros.grounding.pipeline import FrameEncoding, GroundingPipeline
from flmm_ros.grounding.types import GroundingCancelled, GroundingError
from flmm_ros.overlay import draw_overlay, label_image
from flmm_ros.ros import diagnostics, parameters
from flmm_ros.ros.frames import Frame, FrameStore
from flmm_ros.ros.image_conversions import image_to_depth, image_to_rgb, is_empty_image, mono_to_image, rgb_to_image
from flmm_ros.ros.messages import marker_array, result_message
from flmm_ros.ros.qos import (ACTION_SERVICE_QOS, DIAGNOSTICS_QOS, INSTRUCTION_QOS, RESULT_DEPTH, STATUS_QOS,
                              lost_message_callbacks, qos_profile)
from flmm_ros.ros.requests import CANCELLED, SHUTDOWN, Request, RequestQueue
from flmm_ros.ros.stamp_sync import StampMatcher, stamp_ns
from flmm_ros.speech import Speaker

NODE_NAME = 'flmm_grounding'
E = GroundingResultMsg  # error code constants (E.ERROR_NO_FRAME, ...)
REFUSALS = {E.ERROR_BUSY: "busy with another instruction (busy_policy {policy}, max_queued {max_queued})",
            E.ERROR_PREEMPTED: 'preempted by a newer instruction (busy_policy preempt)',
            E.ERROR_SHUTDOWN: 'the node is shutting down'}


class RequestFailed(Exception):
    """A request ends with an explicit error code (one of GroundingResult's ERROR_* constants)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class GroundingNode(Node):
    """The flmm_grounding node. Callbacks run on a multi-threaded executor; inference runs on one worker thread.

    `shutdown()` (from the main thread, while the executor still spins) answers every unfinished
    instruction with 'shutdown' before ROS is torn down."""

    def __init__(self, stop_event: threading.Event | None = None):
        super().__init__(NODE_NAME)
        self.params = self._declare_parameters()
        parameters.validate(self.params)
        self.pipeline_config = parameters.pipeline_config(self.params)
        self.pipeline: GroundingPipeline | None = None
        self.failure: str | None = None  # set when the model could not be loaded; main() then exits
        self._stop_event = stop_event or threading.Event()

        p = self.params
        self.queue = RequestQueue(p['busy_policy'], p['max_queued'])
        self.frames = FrameStore()
        self.stats = diagnostics.NodeStats()
        self._state = 'loading'
        self._encoded: tuple[int, np.ndarray, FrameEncoding] | None = None  # worker only: (seq, rgb, encoding)
        self._depths = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._infos = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._goals: dict[bytes, Request] = {}
        self._goals_done = threading.Condition()
        self._speaker = Speaker() if p['speak'] else None

        out_qos = qos_profile(p['output_qos'], 5)
        self.status_pub = self.create_publisher(String, '~/status', STATUS_QOS)
        self.answer_pub = self.create_publisher(String, '~/answer', qos_profile(p['output_qos'], RESULT_DEPTH))
        self.result_pub = self.create_publisher(GroundingResultMsg, '~/result',
                                                qos_profile(p['output_qos'], RESULT_DEPTH))
        self.mask_pub = self.create_publisher(Image, '~/mask', out_qos)
        self.overlay_pub = self.create_publisher(Image, '~/overlay', out_qos)
        self.markers_pub = self.create_publisher(MarkerArray, '~/markers', out_qos)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)

        sensors, requests = MutuallyExclusiveCallbackGroup(), ReentrantCallbackGroup()
        self.create_subscription(Image, 'image', self._on_image, qos_profile(p['input_qos'], 1),
                                 callback_group=sensors, event_callbacks=lost_message_callbacks(self.frames.note_lost))
        if p['use_3d']:
            self.create_subscription(Image, 'depth', self._on_depth, qos_profile(p['input_qos'], 5),
                                     callback_group=sensors)
            self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info,
                                     qos_profile(p['input_qos'], 5), callback_group=sensors)
        self.create_subscription(String, 'instruction', self._on_instruction, INSTRUCTION_QOS,
                                 callback_group=requests)
        self.action_server = ActionServer(
            self, Ground, '~/ground', execute_callback=self._execute_goal, goal_callback=self._accept_goal,
            cancel_callback=self._cancel_goal, callback_group=requests, goal_service_qos_profile=ACTION_SERVICE_QOS,
            result_service_qos_profile=ACTION_SERVICE_QOS, cancel_service_qos_profile=ACTION_SERVICE_QOS)
        self.image_topic = self.resolve_topic_name('image')
        self.create_timer(p['diagnostics_period'], self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())

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

    # ---- inputs (cheap: they only store or submit) ------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self.frames.add(msg)

    def _on_depth(self, msg: Image) -> None:
        self._depths.add(stamp_ns(msg.header.stamp), msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._infos.add(stamp_ns(msg.header.stamp), msg)

    def _on_instruction(self, msg: String) -> None:
        self._submit(Request(msg.data, source='topic'))

    def _submit(self, request: Request) -> None:
        self.stats.instruction_received()
        if not request.instruction.strip():
            self._fail(request, E.ERROR_EMPTY_INSTRUCTION, 'the instruction is empty')
            return
        for refused, code in self.queue.submit(request):
            reason = REFUSALS.get(code, code).format(policy=self.queue.policy, max_queued=self.queue.max_queued)
            self._fail(refused, code, reason)

    # ---- the action (coroutines: a waiting goal holds no executor thread) ----------------------------
    def _accept_goal(self, goal) -> GoalResponse:
        # Every goal is accepted and then answered with one GroundingResult (busy / shutdown included), so a
        # client always learns why; only a closing node rejects, because it can no longer send results.
        return GoalResponse.REJECT if self._stop_event.is_set() else GoalResponse.ACCEPT

    async def _execute_goal(self, goal_handle) -> Ground.Result:
        goal = goal_handle.request
        done = self.executor.create_future()
        done.add_done_callback(lambda _: None)   # a done callback makes set_result wake the executor
        image = None if is_empty_image(goal.image) else goal.image
        request = Request(goal.instruction, image=image, source='action', on_done=done.set_result,
                          on_stage=lambda stage: goal_handle.publish_feedback(Ground.Feedback(stage=stage)))
        key = bytes(goal_handle.goal_id.uuid)
        with self._goals_done:
            self._goals[key] = request
        try:
            if goal_handle.is_cancel_requested:  # cancelled before it was registered above
                request.stop(CANCELLED)
            request.on_stage('queued')
            self._submit(request)
            result: GroundingResultMsg = await done
        finally:
            with self._goals_done:
                self._goals.pop(key, None)
                self._goals_done.notify_all()
        if result.success:
            goal_handle.succeed()
        elif result.error_code == E.ERROR_CANCELLED and goal_handle.status == GoalStatus.STATUS_CANCELING:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return Ground.Result(result=result)

    def _cancel_goal(self, goal_handle) -> CancelResponse:
        with self._goals_done:
            request = self._goals.get(bytes(goal_handle.goal_id.uuid))
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
            self._state = 'error'
            self.get_logger().fatal(self.failure)
            self._status(f"error: {self.failure}")
            for request in self.queue.close():
                self._fail(request, E.ERROR_INTERNAL, self.failure)
            self._stop_event.set()
            return
        self.get_logger().info(f"model loaded ({model}); waiting for images on {self.image_topic}")
        self._state = 'ready'
        self._status('ready')
        while (request := self.queue.take()) is not None:
            try:
                self._serve(request)
            finally:
                self.queue.finish(request)
                if not self.queue.busy and not self._stop_event.is_set():
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
            warnings = self._check_fresh(frame, request)
            depth, info = self._match_3d(frame)        # now: the buffers may have moved on after inference
            progress('encode')
            rgb, encoding = self._encode(frame)
            result = self.pipeline.run(encoding, request.instruction, progress=progress)
            progress('publish')
            timings = dict(result.timings)
            poses, pose_status = [None] * len(result.objects), [''] * len(result.objects)
            if self.params['use_3d'] and result.objects:
                start = time.perf_counter()
                poses, pose_status = self._poses(frame, result.objects, depth, info)
                timings['depth_3d'] = time.perf_counter() - start
            msg = result_message(request.instruction, header, answer=result.answer, objects=result.objects,
                                 poses=poses, pose_status=pose_status, timings=timings,
                                 total_seconds=request.age(), frame_cached=result.frame_cached, warnings=warnings)
            self._publish_outputs(rgb, result, poses, header)
            self._answer(request, msg)
        except RequestFailed as error:
            self._fail(request, error.code, str(error), header, show=True)
        except GroundingCancelled:
            reason = request.stop_reason or CANCELLED
            self._fail(request, reason, REFUSALS.get(reason, f"{reason} while running").format(
                policy=self.queue.policy, max_queued=self.queue.max_queued), header)
        except GroundingError as error:
            self._fail(request, E.ERROR_BAD_INPUT, str(error), header, show=True)
        except Exception as error:  # noqa: BLE001 - the node must outlive any one request
            self.get_logger().error(f"internal error on {request.instruction!r}:\n{traceback.format_exc()}")
            self._fail(request, E.ERROR_INTERNAL, f"internal error: {type(error).__name__}: {error}", header,
                       show=True)

    def _frame_for(self, request: Request) -> Frame:
        if request.image is not None:
            return self.frames.add(request.image, from_camera=False)
        frame = self.frames.latest
        if frame is None:
            raise RequestFailed(E.ERROR_NO_FRAME, f"no image received yet on {self.image_topic} "
                                                  f"({self.frames.describe()}); is the camera running?")
        return frame

    def _check_fresh(self, frame: Frame, request: Request) -> list[str]:
        """Refuse a frame that was stale when the instruction came; warnings about its stamp."""
        limit = self.params['max_frame_age']
        if not frame.from_camera or limit <= 0:
            return []
        # Age when the instruction arrived: time spent waiting behind other instructions does not count.
        age = request.received - frame.received
        if age > limit:
            raise RequestFailed(E.ERROR_STALE_FRAME, f"the latest image on {self.image_topic} arrived {age:.1f} s "
                                                     f"before the instruction (max_frame_age {limit:g} s): "
                                                     f"{self.frames.describe()}; is the camera running?")
        lag = (self.get_clock().now().nanoseconds - stamp_ns(frame.image.header.stamp)) / 1e9
        if abs(lag) <= limit:
            return []
        where = 'behind' if lag > 0 else 'ahead of'
        warning = (f"the image's header stamp is {abs(lag):.1f} s {where} this node's clock (max_frame_age "
                   f"{limit:g} s): check the camera's clock and use_sim_time")
        self.get_logger().warning(warning, throttle_duration_sec=10.0)
        return [warning]

    def _encode(self, frame: Frame) -> tuple[np.ndarray, FrameEncoding]:
        """The frame's RGB and encoding, computed once per frame and reused by later instructions on it."""
        if self._encoded is not None and self._encoded[0] == frame.seq:
            return self._encoded[1], self._encoded[2]
        try:
            rgb = image_to_rgb(frame.image)
            encoding = self.pipeline.encode(rgb)  # also refuses images too small to ground in
        except GroundingError as error:
            raise RequestFailed(E.ERROR_BAD_IMAGE, f"bad image: {error}") from error
        self._encoded = (frame.seq, rgb, encoding)
        return rgb, encoding

    # ---- 3D --------------------------------------------------------------------------------------
    def _match_3d(self, frame: Frame) -> tuple[Any, Any]:
        if not self.params['use_3d'] or not frame.from_camera:
            return None, None
        stamp = stamp_ns(frame.image.header.stamp)
        return self._depths.match(stamp), self._infos.match(stamp)

    def _poses(self, frame: Frame, objects, depth_msg, info) -> tuple[list, list[str]]:
        """3D per object from the depth + camera_info of the frame's stamp, and why where there is none."""
        if frame.from_camera:   # depth may have arrived after the image, while the model ran
            later_depth, later_info = self._match_3d(frame)
            depth_msg, info = depth_msg or later_depth, info or later_info
        missing = [name for name, msg in (('depth image', depth_msg), ('camera_info', info)) if msg is None]
        if missing:
            reason = (f"no {' and no '.join(missing)} within sync_slop {self.params['sync_slop']:g} s of the image "
                      "stamp" if frame.from_camera else "the goal's own image has no depth")
            return [None] * len(objects), [reason] * len(objects)
        try:
            depth = image_to_depth(depth_msg)
            intrinsics = CameraIntrinsics.from_k(info.k, info.width, info.height)
            poses, reasons = zip(*(object_pose_with_reason(obj.mask, depth, intrinsics) for obj in objects))
        except GroundingError as error:  # 3D is extra: the 2D result still stands
            self.get_logger().warning(f"3D skipped: {error}", throttle_duration_sec=5.0)
            return [None] * len(objects), [f"no 3D: {error}"] * len(objects)
        return list(poses), list(reasons)

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
            self.stats.result(msg.error_code, msg.total_seconds)
            self.result_pub.publish(msg)

    def _fail(self, request: Request, code: str, message: str, header: Header | None = None,
              show: bool = False) -> None:
        """Answer the request with an error; `show` also puts it on ~/status (errors of the served request)."""
        if header is None:
            header = Header(stamp=self.get_clock().now().to_msg())
        line = f"{request.source} instruction {request.instruction!r}: {code}: {message}"
        if show:
            self.get_logger().warning(line)
            self._status(f"error: {message}")
        else:   # refusals come in bursts: one line a second is enough (~/result has every one)
            self.get_logger().warning(line, throttle_duration_sec=1.0)
        self._answer(request, result_message(request.instruction, header, total_seconds=request.age(),
                                             error_code=code, error=message))

    def _status(self, text: str) -> None:
        self.status_pub.publish(String(data=text))

    def _publish_diagnostics(self) -> None:
        latest = self.frames.latest
        values = {'state': self._state, 'model': self.pipeline_config.model, 'device': self.params['device'],
                  'image_topic': self.image_topic, 'frames_received': self.frames.received,
                  'frames_lost': self.frames.lost,
                  'latest_frame_age_s': f"{time.monotonic() - latest.received:.3f}" if latest else 'n/a',
                  'latest_frame_stamp': (f"{latest.image.header.stamp.sec}.{latest.image.header.stamp.nanosec:09d}"
                                         if latest else 'n/a'),
                  'queue_waiting': self.queue.waiting, **self.stats.snapshot()}
        if self._state == 'error':
            level, message = diagnostics.ERROR, self.failure or 'error'
        elif latest is None or (self.params['max_frame_age'] > 0 and
                                time.monotonic() - latest.received > self.params['max_frame_age']):
            level, message = diagnostics.WARN, f"no recent image on {self.image_topic}"
        else:
            level, message = diagnostics.OK, self._state
        self.diagnostics_pub.publish(diagnostics.diagnostic_array(
            Header(stamp=self.get_clock().now().to_msg()), f"{self.get_name()}: grounding",
            self.params['device'], level, message, values))

    # ---- shutdown ---------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 3.0) -> bool:
        """Stop accepting; answer waiting instructions 'shutdown' now and the running one at its next stage;
        wait (at most `timeout`) until every request and action goal has its result. The executor must still
        spin meanwhile (goal coroutines resume on it). Returns False if the worker is still busy (e.g. loading)."""
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        self._state = 'shutting down'
        self._status('shutting down')
        for request in self.queue.close():
            self._fail(request, SHUTDOWN, REFUSALS[SHUTDOWN])
        self._worker.join(max(deadline - time.monotonic(), 0.0))
        running = self.queue.running
        if running is not None:   # a stage that outlived the deadline: answer it now (first result wins)
            self._fail(running, SHUTDOWN, REFUSALS[SHUTDOWN])
        with self._goals_done:
            self._goals_done.wait_for(lambda: not self._goals, max(deadline - time.monotonic(), 0.0))
        for publisher in (self.result_pub, self.answer_pub, self.status_pub):
            publisher.wait_for_all_acked(Duration(seconds=max(deadline - time.monotonic(), 0.2)))
        if self._speaker is not None:
            self._speaker.close()
        return not self._worker.is_alive()
