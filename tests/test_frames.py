"""The latest-frame store and what it says about the stream (no DDS)."""
from flmm_ros.ros.frames import FrameStore


def test_only_the_latest_camera_frame_is_kept_and_goal_images_do_not_replace_it():
    store = FrameStore()
    assert store.latest is None and store.describe() == '0 frames received'
    first = store.add('a')
    second = store.add('b')
    goal = store.add('goal image', from_camera=False)
    assert store.latest is second and second.seq > first.seq and goal.seq > second.seq
    assert not goal.from_camera and store.received == 2


def test_describe_says_when_the_last_frame_came_and_what_the_transport_lost():
    store = FrameStore()
    frame = store.add('a')
    store.note_lost(3)
    store.note_lost(-1)   # a bogus count never lowers the total
    text = store.describe(now=frame.received + 4.25)
    assert text.startswith('1 frame received, the last 4.2 s ago') or 'the last 4.3 s ago' in text
    assert '3 lost in transport' in text
