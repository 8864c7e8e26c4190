"""All instances of a plural phrase (grounding/instances.py): the plural rules, the SAM-prompted splitting and the
calibrated instance filter (grounding/instance_filter.py)."""
import numpy as np
import pytest
import torch

from flmm_ros.grounding.instance_filter import FEATURES, MASK_FEATURES, InstanceCalibration
from flmm_ros.grounding.instances import (
    InstanceSplitter,
    is_plural,
    presence_probe,
    seed_regions,
    singular,
    singular_probe,
)
from flmm_ros.grounding.kind_check import KindCheck
from flmm_ros.grounding.types import GroundingError


@pytest.mark.parametrize("phrase, plural, probe", [
    ("the mugs", True, "the mug"), ("all the balls", True, "the ball"), ("both boxes", True, "the box"),
    ("every red object", True, "the red object"), ("the two mugs", True, "the mug"),
    ("all the red mugs on the left", True, "the red mug on the left"), ("the glasses", True, "the glass"),
    ("the boxes next to the bowl", True, "the box next to the bowl"), ("mugs", True, "the mug"),
    ("the red mug", False, None), ("the glass", False, None), ("the mug on the left", False, None),
    ("the box next to the bowls", False, None), ("the left mug", False, None), ("the bus", False, None),
    ("this", False, None),
])
def test_plural_and_quantified_phrases_and_their_single_instance(phrase, plural, probe):
    assert is_plural(phrase) == plural
    if plural:
        assert singular_probe(phrase) == probe


@pytest.mark.parametrize("word, one", [("boxes", "box"), ("batteries", "battery"), ("knives", "knife"),
                                       ("glasses", "glass"), ("dishes", "dish"), ("bottles", "bottle"),
                                       ("mug", "mug")])
def test_singular_nouns(word, one):
    assert singular(word) == one


@pytest.mark.parametrize("phrase, probe", [
    ("the red mug", "the red mug"), ("the left mug", "the mug"), ("the mug on the left", "the mug"),
    ("the big red box", "the red box"), ("the ball next to the bowl", "the ball"), ("all the red mugs", "the red mug"),
    ("the mugs on the left", "the mug"), ("every red object", "the red object"), ("it", "it")])
def test_presence_is_judged_on_the_object_a_phrase_names(phrase, probe):
    assert presence_probe(phrase) == probe


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


class BoxPickingSam:
    """Stands in for SAM's decoder: for each box prompt, the object that fills most of the box."""

    def __init__(self, objects):
        self.objects = objects
        self.calls = 0

    def refine_scored(self, sam, dense, tokens, boxes):
        assert len(dense) == len(tokens) == len(boxes)
        self.calls += len(boxes)
        out = []
        for x0, y0, x1, y1 in boxes.int().tolist():
            inside = [o[y0:y1, x0:x1].sum() for o in self.objects]
            best = self.objects[int(np.argmax(inside))]
            out.append(torch.where(torch.from_numpy(best), 10.0, -10.0))
        return torch.stack(out), torch.full((len(boxes),), 0.9)


def split(objects, union=None, image=None):
    union = np.any(objects, axis=0) if union is None else union
    sam = BoxPickingSam(objects)
    splitter = InstanceSplitter(sam, max_instances=8, mask_threshold=0.5)
    prob = torch.from_numpy(union.astype(np.float32))
    found = splitter.split("encoding", torch.zeros(16, 16), prob, torch.zeros(2, 8), image)
    return found, sam


def ious(found, objects):
    return [[(f.mask & o).sum() / (f.mask | o).sum() for o in objects] for f in found]


def test_touching_objects_in_one_connected_mask_come_apart():
    h, w = 96, 160
    objects = [disc(h, w, 48, 40, 22), disc(h, w, 50, 78, 20), disc(h, w, 46, 116, 22)]
    objects = [objects[0] & ~objects[1], objects[1] & ~objects[2], objects[2]]    # occluding each other
    union = np.any(objects, axis=0)
    import cv2
    assert cv2.connectedComponents(union.astype(np.uint8))[0] == 2      # background + one blob
    found, _ = split(objects)
    assert len(found) == 3
    overlap = ious(found, objects)
    assert all(max(row) > 0.95 for row in overlap)
    assert sorted(int(np.argmax(row)) for row in overlap) == [0, 1, 2]
    # In reading order, left to right.
    assert [int(np.argmax(row)) for row in overlap] == [0, 1, 2]


def test_seeds_follow_the_camera_images_edges():
    h, w = 80, 120
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[20:60, 20:60], right[20:60, 60:100] = True, True      # two squares side by side: one rectangle
    image = np.zeros((h, w, 3), np.uint8)
    image[left], image[right] = (200, 30, 30), (30, 30, 200)
    regions = seed_regions(left | right, image, min_area=20)
    assert len(regions) >= 2
    for region in regions:   # no region straddles the colour edge much
        assert min((region & left).sum(), (region & right).sum()) <= 0.1 * region.sum()


def test_copies_and_strays_are_dropped_and_empty_masks_give_nothing():
    h, w = 80, 120
    big = disc(h, w, 40, 60, 30)
    outside = disc(h, w, 10, 10, 8) & ~big
    found, sam = split([big, outside], union=big)   # SAM may answer with something outside the phrase's mask
    assert len(found) == 1 and ious(found, [big])[0][0] > 0.95 and sam.calls >= 1
    assert split([np.zeros((h, w), bool)])[0] == []


def test_at_most_max_instances():
    h, w = 60, 300
    objects = [disc(h, w, 30, 25 + 50 * i, 18) for i in range(6)]
    sam = BoxPickingSam(objects)
    found = InstanceSplitter(sam, max_instances=3, mask_threshold=0.5).split(
        "encoding", torch.zeros(8, 8), torch.from_numpy(np.any(objects, 0).astype(np.float32)), torch.zeros(1, 8), None)
    assert len(found) == 3


# ---- the calibrated instance filter (instance_filter.py) -------------------------------------------------------
def area_rule(threshold=0.5) -> InstanceCalibration:
    """Keeps instances by their area relative to the largest one only (weight on rel_area, nothing else)."""
    n = len(MASK_FEATURES)
    weights = tuple(8.0 if f == "rel_area" else 0.0 for f in MASK_FEATURES)
    return InstanceCalibration(MASK_FEATURES, (0.5,) * n, (0.1,) * n, weights, 0.0, threshold)


def test_the_calibration_drops_instances_it_does_not_believe():
    h, w = 60, 300
    objects = [disc(h, w, 30, 40, 20), disc(h, w, 30, 120, 20), disc(h, w, 30, 200, 6)]   # a crumb
    union = torch.from_numpy(np.any(objects, 0).astype(np.float32))
    splitter = InstanceSplitter(BoxPickingSam(objects), 8, 0.5, area_rule())
    found = splitter.split("encoding", torch.zeros(8, 8), union, torch.zeros(1, 8), None)
    assert len(found) == 2 and all(max(row) > 0.95 for row in ious(found, objects[:2]))
    assert all(set(k.features) == set(MASK_FEATURES) and k.features["rel_area"] > 0.9 for k in found)
    # Without a calibration every instance stays, as before.
    assert len(InstanceSplitter(BoxPickingSam(objects), 8, 0.5).split(
        "encoding", torch.zeros(8, 8), union, torch.zeros(1, 8), None)) == 3


def test_with_a_calibration_an_instance_stops_at_a_neighbour_of_another_colour():
    h, w = 80, 120
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[20:60, 20:60], right[20:60, 60:100] = True, True
    image = np.zeros((h, w, 3), np.uint8)
    image[left], image[right] = (200, 30, 30), (30, 30, 200)
    both = left | right                         # a SAM that always answers with both squares
    sam = BoxPickingSam([both])
    union = torch.from_numpy(both.astype(np.float32))
    kept_all = InstanceCalibration(MASK_FEATURES, (0.0,) * 5, (1.0,) * 5, (0.0,) * 5, 0.0, threshold=0.0)
    found = InstanceSplitter(sam, 8, 0.5, kept_all).split("encoding", torch.zeros(8, 8), union, torch.zeros(1, 8),
                                                          image)
    assert len(found) == 2 and sorted(int(np.argmax(r)) for r in ious(found, [left, right])) == [0, 1]
    assert all(max(r) > 0.9 for r in ious(found, [left, right]))
    assert len(InstanceSplitter(sam, 8, 0.5).split("encoding", torch.zeros(8, 8), union, torch.zeros(1, 8),
                                                   image)) == 1          # uncut: one mask over both


def test_instance_calibration_round_trips_and_refuses_bad_specs():
    rule = area_rule(0.4)
    assert InstanceCalibration.from_spec(rule.to_spec()) == rule
    with pytest.raises(GroundingError, match="unknown features"):
        InstanceCalibration.from_spec({**rule.to_spec(), "features": ["smell"] * 5})
    with pytest.raises(GroundingError, match="threshold"):
        InstanceCalibration.from_spec({**rule.to_spec(), "threshold": 1.5})
    with pytest.raises(GroundingError, match="expected features"):
        InstanceCalibration.from_spec({"features": list(FEATURES)})
    rows, labels = [{f: float(i % 2) + 0.1 * i for f in FEATURES} for i in range(20)], [i % 2 for i in range(20)]
    fitted = InstanceCalibration.fit(rows, labels)
    assert fitted.features == MASK_FEATURES and fitted.kind_check is None
    assert fitted.probability({f: 1.0 for f in FEATURES}) > fitted.probability({f: 0.0 for f in FEATURES})
    with_kind = InstanceCalibration.fit(rows, labels, kind_check=KindCheck())
    assert with_kind.features == FEATURES and InstanceCalibration.from_spec(with_kind.to_spec()) == with_kind
    with pytest.raises(GroundingError, match="kind_check"):       # lmm_kind needs its recipe
        InstanceCalibration.from_spec({k: v for k, v in with_kind.to_spec().items() if k != "kind_check"})
    with pytest.raises(GroundingError, match="kind_check"):
        InstanceCalibration.from_spec({**with_kind.to_spec(), "kind_check": {"answer_prefix": "a"}})
