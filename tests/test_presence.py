"""Presence of a grounded phrase (grounding/presence.py): calibration, the LMM's yes / no, the features."""
import math

import numpy as np
import pytest
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import GROUNDING_PROMPT
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.presence import (
    FEATURES,
    PresenceCalibration,
    PresenceJudge,
    answer_token_ids,
    fit_calibration,
    foreground_mean,
    indefinite,
)
from flmm_ros.grounding.testing import TEST_WORDS, word_tokenizer, write_random_bundle
from flmm_ros.grounding.types import GroundingError

YES_NO_WORDS = [*TEST_WORDS, "yes", "no"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A random-weight bundle whose tokenizer can say yes and no."""
    bundle = write_random_bundle(tmp_path_factory.mktemp("bundle"), tokenizer=word_tokenizer(YES_NO_WORDS))
    return GroundingPipeline.from_config(PipelineConfig(model=str(bundle), max_new_tokens=4))


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("phrase, question_form", [("the red mug", "a red mug"), ("the orange box", "an orange box"),
                                                   ("a ball", "a ball"), ("mugs", "mugs")])
def test_the_question_asks_about_any_such_object(phrase, question_form):
    assert indefinite(phrase) == question_form


def test_calibrated_probability_is_the_logistic_of_standardised_features():
    cal = PresenceCalibration(("lmm_yes", "sam_iou"), (1.0, 0.5), (2.0, 0.25), (1.5, -2.0), 0.3)
    z = 0.3 + 1.5 * (3.0 - 1.0) / 2.0 - 2.0 * (0.75 - 0.5) / 0.25
    assert cal.probability({"lmm_yes": 3.0, "sam_iou": 0.75}) == pytest.approx(1 / (1 + math.exp(-z)))
    # A feature that could not be computed counts as its mean: neutral.
    z_missing = 0.3 + 1.5 * (3.0 - 1.0) / 2.0
    assert cal.probability({"lmm_yes": 3.0, "sam_iou": None}) == pytest.approx(1 / (1 + math.exp(-z_missing)))
    assert PresenceCalibration.from_spec(cal.to_spec()) == cal and cal.calibrated


def test_without_calibration_presence_is_the_lmms_own_yes_probability():
    cal = PresenceCalibration.lmm_only()
    p_yes, p_no = 0.3, 0.1          # P(yes) / (P(yes) + P(no)) = 0.75
    assert cal.probability({"lmm_yes": math.log(p_yes) - math.log(p_no)}) == pytest.approx(0.75)
    assert not cal.calibrated and "{phrase}" in cal.question


@pytest.mark.parametrize("spec, message", [
    ({"features": ["colour"], "mean": [0], "scale": [1], "weights": [1], "bias": 0}, "unknown features"),
    ({"features": ["lmm_yes"], "mean": [0, 1], "scale": [1], "weights": [1], "bias": 0}, "differ in length"),
    ({"features": ["lmm_yes"], "mean": [0], "scale": [0], "weights": [1], "bias": 0}, "not positive"),
    ({"features": ["lmm_yes"], "mean": [0], "scale": [1], "weights": [1], "bias": 0, "question": "is it?"},
     "placeholder"),
    ({"features": ["lmm_yes"], "mean": [0]}, "bad presence calibration"),
])
def test_bad_calibrations_are_refused_clearly(spec, message):
    with pytest.raises(GroundingError, match=message):
        PresenceCalibration.from_spec(spec)


def test_fitting_separates_present_from_absent_and_balances_the_classes():
    rng = np.random.default_rng(0)
    rows = [{"lmm_yes": float(rng.normal(2 if i < 30 else -2)), "sam_iou": float(rng.normal())} for i in range(130)]
    labels = [1] * 30 + [0] * 100
    cal = fit_calibration(rows, labels, features=("lmm_yes", "sam_iou"), balance=True)
    probs = np.array([cal.probability(r) for r in rows])
    assert probs[:30].mean() > 0.8 and probs[30:].mean() < 0.2
    assert abs(cal.weights[0]) > 5 * abs(cal.weights[1])      # the informative feature carries the decision
    # Balanced: the two classes' mean probabilities sit symmetrically around 0.5, not pulled towards "absent".
    assert abs((probs[:30].mean() + probs[30:].mean()) - 1.0) < 0.1
    with pytest.raises(GroundingError, match="present and absent"):
        fit_calibration(rows[:5], [1] * 5)


def test_the_lmms_yes_no_is_read_from_one_pass_over_the_cached_frame(pipe):
    frame = pipe.encode(image())
    judge = PresenceJudge(pipe.lmm, PresenceCalibration.lmm_only("is there {phrase} ?"))
    assert judge.can_ask and judge.enabled
    value = judge.lmm_yes(frame.lmm, "the red mug")
    assert frame.lmm.cache.get_seq_length() == len(frame.lmm.prefix_ids)   # the cache holds the prefix only
    # The same number from a plain forward over the whole prompt.
    tok = pipe.lmm.tokenizer
    ids = pipe.lmm.prompt_ids("is there a red mug ?", len(frame.lmm.image_keys))
    embeds = pipe.lmm.embed_tokens(torch.tensor([ids]))
    features = pipe.lmm.image_features(frame.lmm.prepared)
    embeds[0, [i for i, t in enumerate(ids) if t == pipe.lmm.image_token_id]] = features
    with torch.no_grad():
        logits = pipe.lmm.model.lm_head(pipe.lmm.language_model(inputs_embeds=embeds).last_hidden_state[0, -1])
    logp = logits.float().log_softmax(-1)
    yes, no = answer_token_ids(tok, ("yes",)), answer_token_ids(tok, ("no",))
    assert value == pytest.approx(float(logp[yes].logsumexp(0) - logp[no].logsumexp(0)), abs=1e-4)


def test_foreground_mean_is_the_mean_over_the_mask_and_zero_without_one():
    prob = torch.rand(48, 64, generator=torch.Generator().manual_seed(0))
    fg = prob > 0.7
    assert foreground_mean(prob, fg) == pytest.approx(float(prob[fg].mean()), rel=1e-6)
    assert foreground_mean(prob, torch.zeros_like(fg)) == 0.0


def test_every_feature_comes_from_the_grounding_pass(pipe):
    frame = pipe.encode(image(1))
    with torch.no_grad():
        logits = pipe.ground_logits(frame, ["the red mug", "the bowl"])
    judge = PresenceJudge(pipe.lmm, PresenceCalibration.lmm_only())
    values = judge.features(frame.lmm, ["the red mug", "the bowl"], logits, frame.image_hw, 0.5)
    assert len(values) == 2 and all(set(v) == set(FEATURES) for v in values)
    assert all(v[f] is not None and math.isfinite(v[f]) for v in values for f in FEATURES)
    assert all(v["phrase_logprob_min"] <= v["phrase_logprob_mean"] <= 0 for v in values)
    # The phrase's token log-probabilities are those of a teacher-forced pass of the prompt and the phrases.
    pass_ = pipe.lmm.phrase_pass(frame.lmm, ["the red mug"])
    ids = pipe.lmm.prompt_ids(GROUNDING_PROMPT, len(frame.lmm.image_keys)) + pipe.lmm.text_ids("the red mug")
    embeds = pipe.lmm.embed_tokens(torch.tensor([ids]))
    embeds[0, [i for i, t in enumerate(ids) if t == pipe.lmm.image_token_id]] = \
        pipe.lmm.image_features(frame.lmm.prepared)
    with torch.no_grad():
        logp = pipe.lmm.model.lm_head(pipe.lmm.language_model(inputs_embeds=embeds).last_hidden_state[0]).log_softmax(-1)
    n = len(pipe.lmm.text_ids("the red mug"))
    expected = [float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n)]
    assert pass_.token_logprobs[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_an_instruction_asks_its_presence_question_inside_the_grounding_pass(pipe, monkeypatch):
    frame = pipe.encode(image(2))
    pipe.run(frame, "pick up the red mug")                       # the frame counts as cached from here
    forwards = []
    model = pipe.lmm.language_model
    monkeypatch.setattr(model, "forward", lambda *a, _f=model.forward, **k: forwards.append(1) or _f(*a, **k))
    beside = pipe.run(frame, "pick up the red mug")
    assert len(forwards) == 1                                     # phrases and question: one LMM forward
    # The same decision as asking the question in a pass of its own.
    monkeypatch.setattr(type(pipe), "presence_questions", lambda self, phrases, judge=None: [])
    alone = pipe.run(frame, "pick up the red mug")
    assert len(forwards) == 3
    assert beside.objects[0].presence == pytest.approx(alone.objects[0].presence, abs=1e-5)
    assert 0.0 < beside.objects[0].presence < 1.0


def test_a_tokenizer_without_yes_or_no_turns_an_uncalibrated_check_off(tmp_path):
    bundle = write_random_bundle(tmp_path)          # the test vocabulary has neither "yes" nor "no"
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), answer=False))
    judge = pipe.presence_judge
    assert not judge.can_ask and not judge.enabled
    result = pipe.run(image(), "pick the red mug")
    assert [(o.found, o.presence) for o in result.objects] == [(True, 1.0)] and result.not_found == []

