"""flmm-ask: send one instruction to the flmm_grounding node and print its result.

    flmm-ask "pick the red mug"                       # topic: publish on `instruction`, wait on ~/result
    flmm-ask "pick the red mug" --image scene.png     # also publish the image on `image` (as a camera would)
    flmm-ask "pick the red mug" --action              # the ~/ground action (Ctrl-C cancels the goal)
    flmm-ask "where is the ball?" --image scene.png --save-overlay overlay.png
    flmm-ask "pick the red mug" --track --follow 5    # keep tracking it; print ~/tracks for 5 s
    flmm-ask --stop-tracking                          # the ~/stop_tracking service
    flmm-ask --point 320 240                          # what is at this pixel? (region input)
    flmm-ask "what colour is it?" --box 280 200 380 300

Exit status: 0 success, 1 the node answered with an error, 2 no answer (timeout, node not found, bad file).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import cv2
import numpy as np
import rclpy
from flmm_msgs.action import Ground
from flmm_msgs.msg import GroundingResult, TrackedObjects
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import String
from std_srvs.srv import Trigger

from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros.image_conversions import image_to_rgb, rgb_to_image
from flmm_ros.ros.qos import INSTRUCTION_QOS

EXIT_OK, EXIT_ERROR, EXIT_NO_ANSWER = 0, 1, 2
IMAGE_PERIOD_S = 0.2      # --image is re-published like a slow camera until the answer comes
IMAGE_LEAD_S = 0.3        # ... starting this long before the instruction, so the node has it first


class NoAnswer(RuntimeError):
    """The node did not answer (not running, wrong name, timeout)."""


def bracketed_answer(msg: GroundingResult) -> str:
    """The answer with each grounded phrase in [brackets] and its object's number: "[the red mug]1 is on ..."."""
    spans = sorted((o.answer_start, o.answer_end, k) for k, o in enumerate(msg.objects, start=1)
                   if 0 <= o.answer_start < o.answer_end <= len(msg.answer))
    out, at = [], 0
    for start, end, k in spans:
        if start < at:
            continue
        out += [msg.answer[at:start], f"[{msg.answer[start:end]}]{k}"]
        at = end
    return ''.join(out) + msg.answer[at:]


def format_result(msg: GroundingResult) -> str:
    """Human-readable summary of a GroundingResult (never the mask pixels)."""
    if not msg.success:
        return f"error [{msg.error_code}]: {msg.error}"
    answer = bracketed_answer(msg) if msg.answer else "(none)"
    lines = [f"answer: {answer}", f"objects: {len(msg.objects)}"]
    for index, obj in enumerate(msg.objects, start=1):
        name = f"{obj.phrase!r}" + (f" #{obj.instance}" if obj.instance else "")
        if not obj.found:
            lines.append(f"  {index}. {name} not found (presence {obj.presence:.2f})")
            continue
        box = obj.box
        line = (f"  {index}. {name} score {obj.score:.2f} box x={box.x_offset} y={box.y_offset} "
                f"w={box.width} h={box.height}")
        if obj.has_pose:
            c, s = obj.centroid, obj.size
            line += f" 3D centroid ({c.x:.3f}, {c.y:.3f}, {c.z:.3f}) m size ({s.x:.3f}, {s.y:.3f}, {s.z:.3f}) m"
        lines.append(line)
    if msg.not_found:
        lines.append("not found: " + ", ".join(repr(p) for p in msg.not_found))
    if msg.track_ids:
        lines.append("tracking: " + ", ".join(f"#{i} {o.phrase!r}" for i, o in zip(msg.track_ids, msg.objects)))
    lines.extend(f"warning: {w}" for w in msg.warnings)
    stages = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in zip(msg.stage_names, msg.stage_seconds))
    cached = " (frame cached)" if msg.frame_cached else ""
    masks = f", masks after {msg.mask_seconds * 1000:.0f} ms" if msg.mask_seconds else ""
    lines.append(f"latency: {msg.total_seconds * 1000:.0f} ms{masks}{cached}" + (f" [{stages}]" if stages else ""))
    return "\n".join(lines)


def format_tracks(msg: TrackedObjects) -> str:
    """One line per ~/tracks message: each object's id, state, score and box (never the mask pixels)."""
    if not msg.objects:
        return "tracks: none (tracking stopped)"
    parts = []
    for obj in msg.objects:
        if obj.state == 'lost':
            parts.append(f"#{obj.track_id} {obj.phrase!r} lost ({obj.lost_reason})")
        else:
            b = obj.box
            parts.append(f"#{obj.track_id} {obj.phrase!r} score {obj.score:.2f} box x={b.x_offset} y={b.y_offset} "
                         f"w={b.width} h={b.height}" + (" regrounded" if obj.regrounded else ""))
    return f"frame {msg.frame_index}: " + "; ".join(parts)


def same_stamp(a, b) -> bool:
    return a.stamp.sec == b.stamp.sec and a.stamp.nanosec == b.stamp.nanosec and a.frame_id == b.frame_id


def about_another_frame(result: GroundingResult) -> bool:
    """A result that does not concern the image just sent, when its header is not that image's: a success on an
    earlier frame, or no frame / a stale one because the image had not arrived yet. (Any other error is an answer.)"""
    return result.success or result.error_code in (GroundingResult.ERROR_NO_FRAME, GroundingResult.ERROR_STALE_FRAME)


class AskClient(Node):
    def __init__(self, grounding_node: str = '/flmm_grounding', image_topic: str = 'image',
                 instruction_topic: str = 'instruction', want_overlay: bool = False):
        super().__init__(f'flmm_ask_{os.getpid()}')
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self._results: list[GroundingResult] = []
        self._overlays: list[Image] = []
        self.create_subscription(GroundingResult, f'{grounding_node}/result', self._results.append, reliable)
        if want_overlay:
            self.create_subscription(Image, f'{grounding_node}/overlay', self._overlays.append, reliable)
        self.instruction_pub = self.create_publisher(String, instruction_topic, INSTRUCTION_QOS)
        self.image_pub = self.create_publisher(Image, image_topic, reliable)
        self.action = ActionClient(self, Ground, f'{grounding_node}/ground')
        self.grounding_node = grounding_node
        self._tracks: list[TrackedObjects] = []
        self.create_subscription(TrackedObjects, f'{grounding_node}/tracks', self._tracks.append, reliable)
        self.stop_client = self.create_client(Trigger, f'{grounding_node}/stop_tracking')

    def _spin_until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise NoAnswer(f"timed out after {timeout:g} s {what}")
            rclpy.spin_once(self, timeout_sec=0.05)

    def ask_topic(self, instruction: str, image: Image | None, timeout: float) -> GroundingResult:
        """Publish the instruction (after `image`, if given) and wait for its result on ~/result. With an image, a
        result about another frame (the node still had an earlier one: topics keep no order between each other)
        is not the answer: the instruction is asked again until the node answers about this image (or the time is
        up)."""
        deadline = time.monotonic() + timeout
        self._spin_until(lambda: self.instruction_pub.get_subscription_count() > 0, timeout,
                         f"waiting for a subscriber on {self.instruction_pub.topic_name} (is the node running?)")
        timer = None
        if image is not None:
            self._spin_until(lambda: self.image_pub.get_subscription_count() > 0, timeout,
                             f"waiting for a subscriber on {self.image_pub.topic_name}")
            image.header.stamp = self.get_clock().now().to_msg()   # taken now, not when the node was still loading
            timer = self.create_timer(IMAGE_PERIOD_S, lambda: self.image_pub.publish(image))
            self.image_pub.publish(image)
            lead_until = time.monotonic() + IMAGE_LEAD_S
            self._spin_until(lambda: time.monotonic() > lead_until, timeout, '')
        try:
            for attempt in itertools.count():
                self._results.clear()
                self.instruction_pub.publish(String(data=instruction))
                self._spin_until(lambda: any(r.instruction == instruction for r in self._results),
                                 max(deadline - time.monotonic(), 0.1),
                                 f"waiting for the answer on {self.grounding_node}/result")
                result = next(r for r in self._results if r.instruction == instruction)
                if image is None or same_stamp(result.header, image.header) or not about_another_frame(result):
                    return result
                if time.monotonic() > deadline:
                    raise NoAnswer(f"timed out after {timeout:g} s: the node answered only about other frames than "
                                   f"the image (is it reading {self.image_pub.topic_name}?)")
                if attempt == 0:
                    print("  the node answered before it had the image; asking again", file=sys.stderr)
                retry_at = time.monotonic() + IMAGE_PERIOD_S     # at the image's rate, not flooding the node
                self._spin_until(lambda: time.monotonic() > retry_at, timeout, '')
        finally:
            if timer is not None:
                self.destroy_timer(timer)

    def ask_action(self, instruction: str, image: Image | None, timeout: float, track: bool = False,
                   point=None, box=None) -> GroundingResult:
        deadline = time.monotonic() + timeout
        if not self.action.wait_for_server(timeout_sec=timeout):
            raise NoAnswer(f"no action server {self.grounding_node}/ground after {timeout:g} s (is the node running?)")
        if image is not None:
            image.header.stamp = self.get_clock().now().to_msg()   # taken now, not when the node was still loading
        goal = Ground.Goal(instruction=instruction, image=image if image is not None else Image(), track=track,
                           point=list(point or ()))
        if box:
            x0, y0, x1, y1 = box
            goal.box = RegionOfInterest(x_offset=x0, y_offset=y0, width=max(x1 - x0, 0), height=max(y1 - y0, 0))
        sent: Future = self.action.send_goal_async(
            goal, feedback_callback=lambda fb: print(f"  stage: {fb.feedback.stage}", file=sys.stderr))
        self._spin_until(sent.done, max(deadline - time.monotonic(), 0.1), 'sending the goal')
        handle = sent.result()
        if not handle.accepted:
            raise NoAnswer('the goal was rejected')
        result_future = handle.get_result_async()
        try:
            self._spin_until(result_future.done, max(deadline - time.monotonic(), 0.1), 'waiting for the result')
        except (KeyboardInterrupt, NoAnswer):
            cancel = handle.cancel_goal_async()
            self._spin_until(cancel.done, 5.0, 'cancelling the goal')
            raise
        return result_future.result().result.result

    def follow_tracks(self, seconds: float) -> None:
        """Print ~/tracks as they come, for `seconds`."""
        self._tracks.clear()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=0.05)
            while self._tracks:
                print(format_tracks(self._tracks.pop(0)))

    def stop_tracking(self, timeout: float) -> str:
        if not self.stop_client.wait_for_service(timeout_sec=timeout):
            raise NoAnswer(f"no service {self.grounding_node}/stop_tracking (is the node running?)")
        future = self.stop_client.call_async(Trigger.Request())
        self._spin_until(future.done, timeout, 'stopping the tracking')
        return future.result().message

    def overlay_for(self, result: GroundingResult, timeout: float = 2.0) -> Image | None:
        """The ~/overlay image computed with this result (same header), if it comes within `timeout`."""
        def found():
            return next((img for img in self._overlays if same_stamp(img.header, result.header)), None)
        try:
            self._spin_until(lambda: found() is not None, timeout, '')
        except NoAnswer:
            return None
        return found()


def load_image(path: str, frame_id: str, clock) -> Image:
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise GroundingError(f"cannot read image file {path!r}")
    msg = rgb_to_image(np.ascontiguousarray(bgr[:, :, ::-1]))
    msg.header.stamp = clock.now().to_msg()
    msg.header.frame_id = frame_id
    return msg


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='flmm-ask', description=__doc__.split('\n')[0])
    parser.add_argument('instruction', nargs='?', help="what to ground, e.g. 'pick the red mug'")
    parser.add_argument('--image', help='image file to ground in (default: the camera\'s latest frame)')
    parser.add_argument('--action', action='store_true', help='use the ~/ground action instead of the topics')
    parser.add_argument('--track', action='store_true', help='keep tracking the objects (the action with track: true)')
    parser.add_argument('--follow', type=float, default=0.0, metavar='S',
                        help='after the result, print ~/tracks for S seconds (with --track)')
    parser.add_argument('--stop-tracking', action='store_true', help='stop tracking (the ~/stop_tracking service)')
    parser.add_argument('--point', type=float, nargs=2, metavar=('X', 'Y'),
                        help='ask about what is at this pixel (region input; the instruction is the question)')
    parser.add_argument('--box', type=int, nargs=4, metavar=('X0', 'Y0', 'X1', 'Y1'),
                        help='ask about what is in this box (region input)')
    parser.add_argument('--save-overlay', metavar='PNG', help='save the overlay (masks, boxes, phrases) here')
    parser.add_argument('--timeout', type=float, default=60.0, help='seconds to wait for the answer (default 60)')
    parser.add_argument('--node', default='/flmm_grounding', help='the grounding node (default /flmm_grounding)')
    parser.add_argument('--image-topic', default='image', help='where --image is published (default image)')
    parser.add_argument('--instruction-topic', default='instruction',
                        help='where the instruction is published (default instruction)')
    parser.add_argument('--frame-id', default='camera', help='frame_id of the --image message (default camera)')
    args = parser.parse_args(argv)
    if args.instruction is None and not args.stop_tracking and not (args.point or args.box):
        parser.error('give an instruction (or --stop-tracking, --point or --box)')
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ros_args = argv[argv.index('--ros-args'):] if '--ros-args' in argv else []
    args = parse_args(argv[:len(argv) - len(ros_args)])
    rclpy.init(args=['flmm-ask', *ros_args])
    client = AskClient(args.node, args.image_topic, args.instruction_topic, want_overlay=bool(args.save_overlay))
    try:
        if args.stop_tracking:
            print(client.stop_tracking(args.timeout))
            if args.instruction is None and not (args.point or args.box):
                return EXIT_OK
        image = load_image(args.image, args.frame_id, client.get_clock()) if args.image else None
        if args.track or args.action or args.point or args.box:
            result = client.ask_action(args.instruction or '', image, args.timeout, track=args.track,
                                       point=args.point, box=args.box)
        else:
            result = client.ask_topic(args.instruction, image, args.timeout)
        print(format_result(result))
        if args.track and result.success and args.follow > 0:
            client.follow_tracks(args.follow)
        if args.save_overlay and result.success:
            overlay = client.overlay_for(result)
            if overlay is None:
                print(f"no overlay received (is publish_overlay on?); {args.save_overlay} not written",
                      file=sys.stderr)
                return EXIT_ERROR
            cv2.imwrite(args.save_overlay, image_to_rgb(overlay)[:, :, ::-1])
            print(f"overlay saved to {args.save_overlay}")
        return EXIT_OK if result.success else EXIT_ERROR
    except (NoAnswer, GroundingError) as error:
        print(f"flmm-ask: {error}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except KeyboardInterrupt:
        return EXIT_NO_ANSWER
    finally:
        client.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
