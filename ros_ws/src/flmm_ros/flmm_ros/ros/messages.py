"""Core results (numpy, dataclasses) -> ROS messages: GroundingResult, GroundedObject, MarkerArray."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from builtin_interfaces.msg import Duration
from flmm_msgs.msg import GroundedObject as GroundedObjectMsg
from flmm_msgs.msg import GroundingResult as GroundingResultMsg
from flmm_msgs.msg import TrackedObject as TrackedObjectMsg
from flmm_msgs.msg import TrackedObjects as TrackedObjectsMsg
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, Vector3
from sensor_msgs.msg import RegionOfInterest
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from flmm_ros.geometry3d import Object3D
from flmm_ros.grounding.types import GroundedObject
from flmm_ros.overlay import object_colour
from flmm_ros.ros.image_conversions import mono_to_image

MARKER_NAMESPACE = 'flmm_grounding'
MIN_MARKER_SIZE = 0.005  # m; RViz draws nothing for a zero-size cube
GRASP_POINT_DIAMETER = 0.02
APPROACH_LENGTH = 0.10


def _point(xyz) -> Point:
    return Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))


def _pose(position, quaternion) -> Pose:
    q = [float(v) for v in quaternion]
    return Pose(position=_point(position), orientation=Quaternion(x=q[0], y=q[1], z=q[2], w=q[3]))


def box_message(box: Sequence[int]) -> RegionOfInterest:
    """(x0, y0, x1, y1), x1/y1 exclusive -> RegionOfInterest (offset + size)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return RegionOfInterest(x_offset=x0, y_offset=y0, width=max(x1 - x0, 0), height=max(y1 - y0, 0))


def object_message(obj: GroundedObject, header: Header, pose: Object3D | None = None,
                   pose_status: str = '') -> GroundedObjectMsg:
    """One GroundedObject; `pose_status` says why there is no pose (ignored when there is one)."""
    start, end = obj.answer_span if obj.answer_span is not None else (-1, -1)
    msg = GroundedObjectMsg(phrase=obj.phrase, found=bool(obj.found), presence=float(obj.presence),
                            instance=int(obj.instance), answer_start=int(start), answer_end=int(end),
                            score=float(obj.score), box=box_message(obj.box),
                            mask=mono_to_image(np.asarray(obj.mask, dtype=np.uint8), header),
                            pose_status='' if pose is not None else pose_status)
    return _with_pose(msg, pose, header)


def _with_pose(msg, pose: Object3D | None, header: Header):
    """Fill a GroundedObject / TrackedObject's 3D fields from `pose` (none: has_pose stays false)."""
    if pose is not None:
        msg.has_pose = True
        msg.grasp_pose = PoseStamped(header=header, pose=_pose(pose.centroid, pose.quaternion))
        msg.centroid = _point(pose.centroid)
        msg.size = Vector3(x=float(pose.size[0]), y=float(pose.size[1]), z=float(pose.size[2]))
    return msg


def tracks_message(update, header: Header, poses: Sequence[Object3D | None], pose_status: Sequence[str],
                   timings: Mapping[str, float]) -> TrackedObjectsMsg:
    """One frame of the tracker (a grounding.tracking.TrackingUpdate) as flmm_msgs/TrackedObjects."""
    objects = []
    for obj, pose, status in zip(update.objects, poses, pose_status, strict=True):
        msg = TrackedObjectMsg(track_id=int(obj.track_id), phrase=obj.phrase, state=obj.state,
                               lost_reason=obj.lost_reason, score=float(obj.score), confidence=float(obj.confidence),
                               frames_lost=int(obj.frames_lost), age=int(obj.age), regrounded=bool(obj.regrounded),
                               box=box_message(obj.box), mask=mono_to_image(np.asarray(obj.mask, np.uint8), header),
                               pose_status='' if pose is not None else status)
        objects.append(_with_pose(msg, pose, header))
    return TrackedObjectsMsg(header=header, frame_index=int(update.frame_index), objects=objects,
                             stage_names=list(timings), stage_seconds=[float(v) for v in timings.values()])


def result_message(instruction: str, header: Header, *, answer: str = '',
                   objects: Sequence[GroundedObject] = (), poses: Sequence[Object3D | None] = (),
                   pose_status: Sequence[str] = (), track_ids: Sequence[int] = (),
                   timings: Mapping[str, float] | None = None,
                   total_seconds: float = 0.0, mask_seconds: float = 0.0, frame_cached: bool = False,
                   warnings: Sequence[str] = (), not_found: Sequence[str] = (), error_code: str = '',
                   error: str = '') -> GroundingResultMsg:
    """One GroundingResult; success exactly when error_code is empty."""
    poses = list(poses) or [None] * len(objects)
    pose_status = list(pose_status) or [''] * len(objects)
    timings = dict(timings or {})
    return GroundingResultMsg(
        header=header, instruction=instruction, answer=answer,
        objects=[object_message(obj, header, pose, status)
                 for obj, pose, status in zip(objects, poses, pose_status, strict=True)],
        track_ids=[int(t) for t in track_ids], not_found=list(not_found),
        stage_names=list(timings), stage_seconds=[float(v) for v in timings.values()],
        total_seconds=float(total_seconds), mask_seconds=float(mask_seconds), frame_cached=bool(frame_cached),
        warnings=list(warnings),
        success=not error_code, error_code=error_code, error=error)


def _colour(index: int, alpha: float) -> ColorRGBA:
    r, g, b = object_colour(index)
    return ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=alpha)


def marker_array(objects: Sequence[GroundedObject], poses: Sequence[Object3D | None], header: Header,
                 indices: Sequence[int] | None = None) -> MarkerArray:
    """RViz markers: DELETEALL (clears the previous result), then per object with 3D a box, the grasp point,
    the approach arrow and the phrase. Object k's markers have ids 4k..4k+3 and the overlay's colour;
    `indices` gives each object's k (default: its position), e.g. its track id."""
    markers = [Marker(header=header, ns=MARKER_NAMESPACE, action=Marker.DELETEALL)]
    indices = list(range(len(objects))) if indices is None else list(indices)
    for index, obj, pose in zip(indices, objects, poses, strict=True):
        if pose is None:
            continue
        base = dict(header=header, ns=MARKER_NAMESPACE, action=Marker.ADD, lifetime=Duration())
        size = np.maximum(np.asarray(pose.size, dtype=float), MIN_MARKER_SIZE)
        markers.append(Marker(**base, id=4 * index, type=Marker.CUBE, pose=_pose(pose.box_center, pose.quaternion),
                              scale=Vector3(x=size[0], y=size[1], z=size[2]), color=_colour(index, 0.4)))
        markers.append(Marker(**base, id=4 * index + 1, type=Marker.SPHERE,
                              pose=_pose(pose.centroid, (0.0, 0.0, 0.0, 1.0)),
                              scale=Vector3(x=GRASP_POINT_DIAMETER, y=GRASP_POINT_DIAMETER, z=GRASP_POINT_DIAMETER),
                              color=_colour(index, 1.0)))
        approach = np.asarray(pose.rotation, dtype=float)[:, 2]  # local z: away from the camera, into the object
        start = np.asarray(pose.centroid, dtype=float) - APPROACH_LENGTH * approach
        markers.append(Marker(**base, id=4 * index + 2, type=Marker.ARROW, pose=_pose((0, 0, 0), (0, 0, 0, 1)),
                              points=[_point(start), _point(pose.centroid)],
                              scale=Vector3(x=0.008, y=0.016, z=0.025), color=_colour(index, 1.0)))
        label_at = np.asarray(pose.box_center, dtype=float) - np.array([0.0, size[1] / 2 + 0.03, 0.0])  # above (y down)
        markers.append(Marker(**base, id=4 * index + 3, type=Marker.TEXT_VIEW_FACING,
                              pose=_pose(label_at, (0.0, 0.0, 0.0, 1.0)), text=f"{obj.phrase} {obj.score:.2f}",
                              scale=Vector3(z=0.04), color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)))
    return MarkerArray(markers=markers)
