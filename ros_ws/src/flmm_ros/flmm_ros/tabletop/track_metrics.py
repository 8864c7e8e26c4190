"""Scoring a tracker's output on a sequence with exact per-frame masks (no model needed; see track_eval.py).

Per frame the method reports, for each phrase j it was asked to track, one output: a track id, a state
(tracking | lost) and a mask. A target object is *visible* on a frame when at least VISIBLE of its silhouette
shows, *hidden* below HIDDEN (occluded or out of view); frames in between are left out of the IoU and the
lost rate. Frame 0 (the grounding itself) is not scored.

- IoU: per target, the mean over its visible frames of IoU(output mask, true mask), the mask of a lost
  track counting as empty (IoU 0); per sequence the mean over its targets.
- tracked IoU: the same over only the visible frames on which the track reports a mask (how good the
  published masks are; how often there is none is the lost rate).
- lost rate: the share of a target's visible frames in which its track is lost.
- hidden tracked: the share of a target's hidden frames in which its track still reports a mask.
- id switches: output masks are matched one to one to the objects they overlap with IoU >= MATCH_IOU. A new
  (track, object) pair counts as one switch when the track last matched another object, or the object
  last matched another track (CLEAR-MOT's ID switches, plus a track jumping to another object).
- recovery: a target that was hidden (after being visible) and shows again has re-entered; it is recovered
  when its own track (the same id as before) matches it again before it hides again or the sequence ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VISIBLE = 0.15
HIDDEN = 0.02
MATCH_IOU = 0.5


@dataclass
class Output:
    """What a method reports for one phrase on one frame."""
    track_id: int
    state: str                       # tracking | lost
    mask: np.ndarray                 # (H, W) bool (ignored while lost)


@dataclass
class SequenceScore:
    scenario: str
    targets: int
    mean_iou: float                  # mean over targets of their mean IoU on visible frames (lost = 0)
    tracked_iou: float               # the same over the visible frames with a mask (nan when none)
    lost_rate: float                 # over all targets' visible frames
    hidden_tracked: float            # over all targets' hidden frames (nan when none)
    id_switches: int
    reentries: int
    recovered: int
    frames_to_recover: list[int] = field(default_factory=list)
    visible_frames: int = 0
    hidden_frames: int = 0

    @property
    def has_reentry(self) -> bool:
        return self.reentries > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _match(outputs: list[Output], masks: np.ndarray) -> dict[int, int]:
    """track id -> object, one to one: pairs with IoU >= MATCH_IOU, best first."""
    pairs = []
    for out in outputs:
        if out.state == "tracking" and out.mask.any():
            pairs += [(iou(out.mask, m), out.track_id, k) for k, m in enumerate(masks) if m.any()]
    matched: dict[int, int] = {}
    for score, track_id, k in sorted(pairs, reverse=True):
        if score >= MATCH_IOU and track_id not in matched and k not in matched.values():
            matched[track_id] = k
    return matched


def score_sequence(scenario: str, gt_masks: list[np.ndarray], visible: list[np.ndarray], targets: list[int],
                   outputs: list[list[Output]]) -> SequenceScore:
    """gt_masks[t]: (K, H, W) bool true masks of all objects; visible[t]: (K,) visible fractions; targets[j]:
    the object phrase j names; outputs[t][j]: the method's output for phrase j on frame t (t = 0 included)."""
    ious: list[list[float]] = [[] for _ in targets]
    tracked_ious: list[list[float]] = [[] for _ in targets]
    lost = vis_frames = hidden_tracked = hid_frames = 0
    switches = 0
    last_obj: dict[int, int] = {}       # track id -> object it last matched
    last_track: dict[int, int] = {}     # object -> track id that last matched it
    # Re-entry bookkeeping per target: was it seen, is it hidden now, frame it re-entered, original id.
    seen = [False] * len(targets)
    hidden_now = [False] * len(targets)
    reentered_at: list[int | None] = [None] * len(targets)
    own_id = [outputs[0][j].track_id for j in range(len(targets))]
    reentries = recovered = 0
    to_recover: list[int] = []
    for t in range(1, len(outputs)):
        masks, fractions = gt_masks[t], visible[t]
        matched = _match(outputs[t], masks)
        for track_id, obj in matched.items():
            if last_obj.get(track_id, obj) != obj or last_track.get(obj, track_id) != track_id:
                switches += 1
            last_obj[track_id], last_track[obj] = obj, track_id
        for j, k in enumerate(targets):
            out = outputs[t][j]
            tracking = out.state == "tracking" and out.mask.any()
            if fractions[k] >= VISIBLE:
                vis_frames += 1
                lost += not tracking
                ious[j].append(iou(out.mask, masks[k]) if tracking else 0.0)
                if tracking:
                    tracked_ious[j].append(ious[j][-1])
                if hidden_now[j] and seen[j]:
                    reentries += 1
                    reentered_at[j] = t
                seen[j], hidden_now[j] = True, False
                if reentered_at[j] is not None and matched.get(own_id[j]) == k:
                    recovered += 1
                    to_recover.append(t - reentered_at[j])
                    reentered_at[j] = None
            elif fractions[k] < HIDDEN:
                hid_frames += 1
                hidden_tracked += tracking
                hidden_now[j] = True
                reentered_at[j] = None          # hid again before it was recovered
    per_target = [float(np.mean(v)) for v in ious if v]
    per_target_tracked = [float(np.mean(v)) for v in tracked_ious if v]
    return SequenceScore(scenario, len(targets), float(np.mean(per_target)) if per_target else float("nan"),
                         float(np.mean(per_target_tracked)) if per_target_tracked else float("nan"),
                         lost / max(1, vis_frames), hidden_tracked / hid_frames if hid_frames else float("nan"),
                         switches, reentries, recovered, to_recover, vis_frames, hid_frames)


def summarize(scores: list[SequenceScore]) -> dict[str, float]:
    """Means over sequences (IoU) and pooled rates (lost, hidden tracked), switch and recovery counts."""
    vis = sum(s.visible_frames for s in scores)
    hid = sum(s.hidden_frames for s in scores)
    frames = [f for s in scores for f in s.frames_to_recover]
    return {
        "sequences": len(scores),
        "mean_iou": _nanmean([s.mean_iou for s in scores]),
        "tracked_iou": _nanmean([s.tracked_iou for s in scores]),
        "lost_rate": sum(s.lost_rate * s.visible_frames for s in scores) / max(1, vis),
        "hidden_tracked": (sum(s.hidden_tracked * s.hidden_frames for s in scores if s.hidden_frames) / hid
                           if hid else float("nan")),
        "id_switches": sum(s.id_switches for s in scores),
        "id_switches_no_reentry": sum(s.id_switches for s in scores if not s.has_reentry),
        "sequences_no_reentry": sum(not s.has_reentry for s in scores),
        "reentries": sum(s.reentries for s in scores),
        "recovered": sum(s.recovered for s in scores),
        "median_frames_to_recover": float(np.median(frames)) if frames else float("nan"),
    }


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
