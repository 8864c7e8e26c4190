"""Presence decisions, instances and the grounded answer in the pipeline (grounding/trust.py), on random-weight
bundles whose tokenizer can say yes and no; and the constrained decoding they use (LMMAdapter.generate_scored)."""
import numpy as np
import pytest
import torch
import yaml

from flmm_ros.grounding.bundle import BUNDLE_FILE
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.instance_filter import MASK_FEATURES, InstanceCalibration
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.presence import PresenceCalibration
from flmm_ros.grounding.testing import TEST_WORDS, word_tokenizer, write_random_bundle
from flmm_ros.grounding.types import GroundingError

WORDS = [*TEST_WORDS, "yes", "no", "mugs", "all", "every", "both"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_random_bundle(tmp_path_factory.mktemp("bundle"), tokenizer=word_tokenizer(WORDS))


@pytest.fixture(scope="module")
def pipe(bundle):
    return GroundingPipeline.from_config(PipelineConfig(model=str(bundle), max_new_tokens=6))


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def calibration(bias: float) -> PresenceCalibration:
    """Every phrase judged present (bias > 0) or absent (bias < 0), whatever the evidence."""
    return PresenceCalibration(("lmm_yes",), (0.0,), (1.0,), (0.0,), bias)


def test_a_phrase_judged_absent_has_no_mask_and_is_named_not_found(pipe):
    pipe.set_presence_calibration(calibration(-20.0))
    early = []
    result = pipe.run(image(), "put the red mug in the bowl", on_objects=early.append)
    assert result.not_found == ["the red mug", "the bowl"] == early[0].not_found
    for obj in result.objects:
        assert not obj.found and obj.presence < 1e-6 and obj.instance == 0
        assert not obj.mask.any() and obj.box == (0, 0, 0, 0) and obj.score == 0.0
    assert result.answer == "there is no red mug. there is no bowl."
    pipe.set_presence_calibration(calibration(20.0))
    result = pipe.run(image(), "put the red mug in the bowl")
    assert result.not_found == [] and all(o.found and o.presence > 0.99 for o in result.objects)


def test_threshold_zero_never_judges_absent(bundle):
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), presence_threshold=0.0, answer=False))
    pipe.set_presence_calibration(calibration(-20.0))
    result = pipe.run(image(), "pick the red mug")
    assert result.objects[0].found and result.objects[0].presence < 1e-6 and result.not_found == []


def test_plural_phrases_give_instances_and_singular_ones_one_object(pipe, bundle):
    pipe.set_presence_calibration(calibration(20.0))
    frame = pipe.encode(image(3))
    result = pipe.run(frame, "pick up all the mugs")
    found = [o for o in result.objects if o.found]
    assert all(o.phrase == "all the mugs" for o in result.objects)
    assert [o.instance for o in found] == list(range(1, len(found) + 1))
    for a in range(len(found)):
        assert found[a].mask.any()
        for b in range(a + 1, len(found)):   # de-duplicated: no two instances are the same object
            inter = ((found[a].mask > 0) & (found[b].mask > 0)).sum()
            assert inter <= 0.5 * min((found[a].mask > 0).sum(), (found[b].mask > 0).sum())
    assert [o.instance for o in pipe.run(frame, "pick up the red mug").objects] == [0]
    off = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), instances="off", answer=False))
    off.set_presence_calibration(calibration(20.0))
    assert [o.instance for o in off.run(frame, "pick up all the mugs").objects] == [0]


def test_the_lmm_answer_source_is_the_lmms_own_answer(bundle):
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), answer_source="lmm", max_new_tokens=6))
    pipe.set_presence_calibration(calibration(-20.0))
    frame = pipe.encode(image())
    assert pipe.run(frame, "pick the red mug").answer == pipe.answer(frame, "pick the red mug")


def test_constrained_decoding_ranks_whole_answers_and_never_uses_a_banned_token(pipe):
    frame = pipe.encode(image(5))
    lmm = pipe.lmm
    free = lmm.generate_ids(frame.lmm, "where is the mug ?", 6)
    scored = lmm.generate_scored(frame.lmm, "where is the mug ?", 6)
    assert scored.ids == free and scored.conflict is None
    # Its log-probability is that of the answer (and EOS, if it ended) under a plain teacher-forced pass.
    ids = lmm._continuation(frame.lmm, "where is the mug ?")
    logp = lmm._token_logprobs(lmm._run_on_cache(frame.lmm, ids + free).last_hidden_state[0], ids + free,
                               [torch.arange(len(ids), len(ids) + len(free))])[0]
    ended = len(free) < 6
    expected = float(logp.sum())
    if ended:
        expected += float(lmm.next_token_logits(frame.lmm, "where is the mug ?",
                                                " " + lmm.tokenizer.decode(free)).log_softmax(-1)[
                                                    lmm.tokenizer.eos_token_id])
    assert scored.logprob == pytest.approx(expected, abs=1e-3)
    banned = free[:2] if free else [lmm.tokenizer.convert_tokens_to_ids("the")]
    constrained = lmm.generate_scored(frame.lmm, "where is the mug ?", 6, [], banned)
    assert not set(constrained.ids) & set(banned) and constrained.conflict == 0
    assert frame.lmm.cache.get_seq_length() == len(frame.lmm.prefix_ids)   # the cached frame is restored


def test_the_bundles_calibration_is_used_and_checked_at_load_time(bundle, tmp_path):
    spec = yaml.safe_load((bundle / BUNDLE_FILE).read_text())
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    spec["presence"] = calibration(3.0).to_spec()
    (copy / BUNDLE_FILE).write_text(yaml.safe_dump(spec))
    assert GroundingPipeline.from_config(PipelineConfig(model=str(copy))).presence_judge.calibration == calibration(3.0)
    spec["presence"]["features"] = ["smell"]
    (copy / BUNDLE_FILE).write_text(yaml.safe_dump(spec))
    with pytest.raises(GroundingError, match="unknown features"):
        GroundingPipeline.from_config(PipelineConfig(model=str(copy)))
    # A bundle without one: the LMM's own yes / no.
    assert not GroundingPipeline.from_config(PipelineConfig(model=str(bundle))).presence_judge.calibration.calibrated


def test_the_bundles_instance_filter_is_used_and_checked_at_load_time(bundle, tmp_path):
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    spec = yaml.safe_load((bundle / BUNDLE_FILE).read_text())
    rule = InstanceCalibration(MASK_FEATURES, (0.5,) * 5, (0.1,) * 5, (0.0, 0.0, 0.0, 0.0, 8.0), 0.0, 0.4)
    spec["instances"] = rule.to_spec()
    (copy / BUNDLE_FILE).write_text(yaml.safe_dump(spec))
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(copy), answer=False))
    assert pipe.instance_calibration == rule
    frame = pipe.encode(image(3))
    with torch.no_grad():
        found = pipe.split_instances(frame, pipe.ground_logits(frame, ["all mugs"]), 0, "all mugs")
    assert all(rule.probability(k.features) >= 0.4 for k in found)
    spec["instances"]["threshold"] = 2.0
    (copy / BUNDLE_FILE).write_text(yaml.safe_dump(spec))
    with pytest.raises(GroundingError, match="threshold"):
        GroundingPipeline.from_config(PipelineConfig(model=str(copy)))
    assert GroundingPipeline.from_config(PipelineConfig(model=str(bundle))).instance_calibration is None


@pytest.mark.parametrize("settings, message", [
    ({"presence_threshold": 1.0}, "presence_threshold"), ({"presence_threshold": -0.1}, "presence_threshold"),
    ({"instances": "some"}, "instances"), ({"max_instances": 0}, "max_instances"),
    ({"relations": "always"}, "relations"), ({"instance_threshold": 1.0}, "instance_threshold"),
    ({"instance_threshold": -0.5}, "instance_threshold"),
    ({"answer_source": "oracle"}, "answer_source")])
def test_bad_trust_settings_are_rejected_clearly(settings, message):
    with pytest.raises(GroundingError, match=message):
        PipelineConfig.from_dict({"model": "x", **settings})


def test_masks_come_before_the_grounded_answer(pipe):
    pipe.set_presence_calibration(calibration(20.0))
    early = []
    result = pipe.run(image(6), "is there a ball?", on_objects=early.append)
    assert early[0].answer == "" and "answer" not in early[0].timings and "answer" in result.timings
    continuation = pipe.lmm.generate(pipe.encode(image(6)).lmm, "is there a ball?", pipe.config.max_new_tokens, "yes")
    assert result.answer == f"yes {continuation}".strip()      # the decision's word once, then the LMM's words


def test_a_bundles_plural_head_grounds_plural_phrases_and_leaves_singular_ones_alone(bundle, tmp_path):
    import shutil

    import torch
    from flmm_ros.grounding.plural_head import PLURAL_HEAD_FILE, write_plural_head
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    main = GroundingPipeline.from_config(PipelineConfig(model=str(copy), answer=False))
    assert main._plural is None
    plural_head = main.head
    with torch.no_grad():
        plural_head.mask_head.conv_seg.bias += 3.0          # a plural head that marks more pixels
    write_plural_head(copy, plural_head)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(copy), answer=False))
    assert pipe._plural is not None and pipe._plural.lmm is pipe.lmm
    assert torch.allclose(pipe._plural.head.mask_head.conv_seg.bias, plural_head.mask_head.conv_seg.bias.half().float())
    assert not torch.equal(pipe._plural.head.mask_head.conv_seg.bias, pipe.head.mask_head.conv_seg.bias)
    for a, b in zip(pipe._plural.head.sam.image_encoder.parameters(), pipe.head.sam.image_encoder.parameters()):
        assert torch.equal(a, b)                            # the frozen encoder is the main head's
    # Singular phrases: the main head, exactly as without a plural head.
    frame_a, frame_b = main.encode(image(2)), pipe.encode(image(2))
    main.set_presence_calibration(calibration(20.0))
    pipe.set_presence_calibration(calibration(20.0))
    mask_a = main.run(frame_a, "pick the red mug").objects[0].mask
    assert (mask_a == pipe.run(frame_b, "pick the red mug").objects[0].mask).all()
    (copy / PLURAL_HEAD_FILE).unlink()
    with pytest.raises(GroundingError, match="plural head"):
        GroundingPipeline.from_config(PipelineConfig(model=str(copy)))
