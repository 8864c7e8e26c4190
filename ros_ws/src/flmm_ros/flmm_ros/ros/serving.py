"""Serving instructions: the worker thread's side of the flmm_grounding node (a mixin of GroundingNode).

One request at a time: choose the frame (the latest camera frame or the goal's own image), refuse a stale
one, encode it once per frame, run the pipeline, add 3D from the depth + camera_info of the frame's stamp,
publish the outputs and the one GroundingResult. Every path ends in exactly one result.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from std_msgs.msg import Header, String

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_with_reason
from flmm_ros.grounding.pipeline import FrameEncoding
from flmm_ros.grounding.types import GroundingCancelled, GroundingError
from flmm_ros.overlay import draw_overlay, label_image
from flmm_ros.ros.frames import Frame
from flmm_ros.ros.image_conversions import (
    image_to_depth,
    image_to_rgb,
    mono_to_image,
    rgb_to_image,
)
from flmm_ros.ros.messages import marker_array, result_message
from flmm_ros.ros.qos import reaches_anyone
from flmm_ros.ros.requests import CANCELLED, Request
from flmm_ros.ros.stamp_sync import stamp_ns

E = GroundingResultMsg  # error code constants (E.ERROR_NO_FRAME, ...)
REFUSALS = {E.ERROR_BUSY: "busy with another instruction (busy_policy {policy}, max_queued {max_queued})",
            E.ERROR_PREEMPTED: 'preempted by a newer instruction (busy_policy preempt)',
            E.ERROR_SHUTDOWN: 'the node is shutting down',
            E.ERROR_INACTIVE: "the node is not active (lifecycle state {state}); activate it first"}


class RequestFailed(Exception):
    """A request ends with an explicit error code (one of GroundingResult's ERROR_* constants)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class InstructionServer:
    """The worker's methods of GroundingNode: serve one request, publish its outputs, answer it.

    Runs on the node's single worker thread, except `_answer` / `_fail`, which any thread may call (a Request
    takes only its first result)."""

    # ---- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        """The worker thread: (with autostart) configure and activate, then serve requests one at a time."""
        if self.params['autostart']:
            self._autostart()
        while (request := self.queue.take()) is not None:
            try:
                self._serve(request)
            finally:
                self.queue.finish(request)
                if not self.queue.busy and self._accepting:
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
            self.get_logger().debug(f"serving {request.source} instruction {request.instruction!r} on frame "
                                    f"{frame.seq} stamped {frame.image.header.stamp.sec}."
                                    f"{frame.image.header.stamp.nanosec:09d} (waited {request.age():.3f} s)")
            warnings = self._check_fresh(frame, request)
            depth, info = self._match_3d(frame)        # now: the buffers may have moved on after inference
            progress('encode')
            rgb, encoding = self._encode(frame)
            early: dict[str, Any] = {}

            def on_objects(partial) -> None:   # masks first: published before the answer is generated
                early['poses'], early['pose_status'], timings = self._with_3d(frame, partial, depth, info)
                early['mask_seconds'] = request.age()
                early['track_ids'] = self._maybe_track(request, partial.objects, rgb, frame, encoding, warnings)
                progress('objects')
                early['msg'] = result_message(request.instruction, header, answer=partial.answer,
                                              objects=partial.objects, poses=early['poses'],
                                              pose_status=early['pose_status'], track_ids=early['track_ids'],
                                              timings=timings,
                                              total_seconds=early['mask_seconds'],
                                              mask_seconds=early['mask_seconds'],
                                              frame_cached=partial.frame_cached, warnings=warnings,
                                              not_found=partial.not_found)
                # ~/objects last: published before the viewer topics, it reached a reliable subscriber late (soak,
                # 90 s: p95 581 ms against 54 ms, 49 of 180 after their result), though they add ~2 ms before it.
                self._publish_masks(rgb, partial.objects, early['poses'], header)
                self.objects_pub.publish(early['msg'])

            if request.is_region:   # click to ask: SAM's region and the LMM's answer about it come together
                question = request.instruction.strip() or self.params['region_question'] or None
                result = self.pipeline.ask_region(encoding, question, point=request.point, box=request.box,
                                                  prompting=self.params['region_prompting'], progress=progress)
                on_objects(result)
            else:
                result = self.pipeline.run(encoding, request.instruction, progress=progress, on_objects=on_objects)
            progress('publish')
            timings = dict(result.timings)
            if 'depth_3d' in early['msg'].stage_names:
                timings['depth_3d'] = early['msg'].stage_seconds[early['msg'].stage_names.index('depth_3d')]
            msg = result_message(request.instruction, header, answer=result.answer, objects=result.objects,
                                 poses=early['poses'], pose_status=early['pose_status'],
                                 track_ids=early['track_ids'], timings=timings,
                                 total_seconds=request.age(), mask_seconds=early['mask_seconds'],
                                 frame_cached=result.frame_cached, warnings=warnings, not_found=result.not_found)
            self._publish_answer(self._spoken(request, result))
            self._answer(request, msg)
            self.get_logger().debug(f"answered {request.instruction!r}: {len(result.objects)} objects, masks after "
                                    f"{early['mask_seconds'] * 1000:.0f} ms, " + ", ".join(
                                        f"{name} {seconds * 1000:.1f} ms" for name, seconds in timings.items()))
        except RequestFailed as error:
            self._fail(request, error.code, str(error), header, show=True)
        except GroundingCancelled:
            reason = request.stop_reason or CANCELLED
            self._fail(request, reason, self._refusal(reason) if reason in REFUSALS else f"{reason} while running",
                       header)
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
    def _maybe_track(self, request: Request, objects, rgb: np.ndarray, frame: Frame, encoding: FrameEncoding,
                     warnings: list[str]) -> list[int]:
        """Start tracking the objects when the request asks for it (from the frame's encoding: no second SAM
        encoder pass); their track ids (else [])."""
        if not request.track or not objects:
            return []
        if not frame.from_camera:
            warnings.append("not tracked: tracking follows the camera stream, and this goal brought its own image")
            return []
        return self.start_tracking(objects, rgb, frame, encoding)

    def _with_3d(self, frame: Frame, partial, depth, info) -> tuple[list, list[str], dict[str, float]]:
        """Poses (or why none) for the partial result's objects, and its timings with depth_3d added."""
        timings = dict(partial.timings)
        poses = [None] * len(partial.objects)
        found = [i for i, obj in enumerate(partial.objects) if obj.found]
        pose_status = ['' if obj.found else 'not found' for obj in partial.objects]
        if self.params['use_3d'] and found:
            start = time.perf_counter()
            some, reasons = self._poses(frame, [partial.objects[i] for i in found], depth, info)
            for i, pose, reason in zip(found, some, reasons):
                poses[i], pose_status[i] = pose, reason
            timings['depth_3d'] = time.perf_counter() - start
        return poses, pose_status, timings

    def _publish_masks(self, rgb: np.ndarray, objects, poses, header: Header) -> None:
        """The viewers' topics (~/mask, ~/overlay, ~/markers), each drawn only when it reaches someone."""
        if reaches_anyone(self.mask_pub):
            self.mask_pub.publish(mono_to_image(label_image(objects, rgb.shape), header))
        if self.params['publish_overlay'] and reaches_anyone(self.overlay_pub):
            self.overlay_pub.publish(rgb_to_image(draw_overlay(rgb, objects), header))
        if self.params['use_3d'] and reaches_anyone(self.markers_pub):
            self.markers_pub.publish(marker_array(objects, poses, header))

    @staticmethod
    def _spoken(request: Request, result) -> str:
        """What ~/answer says: the answer; for a click without a question, the name of what was clicked (the
        LMM's answer describes the picture it saw; `answer_start`/`answer_end` mark that name in it)."""
        if request.is_region and not request.instruction.strip() and result.objects \
                and result.objects[0].answer_span is not None:
            return f"{result.objects[0].phrase}."
        return result.answer

    def _publish_answer(self, answer: str) -> None:
        if answer:
            self.answer_pub.publish(String(data=answer))
            if self._speaker is not None:
                self._speaker.speak(answer)

    def _refusal(self, code: str) -> str:
        return REFUSALS[code].format(policy=self.queue.policy, max_queued=self.queue.max_queued,
                                     state=self._lifecycle_label())

    def _answer(self, request: Request, msg: GroundingResultMsg) -> None:
        """The request's one result: on ~/result and, for an action goal, as the goal's result."""
        if request.complete(msg):
            self.stats.result(msg.error_code, msg.total_seconds)
            if self._io:   # configured: ~/result exists
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

