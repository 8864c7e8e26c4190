"""The spoken answer agrees with the grounding (grounding/answers.py, and its decoding in trust.py)."""
import numpy as np
import pytest

from flmm_ros.grounding.answers import (
    agrees,
    answer_claims,
    banned_words,
    bare,
    grounded_answer,
    place,
    question_kind,
)
from flmm_ros.grounding.types import GroundedObject

H, W = 30, 90


def obj(phrase, x0=None, found=True, instance=0):
    mask = np.zeros((H, W), np.uint8)
    if found and x0 is not None:
        mask[10:20, x0:x0 + 10] = 255
    return GroundedObject(phrase, mask, (0, 0, 0, 0), 0.9 if found else 0.0, found=found, instance=instance)


class Lmm:
    """Records what the answer asked of the LMM; answers `text` after the prefix."""

    def __init__(self, text=""):
        self.text, self.calls = text, []

    def __call__(self, prefix, banned):
        self.calls.append((prefix, banned))
        return self.text


@pytest.mark.parametrize("instruction, kind", [
    ("is there a red mug?", "presence"), ("Are there any mugs", "presence"), ("do you see the ball?", "presence"),
    ("how many mugs are there?", "count"), ("what colour is the mug?", "question"), ("where is the mug", "question"),
    ("pick the red mug", "command"), ("put the apple in the bowl", "command")])
def test_question_kinds(instruction, kind):
    assert question_kind(instruction) == kind


def test_the_readme_demo_answer_follows_the_found_mask():
    """The embedded LMM said "there is no red mug." while masking it; the grounded answer says where it is."""
    red_mug = obj("the red mug", x0=70)
    lmm = Lmm("there is no red mug.")
    answer = grounded_answer("pick the red mug", ["the red mug"], [red_mug], lmm)
    assert answer == "the red mug is on the right." and lmm.calls == []
    assert agrees("pick the red mug", answer, ["the red mug"], [red_mug])
    assert not agrees("pick the red mug", "there is no red mug.", ["the red mug"], [red_mug])


def test_a_phrase_judged_absent_is_said_to_be_absent_whatever_the_lmm_thinks():
    objects = [obj("the apple", x0=5), obj("the green bowl", found=False)]
    answer = grounded_answer("put the apple in the green bowl", ["the apple", "the green bowl"], objects,
                             Lmm("the green bowl is on the left."))
    assert answer == "there is no green bowl."
    assert agrees("put the apple in the green bowl", answer, ["the apple", "the green bowl"], objects)
    assert grounded_answer("grab all the mugs", ["all the mugs"], [obj("all the mugs", found=False)], Lmm()) == \
        "there are no mugs."
    assert grounded_answer("where is the mug?", ["the mug"], [obj("the mug", found=False)], Lmm("left")) == \
        "there is no mug."
    assert grounded_answer("grab every mug", ["every mug"], [obj("every mug", found=False)], Lmm()) == \
        "there is no mug."


def test_yes_no_and_counts_come_from_the_decisions_and_the_lmm_goes_on_from_them():
    lmm = Lmm(", it is on the left.")
    assert grounded_answer("is there a mug?", ["a mug"], [obj("a mug", x0=5)], lmm) == "yes , it is on the left."
    assert lmm.calls == [("yes", [])]
    assert grounded_answer("is there a mug?", ["a mug"], [obj("a mug", found=False)], Lmm()) == "no"
    mugs = [obj("mugs", x0=5, instance=1), obj("mugs", x0=40, instance=2), obj("mugs", x0=75, instance=3)]
    answer = grounded_answer("how many mugs are there?", ["mugs"], mugs, Lmm())
    assert answer == "three" and agrees("how many mugs are there?", answer, ["mugs"], mugs)
    assert not agrees("how many mugs are there?", "two", ["mugs"], mugs)
    assert grounded_answer("how many mugs are there?", ["mugs"], [obj("mugs", found=False)], Lmm()) == "zero"


def test_plural_commands_list_the_instances_places():
    mugs = [obj("all the mugs", x0=75, instance=2), obj("all the mugs", x0=5, instance=1)]
    assert grounded_answer("pick up all the mugs", ["all the mugs"], mugs, Lmm()) == \
        "all the mugs are on the left and on the right."
    every = [obj("every mug", x0=75, instance=2), obj("every mug", x0=5, instance=1)]
    assert grounded_answer("pick up every mug", ["every mug"], every, Lmm()) == \
        "every mug is on the left and on the right."


def test_other_questions_keep_the_lmms_words_without_contradicting_words():
    lmm = Lmm("red")
    mug = obj("the mug", x0=70)
    assert grounded_answer("what colour is the mug?", ["the mug"], [mug], lmm) == "red"
    (prefix, banned), = lmm.calls
    assert prefix == "" and {"no", "not", "left", "middle"} <= set(banned) and "right" not in banned
    assert banned_words(["the mug"], [obj("the mug", x0=40)]).count("middle") == 0


def test_claims_read_back():
    assert answer_claims("is there a mug?", "yes") == (True, None)
    assert answer_claims("is there a mug?", "no, there is not") == (False, None)
    assert answer_claims("how many balls are there?", "there are two balls.") == (True, 2)
    assert answer_claims("pick the mug", "the mug is on the left.") == (True, None)
    assert answer_claims("pick the mug", "I don't see a mug.") == (False, None)


def test_places_and_bare_names():
    mask = np.zeros((H, W), bool)
    mask[:, 0:10] = True
    assert place(mask) == "on the left"
    assert bare("the red mug") == "red mug" and bare("all the mugs") == "mugs" and bare("every mug") == "mug"
