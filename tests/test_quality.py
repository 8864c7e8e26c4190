"""Quality of the shipped embedded model: it must genuinely ground (no retraining here)."""
from pathlib import Path

import pytest

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.training.evaluate import evaluate, whole_image_baseline
from flmm_ros.tabletop.samples import tabletop_samples

BUNDLE = Path(__file__).resolve().parents[1] / "ros_ws/src/flmm_ros/models/tabletop_tiny"
SCENES = 40          # fixed held-out test scenes (deterministic seeds)
# Bars a little under what the shipped model reaches on these 40 scenes: refined 0.797, coarse 0.584
# (MODEL_CARD.md has the 500-scene table: 0.788 / 0.604). Raise them when a better model is shipped.
MIN_REFINED_CIOU = 0.77
MIN_COARSE_CIOU = 0.55
MIN_DEMO_IOU = 0.75  # the shipped model: IoU 0.840 with the red mug (and 6 % of the white mug behind it)


@pytest.fixture(scope="module")
def scores():
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(BUNDLE), answer=False))
    return evaluate(pipe, tabletop_samples("test", SCENES, expression="first"), SCENES)


def test_shipped_model_grounds_held_out_scenes(scores):
    assert scores["refined"]["count"] > SCENES            # every object of every scene was grounded
    assert scores["refined"]["ciou"] >= MIN_REFINED_CIOU
    assert scores["coarse"]["ciou"] >= MIN_COARSE_CIOU


def test_shipped_model_beats_the_whole_image_baseline_by_far(scores):
    baseline = whole_image_baseline(tabletop_samples("test", SCENES, expression="first"))["whole_image"]
    assert scores["refined"]["ciou"] > 4 * baseline["ciou"]


def test_demo_instruction_gives_one_answer_and_one_mask():
    """The README demo's request on the shipped model: one answer, one mask, and the mask is on the red mug."""
    from flmm_ros.demo import demo_scene
    scene, _ = demo_scene()
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(BUNDLE)))
    result = pipe.run(scene.image, "pick the red mug")
    assert result.phrases == ["the red mug"] and result.answer
    assert len(result.objects) == 1 and result.objects[0].mask.shape == scene.image.shape[:2]
    mask = result.objects[0].mask > 0
    iou = {(o.colour, o.kind): (mask & o.mask).sum() / (mask | o.mask).sum() for o in scene.objects}
    assert max(iou, key=iou.get) == ("red", "mug") and iou["red", "mug"] >= MIN_DEMO_IOU, iou
