"""GroundingNode: the flmm_grounding lifecycle node, a thin ROS 2 adapter over GroundingPipeline.

Lifecycle (rclpy.lifecycle, as yolo_ros does it):
- configure: validate the parameters, create the topics / action and load the model;
- activate: serve instructions; deactivate: stop serving (queued and running instructions get 'inactive');
- cleanup: drop the topics and free the model (and its GPU memory).
With `autostart` (default) the worker thread configures and activates at start, so one command runs it.

Subscriptions only store (the latest frame, depth / camera_info for 3D) or submit; one worker thread serves
instructions one at a time (InstructionServer, busy_policy decides what a new one does meanwhile). Every
instruction, from the `instruction` topic or the `~/ground` action, gets exactly one GroundingResult.
Action goals are coroutines that wait without holding an executor thread, so any number of them can wait.
Run-time parameters (`ros2 param set`) are validated and apply from the next instruction.
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Any

import torch
from diagnostic_msgs.msg import DiagnosticArray
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.service import Service
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros import diagnostics, parameters
from flmm_ros.ros.clicks import clicked_pixel
from flmm_ros.ros.frames import FrameStore
from flmm_ros.ros.image_conversions import is_empty_image
from flmm_ros.ros.qos import (ACTION_SERVICE_QOS, DIAGNOSTICS_QOS, INSTRUCTION_QOS, RESULT_DEPTH, STATUS_QOS,
                              lost_message_callbacks, qos_profile)
from flmm_ros.ros.requests import CANCELLED, INACTIVE, SHUTDOWN, Request, RequestQueue
from flmm_ros.ros.serving import E, InstructionServer
from flmm_ros.ros.stamp_sync import StampMatcher, stamp_ns
from flmm_ros.ros.tracking import TrackingServer
from flmm_ros.speech import Speaker

NODE_NAME = 'flmm_grounding'
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class GroundingNode(InstructionServer, TrackingServer, LifecycleNode):
    """The flmm_grounding node. Callbacks run on a multi-threaded executor; inference runs on one worker thread.

    `stop_serving()` (from the main thread, while the executor still spins) answers every unfinished
    instruction with 'shutdown' before ROS is torn down."""

    def __init__(self, stop_event: threading.Event | None = None):
        super().__init__(NODE_NAME)
        self.params = self._declare_parameters()
        parameters.validate(self.params)
        self.pipeline_config = parameters.pipeline_config(self.params)
        self.pipeline: GroundingPipeline | None = None
        self.failure: str | None = None  # set when autostart could not load the model; main() then exits
        self._stop_event = stop_event or threading.Event()
        self._accepting = self.params['autostart']   # autostart: queue instructions that come during the load
        self._state = 'unconfigured'
        self._io: list = []              # the topics / action created by configure, destroyed by cleanup
        self._sync_subs: list = []
        self._goals: dict[bytes, Request] = {}
        self._goals_done = threading.Condition()

        p = self.params
        self.queue = RequestQueue(p['busy_policy'], p['max_queued'])
        self.frames = FrameStore()
        self.stats = diagnostics.NodeStats()
        self._encoded = None             # worker only: (frame seq, rgb, FrameEncoding) of the last frame encoded
        self._depths = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._infos = StampMatcher(p['sync_slop'], p['sync_queue_size'])
        self._speaker = Speaker() if p['speak'] else None
        self.image_topic = self.resolve_topic_name('image')
        self.status_pub = self.create_publisher(String, '~/status', STATUS_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
        self.create_timer(p['diagnostics_period'], self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._init_tracking()
        self._status('unconfigured' if not p['autostart'] else f"loading model {self.pipeline_config.model}")
        self._worker = threading.Thread(target=self._work, name='flmm-grounding-worker', daemon=True)
        self._worker.start()

    # ---- parameters ---------------------------------------------------------------------------
    def _declare_parameters(self) -> dict[str, Any]:
        values = {}
        for spec in parameters.all_parameters():
            description = spec.description + (f" Choices: {', '.join(spec.choices)}." if spec.choices else '')
            if not spec.runtime:
                description += ' Read-only: set it in the params file (a change needs a restart).'
            # Dynamic typing: a value of the wrong type reaches `coerce`, which accepts 2 for 2.0 and gives a
            # one-line error for the rest (rclpy would raise a traceback at declaration).
            descriptor = ParameterDescriptor(description=description, read_only=not spec.runtime,
                                             dynamic_typing=True)
            value = self.declare_parameter(spec.name, spec.default, descriptor).value
            values[spec.name] = parameters.coerce(spec.name, value)
        return values

    def _on_set_parameters(self, changed) -> SetParametersResult:
        """Validate a `ros2 param set` as a whole and apply it; a refusal says why in one line."""
        new = dict(self.params)
        try:
            for param in changed:
                if param.name in parameters.SPECS:
                    new[param.name] = parameters.coerce(param.name, param.value)
            parameters.validate(new)
            config = parameters.pipeline_config(new)
            parameters.tracker_config(new)
        except GroundingError as error:
            return SetParametersResult(successful=False, reason=str(error))
        self._apply_parameters(new, config)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, new: dict[str, Any], config) -> None:
        old, self.params = self.params, new
        self.pipeline_config = config
        if self.pipeline is not None:
            for name in parameters.PIPELINE_RUNTIME:
                setattr(self.pipeline.config, name, getattr(config, name))
        self.queue.policy, self.queue.max_queued = new['busy_policy'], new['max_queued']
        if (new['sync_slop'], new['sync_queue_size']) != (old['sync_slop'], old['sync_queue_size']):
            self._depths = StampMatcher(new['sync_slop'], new['sync_queue_size'])
            self._infos = StampMatcher(new['sync_slop'], new['sync_queue_size'])
        if new['speak'] != old['speak']:
            if self._speaker is not None:
                self._speaker.close()
            self._speaker = Speaker() if new['speak'] else None
        if self._io:
            self._sync_3d_subscriptions(new['use_3d'])
        self._apply_tracker_parameters()
        changes = {k: v for k, v in new.items() if old[k] != v}
        self.get_logger().info(f"parameters changed: {changes}")

    # ---- lifecycle ------------------------------------------------------------------------------
    def _autostart(self) -> None:
        """configure + activate from the worker thread (the model loads there, as before lifecycle)."""
        if self.trigger_configure() != SUCCESS:
            self.failure = self.failure or 'configure failed'
            self._stop_event.set()
            return
        self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        model = self.pipeline_config.model
        self._status(f"loading model {model}")
        self._create_io()
        # Before the model loads: its ONNX Runtime sessions take the thread count torch has then.
        torch.set_num_threads(parameters.cpu_threads(self.params['threads']))
        try:
            self.pipeline = GroundingPipeline.from_config(self.pipeline_config)
        except Exception as error:  # noqa: BLE001 - any load failure is reported and the transition fails
            self.failure = f"could not load model {model}: {error}"
            self.get_logger().fatal(self.failure)
            self._status(f"error: {self.failure}")
            for request in self.queue.drain(E.ERROR_INTERNAL):   # those that came during the load
                self._fail(request, E.ERROR_INTERNAL, self.failure)
            self._destroy_io()
            return FAILURE
        self.failure = None
        self._set_state('inactive')
        self.get_logger().info(f"model loaded ({model}, {torch.get_num_threads()} CPU threads); images from "
                               f"{self.image_topic}")
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._accepting = True
        self._set_state('ready')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._accepting = False
        self.stop_tracking('deactivated')
        self._stop_requests(INACTIVE, timeout=5.0)
        self._set_state('inactive')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_io()
        self.pipeline, self._encoded, self._tracker = None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._set_state('unconfigured')
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_event.set()   # main() then runs stop_serving() and tears ROS down
        return SUCCESS

    def _set_state(self, state: str) -> None:
        self._state = state
        self._status(state)

    def _lifecycle_label(self) -> str:
        return self._state

    def _create_io(self) -> None:
        p = self.params
        out_qos = qos_profile(p['output_qos'], 5)
        self.answer_pub = self.create_publisher(String, '~/answer', qos_profile(p['output_qos'], RESULT_DEPTH))
        self.result_pub = self.create_publisher(GroundingResultMsg, '~/result',
                                                qos_profile(p['output_qos'], RESULT_DEPTH))
        # The masks before the answer: a GroundingResult without the answer, as soon as grounding is done.
        self.objects_pub = self.create_publisher(GroundingResultMsg, '~/objects',
                                                 qos_profile(p['output_qos'], RESULT_DEPTH))
        self.mask_pub = self.create_publisher(Image, '~/mask', out_qos)
        self.overlay_pub = self.create_publisher(Image, '~/overlay', out_qos)
        self.markers_pub = self.create_publisher(MarkerArray, '~/markers', out_qos)
        sensors, requests = MutuallyExclusiveCallbackGroup(), ReentrantCallbackGroup()
        self._sensors = sensors
        image_sub = self.create_subscription(Image, 'image', self.frames.add, qos_profile(p['input_qos'], 1),
                                             callback_group=sensors,
                                             event_callbacks=lost_message_callbacks(self.frames.note_lost))
        instruction_sub = self.create_subscription(
            String, 'instruction',
            lambda msg: self._submit(Request(msg.data, source='topic', track=self.params['track_instructions'])),
            INSTRUCTION_QOS, callback_group=requests)
        action = ActionServer(
            self, Ground, '~/ground', execute_callback=self._execute_goal, goal_callback=self._accept_goal,
            cancel_callback=self._cancel_goal, callback_group=requests, goal_service_qos_profile=ACTION_SERVICE_QOS,
            result_service_qos_profile=ACTION_SERVICE_QOS, cancel_service_qos_profile=ACTION_SERVICE_QOS)
        clicked_sub = self.create_subscription(PointStamped, 'clicked_point', self._on_clicked_point,
                                               INSTRUCTION_QOS, callback_group=requests)
        self._io = [self.answer_pub, self.result_pub, self.objects_pub, self.mask_pub, self.overlay_pub,
                    self.markers_pub, image_sub, instruction_sub, clicked_sub, action, *self._create_tracking_io()]
        self._sync_3d_subscriptions(p['use_3d'])

    def _sync_3d_subscriptions(self, wanted: bool) -> None:
        """Depth and camera_info subscriptions exist exactly while use_3d is on."""
        if wanted and not self._sync_subs:
            qos = qos_profile(self.params['input_qos'], 5)
            self._sync_subs = [
                self.create_subscription(Image, 'depth', lambda m: self._depths.add(stamp_ns(m.header.stamp), m),
                                         qos, callback_group=self._sensors),
                self.create_subscription(CameraInfo, 'camera_info',
                                         lambda m: self._infos.add(stamp_ns(m.header.stamp), m), qos,
                                         callback_group=self._sensors)]
        elif not wanted:
            for sub in self._sync_subs:
                self.destroy_subscription(sub)
            self._sync_subs = []

    def _destroy_io(self) -> None:
        for entity in self._io:
            if isinstance(entity, ActionServer):
                entity.destroy()
            elif isinstance(entity, Service):
                self.destroy_service(entity)
            elif hasattr(entity, 'publish'):
                self.destroy_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._io = []
        self._sync_3d_subscriptions(False)

    # ---- requests ----------------------------------------------------------------------------------
    def _submit(self, request: Request) -> None:
        self.stats.instruction_received()
        self.get_logger().debug(f"{request.source} instruction {request.instruction!r} received")
        if not self._accepting:
            code = E.ERROR_SHUTDOWN if self._stop_event.is_set() else E.ERROR_INACTIVE
            self._fail(request, code, self._refusal(code))
            return
        if not request.instruction.strip() and not request.is_region:   # a region may come without a question
            self._fail(request, E.ERROR_EMPTY_INSTRUCTION, 'the instruction is empty')
            return
        for refused, code in self.queue.submit(request):
            self._fail(refused, code, self._refusal(code))
        self._give_way_to_instructions()     # also when refused: then one runs already, and nothing is tracked

    def _on_clicked_point(self, msg: PointStamped) -> None:
        """RViz's Publish Point: ask about what was clicked, on the latest frame (click to ask)."""
        request = Request(self.params['region_question'], source='clicked_point')
        frame, info = self.frames.latest, self._infos.latest()
        try:
            if frame is None or info is None:
                missing = 'image' if frame is None else 'camera_info (needs use_3d: true)'
                raise GroundingError(f"no {missing} received yet: a clicked point is projected into the latest "
                                     "image with the camera's intrinsics")
            p = msg.point
            request.point = clicked_pixel(p.x, p.y, p.z, msg.header.frame_id, frame.image.header.frame_id,
                                          info.k, info.width, info.height)
        except GroundingError as error:
            self.stats.instruction_received()
            self._fail(request, E.ERROR_BAD_INPUT, str(error))
            return
        self.get_logger().debug(f"clicked point -> pixel ({request.point[0]:.0f}, {request.point[1]:.0f})")
        self._submit(request)

    def _accept_goal(self, goal) -> GoalResponse:
        # Every goal is accepted and then answered with one GroundingResult (busy / inactive included), so a
        # client always learns why; only a closing node rejects, because it can no longer send results.
        return GoalResponse.REJECT if self._stop_event.is_set() else GoalResponse.ACCEPT

    async def _execute_goal(self, goal_handle) -> Ground.Result:
        goal = goal_handle.request
        done = self.executor.create_future()
        done.add_done_callback(lambda _: None)   # a done callback makes set_result wake the executor
        image = None if is_empty_image(goal.image) else goal.image
        box = goal.box
        request = Request(goal.instruction, image=image, source='action', on_done=done.set_result, track=goal.track,
                          point=tuple(goal.point) if len(goal.point) else None,
                          box=(box.x_offset, box.y_offset, box.x_offset + box.width, box.y_offset + box.height)
                          if box.width and box.height else None,
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
        elif result.error_code == E.ERROR_CANCELLED and goal_handle.is_cancel_requested:
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

    def _stop_requests(self, code: str, timeout: float, close: bool = False) -> None:
        """Answer waiting requests with `code` now, the running one at its next stage (or at `timeout`), and
        wait for the action goals to end. `close`: the queue takes no more requests."""
        deadline = time.monotonic() + timeout
        for request in self.queue.close() if close else self.queue.drain(code):
            self._fail(request, code, self._refusal(code))
        running = self.queue.running
        if running is not None and not running.wait(timeout):
            self._fail(running, code, self._refusal(code))   # a stage that outlived the timeout (first wins)
        with self._goals_done:
            self._goals_done.wait_for(lambda: not self._goals, max(deadline - time.monotonic(), 0.0))

    # ---- status and health ----------------------------------------------------------------------
    def _status(self, text: str) -> None:
        self.status_pub.publish(String(data=text))

    def _publish_diagnostics(self) -> None:
        latest = self.frames.latest
        age = time.monotonic() - latest.received if latest else None
        values = {'state': self._state, 'model': self.pipeline_config.model, 'device': self.params['device'],
                  'image_topic': self.image_topic, 'frames_received': self.frames.received,
                  'frames_lost': self.frames.lost, 'latest_frame_age_s': f"{age:.3f}" if latest else 'n/a',
                  'latest_frame_stamp': (f"{latest.image.header.stamp.sec}.{latest.image.header.stamp.nanosec:09d}"
                                         if latest else 'n/a'),
                  'queue_waiting': self.queue.waiting, **self._tracking_summary(), **self.stats.snapshot()}
        if self.failure:
            level, message = diagnostics.ERROR, self.failure
        elif self._state == 'ready' and (age is None or 0 < self.params['max_frame_age'] < age):
            level, message = diagnostics.WARN, f"no recent image on {self.image_topic}"
        else:
            level, message = diagnostics.OK, self._state
        self.diagnostics_pub.publish(diagnostics.diagnostic_array(
            Header(stamp=self.get_clock().now().to_msg()), f"{self.get_name()}: grounding",
            self.params['device'], level, message, values))

    # ---- shutdown ---------------------------------------------------------------------------------
    def stop_serving(self, timeout: float = 3.0) -> bool:
        """Stop accepting; answer waiting instructions 'shutdown' now and the running one at its next stage;
        wait (at most `timeout`) until every request and action goal has its result. The executor must still
        spin meanwhile (goal coroutines resume on it). Returns False if the worker is still busy (e.g. loading)."""
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        self._accepting = False
        self._set_state('shutting down')
        self._stop_requests(SHUTDOWN, timeout, close=True)
        self._tracking_wake.set()
        self._worker.join(max(deadline - time.monotonic(), 0.0))
        self._tracking_thread.join(max(deadline - time.monotonic(), 0.0))
        publishers = [self.status_pub] + ([self.result_pub] if self._io else [])
        for publisher in publishers:   # results published just now must reach the subscribers before teardown
            publisher.wait_for_all_acked(Duration(seconds=max(deadline - time.monotonic(), 0.2)))
        if self._speaker is not None:
            self._speaker.close()
        return not self._worker.is_alive() and not self._tracking_thread.is_alive()
