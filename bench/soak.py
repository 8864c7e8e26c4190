"""Soak: the real node under a 30 Hz 640x480 camera with depth, and instructions at 2 Hz.

Starts `flmm_grounding` (a subprocess on an isolated DDS domain, the embedded default model unless
--model), publishes image + depth + camera_info with one stamp per frame at --fps, and an instruction
every 1/--rate s, cycling through a few, for --duration seconds. Then waits for the last results and
prints: instructions sent vs results received (must be equal), successes and errors by code, latency
percentiles measured here: publish to the masks' arrival (`~/objects`, published before the answer is
generated) and to the result's arrival (after the answer), both at the middleware's reception time (so the
order in which this process's executor serves its callbacks does not count), and publish to the result
callback ("latency", as before), frames published vs frames grounded (the node keeps only
the latest frame: the rest are dropped by design), the age of the frame each result used, and the
node's resident memory over time (first minute vs last minute).

With --track the camera plays a held-out tracking video (objects slide, the camera drifts; forwards and back) and
the instructions name its objects; in the second half every instruction also starts tracking them, and the report
compares the time to mask of the two halves with the cost of one tracking update.

    python bench/soak.py --duration 600            # the 10-minute soak
    python bench/soak.py --duration 15             # smoke (CI)
"""
from __future__ import annotations

import argparse
import array
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import rclpy
from flmm_msgs.msg import GroundingResult, TrackedObjects
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String

from flmm_ros.ros.image_conversions import rgb_to_image
from flmm_ros.ros.testing import SENSOR_DATA, GroundingProcess
from flmm_ros.tabletop.scenes import generate_scene, split_seeds
from flmm_ros.tabletop.sequences import generate_sequence

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ("pick the red mug", "grab the blue ball", "where is the bowl?", "pick up the green box",
                "take the yellow can", "what is on the left?")
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
TRACK_SEED = 2000002        # a held-out `shift` sequence with three objects to name (tracking_stream)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
H, W = 480, 640


class Camera(Node):
    """Publishes the camera stream and the instructions; records results and status."""

    def __init__(self, context: Context, frames: list[Image], instructions: tuple[str, ...], fps: float, rate: float,
                 camera_qos: QoSProfile):
        super().__init__(f"flmm_soak_{os.getpid()}", context=context)
        self.frames, self.instructions = frames, instructions
        self.image_pub = self.create_publisher(Image, "image", camera_qos)
        self.depth_pub = self.create_publisher(Image, "depth", camera_qos)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", camera_qos)
        self.instruction_pub = self.create_publisher(String, "instruction", RELIABLE)
        self.create_subscription(GroundingResult, "/flmm_grounding/objects", self._on_objects, RELIABLE)
        self.create_subscription(GroundingResult, "/flmm_grounding/result", self._on_result, RELIABLE)
        self.create_subscription(String, "/flmm_grounding/status", self._on_status, LATCHED)
        self.create_subscription(TrackedObjects, "/flmm_grounding/tracks", self._on_tracks, RELIABLE)
        self.tracking_at: float | None = None         # the second of the run tracking was switched on (--track)
        self.track_updates: list[float] = []          # seconds per tracking update (its stages but 3D)
        self.track_3d: list[float] = []               # seconds of its objects' 3D poses (depth_3d)
        self.track_states: Counter = Counter()         # "tracking" / "lost": objects on ~/tracks over the run
        self.depth, self.info = depth_and_info()
        self.lock = threading.Lock()
        self.published_frames = 0
        # instruction -> its sends, oldest first: {"sent": monotonic time, "sent_ns": wall-clock ns, "objects": seconds
        # from sending to its masks' arrival on ~/objects, "result": its result record, "failed": True when the result
        # was an error (no masks will come)}
        self.sent: dict[str, list[dict]] = defaultdict(list)
        self.sent_count = 0
        self.results: list[dict] = []
        self.unmatched = 0
        self.unmatched_objects = 0
        self.statuses: list[str] = []
        self.streaming = False
        self.create_timer(1.0 / fps, self._publish_frame)
        self.create_timer(1.0 / rate, self._publish_instruction)

    def _publish_frame(self):
        if not self.streaming:
            return
        stamp = self.get_clock().now().to_msg()
        image = self.frames[self.published_frames % len(self.frames)]
        for msg in (image, self.depth, self.info):
            msg.header.stamp = stamp
        self.depth_pub.publish(self.depth)
        self.info_pub.publish(self.info)
        self.image_pub.publish(image)
        self.published_frames += 1

    def _publish_instruction(self):
        if not self.streaming or self.published_frames == 0:
            return
        text = self.instructions[self.sent_count % len(self.instructions)]
        with self.lock:
            self.sent[text].append({"sent": time.monotonic(), "sent_ns": time.time_ns(), "objects": None,
                                    "result": None, "failed": False, "tracking": self.tracking_at is not None})
            self.sent_count += 1
        self.instruction_pub.publish(String(data=text))

    @staticmethod
    def _since(entry: dict, info) -> float:
        """Seconds from sending `entry` to the middleware's reception of a message (`MessageInfo`), so that the
        executor's turn order (busy publishing camera frames) does not count; the callback's time without one."""
        received = info.get("received_timestamp", 0) if info else 0
        return (received - entry["sent_ns"]) / 1e9 if received > 0 else time.monotonic() - entry["sent"]

    def _on_objects(self, msg: GroundingResult, info):
        """The masks of the oldest send of this text that has none and did not fail. Each topic arrives in order,
        but the two topics are not ordered with each other, so the result may already be there."""
        with self.lock:
            entry = next((e for e in self.sent.get(msg.instruction, ()) if e["objects"] is None and not e["failed"]),
                         None)
            if entry is None:
                self.unmatched_objects += 1
                return
            entry["objects"] = self._since(entry, info)
            if entry["result"] is not None:
                entry["result"]["mask_latency"] = entry["objects"]

    def _on_result(self, msg: GroundingResult, info):
        now = time.monotonic()
        with self.lock:
            entry = next((e for e in self.sent.get(msg.instruction, ()) if e["result"] is None), None)
            if entry is None:
                self.unmatched += 1
                return
            sent_at = entry["sent"]
            entry["failed"] = not msg.success
            frame_age = (self.get_clock().now() - rclpy.time.Time.from_msg(msg.header.stamp)).nanoseconds / 1e9
            entry["result"] = record = {
                "latency": now - sent_at, "arrival_latency": self._since(entry, info),
                "mask_latency": entry["objects"], "node_mask_seconds": msg.mask_seconds,
                "success": msg.success, "code": msg.error_code, "error": msg.error,
                "stamp": (msg.header.stamp.sec, msg.header.stamp.nanosec), "frame_age_at_result": frame_age,
                "cached": msg.frame_cached, "received_at": now, "tracking": entry["tracking"]}
            self.results.append(record)

    def _on_tracks(self, msg: TrackedObjects):
        self.track_states.update(o.state for o in msg.objects)
        if msg.objects:
            stages = dict(zip(msg.stage_names, msg.stage_seconds))
            self.track_3d.append(stages.pop('depth_3d', 0.0))
            self.track_updates.append(sum(stages.values()))

    def _on_status(self, msg: String):
        self.statuses.append(msg.data)

    def outstanding(self) -> int:
        with self.lock:
            return sum(e["result"] is None for sends in self.sent.values() for e in sends)

    def masks_outstanding(self) -> int:
        """Successes whose masks (~/objects) have not arrived yet: the two topics are not ordered with each other,
        so the last result can come before its masks."""
        with self.lock:
            return sum(e["result"] is not None and e["result"]["success"] and e["objects"] is None
                       for sends in self.sent.values() for e in sends)


def depth_and_info() -> tuple[Image, CameraInfo]:
    """A table plane 0.8 m away, and a 640x480 pinhole camera."""
    mm = np.full((H, W), 800, np.uint16)
    depth = Image(height=H, width=W, encoding="16UC1", is_bigendian=0, step=2 * W)
    depth.data = array.array("B", mm.tobytes())
    info = CameraInfo(height=H, width=W, distortion_model="plumb_bob")
    info.k = [525.0, 0.0, W / 2, 0.0, 525.0, H / 2, 0.0, 0.0, 1.0]
    for msg in (depth, info):
        msg.header.frame_id = "camera_color_optical_frame"
    return depth, info


def camera_frames(count: int) -> list[Image]:
    """`count` different held-out scenes (the camera shows a new one on every frame)."""
    return [_image_msg(generate_scene(seed, (H, W)).image) for seed in split_seeds("test", count)]


def tracking_stream() -> tuple[list[Image], tuple[str, ...]]:
    """A held-out video that tracking can follow (objects slide along the table, the camera drifts: `shift`), played
    forwards and back so that it loops without a jump, and instructions naming its objects."""
    sequence = generate_sequence(TRACK_SEED, (H, W), "shift", length=60)
    order = list(range(sequence.length)) + list(range(sequence.length - 2, 0, -1))
    images = {t: _image_msg(sequence.frame(t).image) for t in range(sequence.length)}
    verbs = ("pick {}", "grab {}", "where is {}?")
    return [images[t] for t in order], tuple(verbs[i % len(verbs)].format(p) for i, p in enumerate(sequence.phrases))


def _image_msg(rgb: np.ndarray) -> Image:
    msg = rgb_to_image(rgb)
    msg.header.frame_id = "camera_color_optical_frame"
    return msg


def rss_slope(memory: list[tuple[float, float]], after: float, switch: float | None = None) -> float:
    """Least-squares RSS trend after the warm-up window, MiB per minute (0 with too few samples). With `switch` (the
    second of the run at which tracking started) each phase is measured after its first third and the larger trend
    (the faster growth) is returned: starting the tracker loads its sessions once, a step that is no leak."""
    last = memory[-1][0] if memory else 0.0
    phases = [(after, last + 1)] if switch is None else [(switch / 3, switch), (switch + (last - switch) / 3, last + 1)]
    slopes = []
    for start, stop in phases:
        points = [(t / 60, m) for t, m in memory if start <= t < stop]
        if len(points) >= 3:
            slopes.append(float(np.polyfit(*zip(*points), 1)[0]))
    return max(slopes, default=0.0)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="flmm_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = {"input_qos": args.input_qos, "busy_policy": "queue", "max_queued": args.max_queued,
                 "speak": False}
    camera_qos = RELIABLE if args.input_qos in ("RELIABLE", "DEFAULT") else SENSOR_DATA
    node = GroundingProcess(work, args.model or None, overrides, camera_qos=camera_qos)
    frames, instructions = tracking_stream() if args.track else (camera_frames(8), INSTRUCTIONS)
    camera = Camera(node.context, frames, instructions, args.fps, args.rate, camera_qos)
    node.executor.add_node(camera)
    memory: list[tuple[float, float]] = []
    exit_code = None
    try:
        node.wait_ready()
        while camera.image_pub.get_subscription_count() == 0 or camera.instruction_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        t0 = time.monotonic()
        camera.streaming = True
        while (elapsed := time.monotonic() - t0) < args.duration:
            memory.append((elapsed, node.rss_mb()))
            if args.track and camera.tracking_at is None and elapsed >= args.duration / 2:
                set_parameter(camera, "track_instructions", True)   # second half: every instruction tracks
                camera.tracking_at = elapsed
            time.sleep(min(args.memory_every, max(0.0, args.duration - elapsed)))
        camera.streaming = False
        drain_deadline = time.monotonic() + args.drain_timeout
        while (camera.outstanding() or camera.masks_outstanding()) and time.monotonic() < drain_deadline:
            time.sleep(0.1)
        memory.append((time.monotonic() - t0, node.rss_mb()))
        alive = node.alive()
        exit_code = node.stop(signal.SIGINT)
    finally:
        node.stop_spinning()                 # no camera timer may run while the camera node is destroyed
        node.executor.remove_node(camera)
        camera.destroy_node()
        node.close()
    return summarise(camera, memory, args, alive, work, exit_code)


def set_parameter(node: Node, name: str, value) -> None:
    """What `ros2 param set /flmm_grounding <name> <value>` does."""
    client = node.create_client(SetParameters, "/flmm_grounding/set_parameters")
    if not client.wait_for_service(timeout_sec=30):
        raise RuntimeError("no /flmm_grounding/set_parameters service")
    future = client.call_async(SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()]))
    deadline = time.monotonic() + 30
    while not future.done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"setting {name} timed out")
        time.sleep(0.05)
    if not future.result().results[0].successful:
        raise RuntimeError(f"setting {name}: {future.result().results[0].reason}")


def tracking_comparison(results: list[dict], updates: list[float], poses: list[float]) -> dict:
    """Time to mask without and with tracking running (halves of one run), and what one tracking update costs:
    tracking delays an instruction by at most one update when the difference stays below it."""
    def masks(tracking: bool) -> list[float]:
        return [r["mask_latency"] * 1e3 for r in results
                if r["success"] and r["mask_latency"] is not None and r["tracking"] == tracking]
    def node_masks(tracking: bool) -> list[float]:      # the node's own clock: no DDS or subscriber time
        return [r["node_mask_seconds"] * 1e3 for r in results
                if r["success"] and r["node_mask_seconds"] > 0 and r["tracking"] == tracking]

    def outside(tracking: bool) -> list[float]:   # DDS both ways and the node's wait for its executor
        return [(r["mask_latency"] - r["node_mask_seconds"]) * 1e3 for r in results
                if r["success"] and r["mask_latency"] is not None and r["node_mask_seconds"] > 0
                and r["tracking"] == tracking]

    without, with_tracking = masks(False), masks(True)
    return {"node_mask_ms_without_tracking_p50": percentile(node_masks(False), 50),
            "node_mask_ms_with_tracking_p50": percentile(node_masks(True), 50),
            "outside_node_ms_without_tracking_p50": percentile(outside(False), 50),
            "outside_node_ms_with_tracking_p50": percentile(outside(True), 50),
            "outside_node_ms_without_tracking_p95": percentile(outside(False), 95),
            "outside_node_ms_with_tracking_p95": percentile(outside(True), 95),
            "mask_ms_without_tracking_p50": percentile(without, 50),
            "mask_ms_with_tracking_p50": percentile(with_tracking, 50),
            "mask_ms_without_tracking_p95": percentile(without, 95),
            "mask_ms_with_tracking_p95": percentile(with_tracking, 95),
            "tracking_updates": len(updates), "tracking_update_ms_p50": percentile([u * 1e3 for u in updates], 50),
            "tracking_update_ms_p95": percentile([u * 1e3 for u in updates], 95),
            "tracking_3d_ms_p50": percentile([p * 1e3 for p in poses], 50)}


def summarise(camera: Camera, memory: list[tuple[float, float]], args, alive: bool, work: Path,
              exit_code: int | None) -> dict:
    results = camera.results
    ok = [r for r in results if r["success"]]
    latencies = [r["latency"] * 1e3 for r in ok]
    mask_latencies = [r["mask_latency"] * 1e3 for r in ok if r["mask_latency"] is not None]
    arrivals = [r["arrival_latency"] * 1e3 for r in ok]
    ahead = [(r["arrival_latency"] - r["mask_latency"]) * 1e3 for r in ok if r["mask_latency"] is not None]
    node_mask = [r["node_mask_seconds"] * 1e3 for r in ok if r["node_mask_seconds"] > 0]
    grounded_frames = {r["stamp"] for r in ok}
    window = min(60.0, args.duration / 3)
    first = [m for t, m in memory if t <= window]
    last = [m for t, m in memory if t >= memory[-1][0] - window]
    return {
        "duration_s": args.duration, "fps": args.fps, "instruction_rate_hz": args.rate,
        "instructions_sent": camera.sent_count, "results_received": len(results),
        "lost": camera.outstanding(), "unmatched_results": camera.unmatched,
        "successes": len(ok), "errors": dict(Counter(r["code"] for r in results if not r["success"])),
        "error_examples": sorted({r["error"] for r in results if not r["success"]})[:5],
        "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                       "p99": percentile(latencies, 99), "max": max(latencies, default=float("nan"))},
        "mask_latency_ms": {"p50": percentile(mask_latencies, 50), "p95": percentile(mask_latencies, 95),
                            "p99": percentile(mask_latencies, 99), "max": max(mask_latencies, default=float("nan"))},
        "result_arrival_ms": {"p50": percentile(arrivals, 50), "p95": percentile(arrivals, 95),
                              "p99": percentile(arrivals, 99), "max": max(arrivals, default=float("nan"))},
        "masks_received": len(mask_latencies), "unmatched_objects": camera.unmatched_objects,
        "masks_ahead_of_result_ms_p50": percentile(ahead, 50), "masks_after_their_result": sum(a < 0 for a in ahead),
        "node_mask_seconds_ms_p50": percentile(node_mask, 50),
        "frame_age_at_result_ms": {"p50": percentile([r["frame_age_at_result"] * 1e3 for r in ok], 50),
                                   "max": max((r["frame_age_at_result"] * 1e3 for r in ok), default=float("nan"))},
        "frames_published": camera.published_frames, "frames_grounded": len(grounded_frames),
        "frames_dropped_by_design": camera.published_frames - len(grounded_frames),
        "rss_mib": {"start": memory[0][1], "first_window_mean": statistics.fmean(first),
                    "last_window_mean": statistics.fmean(last), "max": max(m for _, m in memory),
                    "window_s": window},
        "rss_growth_mib": statistics.fmean(last) - statistics.fmean(first),
        "rss_slope_mib_per_min": rss_slope(memory, window, camera.tracking_at),
        "node_alive_at_end": alive, "node_exit_code_after_sigint": exit_code, "node_log": str(work / "node.log"),
        "rss_trace": [(round(t, 1), round(m, 1)) for t, m in memory],
        "tracking": tracking_comparison(results, camera.track_updates, camera.track_3d) | {
            "tracked_object_states": dict(camera.track_states)} if args.track else None,
    }


def print_report(s: dict) -> None:
    lat, mask, age, rss = s["latency_ms"], s["mask_latency_ms"], s["frame_age_at_result_ms"], s["rss_mib"]
    arrival = s["result_arrival_ms"]
    print(f"soak: {s['duration_s']:.0f} s, camera {s['fps']:.0f} Hz 640x480 rgb8 + 16UC1 depth + camera_info, "
          f"instructions {s['instruction_rate_hz']:.1f} Hz")
    rows = [
        ("instructions sent", s["instructions_sent"]),
        ("results received", s["results_received"]),
        ("lost (no result)", s["lost"]),
        ("successes", s["successes"]),
        ("errors", ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"),
        ("masks received (~/objects)", s["masks_received"]),
        ("time to mask p50 / p95 / p99 / max ms",
         f"{mask['p50']:.0f} / {mask['p95']:.0f} / {mask['p99']:.0f} / {mask['max']:.0f}"),
        ("time to result p50 / p95 / p99 / max ms",
         f"{arrival['p50']:.0f} / {arrival['p95']:.0f} / {arrival['p99']:.0f} / {arrival['max']:.0f}"),
        ("latency p50 / p95 / p99 / max ms", f"{lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f}"),
        ("masks ahead of their result p50 ms", f"{s['masks_ahead_of_result_ms_p50']:.0f}"
         f" ({s['masks_after_their_result']} arrived after it)"),
        ("node's mask_seconds p50 ms", f"{s['node_mask_seconds_ms_p50']:.0f}"),
        ("frame age at result p50 / max ms", f"{age['p50']:.0f} / {age['max']:.0f}"),
        ("frames published", s["frames_published"]),
        ("frames grounded", s["frames_grounded"]),
        ("frames dropped by design", s["frames_dropped_by_design"]),
        (f"node RSS MiB: first / last {rss['window_s']:.0f} s", f"{rss['first_window_mean']:.1f} / {rss['last_window_mean']:.1f}"
         f" (growth {s['rss_growth_mib']:+.1f}, max {rss['max']:.1f})"),
        ("node RSS trend after warm-up (--track: faster phase)", f"{s['rss_slope_mib_per_min']:+.2f} MiB/min"),
        ("node alive at end", s["node_alive_at_end"]),
        ("node exit code after SIGINT", s["node_exit_code_after_sigint"]),
    ]
    if s["tracking"]:
        t = s["tracking"]
        rows += [
            ("time to mask p50 / p95 ms, no tracking", f"{t['mask_ms_without_tracking_p50']:.0f} / "
                                                        f"{t['mask_ms_without_tracking_p95']:.0f}"),
            ("time to mask p50 / p95 ms, tracking", f"{t['mask_ms_with_tracking_p50']:.0f} / "
                                                     f"{t['mask_ms_with_tracking_p95']:.0f}"),
            ("node's mask_seconds p50 ms, no tracking / tracking",
             f"{t['node_mask_ms_without_tracking_p50']:.0f} / {t['node_mask_ms_with_tracking_p50']:.0f}"),
            ("outside the node p50 / p95 ms, no tracking / tracking",
             f"{t['outside_node_ms_without_tracking_p50']:.0f} / {t['outside_node_ms_without_tracking_p95']:.0f}, "
             f"{t['outside_node_ms_with_tracking_p50']:.0f} / {t['outside_node_ms_with_tracking_p95']:.0f}"),
            ("tracking updates, p50 / p95 ms", f"{t['tracking_updates']}, {t['tracking_update_ms_p50']:.1f} / "
                                               f"{t['tracking_update_ms_p95']:.1f}"),
            ("tracking 3D poses p50 ms (not in the update)", f"{t['tracking_3d_ms_p50']:.1f}"),
            ("tracked objects on ~/tracks by state", ", ".join(f"{k}: {v}" for k, v in
                                                               sorted(t["tracked_object_states"].items())) or "none"),
        ]
    for name, value in rows:
        print(f"{name:<38} {value}")
    for example in s["error_examples"]:
        print(f"  error: {example}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of streaming")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=2.0, help="instructions per second")
    parser.add_argument("--model", default="", help="model bundle (default: the embedded tabletop-tiny)")
    parser.add_argument("--input-qos", default="SENSOR_DATA",
                        help="the node's input QoS (the camera publishes best effort for SENSOR_DATA / "
                             "BEST_EFFORT, reliably otherwise)")
    parser.add_argument("--max-queued", type=int, default=2)
    parser.add_argument("--track", action="store_true",
                        help="second half: every instruction also starts tracking (track_instructions), to measure "
                             "what tracking costs the instructions")
    parser.add_argument("--memory-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--work", help="directory for the node's params and log (default: a temp dir)")
    parser.add_argument("--json", help="also write the summary (with the RSS trace) here")
    args = parser.parse_args()
    summary = run(args)
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    healthy = summary["node_alive_at_end"] and summary["node_exit_code_after_sigint"] == 0
    return 0 if summary["lost"] == 0 and summary["unmatched_results"] == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
