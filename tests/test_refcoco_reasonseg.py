"""F-LMM's evaluation protocols on small fixtures in the original layouts (issue #15, points 3 and 4).

RefCOCO: data/coco/refcoco/{instances.json, refs(unc).p} + data/coco/train2014/*.jpg, read as mmdet 3.3's
RefCocoDataset does with F-LMM's text_mode='select_first'. ReasonSeg: <split>/<name>.{jpg,json}.
"""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.training import evaluate
from flmm_ros.grounding.training.data import refcoco_samples
from flmm_ros.grounding.training.metrics import ReasonSegMeter
from flmm_ros.grounding.training.reasonseg import reasonseg_mask, reasonseg_samples
from flmm_ros.grounding.training.refcoco import (_string_counts, coco_mask, decode_counts, load_refs_pickle,
                                                 read_split)

RECT = [10, 10, 30, 10, 30, 20, 10, 20]
# (polygons, h, w) -> pycocotools 2.0.11 RLE string of mask.merge(mask.frPyObjects(polygons, h, w)), and its area.
PYCOCOTOOLS = [
    ([RECT], 40, 50, "j<:n00000000000000000000000000000000000000fh0", 200),
    ([[3.3, 2.7, 27.9, 5.2, 20.4, 31.6, 8.8, 22.1, 1.5, 12.0]], 36, 32,
     "_26j06N1O1O2N1O2N1O010O1O1O1O1O001O1O1O01L3L4M3L4M3L4M^4", 462),
    ([[0, 0, 12.5, 0, 6.25, 9.75], [14, 14, 20.2, 15.1, 17, 19.9, 13.5, 18.0]], 24, 24,
     "01g01O2N1O2N2N00O1N2O1N2Oo12PN1O10N1O1Nc2", 84),
]


@pytest.mark.parametrize("polygons, h, w, rle, area", PYCOCOTOOLS)
def test_polygons_are_rasterised_exactly_as_pycocotools(polygons, h, w, rle, area):
    expected = decode_counts(_string_counts(rle), h, w)
    assert expected.sum() == area
    assert np.array_equal(coco_mask(polygons, h, w), expected)
    assert np.array_equal(coco_mask({"size": [h, w], "counts": rle}, h, w), expected)   # compressed RLE


def ref(ref_id, ann_id, image_id, split, *sentences):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "sent_ids": list(range(len(sentences))), "file_name": f"x_{ann_id}.jpg",
            "sentences": [{"raw": s, "sent": s.lower().strip(".!"), "tokens": s.split(), "sent_id": i}
                          for i, s in enumerate(sentences)]}


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    """Three images; val refers to 3 objects with 6 sentences in all (one object named by two refs)."""
    coco = tmp_path_factory.mktemp("data") / "coco"
    (coco / "train2014").mkdir(parents=True)
    (coco / "refcoco").mkdir()
    rng = np.random.default_rng(0)
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 50},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 36, "width": 32},
              {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 30, "width": 30}]
    for img in images:
        pixels = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(coco / "train2014" / img["file_name"], quality=95)
    annotations = [{"id": 11, "image_id": 1, "segmentation": [RECT], "category_id": 1},
                   {"id": 12, "image_id": 1, "segmentation": [[0, 0, 20, 0, 10, 15], [1, 2]], "category_id": 1},
                   {"id": 13, "image_id": 1, "segmentation": [[30, 30, 40, 30, 35, 38]], "category_id": 1},
                   {"id": 21, "image_id": 2, "segmentation": PYCOCOTOOLS[1][0], "category_id": 1},
                   {"id": 31, "image_id": 3, "segmentation": [[1, 1, 9, 1, 9, 9]], "category_id": 1}]
    refs = [ref(1, 11, 1, "val", "The Man on the LEFT.", "left guy"),
            ref(2, 21, 2, "val", "A dog!"),
            ref(3, 12, 1, "val", "Red Car", "car", "the red one"),
            ref(4, 13, 1, "train", "tree"),
            ref(5, 21, 2, "val", "Dog, again", "the dog"),
            ref(6, 31, 3, "train", "sky")]
    (coco / "refcoco" / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                                 "categories": [{"id": 1, "name": "thing"}]}))
    (coco / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return coco / "refcoco"


def test_select_first_gives_one_raw_lowercased_sentence_per_object(refcoco):
    items = read_split(refcoco, "val")
    assert [(i.image_id, i.texts) for i in items] == [(1, ["the man on the left.", "red car"]),
                                                      (2, ["dog, again"])]      # ann 21: the later ref wins
    original = read_split(refcoco, "val", text_mode="original")
    assert sum(len(i.texts) for i in original) == 2 + 3 + 2
    assert [len(i.texts) for i in read_split(refcoco, "val", text_mode="random")] == [2, 1]
    assert [i.texts for i in read_split(refcoco, "train")] == [["tree"], ["sky"]]


def test_samples_load_the_original_layout_directly(refcoco):
    samples = list(refcoco_samples(refcoco, "val"))
    assert [len(s.masks) for s in samples] == [2, 1]
    first = samples[0]
    assert first.image.shape == (40, 50, 3)
    assert first.masks[0].sum() == 200 and first.masks[0][10:20, 10:30].all()
    assert np.array_equal(first.masks[1], coco_mask([[0, 0, 20, 0, 10, 15]], 40, 50))   # [1, 2] dropped
    assert np.array_equal(samples[1].masks[0], coco_mask(*PYCOCOTOOLS[1][:3]))


class Payload:
    def __reduce__(self):
        return print, ("a refs file ran code",)


def test_refs_pickle_is_never_allowed_to_build_objects(tmp_path, capsys):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "split": "val", "x": Payload()}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load __builtin__\.print"):
        load_refs_pickle(path)
    assert capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("bundle")))


def run_evaluate(capsys, *argv) -> dict:
    evaluate.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_evaluate_runs_flmms_refcoco_protocol(refcoco, bundle, capsys):
    scores = run_evaluate(capsys, "--model", bundle, "--data", str(refcoco), "--split", "val")
    assert scores["refined"]["count"] == scores["coarse"]["count"] == 3
    everything = run_evaluate(capsys, "--model", bundle, "--data", str(refcoco), "--text-mode", "original")
    assert everything["refined"]["count"] == 7


# ---- ReasonSeg -------------------------------------------------------------------------------------------
def test_reasonseg_metric_divides_by_each_images_pixels():
    meter = ReasonSegMeter()
    small_pred, small_gt = np.zeros((10, 10), bool), np.zeros((10, 10), np.uint8)
    small_pred.flat[:20] = True                       # 20 px, 10 of them on the 30 px object
    small_gt.flat[10:40] = 1
    big_pred, big_gt = np.zeros((20, 20), bool), np.zeros((20, 20), np.uint8)
    big_pred.flat[:60] = True
    big_gt.flat[20:80] = 1
    big_gt.flat[380:] = 255                           # ignored: neither counted in I nor in U
    big_pred.flat[380:] = True
    meter.add(small_pred, small_gt, is_sentence=False)
    meter.add(big_pred, big_gt, is_sentence=True)
    scores = meter.scores()
    # I/N, U/N: (0.1, 0.4) and (40/400, 80/400) = (0.1, 0.2).
    assert scores["overall"]["giou"] == pytest.approx((0.25 + 0.5) / 2)
    assert scores["overall"]["ciou"] == pytest.approx(0.1 / 0.3)              # not (10 + 40) / (40 + 80)
    assert scores["long"] == {"giou": pytest.approx(0.5), "ciou": pytest.approx(0.5), "count": 1}
    assert scores["short"]["count"] == 1


@pytest.fixture(scope="module")
def reasonseg(tmp_path_factory):
    split = tmp_path_factory.mktemp("ReasonSeg") / "val"
    split.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w), is_sentence in (("a", (40, 60), False), ("b", (32, 32), True)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(split / f"{name}.jpg")
        shapes = [{"label": "target", "points": [[5, 5], [30, 5], [30, 20], [5, 20]]},
                  {"label": "ignore", "points": [[0, 25], [10, 25], [10, 30], [0, 30]]},
                  {"label": "flag", "points": [[0, 0], [31, 0], [31, 31], [0, 31]]}]
        (split / f"{name}.json").write_text(json.dumps({"text": [f"query {name}", "other"], "shapes": shapes,
                                                        "is_sentence": is_sentence}))
    return split


def test_reasonseg_ground_truth_as_lisa_draws_it(reasonseg):
    samples = list(reasonseg_samples(reasonseg))
    assert [(s.name, s.query, s.is_sentence) for s in samples] == [("a", "query a", False), ("b", "query b", True)]
    target = samples[0].target
    assert target.shape == (40, 60) and set(np.unique(target)) == {0, 1, 255}
    assert target[10, 10] == 1 and target[27, 5] == 255 and target[35, 50] == 0     # the flag shape is skipped
    assert np.array_equal(target, reasonseg_mask(json.loads((reasonseg / "a.json").read_text()), 40, 60))


def test_evaluate_runs_flmms_reasonseg_protocol(reasonseg, bundle, capsys):
    scores = run_evaluate(capsys, "--model", bundle, "--data", str(reasonseg))
    assert scores["overall"]["count"] == 2 and scores["long"]["count"] == scores["short"]["count"] == 1
    assert all(0.0 <= s["giou"] <= 1.0 for s in scores.values())
