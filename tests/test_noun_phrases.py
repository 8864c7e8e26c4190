"""Noun phrases of a free answer (grounded conversation): the rules in grounding/noun_phrases.py."""
import pytest

from flmm_ros.grounding.noun_phrases import MAX_WORDS, noun_phrases


def texts(answer):
    return [p.text for p in noun_phrases(answer)]


@pytest.mark.parametrize("answer, expected", [
    # the tabletop model's descriptions: a phrase per object, places dropped
    ("a red mug on the left, a blue bowl in the middle and a ball on the right.",
     ["a red mug", "a blue bowl", "a ball"]),
    ("the red mug is next to the blue bowl", ["the red mug", "the blue bowl"]),
    ("I see two mugs and three balls.", ["two mugs", "three balls"]),
    ("There are 3 cups on the table", ["3 cups", "the table"]),
    ("What should I clean up? The dirty plate behind my laptop.", ["The dirty plate", "my laptop"]),
    # coordination: split only before a starter or a stop word
    ("the black and white cup is here", ["the black and white cup"]),
    ("the mug and the bowl", ["the mug", "the bowl"]),
    ("a big, red mug", ["a big, red mug"]),
    ("the mug and ball", ["the mug and ball"]),
    # "can": a noun before punctuation, a preposition, a conjunction, an auxiliary or the end; else a modal verb
    ("a yellow can on the left and a blue can.", ["a yellow can", "a blue can"]),
    ("the can is red", ["the can"]),
    ("the robot can pick up the red mug", ["the robot", "the red mug"]),
    # "one" after a content word is the head
    ("the red one and the blue one", ["the red one", "the blue one"]),
])
def test_phrases_of_answers(answer, expected):
    assert texts(answer) == expected


@pytest.mark.parametrize("answer", [
    "there is no red mug.",               # negation: an absent thing has no mask
    "it is not a ball",
    "yes", "red", "it is on the left.",   # no starter, or only a place
    "look at the image", "the one on the left",
    "this is it",
])
def test_answers_without_a_visible_thing_give_no_phrase(answer):
    assert texts(answer) == []


def test_spans_index_the_original_text_and_keep_its_case():
    answer = "  The RED mug’s handle, next to  a Blue bowl!"
    phrases = noun_phrases(answer)
    assert [p.text for p in phrases] == ["The RED mug’s handle", "a Blue bowl"]
    for p in phrases:
        assert answer[p.start:p.end] == p.text


def test_a_repeated_phrase_keeps_its_first_occurrence():
    answer = "a blue ball on the left, a blue ball in the middle and A Blue Ball on the right."
    (phrase,) = noun_phrases(answer)
    assert (phrase.start, phrase.end) == (0, len("a blue ball"))


def test_a_phrase_stops_after_max_words():
    answer = "the " + " ".join(["very"] * 10) + " big mug"
    (phrase,) = noun_phrases(answer)
    assert len(phrase.text.split()) == MAX_WORDS
