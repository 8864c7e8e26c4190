"""Matching depth / camera_info to an image by stamp (StampMatcher), without DDS."""
from types import SimpleNamespace

from flmm_ros.ros.stamp_sync import StampMatcher, stamp_ns


def test_stamp_matcher_picks_closest_within_slop():
    matcher = StampMatcher(slop_s=0.01, capacity=3)
    assert matcher.match(0) is None
    for t_ms in (100, 133, 166):
        matcher.add(t_ms * 1_000_000, f"depth{t_ms}")
    assert matcher.match(131_000_000) == 'depth133'
    assert matcher.match(175_999_999) == 'depth166'   # 9.999999 ms away
    assert matcher.match(176_000_001) is None         # just outside the slop
    assert matcher.match(150_000_000) is None         # between two, 16-17 ms from each


def test_stamp_matcher_forgets_oldest_and_exact_slop_zero():
    matcher = StampMatcher(slop_s=0.0, capacity=2)
    for t in (1, 2, 3):
        matcher.add(t, t)
    assert len(matcher) == 2 and matcher.match(1) is None and matcher.match(3) == 3


def test_stamp_ns():
    assert stamp_ns(SimpleNamespace(sec=3, nanosec=25)) == 3_000_000_025
