"""Which phrases get grounded: instruction rules and F-LMM's reasoning recipe."""
import pytest

from flmm_ros.grounding.phrases import (REASONING_ANSWER_PREFIX, REASONING_MAX_NEW_TOKENS, REASONING_SUFFIX,
                                        is_sentence_query, phrases_from_instruction, reasoning_phrase,
                                        reasoning_prompt)
from flmm_ros.grounding.types import GroundingError


@pytest.mark.parametrize("instruction, phrases", [
    # Command and politeness words are stripped.
    ("pick the mug", ["the mug"]),
    ("Please pick up the red mug.", ["the red mug"]),
    ("Can you grab the blue bowl?", ["the blue bowl"]),
    ("please, could you hand me the cup", ["the cup"]),
    ("get me the bottle please", ["the bottle"]),
    ("pick the mug up", ["the mug"]),
    ("show me the box", ["the box"]),
    ("point at the ball", ["the ball"]),
    ("segment the banana", ["the banana"]),
    ("where is the remote?", ["the remote"]),
    ("look at the plant", ["the plant"]),
    ("go and fetch the spoon", ["the spoon"]),
    ("robot, find the keys", ["the keys"]),
    # No command: the whole text is the phrase.
    ("the red mug", ["the red mug"]),
    # Several objects.
    ("pick the mug and the ball", ["the mug", "the ball"]),
    ("grab the mug, the ball and the cup", ["the mug", "the ball", "the cup"]),
    ("pick the mug and 2 plates", ["the mug", "2 plates"]),
    # Coordination inside one noun phrase is kept (no determiner after "and").
    ("grab the black and white cup", ["the black and white cup"]),
    # Placement verbs split at the destination.
    ("put the apple in the bowl", ["the apple", "the bowl"]),
    ("move the cup next to the plate", ["the cup", "the plate"]),
    ("place the bottle on top of the box", ["the bottle", "the box"]),
    ("move the cup to the left of the plate", ["the cup", "the plate"]),
    ("drop the ball into the basket", ["the ball", "the basket"]),
    ("stack the red block on the blue block", ["the red block", "the blue block"]),
    ("place the cup between the mug and the bowl", ["the cup", "the mug", "the bowl"]),
    # ... at the last preposition whose target names something.
    ("put the apple in the bowl on the left", ["the apple", "the bowl on the left"]),
    ("put the ball next to the bowl in the box", ["the ball next to the bowl", "the box"]),
    # Directions only are not objects.
    ("put the cup on the left", ["the cup"]),
    ("move the cup a bit to the left", ["the cup"]),
    ("move the cup left", ["the cup"]),
    ("move the cup on the left to the right", ["the cup on the left"]),
    ("push the box on the right forward", ["the box on the right"]),
    ("give the cup to me", ["the cup"]),
    # Relations that pick one object stay whole with non-placement verbs.
    ("pick the ball next to the bowl", ["the ball next to the bowl"]),
    ("grab the mug on the table", ["the mug on the table"]),
    ("show me the cup behind the laptop", ["the cup behind the laptop"]),
    # Source prepositions separate the container.
    ("take the apple out of the bowl", ["the apple", "the bowl"]),
    ("move the cup from the table to the shelf", ["the cup", "the table", "the shelf"]),
    # Several commands; pronouns are dropped; repeats once.
    ("pick the mug and put it in the sink", ["the mug", "the sink"]),
    ("pick up the mug; then place the spoon in the cup", ["the mug", "the spoon", "the cup"]),
    ("pick the mug and put the mug on the tray", ["the mug", "the tray"]),
    # Case, unicode, spacing, quotes and punctuation.
    ("  PICK   the \t Red  Mug!! ", ["the red mug"]),
    ("pick the café mug", ["the café mug"]),
    ("pick \u201cthe mug\u201d", ["the mug"]),
    ("grab the child\u2019s cup", ["the child's cup"]),
    ("pick the big, red mug", ["the big red mug"]),
])
def test_instruction_rules(instruction, phrases):
    assert phrases_from_instruction(instruction) == phrases


@pytest.mark.parametrize("instruction", ["", "   ", "please", "pick up", "can you please grab", "pick it up",
                                         "put it there", "?!", "move that"])
def test_nothing_to_ground_is_an_error(instruction):
    with pytest.raises(GroundingError, match="no object to ground in"):
        phrases_from_instruction(instruction)


def test_short_queries_are_rewritten_as_flmm_questions():
    """scripts/reason_seg.py: f"What is {instruction} in this image? " + 'Briefly answer ...' (text as given)."""
    assert reasoning_prompt("the red mug") == \
        "What is the red mug in this image? Briefly answer the question in a single sentence."
    assert reasoning_prompt("something to drink from", is_sentence=False) == \
        "What is something to drink from in this image? Briefly answer the question in a single sentence."


def test_sentence_queries_get_the_suffix_without_a_space_as_in_flmm():
    question = "What could I use to cut the bread?"
    assert is_sentence_query(question) and not is_sentence_query("the knife")
    assert reasoning_prompt(question) == question + "Briefly answer the question in a single sentence."
    with pytest.raises(GroundingError):
        reasoning_prompt("  ")


def test_the_query_type_decides_not_the_wording():
    """ReasonSeg labels each query; a labelled type overrides the guess from the text."""
    assert reasoning_prompt("what the man holds", is_sentence=False) == \
        "What is what the man holds in this image? Briefly answer the question in a single sentence."
    assert reasoning_prompt("the thing that keeps food cold", is_sentence=True) == \
        "the thing that keeps food coldBriefly answer the question in a single sentence."


@pytest.mark.parametrize("grounded, phrase", [(" a red mug.", "a red mug"), ("the knife", "the knife"),
                                              (" .", "it"), ("", "it")])
def test_reasoning_mask_is_named_after_its_grounded_tokens(grounded, phrase):
    assert reasoning_phrase(grounded) == phrase


def test_reasoning_constants_are_flmms():
    """scripts/reason_seg.py: answer_prefix='It is', max_new_tokens=16, the brief-answer request."""
    assert (REASONING_ANSWER_PREFIX, REASONING_MAX_NEW_TOKENS) == ("It is", 16)
    assert REASONING_SUFFIX == "Briefly answer the question in a single sentence."
