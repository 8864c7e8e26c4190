"""Tracking scores on hand-made outputs (each rule of track_metrics.py), and the evaluation tool end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flmm_ros.tabletop.track_metrics import Output, score_sequence, summarize

ROOT = Path(__file__).resolve().parents[1]
H, W = 20, 40


def _box(x0, x1):
    m = np.zeros((H, W), bool)
    m[5:15, x0:x1] = True
    return m


A, B = _box(0, 10), _box(20, 30)          # two objects
EMPTY = np.zeros((H, W), bool)


def _score(frames, outputs, fractions=None):
    """frames: per frame (mask of object 0, mask of object 1); object 0 is the target."""
    gt = [np.stack(f) for f in frames]
    vis = fractions or [np.array([1.0 if f[0].any() else 0.0, 1.0]) for f in frames]
    return score_sequence("pan", gt, vis, [0], [[o] for o in outputs])


def test_perfect_tracking_scores_one():
    s = _score([(A, B)] * 5, [Output(1, "tracking", A)] * 5)
    assert s.mean_iou == 1.0 and s.tracked_iou == 1.0 and s.lost_rate == 0 and s.id_switches == 0
    assert s.visible_frames == 4                       # frame 0 (the grounding) is not scored


def test_lost_frames_count_as_empty_masks_and_in_the_lost_rate():
    outs = [Output(1, "tracking", A)] * 3 + [Output(1, "lost", A)] * 2
    s = _score([(A, B)] * 5, outs)
    assert s.lost_rate == 0.5 and s.mean_iou == 0.5 and s.tracked_iou == 1.0


def test_a_track_jumping_to_another_object_is_a_switch():
    s = _score([(A, B)] * 5, [Output(1, "tracking", A)] * 3 + [Output(1, "tracking", B)] * 2)
    assert s.id_switches == 1


def test_the_object_coming_back_under_a_new_id_is_a_switch():
    s = _score([(A, B)] * 5, [Output(1, "tracking", A)] * 3 + [Output(2, "tracking", A)] * 2)
    assert s.id_switches == 1


def test_two_masks_on_one_object_match_it_once():
    gt = [np.stack((A, B))] * 3
    outs = [[Output(1, "tracking", A), Output(2, "tracking", A)]] * 3
    s = score_sequence("pan", gt, [np.ones(2)] * 3, [0, 1], outs)
    assert s.id_switches == 0


def test_recovery_after_the_target_hides_and_shows_again():
    frames = [(A, B), (A, B), (EMPTY, B), (EMPTY, B), (A, B), (A, B), (A, B)]
    outs = [Output(1, "tracking", A)] * 2 + [Output(1, "lost", EMPTY)] * 3 + [Output(1, "tracking", A)] * 2
    s = _score(frames, outs)
    assert s.reentries == 1 and s.recovered == 1 and s.frames_to_recover == [1]
    assert s.hidden_frames == 2 and s.hidden_tracked == 0.0
    never = _score(frames, [Output(1, "tracking", A)] * 2 + [Output(1, "tracking", B)] * 5)
    assert never.recovered == 0 and never.hidden_tracked == 1.0


def test_marginal_frames_are_left_out():
    fractions = [np.array([1.0, 1.0]), np.array([0.05, 1.0]), np.array([1.0, 1.0])]
    s = _score([(A, B)] * 3, [Output(1, "tracking", A), Output(1, "lost", A), Output(1, "tracking", A)], fractions)
    assert s.visible_frames == 1 and s.hidden_frames == 0 and s.lost_rate == 0


def test_summary_pools_sequences():
    a = _score([(A, B)] * 5, [Output(1, "tracking", A)] * 5)
    b = _score([(A, B)] * 5, [Output(1, "tracking", A)] * 3 + [Output(1, "lost", A)] * 2)
    summary = summarize([a, b])
    assert summary["sequences"] == 2 and summary["mean_iou"] == pytest.approx(0.75)
    assert summary["lost_rate"] == pytest.approx(0.25) and summary["id_switches_no_reentry"] == 0


def test_the_evaluation_tool_runs_on_the_embedded_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flmm_ros.tabletop.track_eval", "--count", "1",
                          "--methods", "ours,keep_first", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["methods"]) == {"ours", "keep_first"}
    ours = result["methods"]["ours"]
    assert ours["sequences"] == 1 and 0 <= ours["mean_iou"] <= 1 and ours["ms_per_frame"] > 0
    assert "| ours |" in out and "| keep_first |" in out
