"""The trust evaluation and presence calibration tool on tabletop scenes (tabletop/trust_eval.py), and the instance
filter's calibration tool (tabletop/instance_calibration.py)."""
import numpy as np
import pytest
import yaml

from flmm_ros.grounding.bundle import BUNDLE_FILE
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.instance_filter import FEATURES, InstanceCalibration
from flmm_ros.grounding.kind_check import KindCheck
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.testing import TEST_WORDS, word_tokenizer, write_random_bundle
from flmm_ros.tabletop import instance_calibration, trust_eval
from flmm_ros.tabletop.track_eval import EMBEDDED


def test_instance_matching_is_one_to_one_at_iou_half():
    a = np.zeros((10, 10), bool)
    a[:, :5] = True
    b = ~a
    half = np.zeros((10, 10), bool)
    half[:, :3] = True                  # IoU 0.6 with a
    assert trust_eval.matched([a, b], [a, b]) == 2
    assert trust_eval.matched([a, a], [a, b]) == 1          # a copy is not a second instance
    assert trust_eval.matched([half], [a]) == 1 and trust_eval.matched([half[:, ::-1]], [a]) == 0


def test_touching_masks():
    a, b = np.zeros((10, 20), bool), np.zeros((10, 20), bool)
    a[:, :5], b[:, 6:10] = True, True
    assert trust_eval.touching([a, b])
    b[:] = False
    b[:, 15:] = True
    assert not trust_eval.touching([a, b])


def test_roc_area_and_the_operating_point_at_five_percent_miss():
    scores, labels = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2], [1, 1, 1, 0, 0, 0]
    assert trust_eval.roc_auc(scores, labels) == 1.0
    assert trust_eval.roc_auc(scores, [0, 0, 0, 1, 1, 1]) == 0.0
    point = trust_eval.operating_point([0.1 * i for i in range(100)] + [0.5] * 10, [1] * 100 + [0] * 10)
    assert point["miss"] <= 0.05 and point["false_positive"] == 1.0
    assert point["threshold"] == pytest.approx(0.5)


def test_calibrate_writes_a_calibration_the_pipeline_then_uses_and_evaluate_reports_every_number(tmp_path, capsys):
    bundle = write_random_bundle(tmp_path / "bundle", tokenizer=word_tokenizer([*TEST_WORDS, "yes", "no"]))
    trust_eval.main(["calibrate", "--model", str(bundle), "--split", "val", "--count", "2", "--write"])
    spec = yaml.safe_load((bundle / BUNDLE_FILE).read_text())["presence"]
    assert spec["question"] in trust_eval.QUESTIONS and "auc" in spec["metrics"] and "val scenes" in spec["source"]
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle)))
    assert pipe.presence_judge.calibration.calibrated
    out = tmp_path / "scores.json"
    trust_eval.main(["evaluate", "--model", str(bundle), "--count", "2", "--answer-scenes", "1", "--json", str(out)])
    import json
    scores = json.loads(out.read_text())
    assert {"presence", "instances", "agreement", "answer_accuracy", "referring"} <= set(scores)
    presence = scores["presence"]
    assert presence["present"] > 0 and presence["absent"] > 0 and 0 <= presence["false_positive_rate"] <= 1
    assert set(scores["instances"]) == {"all", "touching", "apart"}
    assert {"instruction", "presence question", "all"} <= set(scores["agreement"])
    assert set(scores["answer_accuracy"]) == {"grounded", "lmm"}


@pytest.mark.parametrize("question, answer, reference, same", [
    ("is there a red mug?", "yes, on the left", "yes", True), ("is there a red mug?", "no", "yes", False),
    ("how many mugs are there?", "two mugs", "two", True), ("how many mugs are there?", "three", "two", False),
    ("what colour is the mug?", "red", "red", True), ("what colour is the mug?", "red mug", "red", False)])
def test_yes_no_and_count_answers_are_scored_by_their_claim(question, answer, reference, same):
    from flmm_ros.tabletop.trust_eval import same_answer
    assert same_answer(question, answer, reference) is same


def test_instance_labels_are_one_to_one_and_the_threshold_maximises_f1():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[5:] = True, True
    assert instance_calibration.matched_labels([a, a.copy(), b], [a]) == [1, 0, 0]
    threshold, scores = instance_calibration.best_threshold([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0], named=3)
    assert 0.3 < threshold <= 0.8 and scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)


def test_instance_calibration_is_fitted_on_the_embedded_model_and_written_to_the_bundle(tmp_path):
    import shutil
    bundle = tmp_path / "bundle"
    shutil.copytree(EMBEDDED, bundle)
    spec = yaml.safe_load((bundle / BUNDLE_FILE).read_text())
    spec.pop("instances", None)
    (bundle / BUNDLE_FILE).write_text(yaml.safe_dump(spec))
    instance_calibration.main(["--model", str(bundle), "--count", "12", "--write"])
    written = yaml.safe_load((bundle / BUNDLE_FILE).read_text())["instances"]
    assert written["features"] == list(FEATURES) and 0 <= written["threshold"] < 1
    assert 0 < written["metrics"]["at_threshold"]["recall"] <= 1 and "val instance scenes" in written["source"]
    assert written["kind_check"] == KindCheck().to_spec() and "without_lmm_kind" in written["metrics"]
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle)))
    assert pipe.instance_calibration == InstanceCalibration.from_spec(written)
