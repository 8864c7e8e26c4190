"""Tracking in the node: after an instruction asks for it, its objects are followed onto every camera frame
(grounding.tracking.ObjectTracker: SAM only, no LMM) and published on ~/tracks (a mixin of GroundingNode).

One thread takes the newest camera frame whenever it is free (frames that came meanwhile are skipped, never
queued), updates every track, adds 3D from the depth of that frame's stamp and publishes flmm_msgs/
TrackedObjects, and the overlay and markers with the track ids while someone subscribes to them. State changes
(lost, found again, stopped) go to ~/status.

Instructions first: an update never starts while an instruction is served or waits, and the one in progress when
an instruction comes gives way at once (`ObjectTracker.interrupt`: its SAM encoder pass is ended, or, when past it,
its objects finish, the re-grounding stops and the frame is not published), so an instruction shares the CPU with at
most the end of one update. Starting its tracks does not wait for that update (ObjectTracker swaps its list of
tracks); the tracker's SAM runs outside the pipeline's lock.
"""
from __future__ import annotations

import threading
import time
import traceback

from flmm_msgs.msg import TrackedObjects
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from flmm_ros.grounding.pipeline import FrameEncoding
from flmm_ros.grounding.tracking import ObjectTracker
from flmm_ros.grounding.types import GroundedObject, GroundingError
from flmm_ros.overlay import draw_overlay
from flmm_ros.ros import parameters
from flmm_ros.ros.frames import Frame
from flmm_ros.ros.image_conversions import image_to_rgb, rgb_to_image
from flmm_ros.ros.messages import marker_array, tracks_message
from flmm_ros.ros.qos import qos_profile, reaches_anyone


class TrackingServer:
    """The node's tracking thread and its start / stop. Thread-safety: the ObjectTracker has its own lock;
    start comes from the instruction worker, stop from a service callback, updates from the tracking thread."""

    def _init_tracking(self) -> None:
        self._tracker: ObjectTracker | None = None
        self._tracked_seq = 0                    # frames up to this one are not tracked (grounded on or before)
        self._track_states: dict[int, str] = {}  # last state per track id, to report changes
        self._tracking_wake = threading.Event()
        self._tracking_thread = threading.Thread(target=self._track_loop, name='flmm-tracking', daemon=True)
        self._tracking_thread.start()

    def _create_tracking_io(self) -> list:
        self.tracks_pub = self.create_publisher(TrackedObjects, '~/tracks', qos_profile(self.params['output_qos'], 5))
        service = self.create_service(Trigger, '~/stop_tracking', self._on_stop_tracking)
        return [self.tracks_pub, service]

    # ---- start / stop -------------------------------------------------------------------------------
    def start_tracking(self, objects: list[GroundedObject], rgb, frame: Frame,
                       encoding: FrameEncoding | None = None) -> list[int]:
        """Track `objects`, just grounded on `frame` (replacing what was tracked; `encoding`, the pipeline's
        encoding of it, saves a SAM encoder pass); returns their track ids."""
        if self._tracker is None:
            # A re-grounding (the LMM) gives way to an instruction that comes meanwhile, at its next stage.
            self._tracker = ObjectTracker(self.pipeline, parameters.tracker_config(self.params),
                                          yield_to=lambda: self.queue.busy)
        tracked = self._tracker.start(objects, image=rgb, frame=encoding)
        self._tracked_seq = frame.seq
        self._track_states = {t.track_id: t.state for t in tracked}
        self._status('tracking ' + ', '.join(f"#{t.track_id} {t.phrase!r}" for t in tracked))
        self._tracking_wake.set()
        return [t.track_id for t in tracked]

    def stop_tracking(self, why: str) -> int:
        """Stop every track; returns how many there were. An empty ~/tracks message tells subscribers."""
        tracker = self._tracker
        count = len(tracker.tracks) if tracker is not None else 0
        if count:
            tracker.stop()
            self._track_states = {}
            self.tracks_pub.publish(TrackedObjects(header=Header(stamp=self.get_clock().now().to_msg())))
            self._status(f"tracking stopped ({why})")
        return count

    def _give_way_to_instructions(self) -> None:
        """An instruction was queued: the frame being tracked gives way at once (ObjectTracker.interrupt: its SAM
        encoder pass ends, or its objects finish and the re-grounding stops), so the instruction has the CPU."""
        if self._tracker is not None:
            self._tracker.interrupt()

    def _on_stop_tracking(self, request, response):
        count = self.stop_tracking('~/stop_tracking')
        response.success = True
        response.message = f"stopped tracking {count} object{'s' if count != 1 else ''}" if count else \
            'nothing was being tracked'
        return response

    def _apply_tracker_parameters(self) -> None:
        """Run-time tracker settings (the thresholds of the lost rule) take effect from the next frame."""
        if self._tracker is not None:
            self._tracker.configure(parameters.tracker_config(self.params))

    # ---- the tracking thread ----------------------------------------------------------------------------
    def _track_loop(self) -> None:
        seq = 0
        while not self._stop_event.is_set():
            tracker = self._tracker
            if tracker is None or not tracker.tracks or not self._accepting:
                self._tracking_wake.wait()
                self._tracking_wake.clear()
                continue
            frame = self.frames.wait_newer(max(seq, self._tracked_seq), timeout=1.0)
            if frame is None or self._tracker is not tracker or not tracker.tracks:
                continue
            # Instructions first: a frame is never tracked while one is served or waits, so an instruction shares
            # the CPU with at most the one frame already being tracked when it came.
            if not self.queue.wait_idle(timeout=1.0):
                continue
            frame = self.frames.latest
            seq = frame.seq
            try:
                self._track_frame(tracker, frame)
            except GroundingError as error:   # e.g. the camera changed resolution: start again
                self.get_logger().warning(f"tracking stopped: {error}")
                self.stop_tracking(str(error))
            except Exception as error:  # noqa: BLE001 - tracking must never take the node down
                self.get_logger().error(f"tracking failed:\n{traceback.format_exc()}")
                self.stop_tracking(f"internal error: {type(error).__name__}: {error}")

    def _track_frame(self, tracker: ObjectTracker, frame: Frame) -> None:
        header = frame.image.header
        rgb = image_to_rgb(frame.image)
        update = tracker.update(rgb)
        # Gave way to an instruction, or one replaced the tracks meanwhile (the next frame has the new ones): skip
        # the frame, as the latest-frame policy skips any (an empty message would read as "stopped").
        if update.interrupted or (not update.objects and tracker.tracks):
            return
        self._report_changes(update.objects)
        if self.queue.busy:   # an instruction came during the update: it has the CPU, ~/tracks gets the next frame
            return
        timings = dict(update.timings)
        poses, pose_status = [None] * len(update.objects), ['lost'] * len(update.objects)
        visible = [i for i, obj in enumerate(update.objects) if obj.state == 'tracking']
        if self.params['use_3d'] and visible:
            start = time.perf_counter()
            depth, info = self._match_3d(frame)
            found, reasons = self._poses(frame, [update.objects[i] for i in visible], depth, info)
            for i, pose, reason in zip(visible, found, reasons):
                poses[i], pose_status[i] = pose, reason
            timings['depth_3d'] = time.perf_counter() - start
        self.tracks_pub.publish(tracks_message(update, header, poses, pose_status, timings))
        # The viewers' topics at camera rate only while someone watches them, and never ahead of an instruction.
        overlay = self.params['publish_overlay'] and reaches_anyone(self.overlay_pub)
        markers = self.params['use_3d'] and reaches_anyone(self.markers_pub)
        if self.queue.busy or not (overlay or markers):
            return
        labelled = [GroundedObject(f"#{o.track_id} {o.phrase}", o.mask, o.box, o.score) for o in update.objects]
        ids = [o.track_id for o in update.objects]
        if overlay:
            self.overlay_pub.publish(rgb_to_image(draw_overlay(rgb, labelled, colours=ids), header))
        if markers:
            self.markers_pub.publish(marker_array(labelled, poses, header, indices=ids))

    def _report_changes(self, objects) -> None:
        for obj in objects:
            before = self._track_states.get(obj.track_id)
            if before != obj.state:
                how = 'found again by re-grounding' if obj.regrounded else 'found again'
                self._status(f"track #{obj.track_id} {obj.phrase!r} " +
                             (f"lost ({obj.lost_reason})" if obj.state == 'lost' else how))
            self._track_states[obj.track_id] = obj.state

    def _tracking_summary(self) -> dict[str, object]:
        tracks = self._tracker.tracks if self._tracker is not None else []
        return {'tracks_tracking': sum(t.state == 'tracking' for t in tracks),
                'tracks_lost': sum(t.state == 'lost' for t in tracks)}
