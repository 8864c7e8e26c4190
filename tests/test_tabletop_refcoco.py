"""RefCOCO-format export of generated scenes and the loader that reads it back."""
import json

import numpy as np
import pytest

from flmm_ros.tabletop.refcoco_format import (export_refcoco_format, load_refcoco_format, mask_to_rle,
                                              rle_to_mask)
from flmm_ros.tabletop.scenes import generate_scene, split_seeds


def test_rle_follows_the_coco_convention():
    mask = np.array([[0, 1, 1],
                     [1, 1, 0]], bool)
    # Column-major: 0,1 | 1,1 | 1,0 -> runs: one 0, four 1s, one 0.
    assert mask_to_rle(mask) == {"size": [2, 3], "counts": [1, 4, 1]}
    starts_on = np.array([[1, 0], [1, 0]], bool)
    assert mask_to_rle(starts_on)["counts"] == [0, 2, 2]
    assert mask_to_rle(np.zeros((2, 2), bool))["counts"] == [4]


def test_rle_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) > rng.random()
        assert np.array_equal(rle_to_mask(mask_to_rle(mask)), mask)
    with pytest.raises(ValueError):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_export_and_load_give_back_the_scenes(tmp_path):
    seeds = list(split_seeds("train", 3)) + list(split_seeds("val", 2)) + list(split_seeds("test", 1))
    counts = export_refcoco_format(tmp_path, seeds, size=(120, 160))
    assert counts["images"] == 6 and counts["refs"] > 0
    loaded = {r.image_id: r for r in load_refcoco_format(tmp_path)}
    assert set(loaded) <= set(seeds) and len(loaded) >= 5
    for seed, ref_image in loaded.items():
        scene = generate_scene(seed, (120, 160))
        assert np.array_equal(ref_image.image, scene.image)   # PNG is lossless
        expected = scene.referring_pairs()
        assert [e for e, _ in ref_image.refs] == [e for e, _ in expected]
        assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(ref_image.refs, expected))

    assert {r.split for r in load_refcoco_format(tmp_path, split="val")} == {"val"}
    assert len(list(load_refcoco_format(tmp_path, split="test"))) <= 1

    instances = json.loads((tmp_path / "instances.json").read_text())
    refs = json.loads((tmp_path / "refs.json").read_text())
    ann_ids = {a["id"] for a in instances["annotations"]}
    assert all(r["ann_id"] in ann_ids for r in refs)
    sent_ids = [s for r in refs for s in r["sent_ids"]]
    assert len(sent_ids) == len(set(sent_ids))
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        mask = rle_to_mask(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert ann["area"] == mask.sum()
    questions = json.loads((tmp_path / "questions.json").read_text())
    assert {q["type"] for q in questions} >= {"colour", "count", "presence", "describe"}


def test_loader_reads_polygon_segmentations(tmp_path):
    export_refcoco_format(tmp_path, [0], size=(100, 100))
    instances = json.loads((tmp_path / "instances.json").read_text())
    ann = instances["annotations"][0]
    ann["segmentation"] = [[10, 10, 30, 10, 30, 20, 10, 20]]   # COCO: pixels 10..29 x 10..19 (pycocotools: 200)
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    refs = json.loads((tmp_path / "refs.json").read_text())
    refs = [r for r in refs if r["ann_id"] == ann["id"]]
    if not refs:
        pytest.skip("the first object of seed 0 has no unique expression")
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (ref_image,) = load_refcoco_format(tmp_path)
    mask = ref_image.refs[0][1]
    assert mask.sum() == 20 * 10 and mask[10:20, 10:30].all()


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances.json"):
        list(load_refcoco_format(tmp_path))
