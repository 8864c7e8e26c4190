"""The LMM's look at an instance alone (grounding/kind_check.py): the view it is shown, the words it is checked
for, the recipe in the bundle, the splitter using the evidence, and the embedded model reading kinds with it."""
import numpy as np
import pytest
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.instance_filter import FEATURES, InstanceCalibration
from flmm_ros.grounding.instances import InstanceSplitter
from flmm_ros.grounding.kind_check import KindCheck, KindScorer, content_words, isolated_view
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.types import GroundingError
from flmm_ros.tabletop.language import PLURALS
from flmm_ros.tabletop.scenes import generate_instance_scene
from flmm_ros.tabletop.track_eval import EMBEDDED
from test_instances import BoxPickingSam, disc


@pytest.mark.parametrize("phrase, words", [("the red mug", ["red", "mug"]), ("the mug", ["mug"]),
                                           ("the red object", ["red"]), ("the object", []), ("a box", ["box"])])
def test_the_words_a_description_should_contain(phrase, words):
    assert content_words(phrase) == words


def test_the_isolated_view_shows_the_instance_and_its_margin_on_the_border_colour():
    image = np.full((40, 50, 3), (90, 80, 70), np.uint8)
    image[5:15, 5:15] = (200, 0, 0)                  # another object
    image[20:30, 25:35] = (0, 0, 200)                # the instance
    mask = np.zeros((40, 50), bool)
    mask[21:29, 26:34] = True                        # a pixel short of the object on every side
    view = isolated_view(image, mask, grow=2)
    assert (view[20:30, 25:35] == image[20:30, 25:35]).all()         # the margin shows the whole object
    assert (view[5:15, 5:15] == (90, 80, 70)).all()                  # the other object is gone
    assert (view[~np.pad(np.ones((14, 14), bool), ((18, 8), (23, 13)))] == (90, 80, 70)).all()
    assert (isolated_view(image, mask, grow=0)[~mask] == (90, 80, 70)).all()


def test_the_kind_check_recipe_round_trips_and_refuses_bad_specs():
    check = KindCheck("describe it", "a", 3)
    assert KindCheck.from_spec(check.to_spec()) == check
    for bad in ({"answer_prefix": "a"}, {"prompt": " "}, {"prompt": "x", "words": 0}, {"prompt": "x", "words": "two"}):
        with pytest.raises(GroundingError, match="kind check|kind_check"):
            KindCheck.from_spec(bad)


def kind_rule(threshold=0.5) -> InstanceCalibration:
    """Keeps instances by the LMM's kind evidence only."""
    n = len(FEATURES)
    weights = tuple(4.0 if f == "lmm_kind" else 0.0 for f in FEATURES)
    return InstanceCalibration(FEATURES, (-1.0,) * n, (1.0,) * n, weights, 0.0, threshold, kind_check=KindCheck())


def test_the_splitter_keeps_the_instances_the_kind_evidence_believes():
    h, w = 60, 300
    objects = [disc(h, w, 30, 40, 20), disc(h, w, 30, 120, 20), disc(h, w, 30, 200, 20)]
    union = torch.from_numpy(np.any(objects, 0).astype(np.float32))
    image = np.zeros((h, w, 3), np.uint8)
    looked_at = []

    def scorer(img, masks):      # the middle disc is "not what the phrase names"
        looked_at.extend(masks)
        return [-5.0 if mask[30, 120] else -0.1 for mask in masks]

    found = InstanceSplitter(BoxPickingSam(objects), 8, 0.5, kind_rule(), scorer).split(
        "encoding", torch.zeros(8, 8), union, torch.zeros(1, 8), image)
    assert len(looked_at) == 3 and len(found) == 2
    assert [bool(k.mask[30, 40]) for k in found] == [True, False] and found[1].mask[30, 200]
    assert all(k.features["lmm_kind"] == -0.1 for k in found)
    # A phrase with nothing to check: no evidence, which counts as its mean (kept at 0.5).
    unsure = InstanceSplitter(BoxPickingSam(objects), 8, 0.5, kind_rule(), lambda img, masks: [None] * len(masks)
                              ).split("encoding", torch.zeros(8, 8), union, torch.zeros(1, 8), image)
    assert len(unsure) == 3 and not any("lmm_kind" in k.features for k in unsure)
    # Without the camera image there is nothing to show the LMM: the same.
    assert len(InstanceSplitter(BoxPickingSam(objects), 8, 0.5, kind_rule(), scorer).split(
        "encoding", torch.zeros(8, 8), union, torch.zeros(1, 8), None)) == 3


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED)))


def test_the_embedded_lmm_reads_an_instances_kind_when_it_is_shown_alone(embedded):
    """On generated instance scenes, true masks: each object of the named kind scores above every object of
    another kind in its scene (the LMM finds objects by colour, but reads the kind of the one it is shown)."""
    check = embedded.instance_calibration.kind_check
    right = wrong = 0
    for seed in range(6):
        scene, kind = generate_instance_scene(2_000_000 + seed)
        scorer = KindScorer(embedded.lmm, check, f"the {kind}")
        scores = scorer(scene.image, [o.mask for o in scene.objects])
        named = [v for v, o in zip(scores, scene.objects) if o.kind == kind]
        others = [v for v, o in zip(scores, scene.objects) if o.kind != kind]
        right += sum(n > o for n in named for o in others)
        wrong += sum(n <= o for n in named for o in others)
    assert right >= 4 * wrong and right > 0


def test_instances_checked_together_score_as_each_alone(embedded):
    """The batched LMM pass gives each instance the score it gets alone (and the phrase's words are what count)."""
    scene, kind = generate_instance_scene(2_000_001, (480, 640))
    masks = [o.mask for o in scene.objects]
    scorer = KindScorer(embedded.lmm, KindCheck(), f"the red {kind}")
    together = scorer(scene.image, masks)
    assert together == pytest.approx([scorer(scene.image, [m])[0] for m in masks], abs=1e-4)
    assert all(v < 0 for v in together) and scorer(scene.image, []) == []
    # Nothing the LMM could say: no evidence either way (the filter counts it as its mean).
    assert KindScorer(embedded.lmm, KindCheck(), "the object")(scene.image, masks) == [None] * len(masks)
    assert KindScorer(embedded.lmm, KindCheck(), "the zebra")(scene.image, masks) == [None] * len(masks)
    assert KindScorer(embedded.lmm, KindCheck(), "the red zebra")(scene.image, masks)[0] is not None


def test_the_embedded_models_filter_looks_at_each_instance(embedded):
    scene, kind = generate_instance_scene(2_000_003)
    phrase = f"all the {PLURALS[kind]}"
    frame = embedded.encode(scene.image)
    with torch.no_grad():
        found = embedded.split_instances(frame, embedded.ground_logits(frame, [phrase]), 0, phrase)
    calibration = embedded.instance_calibration
    assert calibration.uses_kind and found
    assert all("lmm_kind" in k.features and calibration.probability(k.features) >= calibration.threshold
               for k in found)


def test_the_instance_threshold_trades_wrong_instances_for_missed_ones(embedded, monkeypatch):
    """`instance_threshold` (a runtime node parameter): 0 keeps every candidate, -1 is the bundle's threshold."""
    scene, kind = generate_instance_scene(2_000_003)
    frame = embedded.encode(scene.image)
    phrase = f"all the {PLURALS[kind]}"
    counts = {}
    for threshold in (0.0, -1.0, 0.99):
        monkeypatch.setattr(embedded.config, "instance_threshold", threshold)
        with torch.no_grad():
            found = embedded.split_instances(frame, embedded.ground_logits(frame, [phrase]), 0, phrase)
        counts[threshold] = [round(embedded.instance_calibration.probability(k.features), 6) for k in found]
    bundle = embedded.instance_calibration.threshold
    assert all(p >= bundle for p in counts[-1.0]) and all(p >= 0.99 for p in counts[0.99])
    assert len(counts[0.0]) >= len(counts[-1.0]) >= len(counts[0.99])
    assert len(counts[0.0]) > len(counts[0.99])           # the setting changes what is kept
    assert sorted(counts[-1.0]) == sorted(p for p in counts[0.0] if p >= bundle)
