"""Grounded conversation (`phrase_mode: conversation`, `ground_answer`) and region input (`ask_region`) through
GroundingPipeline, on a tiny random-weight bundle (grounding/answer_grounding.py)."""
import dataclasses

import numpy as np
import pytest
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import GROUNDING_PROMPT
from flmm_ros.grounding.pipeline import FrameEncoding, GroundingLogits, GroundingPipeline
from flmm_ros.grounding.region import crop_window
from flmm_ros.grounding.sam.region import segment_region
from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.types import GroundingError

ANSWER = "the red mug is next to the blue bowl ."


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def pipe(bundle):
    return GroundingPipeline.from_config(PipelineConfig(model=bundle, phrase_mode="conversation", max_new_tokens=12))


def image(seed=0, hw=(60, 90)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture
def fixed_answer(pipe, monkeypatch):
    """The LMM 'generates' ANSWER (random weights say random words), so the phrases are known."""
    ids = pipe.lmm.text_ids(ANSWER)
    monkeypatch.setattr(pipe.lmm, "generate_ids", lambda *args, **kwargs: list(ids))
    return ids


# ---- grounded conversation -----------------------------------------------------------------------------------
def test_conversation_mode_grounds_every_noun_phrase_of_the_answer_with_its_span(pipe, fixed_answer):
    handed = []
    result = pipe.run(image(), "describe the table", on_objects=handed.append)
    assert result.answer == ANSWER and result.phrases == ["the red mug", "the blue bowl"]
    assert [o.phrase for o in result.objects] == result.phrases
    for obj in result.objects:
        start, end = obj.answer_span
        assert result.answer[start:end] == obj.phrase
        assert obj.mask.shape == (60, 90) and obj.prompt_tokens is not None
    (early,) = handed                                        # the masks come from the answer: handed over with it
    assert early.answer == ANSWER and len(early.objects) == 2
    for stage in ("answer", "phrases", "phrase_pass", "mask_head", "sam_decoder", "post"):
        assert stage in result.timings


def test_the_masks_come_from_the_answers_own_tokens(pipe, fixed_answer):
    """The same as grounding the given answer text after the instruction, and not the same as grounding the
    phrases alone in F-LMM's grounding prompt (which drops the answer's context)."""
    frame = pipe.encode(image(1))
    result = pipe.run(frame, "describe the table")
    given = pipe.ground_answer(frame, ANSWER, prompt="describe the table")
    assert [o.answer_span for o in given.objects] == [o.answer_span for o in result.objects]
    for a, b in zip(result.objects, given.objects):
        np.testing.assert_array_equal(a.mask, b.mask)
    with torch.no_grad():
        from_answer = pipe.ground_logits(frame, ["the red mug"])   # F-LMM's prompt, phrase alone
        tokens = pipe.lmm.text_ids(ANSWER)
        in_context = pipe.lmm.answer_pass(frame.lmm, "describe the table", tokens, [[0, 1, 2]])
        ours = pipe.head_logits(in_context, frame.lmm.prepared, frame.sam)
    assert (from_answer.coarse - ours.coarse).abs().max() > 1e-4


def test_an_answer_without_a_noun_phrase_gives_no_object_and_no_error(pipe, monkeypatch):
    monkeypatch.setattr(pipe.lmm, "generate_ids", lambda *a, **k: pipe.lmm.text_ids("it is on the left ."))
    result = pipe.run(image(2), "where is the red mug ?")
    assert result.answer == "it is on the left ." and result.objects == [] and result.phrases == []
    assert pipe.ground_answer(pipe.encode(image(2)), "yes").objects == []


def test_conversation_is_a_phrase_mode_and_others_are_refused(bundle):
    assert PipelineConfig(model=bundle, phrase_mode="conversation").phrase_mode == "conversation"
    with pytest.raises(GroundingError, match="phrase_mode 'chat' is not one of"):
        PipelineConfig.from_dict({"model": bundle, "phrase_mode": "chat"})
    field = next(f for f in dataclasses.fields(PipelineConfig) if f.name == "phrase_mode")
    assert "conversation" in field.metadata["choices"] and "conversation" in field.metadata["description"]


# ---- region input ------------------------------------------------------------------------------------------------
def test_a_click_gives_one_object_named_by_the_answer(pipe, fixed_answer):
    frame = pipe.encode(image(3))
    result = pipe.ask_region(frame, point=(45, 30))
    assert result.instruction == GROUNDING_PROMPT and result.answer == ANSWER
    (obj,) = result.objects
    assert result.phrases == [obj.phrase] and obj.mask.shape == (60, 90)
    if obj.answer_span is None:
        assert obj.phrase == "region"
    else:
        assert ANSWER[obj.answer_span[0]:obj.answer_span[1]] == obj.phrase in ("the red mug", "the blue bowl")
    assert not result.frame_cached and "vision" in result.timings
    assert pipe.ask_region(frame, question="what is this ?", box=(10, 10, 40, 50)).frame_cached


def test_the_named_mask_replaces_sams_only_while_it_holds_the_click(pipe, fixed_answer, monkeypatch):
    frame = pipe.encode(image(4))
    sam_mask = (segment_region(pipe.refiner, frame.sam, (45, 30))[0] > 0).numpy()
    monkeypatch.setattr(pipe, "_region_name", lambda found, logits, mask: found[0])     # "the red mug"
    named_coarse = torch.full((1, 60, 90), -10.0)

    def ground_logits(frame, phrases, clock=None):      # F-LMM's grounding of the name: a given mask
        return GroundingLogits(named_coarse, named_coarse.clone(), None)

    named_coarse[0, 5:20, 5:20] = 10.0                   # elsewhere: SAM's mask stays
    monkeypatch.setattr(pipe, "ground_logits", ground_logits)
    far = pipe.ask_region(frame, point=(45, 30)).objects[0]
    np.testing.assert_array_equal(far.mask > 0, sam_mask)
    assert far.phrase == "the red mug" and far.answer_span == (0, 11)
    named_coarse[0, 20:40, 30:60] = 10.0                 # now it holds the click: it is the region's mask
    near = pipe.ask_region(frame, point=(45, 30)).objects[0]
    assert (near.mask > 0).sum() == 15 * 15 + 20 * 30 and near.mask[30, 45] and near.box == (5, 5, 60, 40)


def test_the_lmm_is_asked_about_the_visual_prompt(pipe, fixed_answer, monkeypatch):
    seen = []
    encode = pipe.lmm.encode_frame
    monkeypatch.setattr(pipe.lmm, "encode_frame", lambda img, *a, **k: (seen.append(img), encode(img, *a, **k))[1])
    frame = pipe.encode(image(5))
    seen.clear()
    crop = pipe.ask_region(frame, point=(45, 30), prompting="crop")
    region = segment_region(pipe.refiner, frame.sam, (45, 30))[0] > 0
    ys, xs = np.nonzero(region.numpy())
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if ys.size else (42, 27, 49, 34)
    x0, y0, x1, y1 = crop_window(box, (60, 90))
    np.testing.assert_array_equal(seen[-1], frame.image[y0:y1, x0:x1])
    for prompting in ("marker", "highlight"):
        pipe.ask_region(frame, point=(45, 30), prompting=prompting)
        assert seen[-1].shape == frame.image.shape and not np.array_equal(seen[-1], frame.image)
    count = len(seen)
    pipe.ask_region(frame, point=(45, 30), prompting="none")
    assert len(seen) == count                            # the whole image: the frame's cached encoding
    assert crop.objects[0].mask.shape == (60, 90)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs a point"), ({"point": (100, 3)}, "outside"), ({"box": (5, 5, 5, 9)}, "empty"),
    ({"point": (3, 3), "prompting": "arrow"}, "not one of"), ({"point": (3, 3), "question": ""}, "empty"),
])
def test_bad_region_requests_are_refused_clearly(pipe, kwargs, message):
    with pytest.raises(GroundingError, match=message):
        pipe.ask_region(pipe.encode(image(6)), **kwargs)


def test_region_input_needs_sam_and_a_frame_that_kept_its_image(bundle, pipe):
    plain = GroundingPipeline.from_config(PipelineConfig(model=bundle, refine=False))
    with pytest.raises(GroundingError, match="needs the SAM refiner"):
        plain.ask_region(plain.encode(image()), point=(3, 3))
    frame = pipe.encode(image())
    with pytest.raises(GroundingError, match="FrameEncoding from encode"):
        pipe.ask_region(FrameEncoding(frame.image_hw, frame.lmm, frame.sam), point=(3, 3))
