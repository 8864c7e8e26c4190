"""The region-input evaluation (tabletop/region_eval.py): its pieces, and the embedded model on a few held-out
scenes, where clicking an object must tell its kind and colour far above chance."""
from pathlib import Path

import numpy as np
import pytest

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.tabletop.region_eval import (
    FIRST_PHRASE, RegionRecord, click_point, evaluate_regions, kind_and_colour, main, summarize, table)

BUNDLE = Path(__file__).resolve().parents[1] / "ros_ws/src/flmm_ros/models/tabletop_tiny"
SCENES = 8
# A little under what the shipped model reaches on these 8 test scenes (MODEL_CARD.md has the 300-scene table).
MIN_CROP_BOTH = 0.6
MIN_CLICK_MASK_IOU = 0.55


def test_the_click_is_the_most_interior_pixel():
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True                       # a 10 x 20 block: its middle row, away from the ends
    x, y = click_point(mask)
    assert y in (9, 10) and 14 <= x <= 25
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[10:30, 10:30] = False
    x, y = click_point(ring)
    assert ring[y, x]


@pytest.mark.parametrize("text, expected", [
    ("a blue can", ("can", "blue")), ("two mugs on the left", ("mug", None)), ("the white object", (None, "white")),
    ("The Orange BOX.", ("box", "orange")), ("", (None, None)), ("a red mug and a blue bowl", ("mug", "red"))])
def test_kind_and_colour_are_the_first_such_words(text, expected):
    assert kind_and_colour(text) == expected


def test_accuracy_and_chance_rows():
    def record(obj, method, kind, colour):
        return RegionRecord(1, obj, "mug", "red", "point", method, 0.5, 0.4, "", "", kind, colour)
    records = [record(0, "crop", "mug", "red"), record(1, "crop", "mug", "blue"), record(2, "crop", None, None)]
    rows = summarize(records)
    assert rows["point: crop"]["kind"] == pytest.approx(2 / 3) and rows["point: crop"]["colour"] == pytest.approx(1 / 3)
    assert rows["point: crop"]["both"] == pytest.approx(1 / 3) and rows["point: crop"]["sam_iou"] == pytest.approx(0.4)
    assert rows["chance: uniform"]["kind"] == pytest.approx(1 / 6) and rows["chance: uniform"]["both"] == 1 / 42
    assert rows["chance: most frequent"]["both"] == 1.0             # every object here is a red mug
    assert "| point: crop | 3 |" in table(rows)


@pytest.fixture(scope="module")
def records():
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(BUNDLE), max_new_tokens=48))
    return evaluate_regions(pipe, "test", SCENES, promptings=("crop", "none"), box_promptings=("highlight",))


def test_every_object_is_asked_with_every_method(records):
    objects = {(r.seed, r.object) for r in records}
    assert len(objects) >= SCENES
    for method, prompt in (("crop", "point"), ("none", "point"), (FIRST_PHRASE, "point"), ("highlight", "box")):
        assert sum(r.method == method and r.prompt == prompt for r in records) == len(objects)
    assert all(0.0 <= r.mask_iou <= 1.0 and 0.0 <= r.sam_iou <= 1.0 for r in records)


def test_clicking_tells_kind_and_colour_far_above_chance(records):
    rows = summarize(records)
    assert rows["point: crop"]["both"] >= MIN_CROP_BOTH
    assert rows["point: crop"]["both"] > 10 * rows["chance: uniform"]["both"]
    assert rows["point: crop"]["both"] > rows[f"point: {FIRST_PHRASE}"]["both"]
    assert rows["point: crop"]["mask_iou"] >= MIN_CLICK_MASK_IOU


def test_the_command_line_writes_its_table_and_records(tmp_path, capsys):
    out = tmp_path / "region.json"
    main(["--scenes", "1", "--split", "val", "--promptings", "crop", "--box-promptings", "", "--json", str(out)])
    assert "| point: crop |" in capsys.readouterr().out
    import json
    saved = json.loads(out.read_text())
    assert set(saved) == {"summary", "records"} and saved["records"][0]["method"] == "crop"
