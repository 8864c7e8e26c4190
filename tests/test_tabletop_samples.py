"""The generated scenes as referring samples for the grounding tools (tabletop/samples.py)."""
from types import SimpleNamespace

from flmm_ros.tabletop.samples import distractor_case, tabletop_samples
from flmm_ros.tabletop.scenes import generate_scene, split_seeds


def test_distractor_cases_of_tabletop_objects():
    red_mug, red_box, white_mug, blue_ball = (SimpleNamespace(colour=c, kind=k) for c, k in
                                              (("red", "mug"), ("red", "box"), ("white", "mug"), ("blue", "ball")))
    scene = [red_mug, red_box, white_mug, blue_ball]
    assert distractor_case(red_mug, scene) == "another object of its colour"
    assert distractor_case(red_box, scene) == "another object of its colour"
    assert distractor_case(white_mug, scene) == "another object of its kind, no other of its colour"
    assert distractor_case(blue_ball, scene) == "unique colour and kind"


def test_tabletop_samples_leave_out_objects_no_expression_singles_out():
    seed = split_seeds("train", 1, 1398)[0]     # a training scene with one object nothing singles out
    scene = generate_scene(seed, size=(256, 256))
    referable = [o for o in scene.objects if o.expressions]
    assert 0 < len(referable) < len(scene.objects)
    sample = next(tabletop_samples("train", 1, offset=1398))
    assert len(sample.phrases) == len(sample.masks) == len(referable)
    assert all(sample.phrases)
