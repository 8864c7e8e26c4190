"""A plural phrase that names no kind or colour ("all the objects", "how many objects are there?"): its instances are
the objects the LMM's own description names, each grounded (trust.py `_described_objects`)."""
import numpy as np
import pytest
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.instances import names_no_kind
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.tabletop.scenes import generate_scene
from flmm_ros.tabletop.track_eval import EMBEDDED


@pytest.mark.parametrize("phrase, generic", [
    ("the objects", True), ("all the objects", True), ("every object", True), ("objects", True),
    ("all the things", True), ("both objects", True), ("all the red objects", False), ("the mugs", False),
    ("the object", False), ("the red object", False), ("every mug", False)])
def test_phrases_that_name_no_kind_or_colour(phrase, generic):
    assert names_no_kind(phrase) == generic


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED)))


def test_every_object_the_description_names_is_an_instance(embedded):
    scene = generate_scene(2_000_016, (480, 640))     # the README demo's scene: a white mug, a purple box, a red mug
    frame = embedded.encode(scene.image)
    result = embedded.run(frame, "how many objects are there?")
    assert result.answer.split()[0] == "three" and result.not_found == []
    assert [o.instance for o in result.objects] == [1, 2, 3] and all(o.found and o.presence == 1.0
                                                                     for o in result.objects)
    assert [o.box[0] for o in result.objects] == sorted(o.box[0] for o in result.objects)     # left to right
    matched = {max(range(3), key=lambda k: iou(o.mask > 0, scene.objects[k].mask)) for o in result.objects}
    assert len(matched) == 3 and all(max(iou(o.mask > 0, t.mask) for t in scene.objects) > 0.5
                                     for o in result.objects)
    # Each instance keeps its own phrase tokens (a tracker follows each without the LMM).
    assert all(o.prompt_tokens is not None for o in result.objects)
    plain = embedded.run(frame, "pick up all the objects").objects
    assert [o.phrase for o in plain] == ["all the objects"] * 3
    assert all((a.mask == b.mask).all() for a, b in zip(plain, result.objects))


def test_with_instances_off_the_phrase_is_judged_as_any_other(embedded):
    off = GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED), instances="off"))
    scene = generate_scene(2_000_016, (480, 640))
    objects = off.run(scene.image, "pick up all the objects").objects
    assert len(objects) == 1 and objects[0].instance == 0
