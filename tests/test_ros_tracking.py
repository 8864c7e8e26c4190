"""Tracking through the node over real DDS (issue #17): an action goal with `track: true` grounds the target on
one frame, then ~/tracks follows it frame by frame with a stable id, says when it is lost (it leaves the view)
and when it is found again with the same id, and ~/stop_tracking ends it; every case is on ~/status.
Embedded model, a generated sequence with exact masks.

Each frame is published only after the tracks of the previous one arrived, so no frame is skipped by the
node's latest-frame policy and the test does not depend on the machine's speed. Each test stamps its frames from a
base of its own and reads only the status lines that came after it began, so the tests hold in any order and
repeated (`--count`) against one node.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from flmm_msgs.msg import GroundingResult
from std_srvs.srv import Trigger

from flmm_ros.ros.image_conversions import rgb_to_image
from flmm_ros.ros.testing import GroundingProcess, send_goal, stamped, wait_future, wait_result
from flmm_ros.tabletop.sequences import generate_sequence

pytestmark = pytest.mark.ros

# The purple ball leaves the view at frame 21 and is back whole from frame 35.
SEQUENCE = generate_sequence(3, (240, 320), scenario='reentry')
TARGET = SEQUENCE.targets[0]
STAMP_BASES = itertools.count(1000, 1000)      # seconds: each test's frames get stamps of their own


@pytest.fixture(scope='module')
def node(tmp_path_factory, repetition):
    process = GroundingProcess(tmp_path_factory.mktemp('tracking'), None,
                               {'input_qos': 'RELIABLE', 'diagnostics_period': 0.1, 'max_frame_age': 0.0,
                                'use_3d': False})
    try:
        process.wait_ready()
        yield process
    finally:
        process.close()


def publish(probe, t: int, base: int):
    image = stamped(rgb_to_image(SEQUENCE.frame(t).image), base + t, frame_id='camera')
    probe.image_pub.publish(image)
    return image.header


def stamp_of(t: int, base: int):
    return stamped(rgb_to_image(SEQUENCE.frame(0).image[:8, :8]), base + t, frame_id='camera').header


def tracks_for(probe, header):
    def find():
        return next((m for m in probe.outputs['tracks'] if m.header.stamp == header.stamp), None)
    probe.wait_for(lambda: find() is not None, 60, f"the tracks of frame {header.stamp.sec}")
    return find()


def mask_of(obj) -> np.ndarray:
    return np.frombuffer(obj.mask.data, np.uint8).reshape(obj.mask.height, obj.mask.width) > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def statuses(probe, since: int = 0) -> list[str]:
    return [s.data for s in probe.outputs['status'][since:]]


def start_tracking(probe, base: int) -> int:
    """A goal with track: true on the sequence's first frame; its one track id."""
    probe.wait_frame(publish(probe, 0, base))
    phrase = SEQUENCE.phrases[0]
    status, result = wait_result(send_goal(probe, f'pick {phrase}', track=True))
    assert result.success, result.error
    assert [o.phrase for o in result.objects] == [phrase] and len(result.track_ids) == 1
    return result.track_ids[0]


def test_a_tracked_goal_follows_its_target_with_one_id_through_leaving_and_reentering_the_view(node):
    probe, base, since = node.probe, next(STAMP_BASES), len(node.probe.outputs['status'])
    track_id = start_tracking(probe, base)
    probe.wait_for(lambda: any(s.startswith(f'tracking #{track_id}') for s in statuses(probe, since)), 30,
                   "status 'tracking'")

    ious, states = [], []
    for t in range(1, 50):
        frame = tracks_for(probe, publish(probe, t, base))
        assert [o.track_id for o in frame.objects] == [track_id]        # one stable id, frame after frame
        (obj,) = frame.objects
        states.append((t, obj.state, obj.lost_reason))
        truth = SEQUENCE.frame(t).masks[TARGET]
        if truth.any() and t < 19:
            ious.append(iou(mask_of(obj), truth))
    visible = [state for t, state, _ in states if t < 19]
    assert visible.count('tracking') >= 0.9 * len(visible), states
    assert np.mean(ious) >= 0.6, f"mean IoU {np.mean(ious):.2f} while the target was in view"
    gone = [(state, reason) for t, state, reason in states if 21 <= t <= 32]
    assert ('lost', '') not in gone and any(state == 'lost' and reason for state, reason in gone), states
    assert any(s.startswith(f'track #{track_id}') and 'lost (' in s for s in statuses(probe, since))
    back = [t for t, state, _ in states if t >= 35 and state == 'tracking']
    assert back, f"never found again after re-entering the view: {states[34:]}"
    last = tracks_for(probe, stamp_of(back[-1], base)).objects[0]
    assert iou(mask_of(last), SEQUENCE.frame(back[-1]).masks[TARGET]) > 0.5
    # The overlay follows the tracks (the probe subscribes to it): the tracked frame with its mask drawn.
    overlay = probe.output_with_header('overlay', stamp_of(back[-1], base), timeout=60)
    drawn = np.frombuffer(overlay.data, np.uint8).reshape(overlay.height, overlay.width, 3)
    changed = (drawn != SEQUENCE.frame(back[-1]).image).any(-1)
    assert changed[mask_of(last)].mean() > 0.8, "the overlay does not show the tracked mask"
    assert any(s.startswith(f'track #{track_id}') and 'found again' in s for s in statuses(probe, since))


def test_stop_tracking_ends_the_tracks_and_says_so(node):
    probe = node.probe
    start_tracking(probe, next(STAMP_BASES))
    since, tracks_since = len(probe.outputs['status']), len(probe.outputs['tracks'])
    client = probe.create_client(Trigger, '/flmm_grounding/stop_tracking')
    assert client.wait_for_service(timeout_sec=30)
    response = wait_future(client.call_async(Trigger.Request()), 30, 'stop_tracking')
    assert response.success and response.message.startswith('stopped tracking 1 object')
    probe.wait_for(lambda: any(m.objects == [] for m in probe.outputs['tracks'][tracks_since:]), 30,
                   'an empty ~/tracks')
    assert 'tracking stopped (~/stop_tracking)' in statuses(probe, since)
    probe.wait_diagnostic('tracks_tracking', lambda v: v == '0', 'no tracks in /diagnostics')
    again = wait_future(client.call_async(Trigger.Request()), 30, 'stop_tracking again')
    assert again.success and again.message == 'nothing was being tracked'


def test_a_goal_with_its_own_image_is_answered_but_not_tracked(node):
    probe = node.probe
    image = stamped(rgb_to_image(SEQUENCE.frame(0).image), 5000)
    status, result = wait_result(send_goal(probe, f'pick {SEQUENCE.phrases[0]}', image, track=True))
    assert result.success and list(result.track_ids) == []
    assert any('not tracked' in w for w in result.warnings)
    assert result.error_code == '' and isinstance(result, GroundingResult)


def test_the_client_starts_and_stops_tracking(node):
    import os
    import subprocess
    import sys
    probe = node.probe
    probe.wait_frame(publish(probe, 0, next(STAMP_BASES)))
    env = dict(os.environ, ROS_DOMAIN_ID=str(node.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')

    def client(*args):
        return subprocess.run([sys.executable, '-m', 'flmm_ros.ros.client', *args], env=env, capture_output=True,
                              text=True, timeout=120)

    started = client(f'pick {SEQUENCE.phrases[0]}', '--track')
    assert started.returncode == 0, started.stdout + started.stderr
    assert 'tracking: #' in started.stdout and SEQUENCE.phrases[0] in started.stdout
    stopped = client('--stop-tracking')
    assert stopped.returncode == 0 and 'stopped tracking 1 object' in stopped.stdout, stopped.stdout + stopped.stderr
